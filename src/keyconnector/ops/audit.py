"""``keyconnector audit verify``: check the MACs and chains of the audit trail, against every
checkpoint the command can see.

Reads the JSON-lines file (``--file``, default ``audit.file``) or the table ``keyconnector_audit``
(``--database``, the configured database) and hands it to ``keyconnector.audit.verify``. The audit
key comes from the deployment's key ring, so the command needs the deployment's settings (database
and key pair) even for ``--file``. Checkpoints of the verified sink come from the other configured
sink (the table when verifying the file, ``audit.file`` when verifying the table) and from
``--anchor`` tokens copied from the service log. Exit 0 with the counts when everything verifies;
exit 1 naming the first removed, changed, forged or reordered entry and where it is (line number,
or row id; chain and seq); exit 2 when the file cannot be read. ``--json`` prints ``to_document``
(docs/cli.md) instead of the lines. Read-only: it never writes to the file or the database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import select

from keyconnector.audit.chain import KEY_PURPOSE, Checkpoint, Mac
from keyconnector.audit.verify import Expectation, Report, checkpoints_in, verify
from keyconnector.errors import ConfigurationError, KeyConnectorError, StorageError, UsageError
from keyconnector.ops import Subcommands, add_settings_arguments, load_settings_from, open_side
from keyconnector.ops.report import add_json_option, emit_json, wants_json
from keyconnector.runtime.settings import DatabaseSettings, Settings, side_of

TABLE = "the table keyconnector_audit"

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
    from keyconnector.audit.sinks.database import audit_engine
    from keyconnector.storage.sql.schema import audit

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
                    sealed = entry.get("mac", entry.get("hash"))
                    if int(mapping["status"]) != entry.get("status") or mapping["hash"] != sealed:
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


async def _audit_key(settings: Settings) -> tuple[bytes, str]:
    """The audit key and the key ring's anchor, from the ring read-only (nothing is adopted here)."""
    try:
        side = await open_side(side_of(settings), create=False, name="service's")
    except ConfigurationError as exc:
        raise ConfigurationError(
            exc.setting,
            f"{exc.problem} (audit verify checks MACs under a key that comes from the deployment's data "
            "key: give the service's settings with --env-file or --config, or in the environment)",
        ) from None
    try:
        if side.adopted:
            raise StorageError(
                f"there is no keyed audit trail yet: {side.adopted}. The service has not started with this "
                "version, so no entry is keyed; start it (it adopts the existing trail), then verify"
            )
        return side.ring.derive(KEY_PURPOSE), side.ring.anchor
    finally:
        await side.aclose()


def _expectations(texts: list[str]) -> list[Expectation]:
    try:
        return [Expectation.parse(text) for text in texts]
    except ValueError as exc:
        raise UsageError("--expect-seq", str(exc)) from None


def _anchors(texts: list[str], mac: Mac) -> list[Checkpoint]:
    anchors: list[Checkpoint] = []
    for text in texts:
        try:
            anchor = Checkpoint.parse(text)
        except ValueError as exc:
            raise UsageError("--anchor", f"{text[:60]!r} is not an anchor token: {exc}") from None
        if not anchor.authentic(mac):
            raise UsageError(
                "--anchor",
                f"{text[:60]!r}...: its tag does not verify under this deployment's audit key: it was "
                "mistyped, or is not an anchor of this deployment",
            )
        anchors.append(anchor)
    return anchors


def _other_checkpoints(
    name: str, items: Callable[[], Iterable[tuple[str, str]]], mac: Mac, hosts: list[str], notes: list[str]
) -> list[tuple[str, Checkpoint]]:
    """The checkpoints in the other sink, each with where it was found. A sink that cannot be read
    only gives a note: under the threat model that sink is the one the attacker could not touch."""
    try:
        found, refused = checkpoints_in(items(), mac)
    except KeyConnectorError as exc:
        notes.append(f"no checkpoints read from {name}: {exc}")
        return []
    if refused:
        notes.append(f"{refused} checkpoint entr(ies) in {name} do not verify under the audit key: ignored")
    if hosts:
        found = [checkpoint for checkpoint in found if checkpoint.host in hosts]
    return [(f"in {name}, {checkpoint.time}", checkpoint) for checkpoint in found]


@dataclass
class _Trail:
    """One sink's entries as the command reads them: its name, how it is shown, and a reader."""

    sink: str
    where: str
    read: Callable[[], Iterable[tuple[str, str]]]


def _file_trail(path: str) -> _Trail:
    return _Trail("file", path, partial(_file_items, path))


def _table_trail(database: DatabaseSettings) -> _Trail:
    return _Trail("database", TABLE, partial(_database_items, database))


def _trails(args: argparse.Namespace, settings: Settings) -> tuple[_Trail, _Trail | None]:
    """The trail to verify and the other configured sink, where its checkpoints are."""
    config = settings.audit
    path: str | None = args.file or (None if args.database else config.file)
    if path:
        return _file_trail(path), _table_trail(settings.database) if config.database else None
    if args.database or config.database:
        return _table_trail(settings.database), _file_trail(config.file) if config.file else None
    raise ConfigurationError("audit.file", "is not set: give --file FILE or --database")


def _readable(trail: _Trail, args: argparse.Namespace) -> None:
    """A trail file that cannot be opened is the operator's to fix (exit 2, naming ``--file`` or
    ``audit.file``), not a verification that failed (exit 1)."""
    if trail.sink != "file":
        return
    try:
        with open(trail.where, "rb"):
            pass
    except OSError as exc:
        path, detail = trail.where, exc.strerror or str(exc)
        if args.file:
            raise UsageError("--file", f"cannot read the audit file {path}: {detail}") from None
        raise ConfigurationError("audit.file", f"cannot read the audit file {path}: {detail}") from None


def cmd_verify(args: argparse.Namespace) -> int:
    if args.file and args.database:
        raise UsageError("--file", "give either --file or --database, not both")
    expectations = _expectations(args.expect_seq or [])
    settings = load_settings_from(args).settings
    trail, other = _trails(args, settings)
    _readable(trail, args)
    sink, where = trail.sink, trail.where
    key, ring_anchor = asyncio.run(_audit_key(settings))
    mac = Mac(key)
    notes: list[str] = []
    checkpoints: list[tuple[str, Checkpoint]] = []
    for anchor in _anchors(args.anchor or [], mac):
        if anchor.sink != sink:
            notes.append(f"--anchor of the {anchor.sink} sink ignored: this is the {sink} trail")
        checkpoints.append(("--anchor", anchor))
    if other is not None:
        checkpoints.extend(_other_checkpoints(other.where, other.read, mac, args.host or [], notes))
    report: Report = verify(trail.read(), mac, sink=sink, checkpoints=checkpoints, expect=expectations)
    if wants_json(args):
        emit_json(to_document(report, trail, ring_anchor, notes))
    else:
        print("\n".join(_lines(report, where, ring_anchor, notes)))
    return 1 if report.problem is not None else 0


def to_document(report: Report, trail: _Trail, ring_anchor: str, notes: list[str]) -> dict[str, Any]:
    """The ``--json`` document (docs/cli.md, ``## audit verify``)."""
    newest: dict[str, Any] | None = None
    if report.newest is not None:
        source, checkpoint = report.newest
        newest = {"chain": checkpoint.chain, "seq": checkpoint.seq, "found": source}
    return {
        "ok": report.problem is None,
        "trail": trail.where,
        "sink": trail.sink,
        "entries": report.entries,
        "chains": report.chains,
        "keyed": report.keyed,
        "adopted": report.adopted,
        "key_ring_anchor": ring_anchor,
        "problem": report.problem,
        "problems": report.problems,
        "newest_checkpoint": newest,
        "checkpointed_chains": report.checkpoints,
        "notes": notes,
    }


def _lines(report: Report, where: str, ring_anchor: str, notes: list[str]) -> list[str]:
    """The text report: one verdict line, then indented details."""
    lines: list[str] = []
    if report.problem is not None:
        more = f" ({report.problems - 1} more problem(s) after it)" if report.problems > 1 else ""
        lines.append(f"audit trail {where}: NOT VERIFIED: {report.problem}{more}")
    else:
        lines.append(f"audit trail {where}: verified {report.entries} entries in {report.chains} chain(s)")
        lines.append(f"  keyed: {report.keyed} entries, every MAC checked (key ring anchor {ring_anchor})")
        if report.adopted:
            lines.append(
                f"  adopted: {report.adopted} unkeyed entries from before this version, hash-chained only "
                "(accepted up to the heads the adoption record names)"
            )
    if report.newest is not None:
        source, newest = report.newest
        lines.append(
            f"  newest checkpoint: chain {newest.chain} seq {newest.seq} ({source}); "
            f"{report.checkpoints} chain(s) checked against checkpoints"
        )
    elif report.problem is None:
        lines.append(
            "  no checkpoint of this trail seen: entries removed from the end, whole chains or the whole "
            "trail would not show; give --anchor tokens from the service log or --expect-seq"
        )
    lines.extend(f"  note: {note}" for note in notes)
    return lines


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "audit",
        help="the audit trail of user-key requests",
        description="Commands on the audit trail (see keyConnectorSettings__audit__*).",
    )
    sub = parser.add_subparsers(dest="audit_command", required=True)
    verify_parser = sub.add_parser(
        "verify",
        help="check the MACs, chains and checkpoints of the audit file or table",
        description=(
            "Check every entry's MAC under the audit key (from the deployment's data key: give the "
            "service's settings) and follow every chain (one per worker process); report the first "
            "removed, changed, forged or reordered entry with its line number or row id. Checkpoints of "
            "this trail in the other configured sink, and --anchor tokens from the service log, show "
            "entries removed from the end. Exit 0 when everything verifies, 1 when it does not, 2 for a "
            "wrong setting or an audit file that cannot be read, 3 when the database cannot be reached. "
            "Read-only."
        ),
    )
    group = verify_parser.add_mutually_exclusive_group()
    group.add_argument("--file", help="a JSON-lines audit file (default: audit.file)")
    group.add_argument("--database", action="store_true", help="the table keyconnector_audit")
    verify_parser.add_argument(
        "--anchor",
        action="append",
        metavar="TOKEN",
        help="a kc-audit-anchor:1:... token from the service log (repeatable): the chain it names must "
        "reach its seq, with its MAC",
    )
    verify_parser.add_argument(
        "--expect-seq",
        action="append",
        metavar="N|CHAIN:N",
        help="N: the trail holds at least N keyed entries; CHAIN:N: that chain reaches seq N (repeatable)",
    )
    verify_parser.add_argument(
        "--host",
        action="append",
        help="use only the other sink's checkpoints written on this host (repeatable): for several hosts "
        "with their own audit.file sharing one audit table",
    )
    add_settings_arguments(verify_parser)
    add_json_option(verify_parser, "the verification report")
    verify_parser.set_defaults(func=cmd_verify)
