"""``keyconnector audit verify``: check every hash chain of the audit trail.

Reads the JSON-lines file (``--file``, default ``audit.file``) or the table ``keyconnector_audit``
(``--database``, the configured database) and follows each chain (one per worker process, see
``keyconnector.audit.chain``). Exit 0 with the counts when every chain verifies; exit 1 naming the
first removed, changed or reordered entry and where it is (line number, or row id; chain and seq).
Read-only: it never writes to the file or the database.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

from sqlalchemy import select

from keyconnector.audit.chain import Report, verify
from keyconnector.errors import ConfigurationError, StorageError, UsageError
from keyconnector.ops import Subcommands, add_settings_arguments, load_settings_from
from keyconnector.settings import DatabaseSettings

_COLUMNS = {"chain": "chain", "seq": "seq", "time": "time", "user_id": "user", "outcome": "outcome"}


def _file_items(path: str) -> Iterator[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield f"line {number}", line
    except OSError as exc:
        raise StorageError(f"cannot read the audit file {path}: {exc.strerror or exc}") from None


def _database_items(database: DatabaseSettings) -> Iterator[tuple[str, str]]:
    """Rows in insertion order; a row whose columns disagree with its sealed entry is reported as
    changed (its entry text is altered so that its hash no longer matches)."""
    from keyconnector.audit.dbsink import audit_engine
    from keyconnector.storage.schema import audit

    engine = audit_engine(database)
    try:
        with engine.connect() as connection:
            rows = connection.execution_options(stream_results=True, yield_per=1000).execute(
                select(audit).order_by(audit.c.id)
            )
            for row in rows:
                mapping = row._mapping
                text = str(mapping["entry"])
                try:
                    entry = json.loads(text)
                    if any(
                        str(mapping[column]) != str(entry.get(field)) for column, field in _COLUMNS.items()
                    ):
                        text = text + " (columns changed)"
                    if int(mapping["status"]) != entry.get("status") or mapping["hash"] != entry.get("hash"):
                        text = text + " (columns changed)"
                except (ValueError, AttributeError):
                    pass
                yield f"row id {mapping['id']}", text
    except StorageError:
        raise
    except Exception as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise StorageError(
            f"cannot read the table keyconnector_audit: {first[0][:300] if first else type(exc).__name__}"
        ) from None
    finally:
        engine.dispose()


def cmd_verify(args: argparse.Namespace) -> int:
    if args.file and args.database:
        raise UsageError("--file", "give either --file or --database, not both")
    settings = None
    if not args.file:
        settings = load_settings_from(args).settings
    if args.file:
        where, items = args.file, _file_items(args.file)
    elif args.database or (settings is not None and not settings.audit.file and settings.audit.database):
        assert settings is not None
        where, items = "the table keyconnector_audit", _database_items(settings.database)
    elif settings is not None and settings.audit.file:
        where, items = settings.audit.file, _file_items(settings.audit.file)
    else:
        raise ConfigurationError("audit.file", "is not set: give --file FILE or --database")
    report: Report = verify(items)
    if report.problem is not None:
        more = f" ({report.problems - 1} more problem(s) after it)" if report.problems > 1 else ""
        print(f"audit trail {where}: NOT VERIFIED: {report.problem}{more}")
        return 1
    print(f"audit trail {where}: verified {report.entries} entries in {report.chains} chain(s)")
    return 0


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "audit",
        help="the audit trail of user-key requests",
        description="Commands on the audit trail (see keyConnectorSettings__audit__*).",
    )
    sub = parser.add_subparsers(dest="audit_command", required=True)
    verify_parser = sub.add_parser(
        "verify",
        help="check the hash chains of the audit file or table",
        description=(
            "Follow every hash chain of the audit trail (one per worker process) and report the first "
            "removed, changed or reordered entry with its line number or row id. Exit 0 when every "
            "chain verifies, 1 otherwise. Read-only. Removing the newest entries of a chain cannot be "
            "seen from the trail alone: compare with the 'chain ... ends at seq N' lines of the log."
        ),
    )
    group = verify_parser.add_mutually_exclusive_group()
    group.add_argument("--file", help="a JSON-lines audit file (default: audit.file)")
    group.add_argument("--database", action="store_true", help="the table keyconnector_audit")
    add_settings_arguments(verify_parser)
    verify_parser.set_defaults(func=cmd_verify)
