"""``keyconnector downgrade-records``: make the database readable by upstream again, online.

Moving back to upstream works only if upstream can read every record. Upstream knows one envelope
(AES-256-GCM, ``base64(ciphertext || tag || nonce)``, no associated data) under one data key: the
one wrapped in the first row of ``ApplicationDatas``. We write format 2 (bound to the user, naming a
data-key version), and after ``rotate-data-key`` the records may be on a version other than 1.

The target: one data key, which becomes (or stays) version 1
    Our reader ties upstream's envelope to data-key version 1 (``crypto.record_version``), and the
    service writes upstream's envelope (with ``compat.writeLegacyFormat``) only while version 1 is
    current. So the cleanest consistent end state is the one a deployment that never rotated has:
    version 1 current and the only active version, every record in upstream's envelope under it,
    and ``ApplicationDatas`` holding its wrap made by the configured key pair (``KeyProvider.wrap``
    is upstream's wrapping for that provider). Upstream then reads everything, and so do we.

    - Version 1 still active (never rotated, or a rotation left unfinished): it is the target. The
      ring is switched back to ``current = 1``; nothing new is made.
    - Version 1 retired (after ``rotate-data-key``): its key is gone for good, so version 1 is
      re-activated with the bytes of the current version's key, freshly wrapped by the configured
      pair. Records on the current version then only change envelope, never key; records on an
      older version (a rotation left unfinished) are re-sealed under it too. This is the one place a
      version number is reused, and it is safe: a version is retired only after a full pass proved
      that no record needs it, the format-2 associated data names the version (so an old
      ``kc:2:1:`` record could not be mistaken for one under the new key, it would fail to open),
      and the services reload every key whenever the ring's revision changes. Because the new
      version 1 is wrapped for the configured pair only, this is refused while the ring holds
      another key pair's wraps (instances running with it could not open version 1): finish the
      key-pair rotation first, as ``rotate-data-key`` demands.

Order, each step safe to interrupt (a re-run looks at the state and carries on from it):

1. The ring is changed in one compare-and-swap (``current = 1``; version 1's ``created`` set to now,
   which is what the settle time is measured from).
2. ``ApplicationDatas`` gets the configured pair's wrap of version 1 unless what it holds already
   unwraps to that key (ring first, then ``ApplicationDatas``, as ``rotate-key-pair --retire-old``).
3. Settle: running instances reload the ring within ``keyRingRefreshSeconds``; from then on they
   seal in upstream's envelope (they must run with ``writeLegacyFormat``, which is why this command
   refuses without it in its own settings: an instance without it would keep writing format 2 and
   undo the work). Before that, an instance could still write format 2 under the old current version.
4. Passes of ``rotate._pass``: every record not in upstream's envelope is re-sealed in it by
   compare-and-swap on the value read, so a client's concurrent write wins; passes repeat until one
   finds nothing to do. Resuming after SIGKILL is running it again: records already in upstream's
   envelope are left alone.
5. Verification independent of the key ring: ``ApplicationDatas`` is unwrapped by the configured
   key pair and every record must be in upstream's envelope and open under that key, with no
   associated data, as upstream would open it. Failures are listed (exit 1) and nothing is retired.
6. Only then are the other versions retired, leaving the ring as upstream would see it.

Backups made before the downgrade carry their own ring and records and restore as they were.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO
from uuid import UUID

from keyconnector.core.envelope import LEGACY_VERSION, DataKey, is_legacy
from keyconnector.core.keyring import (
    ACTIVE,
    KeyRing,
    RingVersion,
    RotationRefused,
    change_ring,
    load_key_set,
    own_wrap,
    precise_now_text,
    retire_versions,
    store_upstream_wrap,
    unwrap_raw,
    wrap_checked,
)
from keyconnector.errors import ConfigurationError, IntegrityFailure, KeyConnectorError
from keyconnector.keypairs.base import KeyProvider, upstream_view
from keyconnector.ops import (
    OperationFailed,
    Side,
    Subcommands,
    add_settings_arguments,
    load_settings_from,
    open_side,
)
from keyconnector.ops.outcome import finish
from keyconnector.ops.progress import Progress
from keyconnector.ops.report import add_json_option, wants_json
from keyconnector.ops.rotate import (
    MAX_PASSES,
    _non_negative_float,
    _pass,
    _positive_float,
    _positive_int,
    _say,
    settle_time,
)
from keyconnector.runtime.settings import Settings, side_of
from keyconnector.storage.base import Repository

WRITE_LEGACY = "compat.writeLegacyFormat"


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "downgrade-records",
        help="rewrite every record in upstream's format under the data key in ApplicationDatas (online)",
        description=(
            "For moving back to upstream Key Connector. FIRST set "
            "keyConnectorSettings__compat__writeLegacyFormat=true on EVERY running instance (and restart "
            "them), and in the settings this command runs with: otherwise instances keep writing "
            "format 2 and undo the downgrade (it refuses without the setting). Makes data-key version 1 "
            "the one current key (after rotate-data-key: version 1 becomes the current key, re-wrapped "
            "by the configured key pair), stores its wrap in ApplicationDatas, waits --settle-seconds "
            "for running instances to reload it, rewrites every record in upstream's envelope (a "
            "client's concurrent write wins), verifies every record as upstream would open it, and "
            "retires the other versions. Run it again after an interruption. Exit 1 lists the users "
            "whose records do not verify."
        ),
    )
    add_settings_arguments(parser)
    parser.add_argument("--batch-size", type=_positive_int, default=2000, help="records per transaction")
    parser.add_argument(
        "--settle-seconds",
        type=_non_negative_float,
        help=(
            "wait after switching the key ring before rewriting "
            "(default: keyRingRefreshSeconds + lastAccessFlushSeconds + 5)"
        ),
    )
    parser.add_argument(
        "--max-rate",
        type=_positive_float,
        help="records examined per second at most, to spare a busy database (default: no limit)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="change nothing: count the records that would be rewritten and say what else would change",
    )
    add_json_option(parser, "the summary (records rewritten, versions, failed user ids)")
    parser.set_defaults(func=cmd_downgrade_records)


def cmd_downgrade_records(args: argparse.Namespace) -> int:
    settings = load_settings_from(args).settings
    out = None if wants_json(args) else sys.stdout
    if args.dry_run:
        plan = asyncio.run(plan_downgrade(settings, batch_size=args.batch_size, out=out))
        return finish(args, "downgrade-records", plan.document(), [], downgrade_failure(plan.failed, True))
    settle = settle_time(settings, args.settle_seconds)
    result = asyncio.run(
        run_downgrade(
            settings,
            batch_size=args.batch_size,
            settle_seconds=settle,
            max_rate=args.max_rate,
            out=out,
        )
    )
    return finish(args, "downgrade-records", result.document(), [], downgrade_failure(result.failed, False))


def downgrade_failure(failed: dict[UUID, str], dry_run: bool) -> OperationFailed | None:
    """The error of a downgrade (or its dry run) with records upstream could not read, if any."""
    if not failed:
        return None
    reason = next(iter(failed.values()))
    if dry_run:
        return OperationFailed(
            "downgrade-records --dry-run: records that do not decrypt (the real run would leave them as "
            f"they are and retire no data-key version; first reason: {reason})",
            sorted(failed),
        )
    return OperationFailed(
        "downgrade-records: records that upstream could not read were left as they are and no data-key "
        f"version was retired (first reason: {reason})",
        sorted(failed),
    )


# -- deciding the target -----------------------------------------------------------------------------------


@dataclass
class Target:
    """What version 1 is to become, read from the ring as it is now."""

    switch: bool
    """The ring must change: version 1 is not current."""
    reactivate: bool
    """Version 1 is retired: it is re-made from the current version's key."""
    source_version: int
    """The version whose key becomes the target (1 unless re-activating)."""


def decide(ring: KeyRing, provider: KeyProvider) -> Target:
    """The step the ring needs; refuses a re-activation that other key pairs' instances could not follow."""
    if ring.revision == 0 or ring.current == LEGACY_VERSION:
        return Target(switch=False, reactivate=False, source_version=LEGACY_VERSION)
    entry = ring.versions.get(LEGACY_VERSION)
    if entry is not None and entry.state == ACTIVE:
        return Target(switch=True, reactivate=False, source_version=LEGACY_VERSION)
    others = ring.fingerprints() - {provider.fingerprint}
    if others:
        raise RotationRefused(
            "refusing to downgrade: data key version 1 must be re-made from the current key, wrapped by "
            f"the configured key pair only, but the active versions are also wrapped by {len(others)} "
            f"other key pair(s) ({', '.join(sorted(others))}), and instances running with those could not "
            "open it. Finish the key-pair rotation first: `keyconnector rotate-key-pair --retire-old` "
            "with the new key pair's settings"
        )
    return Target(switch=True, reactivate=True, source_version=ring.current)


async def switch_ring(repository: Repository, provider: KeyProvider) -> tuple[KeyRing, Target]:
    """Make version 1 current (re-made from the current key if it was retired), in one compare-and-swap."""
    decided: list[Target] = []

    async def change(ring: KeyRing) -> bool:
        decided.clear()
        target = decide(ring, provider)
        decided.append(target)
        if not target.switch:
            # Upstream's format is about to be written again: the ring must accept it.
            changed = not ring.accept_legacy
            ring.accept_legacy = True
            return changed
        mine = provider.fingerprint
        if target.reactivate:
            raw = await unwrap_raw(repository, ring, target.source_version, provider)
            wrapped = await wrap_checked(provider, raw, LEGACY_VERSION)
            ring.versions[LEGACY_VERSION] = RingVersion(
                LEGACY_VERSION, ACTIVE, precise_now_text(), {mine: wrapped}
            )
            ring.seal_versions({LEGACY_VERSION: DataKey(raw, LEGACY_VERSION)})
        else:
            entry = ring.versions[LEGACY_VERSION]
            if mine not in entry.wraps:  # filed from ApplicationDatas, as start_data_key_version does
                entry.wraps[mine] = await own_wrap(repository, ring, LEGACY_VERSION, provider)
            entry.created = precise_now_text()
        ring.current = LEGACY_VERSION
        ring.accept_legacy = True  # the records are about to be rewritten in upstream's format
        return True

    ring, _ = await change_ring(repository, provider, change)
    return ring, decided[0]


async def _opens_to(provider: KeyProvider, wrapped: str | None, raw: bytes) -> bool:
    if wrapped is None:
        return False
    try:
        return hmac.compare_digest(await provider.unwrap(base64.b64decode(wrapped, validate=True)), raw)
    except (IntegrityFailure, binascii.Error, ValueError):
        return False


async def settle(ring: KeyRing, settle_seconds: float, out: TextIO | None) -> None:
    """Wait until running instances have had the time to load the switched ring.

    Measured from version 1's ``created`` time, which the switch sets: a resumed run waits only what
    is left, and a deployment whose version 1 became current long ago (or never had a ring) does not
    wait at all."""
    entry = ring.versions.get(LEGACY_VERSION)
    created = entry.created if entry is not None else ""
    try:
        made_at = datetime.fromisoformat(created).timestamp() + (0.0 if "." in created else 1.0)
    except ValueError:
        return
    remaining = made_at + settle_seconds - time.time()
    if remaining > 0:
        _say(out, f"downgrade-records: waiting {remaining:.1f} s for running instances to load the key ring")
        await asyncio.sleep(remaining)


# -- the downgrade -----------------------------------------------------------------------------------------


@dataclass
class Downgrade:
    rewritten: int = 0
    from_versions: Counter[int] = field(default_factory=Counter)
    """Rewritten records by the data-key version they were on (format 2)."""
    conflicts: int = 0
    """Records a client replaced while they were being rewritten (the client's value was kept)."""
    passes: int = 0
    verified: int = 0
    """Records opened in upstream's envelope under the key in ApplicationDatas."""
    retired: list[int] = field(default_factory=list)
    ring_switched: bool = False
    reactivated_from: int | None = None
    application_datas_updated: bool = False
    failed: dict[UUID, str] = field(default_factory=dict)
    seconds: float = 0.0
    already: int = 0
    """Records that were in upstream's envelope before this run."""

    def document(self) -> dict[str, object]:
        """``downgrade-records --json`` (docs/cli.md, section downgrade-records)."""
        return _document(
            dry_run=False,
            rewritten=self.rewritten,
            from_versions=self.from_versions,
            already=self.already,
            conflicts=self.conflicts,
            passes=self.passes,
            verified=self.verified,
            ring_switched=self.ring_switched,
            reactivated_from=self.reactivated_from,
            application_datas_updated=self.application_datas_updated,
            retired=self.retired,
            failed=self.failed,
            seconds=self.seconds,
        )


def _document(
    *,
    dry_run: bool,
    rewritten: int,
    from_versions: Counter[int],
    already: int,
    conflicts: int,
    passes: int,
    verified: int,
    ring_switched: bool,
    reactivated_from: int | None,
    application_datas_updated: bool,
    retired: list[int] | None,
    failed: dict[UUID, str],
    seconds: float,
) -> dict[str, object]:
    """One shape for the real run and the dry run (docs/cli.md, section downgrade-records)."""
    return {
        "dry_run": dry_run,
        "rewritten": rewritten,
        "from_versions": {str(version): n for version, n in sorted(from_versions.items())},
        "already_upstream_format": already,
        "conflicts": conflicts,
        "passes": passes,
        "verified": verified,
        "ring_switched": ring_switched,
        "reactivated_from": reactivated_from,
        "application_datas_updated": application_datas_updated,
        "retired_versions": retired,
        "failed": [str(user) for user in sorted(failed)],
        "seconds": round(seconds, 3),
    }


def _refuse_format2_writers(settings: Settings) -> None:
    if not settings.compat.write_legacy_format:
        raise ConfigurationError(
            WRITE_LEGACY,
            "is not set to true: running instances without it keep writing format 2, which upstream "
            "cannot read, and would undo the downgrade. Set it to true on every running instance (restart "
            "them) and in this command's settings, then run downgrade-records again",
        )


async def downgrade_records(
    settings: Settings,
    *,
    batch_size: int = 2000,
    settle_seconds: float = 15.0,
    max_rate: float | None = None,
    out: TextIO | None = None,
) -> Downgrade:
    """The whole downgrade (see the module's docstring); raises ``OperationFailed`` listing the users
    whose records do not verify, after doing everything else."""
    result = await run_downgrade(
        settings, batch_size=batch_size, settle_seconds=settle_seconds, max_rate=max_rate, out=out
    )
    failure = downgrade_failure(result.failed, False)
    if failure is not None:
        raise failure
    return result


async def run_downgrade(
    settings: Settings,
    *,
    batch_size: int = 2000,
    settle_seconds: float = 15.0,
    max_rate: float | None = None,
    out: TextIO | None = None,
) -> Downgrade:
    """``downgrade_records`` without raising for records upstream could not read (``result.failed``)."""
    _refuse_format2_writers(settings)
    side = await open_side(side_of(settings))
    try:
        result = await _downgrade(side, batch_size, settle_seconds, max_rate, out)
    finally:
        await side.aclose()
    _report(result, out)
    return result


async def _downgrade(
    side: Side, batch_size: int, settle_seconds: float, max_rate: float | None, out: TextIO | None
) -> Downgrade:
    result = Downgrade()
    ring, target = await switch_ring(side.repository, side.provider)
    if target.switch:
        result.ring_switched = True
        if target.reactivate:
            result.reactivated_from = target.source_version
            _say(
                out,
                f"downgrade-records: data-key version 1 re-made from version {target.source_version}'s key "
                "and made current",
            )
        else:
            _say(out, "downgrade-records: data-key version 1 made current again")
    keys, ring = await load_key_set(side.repository, side.provider)
    result.application_datas_updated = await _store_application_datas(side, ring)
    await settle(ring, settle_seconds, out)

    legacy = keys.keys[LEGACY_VERSION]

    in_upstream_format = 0

    def unbind(record: str, version: int, plaintext: bytes, user_id: UUID) -> str | None:
        nonlocal in_upstream_format
        if is_legacy(record):
            in_upstream_format += 1
            return None
        return legacy.seal_legacy(plaintext)

    started = time.monotonic()
    while True:
        result.passes += 1
        in_upstream_format = 0
        if result.passes > MAX_PASSES:
            raise KeyConnectorError(
                f"downgrade-records: clients kept writing format-2 records for {MAX_PASSES} passes; is an "
                "instance running without keyConnectorSettings__compat__writeLegacyFormat=true? Set it on "
                "every instance and run it again"
            )
        last = await _pass(
            side.repository,
            keys,
            batch_size,
            max_rate,
            result.passes,
            rewrite=unbind,
            description="rewriting records in upstream's format",
        )
        result.rewritten += last.rewritten
        result.conflicts += last.conflicts
        result.from_versions.update(last.from_versions)
        if last.work == 0:
            break
    result.seconds = time.monotonic() - started
    # The last pass saw every record in upstream's envelope, the ones this run rewrote included.
    result.already = max(in_upstream_format - result.rewritten, 0)

    verified, failed = await verify_as_upstream(side.repository, side.provider, batch_size)
    result.verified = verified
    result.failed = {**last.failed, **failed}
    if not result.failed:
        others = [version for version in ring.active if version != LEGACY_VERSION]
        if others:
            _, result.retired = await retire_versions(side.repository, side.provider, others)
    return result


async def _store_application_datas(side: Side, ring: KeyRing) -> bool:
    """Make ``ApplicationDatas`` hold a wrap of version 1 that the configured key pair unwraps the
    way upstream does (RSA-OAEP with SHA-1 for certificate, pkcs11 and azurekv, whatever
    ``rsaKey.wrapAlgorithm`` the ring uses)."""
    if ring.revision == 0:
        return False  # no ring: version 1 was just unwrapped from ApplicationDatas itself
    return await store_upstream_wrap(side.repository, ring, side.provider)


async def verify_as_upstream(
    repository: Repository, provider: KeyProvider, batch_size: int
) -> tuple[int, dict[UUID, str]]:
    """Open every record the way upstream would: the key from ``ApplicationDatas``, its envelope only.

    Deliberately ignores the key ring, so that what it proves is what upstream will see."""
    failed: dict[UUID, str] = {}
    wrapped = await repository.get_wrapped_data_key()
    if wrapped is None:
        raise IntegrityFailure("ApplicationDatas holds no data key: upstream would make a new one")
    try:
        blob = base64.b64decode(wrapped, validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityFailure("the data key in ApplicationDatas is not valid base64") from None
    key = DataKey(await upstream_view(provider).unwrap(blob), LEGACY_VERSION)
    verified = 0
    with Progress("verifying as upstream would read", await repository.count_records()) as progress:
        async for batch in repository.iter_records(batch_size):
            for record in batch:
                if record.key is None:
                    continue
                if not is_legacy(record.key):
                    failed[record.user_id] = "the record is not in upstream's format"
                    continue
                try:
                    key.open(record.key)
                except IntegrityFailure as exc:
                    failed[record.user_id] = str(exc)
                    continue
                verified += 1
            progress.advance(len(batch))
    return verified, failed


def _report(result: Downgrade, out: TextIO | None) -> None:
    sources = ", ".join(
        f"{count:,} from version {version}" for version, count in sorted(result.from_versions.items())
    )
    _say(
        out,
        f"downgrade-records: rewrote {result.rewritten:,} record(s) in upstream's format"
        + (f" ({sources})" if sources else "")
        + f" in {result.seconds:.1f} s ({result.passes} pass(es)"
        + (f", {result.conflicts:,} replaced by clients meanwhile" if result.conflicts else "")
        + f"); {result.verified:,} record(s) verified as upstream reads them; "
        + (
            f"retired version(s) {', '.join(map(str, result.retired))}"
            if result.retired
            else "retired nothing"
        )
        + ("; ApplicationDatas updated" if result.application_datas_updated else "")
        + (f"; {len(result.failed)} record(s) do not verify" if result.failed else ""),
    )


# -- --dry-run ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    to_rewrite: Counter[int] = field(default_factory=Counter)
    """Format-2 records that would be rewritten, by data-key version."""
    already: int = 0
    """Records already in upstream's envelope."""
    ring_switch: bool = False
    reactivate_from: int | None = None
    application_datas_change: bool = False
    failed: dict[UUID, str] = field(default_factory=dict)
    verified: int = 0
    """Records that decrypt with the key ring's keys (the real run then verifies them as upstream)."""
    retire: list[int] | None = None
    """The versions the real run would retire (None: records that do not decrypt, it retires none)."""
    seconds: float = 0.0

    @property
    def rewrites(self) -> int:
        return sum(self.to_rewrite.values())

    def document(self) -> dict[str, object]:
        """``downgrade-records --dry-run --json``: the real run's shape, with what it would do."""
        return _document(
            dry_run=True,
            rewritten=self.rewrites,
            from_versions=self.to_rewrite,
            already=self.already,
            conflicts=0,
            passes=1,
            verified=self.verified,
            ring_switched=self.ring_switch,
            reactivated_from=self.reactivate_from,
            application_datas_updated=self.application_datas_change,
            retired=self.retire,
            failed=self.failed,
            seconds=self.seconds,
        )


async def plan_downgrade(settings: Settings, *, batch_size: int = 2000, out: TextIO | None = None) -> Plan:
    """What ``downgrade_records`` would do, with nothing written (not even a schema migration)."""
    side = await open_side(side_of(settings), create=False)
    try:
        plan = Plan()
        ring = side.ring
        target = decide(ring, side.provider)
        plan.ring_switch = target.switch
        plan.reactivate_from = target.source_version if target.reactivate else None
        if ring.revision > 0:
            raw = await unwrap_raw(side.repository, ring, target.source_version, side.provider)
            wrapped = await side.repository.get_wrapped_data_key()
            plan.application_datas_change = target.reactivate or not await _opens_to(
                upstream_view(side.provider), wrapped, raw
            )

        def count(record: str, version: int, plaintext: bytes, user_id: UUID) -> str | None:
            if is_legacy(record):
                plan.already += 1
            else:
                plan.to_rewrite[version] += 1
            return None

        started = time.monotonic()
        last = await _pass(
            side.repository, side.keys, batch_size, None, 1, rewrite=count, description="counting"
        )
        plan.seconds = time.monotonic() - started
        plan.failed = last.failed
        plan.verified = last.opened
        if not last.failed:
            plan.retire = [version for version in ring.active if version != LEGACY_VERSION]
    finally:
        await side.aclose()
    sources = ", ".join(f"{n:,} on version {v}" for v, n in sorted(plan.to_rewrite.items()))
    if plan.reactivate_from is not None:
        ring_line = f"version 1 would be re-made from version {plan.reactivate_from}'s key and made current"
    elif plan.ring_switch:
        ring_line = "version 1 would be made current again"
    else:
        ring_line = "version 1 is current already"
    _say(
        out,
        f"downgrade-records --dry-run: would rewrite {plan.rewrites:,} record(s) in upstream's format"
        + (f" ({sources})" if sources else "")
        + f"; {plan.already:,} already in it; {ring_line}; ApplicationDatas "
        + ("would be updated" if plan.application_datas_change else "would stay as it is")
        + (
            f"; would retire version(s) {', '.join(map(str, plan.retire))}"
            if plan.retire
            else "; would retire nothing"
        )
        + (f"; {len(plan.failed)} record(s) do not decrypt" if plan.failed else ""),
    )
    if not settings.compat.write_legacy_format:
        _say(
            out,
            "note: the real run needs keyConnectorSettings__compat__writeLegacyFormat=true, on every "
            "running instance and in its own settings",
        )
    return plan
