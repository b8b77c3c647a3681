"""``keyconnector stats``: what is in the database, for planning a rotation or a clean-up.

How many users, how many records are in each format (upstream's envelope, still to be bound by
``upgrade-records``, or format 2, bound to the user) and how many each data-key version still has
(a version can only be retired when none is left; records of a format this version does not know
show up as ``unknown`` in both), when users last read their key, and which key pairs wrap each
data-key version. Read-only: it never creates a database, a table or a data key. With the
configured key pair it also authenticates the key ring (``key_ring_authentication``: its anchor, or
why it is refused); without one it still counts (nothing is decrypted).

Its tables are rich's on a terminal and plain aligned text in a pipe or a file (``ops.report``);
``--json`` prints ``to_document``, whose shape ``docs/cli.md`` documents.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from keyconnector.core.envelope import FORMAT_2, LEGACY_VERSION, is_legacy, record_version
from keyconnector.core.keyring import KeyRing, NotAdopted, RingTrust, open_ring, read_ring
from keyconnector.errors import IntegrityFailure, KeyConnectorError, StorageError
from keyconnector.keypairs import open_key_provider
from keyconnector.keypairs.base import algorithm_label
from keyconnector.ops import Subcommands, add_settings_arguments, load_settings_from
from keyconnector.ops.report import add_json_option, colour, emit_json, plain_table, wants_json
from keyconnector.runtime.settings import DatabaseSettings, Settings, side_of
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import Repository
from keyconnector.storage.registry import inspect, open_repository

UNKNOWN = "unknown"
FORMATS = ("upstream", "bound", UNKNOWN)
"""The keys of ``Stats.records_per_format``, always all three (0 included), so a script can wait
for ``upstream`` to reach 0 after ``upgrade-records``."""

LAST_ACCESS_BUCKETS: list[tuple[str, timedelta | None]] = [
    ("24h", timedelta(days=1)),
    ("7d", timedelta(days=7)),
    ("30d", timedelta(days=30)),
    ("90d", timedelta(days=90)),
    ("1y", timedelta(days=365)),
    ("older", None),
]
"""Exclusive buckets: ``7d`` is "more than 24 h and at most 7 days ago". ``never`` comes first."""

BUCKET_LABELS = {
    "never": "never",
    "24h": "within 24 hours",
    "7d": "1 to 7 days ago",
    "30d": "7 to 30 days ago",
    "90d": "30 to 90 days ago",
    "1y": "90 days to 1 year ago",
    "older": "more than 1 year ago",
}

NEVER_LABEL = "never (enrolled, not yet fetched)"
"""Enrolling a key (POST /user-keys) does not set a last access; only a read (GET) does."""

APPLICATION_DATAS = "ApplicationDatas"
KEY_RING = "key ring"

BATCH_SIZE = 5000


@dataclass
class VersionInfo:
    version: int
    state: str
    current: bool
    created: str
    key_pairs: int
    """How many key pairs wrap it: one per fingerprint in the key ring; for version 1 held only in
    ApplicationDatas (a deployment that never rotated), the one key pair of that wrap. A version-1
    wrap in both places is one key pair's (the ring copies ApplicationDatas' wrap when it adopts it)."""
    stored_in: list[str]
    """Where its wraps are: ``key ring`` (keyconnector's table) and/or ``ApplicationDatas``
    (upstream's table, version 1 only); empty for a retired version whose wraps were removed."""
    fingerprints: list[str]
    """The key pairs' fingerprints, from the key ring (upstream's ApplicationDatas wrap names none)."""
    algorithms: list[str] = field(default_factory=list)
    """How each wrap of ``fingerprints`` (same order) was made, e.g. ``RSA-OAEP-256 (SHA-256)``; a
    key pair moving to another wrap algorithm has one wrap per algorithm."""


@dataclass
class Stats:
    database: str
    generated_at: str
    users: int = 0
    with_key: int = 0
    without_key: int = 0
    records_per_version: dict[str, int] = field(default_factory=dict)
    records_per_format: dict[str, int] = field(default_factory=dict)
    """``upstream`` (upstream's envelope, not bound to its user), ``bound`` (format 2) and ``unknown``
    (a format this version cannot read): ``upgrade-records`` is finished when ``upstream`` is 0."""
    last_access: dict[str, int] = field(default_factory=dict)
    """Users per last-access bucket (``never`` first); a read (GET) sets it, an enrolment does not."""
    enrolled_never_fetched: int = 0
    """Users with a key who never fetched it: enrolled (or migrated) and not read since."""
    key_ring_stored: bool = False
    """False for a deployment that never rotated: version 1 is then only the key in ApplicationDatas."""
    key_ring_revision: int = 0
    current_version: int = 1
    application_datas_wrap: bool = False
    """Whether ApplicationDatas holds a wrapped data key (version 1, the one upstream reads)."""
    versions: list[VersionInfo] = field(default_factory=list)
    unbound_records: str = "accepted"
    """Whether the key ring (as stored) accepts upstream-format records: ``accepted`` or ``refused``."""
    key_ring_authentication: str = "not checked"
    """``ok, anchor ...``, ``refused: ...`` or why it was not checked (no key pair)."""


def _bucket(last_access: datetime | None, now: datetime) -> str:
    if last_access is None:
        return "never"
    age = now - last_access
    for name, limit in LAST_ACCESS_BUCKETS:
        if limit is None or age <= limit:
            return name
    return "older"


def _version_of(record: str) -> str:
    try:
        return str(record_version(record))
    except IntegrityFailure:
        return UNKNOWN


def _format_of(record: str) -> str:
    """``upstream`` (what ``upgrade-records`` rewrites), ``bound`` (format 2) or ``unknown``: a
    ``kc:`` marker this version does not know is neither, and counting it as bound would tell an
    operator the upgrade is finished while records remain that nothing here can read."""
    if is_legacy(record):
        return "upstream"
    return "bound" if record.startswith(FORMAT_2) and _version_of(record) != UNKNOWN else UNKNOWN


def _version_order(name: str) -> tuple[bool, int]:
    """Numeric order, ``unknown`` last."""
    return (name == UNKNOWN, int(name) if name.isdigit() else 0)


async def collect(repository: Repository, description: str, now: datetime | None = None) -> Stats:
    """Count everything in one pass over ``UserKeys`` (keyset pagination: no long transaction)."""
    now = now or datetime.now(UTC).replace(tzinfo=None)
    stats = Stats(description, now.strftime("%Y-%m-%dT%H:%M:%SZ"))
    versions: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    async for batch in repository.iter_records(BATCH_SIZE):
        for record in batch:
            stats.users += 1
            buckets[_bucket(record.last_access_date, now)] += 1
            if record.key is None:
                stats.without_key += 1
            else:
                stats.with_key += 1
                if record.last_access_date is None:
                    stats.enrolled_never_fetched += 1
                versions[_version_of(record.key)] += 1
                formats[_format_of(record.key)] += 1
    stats.records_per_version = {name: versions[name] for name in sorted(versions, key=_version_order)}
    stats.records_per_format = {name: formats[name] for name in FORMATS}
    stats.last_access = {name: buckets[name] for name in BUCKET_LABELS}
    ring: KeyRing = await read_ring(repository)
    stats.unbound_records = "accepted" if ring.accept_legacy else "refused"
    stats.key_ring_stored = ring.revision > 0
    stats.key_ring_revision = ring.revision
    stats.current_version = ring.current
    stats.application_datas_wrap = await repository.get_wrapped_data_key() is not None
    stats.versions = []
    for number, entry in sorted(ring.versions.items()):
        in_datas = number == LEGACY_VERSION and stats.application_datas_wrap
        stored_in = ([KEY_RING] if entry.wraps else []) + ([APPLICATION_DATAS] if in_datas else [])
        key_pairs = len(entry.wraps) or (1 if in_datas else 0)
        stats.versions.append(
            VersionInfo(
                number,
                entry.state,
                number == ring.current,
                entry.created,
                key_pairs,
                stored_in,
                sorted(entry.wraps),
                [algorithm_label(fp) for fp in sorted(entry.wraps)],
            )
        )
    return stats


async def gather_stats(
    database: DatabaseSettings, prefix: str = "database", settings: Settings | None = None
) -> Stats:
    """Statistics of the database, which must exist already (it is never created here); with
    ``settings`` (their key pair), the key ring is also authenticated, read-only, and their
    ``caCertificatesDirectory`` is trusted for the database's TLS."""
    trust = Trust.from_settings(settings) if settings is not None else None
    state = inspect(database, prefix, trust=trust)
    if not state.has_schema:
        raise StorageError(f"no Key Connector data to count: {state.description}")
    repository = await open_repository(database, prefix, trust=trust)
    try:
        stats = await collect(repository, state.description)
        if settings is not None:
            stats.key_ring_authentication = await authenticate_ring(repository, settings)
        return stats
    finally:
        await repository.aclose()


async def authenticate_ring(repository: Repository, settings: Settings) -> str:
    """One line on the stored ring, checked with the configured key pair without writing anything."""
    if settings.rsa_key is None or not settings.rsa_key.provider:
        return "not checked: no key pair configured"
    try:
        provider = await open_key_provider(side_of(settings))
    except KeyConnectorError as exc:
        return f"not checked: the key pair is not available: {exc}"
    try:
        opened = await open_ring(
            repository, provider, trust=RingTrust(anchor=settings.key_ring_anchor), adopt=False
        )
    except NotAdopted as exc:
        return f"none yet: {exc}"
    except IntegrityFailure as exc:
        return f"refused: {exc}"
    except KeyConnectorError as exc:
        return f"not checked: {exc}"
    finally:
        await provider.aclose()
    if opened.adopted:
        return f"not adopted yet: {opened.adopted}"
    return f"ok, revision {opened.ring.revision}, anchor {opened.ring.anchor}"


def to_document(stats: Stats) -> dict[str, Any]:
    """The ``--json`` document (docs/cli.md, ``## stats``): ``ok`` and every field of ``Stats``."""
    return {"ok": True, **asdict(stats)}


Section = tuple[str, list[str], list[list[str]]]
"""A table of the text output: its title, column headers and rows (cells already formatted)."""


def _sections(stats: Stats) -> list[Section]:
    """The tables of the text output, the same on a terminal (rich) and in a pipe (plain text)."""
    users: Section = (
        "users",
        ["", "count"],
        [
            ["rows in UserKeys", f"{stats.users:,}"],
            ["with a key", f"{stats.with_key:,}"],
            ["without a key", f"{stats.without_key:,}"],
        ],
    )
    per_format = stats.records_per_format
    formats: Section = (
        "records per format",
        ["format", "records"],
        [
            ["upstream's (not bound to the user)", f"{per_format.get('upstream', 0):,}"],
            ["format 2 (bound to the user)", f"{per_format.get('bound', 0):,}"],
            ["unknown format", f"{per_format.get(UNKNOWN, 0):,}"],
        ],
    )
    versions: Section = (
        "records per data-key version",
        ["version", "records"],
        [
            ["unknown format" if version == UNKNOWN else version, f"{count:,}"]
            for version, count in stats.records_per_version.items()
        ],
    )
    access_rows = []
    for name, label in BUCKET_LABELS.items():
        count = stats.last_access.get(name, 0)
        share = 100.0 * count / stats.users if stats.users else 0.0
        access_rows.append([NEVER_LABEL if name == "never" else label, f"{count:,}", f"{share:5.1f}%"])
    access: Section = ("last access", ["when", "users", "share"], access_rows)
    ring_rows = [
        [
            str(entry.version),
            entry.state + (" (current)" if entry.current else ""),
            entry.created or "-",
            str(entry.key_pairs),
            ", ".join(entry.stored_in) or "-",
            ", ".join(entry.fingerprints) or "-",
            ", ".join(_algorithms(entry)) or "-",
        ]
        for entry in stats.versions
    ]
    ring: Section = (
        "key ring" + ("" if stats.key_ring_stored else " (never rotated: no ring stored)"),
        ["version", "state", "created", "key pairs", "stored in", "fingerprints", "algorithm"],
        ring_rows,
    )
    return [users, formats, versions, access, ring]


def _algorithms(entry: VersionInfo) -> list[str]:
    """The ring's wraps' algorithms, then ApplicationDatas' (always upstream's RSA-OAEP with SHA-1)."""
    return entry.algorithms + (
        ["RSA-OAEP (SHA-1) in ApplicationDatas"] if APPLICATION_DATAS in entry.stored_in else []
    )


def _notes(stats: Stats) -> list[str]:
    """The lines after the tables."""
    notes = []
    if stats.enrolled_never_fetched:
        notes.append(
            f"{stats.enrolled_never_fetched:,} user(s) enrolled a key and never fetched it: enrolling "
            "(POST /user-keys) is not an access, so they count as never"
        )
    if any(entry.stored_in == [APPLICATION_DATAS] for entry in stats.versions):
        notes.append(
            "version 1 is stored only in ApplicationDatas (upstream's table), wrapped by one key pair; "
            "the key ring records fingerprints from the first rotation on"
        )
    wrap = "holds" if stats.application_datas_wrap else "does not hold"
    notes.append(f"ApplicationDatas {wrap} a wrapped data key (version 1, as upstream reads it)")
    notes.append(f"key ring authentication: {stats.key_ring_authentication}")
    notes.append(f"upstream-format records: {stats.unbound_records} by the key ring")
    return notes


def render(stats: Stats, stream: IO[str] | None = None) -> None:
    """Tables for people: rich's on a terminal (colour unless ``NO_COLOR``), plain aligned text
    otherwise, so a pipe or a file gets no box drawing and no line cut at 80 columns."""
    out = stream or sys.stdout
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty():
        _render_rich(stats, out)
        return
    lines = [f"database: {stats.database}", f"counted at {stats.generated_at}"]
    for title, headers, rows in _sections(stats):
        lines += ["", title, plain_table(headers, rows)]
    lines.append("")
    lines += _notes(stats)
    out.write("\n".join(lines) + "\n")
    out.flush()


def _render_rich(stats: Stats, out: IO[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, no_color=not colour(out))
    console.print(f"database: {stats.database}", soft_wrap=True)
    console.print(f"counted at {stats.generated_at}")
    for title, headers, rows in _sections(stats):
        table = Table(title=title)
        for index, header in enumerate(headers):
            numeric = index > 0 and header in ("count", "records", "users", "share", "key pairs")
            table.add_column(header, justify="right" if numeric else "left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in _notes(stats):
        console.print(note, soft_wrap=True)


def cmd_stats(args: argparse.Namespace) -> int:
    settings = load_settings_from(args).settings
    stats = asyncio.run(gather_stats(settings.database, settings=settings))
    if wants_json(args):
        emit_json(to_document(stats))
    else:
        render(stats)
    return 0


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "stats",
        help="count users, records per format and per data-key version, last access and key-ring versions "
        "(read-only)",
        description=(
            "Read-only statistics of the configured database: users with and without a key, records "
            "per format (upstream's, bound to the user, unknown) and per data-key version, when users last "
            "read their key, and the key ring (authenticated with the configured key pair, if any). Never "
            "creates anything. Tables on a terminal, plain aligned text in a pipe, one JSON document with "
            "--json. Exit 1 when the database has no Key Connector data yet, 3 when it cannot be reached."
        ),
    )
    add_settings_arguments(parser)
    add_json_option(parser, "the statistics")
    parser.set_defaults(func=cmd_stats)
