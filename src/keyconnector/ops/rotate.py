"""``keyconnector rotate-key-pair`` and ``keyconnector rotate-data-key``: rotation without downtime.

Key pair: the data keys do not change, only who can unwrap them. Every active data-key version
gets a second wrap, made by the new key pair, in one compare-and-swap of the key ring (see
``keyconnector.core.keyring``), so the time does not depend on the number of users. Instances still
running with the old settings keep using their own wraps; instances restarted with the new
settings find theirs by the key pair's fingerprint. Once every instance runs with the new settings,
``--retire-old`` (run with the new settings) removes the old pair's wraps and puts the new pair's
wrap of version 1 into upstream's ``ApplicationDatas``.

Data key: a new version N+1 is made current; after a settle time (every running instance has
reloaded the ring by then and seals new records with N+1), every record still on an older version
is re-encrypted in batches, each record by compare-and-swap on its old value, so a client's
concurrent PUT always wins. Passes repeat until one finds nothing left to do; that last pass has
also opened every record, which is the verification. Only then are the old versions retired.

Resuming (after SIGKILL, a crash or Ctrl-C) follows one rule: a rotation is unfinished while the
ring has an active version besides the current one. A run then makes no new version; it waits
what remains of the current version's settle time (from the version's creation time in the ring),
re-encrypts what is left, verifies and retires. Only when the current version is the only active
one does a run make the next. Records that do not decrypt are left untouched, listed, and keep
their version active (so later runs finish the same rotation until they are repaired or deleted).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO
from uuid import UUID

from keyconnector.core.envelope import DataKeys, record_version
from keyconnector.core.keyring import (
    KeyRing,
    add_key_pair,
    load_key_set,
    retire_other_key_pairs,
    retire_versions,
    start_data_key_version,
)
from keyconnector.errors import ConfigurationError, IntegrityFailure, KeyConnectorError, UsageError
from keyconnector.keypairs import KeyProvider, open_key_provider
from keyconnector.ops import (
    OperationFailed,
    Side,
    Subcommands,
    add_settings_arguments,
    load_settings_from,
    load_target_settings,
    open_side,
)
from keyconnector.ops.outcome import finish
from keyconnector.ops.progress import Progress
from keyconnector.ops.report import add_json_option, wants_json
from keyconnector.runtime.assemble import open_key_pair
from keyconnector.runtime.settings import Settings, side_of
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import RecordUpdate, Repository
from keyconnector.storage.registry import migrate, open_repository

SETTLE_MARGIN = 5.0
"""Seconds added to the services' ring refresh delay before a new version is relied on."""
MAX_PASSES = 20
"""A pass only finds work when clients wrote with an old version meanwhile; more means something is wrong."""


def add_commands(commands: Subcommands) -> None:
    pair = commands.add_parser(
        "rotate-key-pair",
        help="wrap the data keys for a new key pair (online), or retire the old pair",
        description=(
            "Without --retire-old: the configured key pair unwraps every active data-key version and the "
            "new pair (--target-env-file/--target-config, or the transferTo__rsaKey__* and "
            "transferTo__certificate__* settings) wraps each; both wraps are kept, so instances with "
            "either settings work. With --retire-old, run with the NEW key pair as the configured one "
            "once every instance uses it: other pairs' wraps are removed and ApplicationDatas gets the "
            "new pair's wrap. Both are idempotent."
        ),
    )
    add_settings_arguments(pair, target=True)
    pair.add_argument(
        "--retire-old",
        action="store_true",
        help=(
            "remove every wrap not made by the configured key pair: run it with the NEW pair's settings "
            "(with the old ones it would undo the rotation)"
        ),
    )
    _add_dry_run(
        pair,
        "open both key pairs and the key ring, prove the new pair wraps and unwraps every active data "
        "key (with --retire-old: that the configured pair opens every version), but write nothing",
    )
    add_json_option(pair, "the summary (versions wrapped, key pairs removed)")
    pair.set_defaults(func=cmd_rotate_key_pair)

    data = commands.add_parser(
        "rotate-data-key",
        help="make a new data-key version and re-encrypt every record with it (online, resumable)",
        description=(
            "Makes data-key version N+1 current, waits --settle-seconds for running instances to load "
            "it, re-encrypts every record on an older version in batches (a client's concurrent write "
            "wins), verifies every record, and retires the old versions. Run it again after an "
            "interruption: an unfinished rotation is finished, no new version is made. Exit 1 lists "
            "the users whose records do not decrypt (left untouched; their version is kept)."
        ),
    )
    add_settings_arguments(data)
    data.add_argument("--batch-size", type=_positive_int, default=2000, help="records per transaction")
    data.add_argument(
        "--settle-seconds",
        type=_non_negative_float,
        help="wait before re-encrypting (default: keyRingRefreshSeconds + lastAccessFlushSeconds + 5)",
    )
    data.add_argument(
        "--max-rate",
        type=_positive_float,
        help="records examined per second at most, to spare a busy database (default: no limit)",
    )
    _add_dry_run(
        data,
        "open the key ring, refuse as the real run would (another key pair's wraps still active), and "
        "count the records that would be re-encrypted, but write nothing and wait for nothing",
    )
    add_json_option(data, "the summary (versions, records re-encrypted, failed user ids)")
    data.set_defaults(func=cmd_rotate_data_key)


def _add_dry_run(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--dry-run", action="store_true", help=what)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


# -- rotate-key-pair -------------------------------------------------------------------------------------


@dataclass
class KeyPairRotation:
    """What ``rotate-key-pair`` did (or, with ``dry_run``, would do), for its summary."""

    dry_run: bool
    retire_old: bool
    configured: str
    """The configured key pair's fingerprint."""
    new: str | None
    """The new key pair's fingerprint (None with ``--retire-old``)."""
    active: list[int]
    wrapped: list[int] = field(default_factory=list)
    """Data-key versions newly wrapped by the new pair."""
    removed: list[str] = field(default_factory=list)
    """Fingerprints of the key pairs whose wraps were removed (``--retire-old``)."""
    application_datas_updated: bool = False
    revision: int = 0
    """The key ring's revision afterwards (with ``dry_run``: as it is; 0: no ring stored yet)."""

    def document(self) -> dict[str, object]:
        """``rotate-key-pair --json`` (docs/cli.md, section rotate-key-pair)."""
        return {
            "dry_run": self.dry_run,
            "retire_old": self.retire_old,
            "configured_key_pair": self.configured,
            "new_key_pair": self.new,
            "active_versions": self.active,
            "wrapped_versions": self.wrapped,
            "removed_key_pairs": self.removed,
            "application_datas_updated": self.application_datas_updated,
            "ring_revision": self.revision,
        }


def cmd_rotate_key_pair(args: argparse.Namespace) -> int:
    settings = load_settings_from(args).settings
    out = None if wants_json(args) else sys.stdout
    if args.retire_old:
        if args.target_env_file or args.target_config:
            raise UsageError(
                "--retire-old",
                "--retire-old takes the NEW key pair as the configured one (--config/--env-file), "
                "not --target-env-file/--target-config",
            )
        result = asyncio.run(retire_key_pair(settings, out, dry_run=args.dry_run))
    else:
        result = asyncio.run(rotate_key_pair(settings, load_target_settings(args), out, dry_run=args.dry_run))
    return finish(args, "rotate-key-pair", result.document(), [])


async def open_new_key_pair(settings: Settings, target: Settings | None) -> KeyProvider:
    """The new key pair, opened and proven by a round trip before anything else happens: the
    target settings' own, or else ``settings``' ``transferTo`` one."""
    new = side_of(target) if target is not None else side_of(settings, transfer=True)
    if new.rsa_key is None:
        raise ConfigurationError(
            "transferTo.rsaKey.provider",
            "is not set: name the new key pair with --target-env-file, --target-config or the "
            "transferTo__rsaKey__* and transferTo__certificate__* settings",
        )
    return await open_key_pair(new)


async def rotate_key_pair(
    settings: Settings, target: Settings | None, out: TextIO | None, *, dry_run: bool = False
) -> KeyPairRotation:
    """Add the new key pair's wraps (none on a re-run). ``dry_run``: the same checks (both pairs
    opened, every active version unwrapped and wrapped again by the new pair, the ring read and
    authenticated), nothing written, not even the schema."""
    new = await open_new_key_pair(settings, target)
    try:
        side = await open_side(side_of(settings), create=not dry_run)
        try:
            old = side.provider
            if new.fingerprint == old.fingerprint:
                _say(
                    out,
                    "rotate-key-pair: nothing to do, the new key pair is the configured one "
                    f"({old.fingerprint})",
                )
                return KeyPairRotation(
                    dry_run,
                    False,
                    old.fingerprint,
                    new.fingerprint,
                    side.ring.active,
                    revision=side.ring.revision,
                )
            ring, added = await add_key_pair(side.repository, old, new, dry_run=dry_run)
        finally:
            await side.aclose()
    finally:
        await new.aclose()
    result = KeyPairRotation(
        dry_run, False, old.fingerprint, new.fingerprint, ring.active, added, revision=ring.revision
    )
    versions = ", ".join(map(str, ring.active))
    if added:
        _say(
            out,
            f"rotate-key-pair{' --dry-run' if dry_run else ''}: data-key version(s) "
            f"{', '.join(map(str, added))} {'would also be' if dry_run else 'now also'} wrapped by "
            f"{new.fingerprint} "
            f"({new.description}); the wraps of {old.fingerprint} are kept "
            f"(key ring revision {ring.revision})",
        )
    else:
        _say(
            out,
            f"rotate-key-pair: nothing to do, version(s) {versions} already wrapped by {new.fingerprint}",
        )
    if not dry_run:
        _say(
            out,
            "next: restart every instance with the new key pair's settings, then run "
            "`keyconnector rotate-key-pair --retire-old` with those settings",
        )
    return result


async def retire_key_pair(
    settings: Settings, out: TextIO | None, *, dry_run: bool = False
) -> KeyPairRotation:
    """Remove the other key pairs' wraps (none on a re-run). ``dry_run``: the same refusal when the
    configured pair lacks a version, what would be removed, nothing written."""
    # Not open_side: it would unwrap every version with the configured pair and fail with that
    # pair's own error, where the refusal below says what to run first.
    provider = await open_key_provider(side_of(settings))
    try:
        await provider.check()
        trust = Trust.from_settings(settings)
        if not dry_run:
            migrate(settings.database, trust=trust)
        repository = await open_repository(settings.database, trust=trust)
        try:
            retirement = await retire_other_key_pairs(repository, provider, dry_run=dry_run)
        finally:
            await repository.aclose()
    finally:
        await provider.aclose()
    ring = retirement.ring
    result = KeyPairRotation(
        dry_run,
        True,
        provider.fingerprint,
        None,
        ring.active,
        removed=retirement.removed,
        application_datas_updated=retirement.application_datas_updated,
        revision=ring.revision,
    )
    name = f"rotate-key-pair --retire-old{' --dry-run' if dry_run else ''}"
    if retirement.removed:
        _say(
            out,
            f"{name}: {'would remove' if dry_run else 'removed'} the wraps of "
            f"{', '.join(retirement.removed)}; "
            f"data-key version(s) {', '.join(map(str, ring.active))} "
            f"{'would be' if dry_run else 'are'} wrapped by {provider.fingerprint} only",
        )
    else:
        _say(out, f"{name}: no other key pair's wraps to remove ({provider.fingerprint})")
    if retirement.application_datas_updated:
        _say(
            out,
            f"ApplicationDatas {'would hold' if dry_run else 'now holds'} data-key version 1 wrapped by the "
            "configured key pair",
        )
    return result


# -- rotate-data-key -------------------------------------------------------------------------------------


def settle_time(settings: Settings, given: float | None) -> float:
    """How long a ring change takes to reach every running service (unless the operator said).

    A service looks at the ring on its access-flush tick once the refresh interval has passed."""
    if given is not None:
        return given
    return settings.key_ring_refresh_seconds + settings.last_access_flush_seconds + SETTLE_MARGIN


def cmd_rotate_data_key(args: argparse.Namespace) -> int:
    settings = load_settings_from(args).settings
    out = None if wants_json(args) else sys.stdout
    if args.dry_run:
        result = asyncio.run(plan_data_key_rotation(settings, batch_size=args.batch_size, out=out))
    else:
        settle = settle_time(settings, args.settle_seconds)
        result = asyncio.run(
            run_data_key_rotation(
                settings,
                batch_size=args.batch_size,
                settle_seconds=settle,
                max_rate=args.max_rate,
                out=out,
            )
        )
    return finish(args, "rotate-data-key", result.document(), [], rotation_failure(result))


@dataclass
class PassResult:
    examined: int = 0
    opened: int = 0
    """Records that decrypted (whatever their version): the verification."""
    rewritten: int = 0
    conflicts: int = 0
    """Re-encrypted records that a client replaced meanwhile (the client's value was kept)."""
    from_versions: Counter[int] = field(default_factory=Counter)
    in_use: set[int] = field(default_factory=set)
    """Data-key versions the records needed when this pass read them."""
    unreadable_format: bool = False
    failed: dict[UUID, str] = field(default_factory=dict)

    @property
    def work(self) -> int:
        return self.rewritten + self.conflicts


@dataclass
class DataKeyRotation:
    current: int
    made: bool
    rewritten: int
    from_versions: Counter[int]
    passes: int
    verified: int
    retired: list[int] | None
    """None only in a dry run with records that do not decrypt (their versions stay; which those
    are, only the real run's last pass knows)."""
    failed: dict[UUID, str]
    seconds: float
    dry_run: bool = False
    finishing: bool = False
    """No new version: an unfinished rotation (to ``current``) is finished."""

    @property
    def rate(self) -> float:
        return self.rewritten / self.seconds if self.seconds > 0 else 0.0

    def document(self) -> dict[str, object]:
        """``rotate-data-key --json`` (docs/cli.md, section rotate-data-key)."""
        return {
            "dry_run": self.dry_run,
            "current_version": self.current,
            "made_version": self.current if self.made else None,
            "finishing": self.finishing,
            "rewritten": self.rewritten,
            "from_versions": {str(version): n for version, n in sorted(self.from_versions.items())},
            "passes": self.passes,
            "verified": self.verified,
            "retired_versions": self.retired,
            "failed": [str(user) for user in sorted(self.failed)],
            "seconds": round(self.seconds, 3),
        }


def rotation_failure(result: DataKeyRotation) -> OperationFailed | None:
    """The error of a rotation with records that do not decrypt, if any."""
    if not result.failed:
        return None
    reason = next(iter(result.failed.values()))
    if result.dry_run:
        return OperationFailed(
            "rotate-data-key --dry-run: records that do not decrypt (the real run would leave them as "
            f"they are and keep their data-key version(s); first reason: {reason})",
            sorted(result.failed),
        )
    return OperationFailed(
        "rotate-data-key: records that do not decrypt were left as they are and their data-key "
        f"version(s) kept (first reason: {reason})",
        sorted(result.failed),
    )


async def rotate_data_key(
    settings: Settings,
    *,
    batch_size: int = 2000,
    settle_seconds: float = 15.0,
    max_rate: float | None = None,
    out: TextIO | None = None,
) -> DataKeyRotation:
    """The whole rotation (see the module's docstring); raises ``OperationFailed`` listing the users
    whose records do not decrypt, after doing everything else."""
    result = await run_data_key_rotation(
        settings, batch_size=batch_size, settle_seconds=settle_seconds, max_rate=max_rate, out=out
    )
    failure = rotation_failure(result)
    if failure is not None:
        raise failure
    return result


async def run_data_key_rotation(
    settings: Settings,
    *,
    batch_size: int = 2000,
    settle_seconds: float = 15.0,
    max_rate: float | None = None,
    out: TextIO | None = None,
) -> DataKeyRotation:
    """``rotate_data_key`` without raising for records that do not decrypt (``result.failed``)."""
    side = await open_side(side_of(settings))
    try:
        result = await _rotate(side, batch_size, settle_seconds, max_rate, out)
    finally:
        await side.aclose()
    if out is not None:
        _report(result, out)
    return result


async def plan_data_key_rotation(
    settings: Settings, *, batch_size: int = 2000, out: TextIO | None = None
) -> DataKeyRotation:
    """What ``rotate_data_key`` would do, with nothing written (not even a schema migration) and no
    settle time: the same refusal (another key pair's wraps still active), the version it would make
    (its key wrapped and unwrapped once by the key pair) or the unfinished rotation it would finish,
    and one pass that opens every record and counts those on another version."""
    side = await open_side(side_of(settings), create=False)
    try:
        ring, made = await start_data_key_version(side.repository, side.provider, dry_run=True)
        current = ring.current
        started = time.monotonic()

        def count(record: str, version: int, plaintext: bytes, user_id: UUID) -> str | None:
            if version != current:
                counted[version] += 1
            return None

        counted: Counter[int] = Counter()
        last = await _pass(
            side.repository, side.keys, batch_size, None, 1, rewrite=count, description="counting"
        )
    finally:
        await side.aclose()
    clean = not last.failed and not last.unreadable_format
    result = DataKeyRotation(
        current=current,
        made=made is not None,
        rewritten=sum(counted.values()),
        from_versions=counted,
        passes=1,
        verified=last.opened,
        retired=[version for version in ring.active if version != current] if clean else None,
        failed=last.failed,
        seconds=time.monotonic() - started,
        dry_run=True,
        finishing=made is None and len(ring.active) > 1,
    )
    if out is not None:
        _report(result, out)
    return result


async def _rotate(
    side: Side, batch_size: int, settle_seconds: float, max_rate: float | None, out: TextIO | None
) -> DataKeyRotation:
    _, made = await start_data_key_version(side.repository, side.provider)
    keys, ring = await load_key_set(side.repository, side.provider)
    if made is not None:
        _say(out, f"rotate-data-key: made data-key version {made}; it seals new records from now on")
    elif len(ring.active) > 1:
        _say(out, f"rotate-data-key: finishing the unfinished rotation to version {ring.current}")
    await _settle(ring, settle_seconds, out)

    started = time.monotonic()
    total = PassResult()
    passes = 0
    last = PassResult()
    while True:
        passes += 1
        if passes > MAX_PASSES:
            raise KeyConnectorError(
                f"rotate-data-key: clients kept writing records with old data-key versions for {MAX_PASSES} "
                "passes; is an instance running with settings that do not reload the key ring? "
                "Run it again later"
            )
        last = await _pass(side.repository, keys, batch_size, max_rate, passes)
        total.rewritten += last.rewritten
        total.from_versions.update(last.from_versions)
        if last.work == 0:
            break
    seconds = time.monotonic() - started

    # The last pass changed nothing and opened every record: what it saw in use is what stays.
    keep = last.in_use | {keys.current}
    retired: list[int] = []
    if last.unreadable_format:
        _say(
            out, "rotate-data-key: some records are in a format this version does not know; retiring nothing"
        )
    else:
        unused = [version for version in ring.active if version not in keep]
        if unused:
            ring, retired = await retire_versions(side.repository, side.provider, unused)
    return DataKeyRotation(
        current=keys.current,
        made=made is not None,
        rewritten=total.rewritten,
        from_versions=total.from_versions,
        passes=passes,
        verified=last.opened,
        retired=retired,
        failed=last.failed,
        seconds=seconds,
        finishing=made is None,
    )


async def _settle(ring: KeyRing, settle_seconds: float, out: TextIO | None) -> None:
    """Wait until every running instance has had the time to load the current version.

    Measured from the version's creation time in the ring, so a resumed rotation waits only what
    is left (plus a second when the time was stored in whole seconds)."""
    created = ring.versions[ring.current].created
    try:
        made_at = datetime.fromisoformat(created).timestamp() + (0.0 if "." in created else 1.0)
    except ValueError:
        made_at = time.time()
    remaining = made_at + settle_seconds - time.time()
    if remaining > 0:
        _say(out, f"rotate-data-key: waiting {remaining:.1f} s for running instances to load it")
        await asyncio.sleep(remaining)


Rewrite = Callable[[str, int, bytes, UUID], str | None]
"""(record, its data-key version, its plaintext, its user) -> the record to store instead, or None."""


async def _pass(
    repository: Repository,
    keys: DataKeys,
    batch_size: int,
    max_rate: float | None,
    number: int,
    *,
    rewrite: Rewrite | None = None,
    description: str | None = None,
) -> PassResult:
    """Read every record once: open it (the verification), and rewrite it by compare-and-swap if
    ``rewrite`` says so (default: re-encrypt it with the current version if it is on another one).
    ``keyconnector upgrade-records`` uses the same pass with its own rule."""
    result = PassResult()
    current = keys.current
    if rewrite is None:

        def rewrite(record: str, version: int, plaintext: bytes, user_id: UUID) -> str | None:
            return keys.seal(plaintext, user_id) if version != current else None

    if description is None:
        description = f"re-encrypting to data-key version {current}"
    description += f" (pass {number})" if number > 1 else ""
    started = time.monotonic()
    with Progress(description, await repository.count_records()) as progress:
        async for batch in repository.iter_records(batch_size):
            updates: list[RecordUpdate] = []
            for record in batch:
                if record.key is None:
                    continue
                try:
                    version = record_version(record.key)
                except IntegrityFailure as exc:
                    result.unreadable_format = True
                    result.failed[record.user_id] = str(exc)
                    continue
                result.in_use.add(version)
                try:
                    plaintext = keys.open(record.key, record.user_id)
                except IntegrityFailure as exc:
                    result.failed[record.user_id] = str(exc)
                    continue
                result.opened += 1
                replacement = rewrite(record.key, version, plaintext, record.user_id)
                if replacement is not None:
                    updates.append(RecordUpdate(record.user_id, record.key, replacement))
                    result.from_versions[version] += 1
            if updates:
                changed = await repository.replace_records(updates)
                result.rewritten += changed
                result.conflicts += len(updates) - changed
            result.examined += len(batch)
            progress.advance(len(batch))
            if max_rate is not None:
                ahead = result.examined / max_rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    return result


def _say(out: TextIO | None, line: str) -> None:
    if out is not None:
        print(line, file=out, flush=True)


def _report(result: DataKeyRotation, out: TextIO) -> None:
    sources = ", ".join(
        f"{count:,} from version {version}" for version, count in sorted(result.from_versions.items())
    )
    if result.dry_run:
        if result.made:
            what = f"would make data-key version {result.current} current"
        elif result.finishing:
            what = f"would finish the unfinished rotation to version {result.current}"
        else:
            what = f"version {result.current} is current"
        if result.retired is None:
            retire = "would retire only versions no record needs"
        elif result.retired:
            retire = f"would retire version(s) {', '.join(map(str, result.retired))}"
        else:
            retire = "would retire nothing"
        print(
            f"rotate-data-key --dry-run: {what}; would re-encrypt {result.rewritten:,} record(s)"
            + (f" ({sources})" if sources else "")
            + f"; {result.verified:,} record(s) decrypt; {retire}"
            + (f"; {len(result.failed)} record(s) do not decrypt" if result.failed else ""),
            file=out,
            flush=True,
        )
        return
    print(
        f"rotate-data-key: version {result.current} is current; re-encrypted {result.rewritten:,} record(s)"
        + (f" ({sources})" if sources else "")
        + f" in {result.seconds:.1f} s ({result.rate:,.0f} records/s, {result.passes} pass(es)); "
        f"{result.verified:,} record(s) verified; "
        + (
            f"retired version(s) {', '.join(map(str, result.retired))}"
            if result.retired
            else "retired nothing"
        )
        + (f"; {len(result.failed)} record(s) do not decrypt" if result.failed else ""),
        file=out,
        flush=True,
    )
