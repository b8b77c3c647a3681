"""``keyconnector stats``: what is in the database, for planning a rotation or a clean-up.

How many users, how many records are in each format (upstream's envelope, still to be bound by
``upgrade-records``, or format 2, bound to the user) and how many each data-key version still has
(a version can only be retired when none is left; records of a format this version does not know
show up as ``unknown`` in both), when users last read their key, and which key pairs wrap each
data-key version. Read-only: it never creates a database, a table or a data key. With the
configured key pair it also authenticates the key ring (``key_ring_authentication``: its anchor, or
why it is refused); without one it still counts (nothing is decrypted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

from keyconnector.core.envelope import FORMAT_2, LEGACY_VERSION, is_legacy, record_version
from keyconnector.core.keyring import KeyRing, NotAdopted, RingTrust, open_ring, read_ring
from keyconnector.errors import IntegrityFailure, KeyConnectorError, StorageError
from keyconnector.keypairs import open_key_provider
from keyconnector.keypairs.base import algorithm_label
from keyconnector.ops import Subcommands, add_settings_arguments, load_settings_from
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

BATCH_SIZE = 5000


@dataclass
class VersionInfo:
    version: int
    state: str
    current: bool
    created: str
    key_pairs: int
    """How many key pairs' wraps the key ring holds for it (fingerprints are not secret; a key pair
    moving to another wrap algorithm counts once per algorithm, see ``algorithms``). Version 1
    is also wrapped in ApplicationDatas (``Stats.application_datas_wrap``), not counted here: which
    key pair made that wrap cannot be known without trying it."""
    fingerprints: list[str]
    algorithms: list[str] = field(default_factory=list)
    """How each wrap of ``fingerprints`` (same order) was made, e.g. ``RSA-OAEP-256 (SHA-256)``."""


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
    stats.versions = [
        VersionInfo(
            number,
            entry.state,
            number == ring.current,
            entry.created,
            len(entry.wraps),
            sorted(entry.wraps),
            [algorithm_label(fp) for fp in sorted(entry.wraps)],
        )
        for number, entry in sorted(ring.versions.items())
    ]
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


def to_json(stats: Stats) -> str:
    return json.dumps(asdict(stats), indent=2)


def render(stats: Stats) -> None:
    """Tables for people (rich prints plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout)
    console.print(f"database: {stats.database}")
    console.print(f"counted at {stats.generated_at}")

    users = Table(title="users")
    users.add_column("", style="bold")
    users.add_column("count", justify="right")
    users.add_row("rows in UserKeys", f"{stats.users:,}")
    users.add_row("with a key", f"{stats.with_key:,}")
    users.add_row("without a key", f"{stats.without_key:,}")
    console.print(users)

    formats = Table(title="records per format")
    formats.add_column("format")
    formats.add_column("records", justify="right")
    formats.add_row("upstream's (not bound to the user)", f"{stats.records_per_format.get('upstream', 0):,}")
    formats.add_row("format 2 (bound to the user)", f"{stats.records_per_format.get('bound', 0):,}")
    formats.add_row("unknown format", f"{stats.records_per_format.get(UNKNOWN, 0):,}")
    console.print(formats)

    versions = Table(title="records per data-key version")
    versions.add_column("version")
    versions.add_column("records", justify="right")
    for version, count in stats.records_per_version.items():
        label = "unknown format" if version == UNKNOWN else version
        versions.add_row(label, f"{count:,}")
    console.print(versions)

    access = Table(title="last access")
    access.add_column("when")
    access.add_column("users", justify="right")
    access.add_column("share", justify="right")
    for name, label in BUCKET_LABELS.items():
        count = stats.last_access.get(name, 0)
        share = 100.0 * count / stats.users if stats.users else 0.0
        access.add_row(label, f"{count:,}", f"{share:.1f}%")
    console.print(access)

    ring = Table(title="key ring" + ("" if stats.key_ring_stored else " (never rotated: no ring stored)"))
    ring.add_column("version")
    ring.add_column("state")
    ring.add_column("created")
    ring.add_column("key pairs", justify="right")
    ring.add_column("fingerprints")
    ring.add_column("algorithm")
    for entry in stats.versions:
        state = entry.state + (" (current)" if entry.current else "")
        wraps, algorithms = list(entry.fingerprints), list(entry.algorithms)
        if entry.version == LEGACY_VERSION and stats.application_datas_wrap:
            wraps.append("ApplicationDatas")
            algorithms.append("upstream's")
        ring.add_row(
            str(entry.version),
            state,
            entry.created or "-",
            str(entry.key_pairs),
            "\n".join(wraps),
            "\n".join(algorithms),
        )
    console.print(ring)
    wrap = "holds" if stats.application_datas_wrap else "does not hold"
    console.print(f"ApplicationDatas {wrap} a wrapped data key (version 1, as upstream reads it)")
    console.print(f"key ring authentication: {stats.key_ring_authentication}")
    console.print(f"upstream-format records: {stats.unbound_records} by the key ring")


def cmd_stats(args: argparse.Namespace) -> int:
    settings = load_settings_from(args).settings
    stats = asyncio.run(gather_stats(settings.database, settings=settings))
    if args.json:
        print(to_json(stats))
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
            "creates anything. Exit 1 when the database has no Key Connector data yet."
        ),
    )
    add_settings_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.set_defaults(func=cmd_stats)
