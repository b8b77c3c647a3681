"""``keyconnector upgrade-records``: bind every upstream-format record to its user, online.

Upstream's records carry no associated data, so a record copied into another user's row decrypts
there (docs/compatibility.md section 5). Format 2 binds the user id and the data-key version. This command
rewrites every upstream-format record into format 2 under the same data-key version (version 1:
the key does not change, only the envelope), while the service keeps serving: it reads either
format, so a GET during the upgrade gets the same key whichever envelope it finds.

It reuses the passes of ``rotate-data-key`` (``keyconnector.ops.rotate._pass``): batches, each
record replaced by compare-and-swap on the value it read, so a client's concurrent PUT always wins;
passes repeat until one finds nothing to rewrite, and that last pass has opened every record (the
verification). Resuming after an interruption (SIGKILL included) is running it again: what was
rewritten is format 2 and left alone.

It refuses while ``compat.writeLegacyFormat`` is set in its own settings: instances configured like
that write upstream's format again, and the upgrade would undo itself.

Once a full pass found every record bound (and none failed), the authenticated key ring is set to
refuse upstream-format records: after that, such a record in a row (copied from a dump taken before
the upgrade, say) is an integrity failure, never a key served to whoever owns the row now.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from typing import TextIO
from uuid import UUID

from keyconnector.core.envelope import LEGACY_VERSION, is_legacy
from keyconnector.core.keyring import refuse_unbound_records
from keyconnector.errors import ConfigurationError, KeyConnectorError
from keyconnector.ops import (
    OperationFailed,
    Subcommands,
    add_settings_arguments,
    load_settings_from,
    open_side,
)
from keyconnector.ops.outcome import finish
from keyconnector.ops.report import add_json_option, wants_json
from keyconnector.ops.rotate import MAX_PASSES, _pass, _positive_float, _positive_int, _say
from keyconnector.runtime.settings import Settings, side_of


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "upgrade-records",
        help="rewrite upstream-format records in format 2, bound to their user (online, resumable)",
        description=(
            "Rewrites every record still in upstream's format (not bound to its user: a copy in another "
            "user's row decrypts there) into format 2, whose AES-GCM associated data binds the user id and "
            "the data-key version. The data-key version stays the same. Runs while the service serves "
            "(a client's concurrent write wins); run it again after an interruption. Refused while "
            "keyConnectorSettings__compat__writeLegacyFormat is set. Exit 1 lists the users whose records "
            "do not decrypt (left untouched)."
        ),
    )
    add_settings_arguments(parser)
    parser.add_argument("--batch-size", type=_positive_int, default=2000, help="records per transaction")
    parser.add_argument(
        "--max-rate",
        type=_positive_float,
        help="records examined per second at most, to spare a busy database (default: no limit)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=(
            "refuse as the real run would (compat__writeLegacyFormat set), open every record and count "
            "those still in upstream's format, but write nothing"
        ),
    )
    add_json_option(parser, "the summary (records rewritten, failed user ids)")
    parser.set_defaults(func=cmd_upgrade_records)


def cmd_upgrade_records(args: argparse.Namespace) -> int:
    settings = load_settings_from(args).settings
    out = None if wants_json(args) else sys.stdout
    if args.dry_run:
        result = asyncio.run(plan_upgrade(settings, batch_size=args.batch_size, out=out))
    else:
        result = asyncio.run(
            run_upgrade(settings, batch_size=args.batch_size, max_rate=args.max_rate, out=out)
        )
    return finish(args, "upgrade-records", result.document(), [], upgrade_failure(result))


@dataclass
class Upgrade:
    rewritten: int
    """Records rewritten in format 2 (with ``dry_run``: that would be)."""
    conflicts: int
    """Records a client replaced while they were being rewritten (the client's value was kept)."""
    verified: int
    passes: int
    failed: dict[UUID, str]
    seconds: float
    dry_run: bool = False
    already_bound: int = 0
    """Records already in format 2."""
    refuses_unbound: bool = False
    """The key ring refuses upstream-format records afterwards (with ``dry_run``: would)."""

    def document(self) -> dict[str, object]:
        """``upgrade-records --json`` (docs/cli.md, section upgrade-records)."""
        return {
            "dry_run": self.dry_run,
            "rewritten": self.rewritten,
            "already_bound": self.already_bound,
            "conflicts": self.conflicts,
            "passes": self.passes,
            "verified": self.verified,
            "refuses_unbound": self.refuses_unbound,
            "failed": [str(user) for user in sorted(self.failed)],
            "seconds": round(self.seconds, 3),
        }


def upgrade_failure(result: Upgrade) -> OperationFailed | None:
    """The error of an upgrade with records that do not decrypt, if any."""
    if not result.failed:
        return None
    reason = next(iter(result.failed.values()))
    if result.dry_run:
        return OperationFailed(
            "upgrade-records --dry-run: records that do not decrypt (the real run would leave them as "
            f"they are; first reason: {reason})",
            sorted(result.failed),
        )
    return OperationFailed(
        f"upgrade-records: records that do not decrypt were left as they are (first reason: {reason})",
        sorted(result.failed),
    )


def _refuse_legacy_writers(settings: Settings) -> None:
    if settings.compat.write_legacy_format:
        raise ConfigurationError(
            "compat.writeLegacyFormat",
            "is set: instances with this setting write upstream's format again, which would undo the "
            "upgrade. Remove it (from every instance) before running upgrade-records",
        )


async def upgrade_records(
    settings: Settings, *, batch_size: int = 2000, max_rate: float | None = None, out: TextIO | None = None
) -> Upgrade:
    """Rewrite every upstream-format record in format 2; raises ``OperationFailed`` listing the users
    whose records do not decrypt, after doing everything else."""
    result = await run_upgrade(settings, batch_size=batch_size, max_rate=max_rate, out=out)
    failure = upgrade_failure(result)
    if failure is not None:
        raise failure
    return result


async def plan_upgrade(settings: Settings, *, batch_size: int = 2000, out: TextIO | None = None) -> Upgrade:
    """What ``upgrade_records`` would do, with nothing written (not even a schema migration): the same
    refusal of ``compat.writeLegacyFormat``, and one pass that opens every record and counts those
    still in upstream's format."""
    _refuse_legacy_writers(settings)
    side = await open_side(side_of(settings), create=False)
    try:
        counts = {"legacy": 0, "bound": 0}

        def count(record: str, version: int, plaintext: bytes, user_id: UUID) -> str | None:
            counts["legacy" if is_legacy(record) else "bound"] += 1
            return None

        started = time.monotonic()
        last = await _pass(
            side.repository, side.keys, batch_size, None, 1, rewrite=count, description="counting"
        )
        accepting = side.ring.accept_legacy
    finally:
        await side.aclose()
    result = Upgrade(
        counts["legacy"],
        0,
        last.opened,
        1,
        last.failed,
        time.monotonic() - started,
        dry_run=True,
        already_bound=counts["bound"],
        refuses_unbound=not last.failed,
    )
    _say(
        out,
        f"upgrade-records --dry-run: would rewrite {result.rewritten:,} record(s) in format 2; "
        f"{result.already_bound:,} already in it; {result.verified:,} record(s) decrypt"
        + (f"; {len(result.failed)} record(s) do not decrypt" if result.failed else "")
        + (
            "; the key ring would then refuse upstream-format records"
            if result.refuses_unbound and accepting
            else ""
        ),
    )
    return result


async def run_upgrade(
    settings: Settings, *, batch_size: int = 2000, max_rate: float | None = None, out: TextIO | None = None
) -> Upgrade:
    """``upgrade_records`` without raising for records that do not decrypt (``result.failed``)."""
    _refuse_legacy_writers(settings)
    side = await open_side(side_of(settings))
    try:
        keys = side.keys  # format 2 for every version: open_side ignores writeLegacyFormat
        already = 0

        def bind(record: str, version: int, plaintext: bytes, user_id: UUID) -> str | None:
            nonlocal already
            if not is_legacy(record):
                already += 1
                return None
            return keys.keys[LEGACY_VERSION].seal(plaintext, user_id)

        started = time.monotonic()
        rewritten = conflicts = passes = 0
        while True:
            passes += 1
            if passes > MAX_PASSES:
                raise KeyConnectorError(
                    f"upgrade-records: clients kept writing upstream-format records for {MAX_PASSES} passes; "
                    "is an instance running with keyConnectorSettings__compat__writeLegacyFormat=true? "
                    "Remove that setting and run it again"
                )
            already = 0
            last = await _pass(
                side.repository,
                keys,
                batch_size,
                max_rate,
                passes,
                rewrite=bind,
                description="binding upstream-format records to their users",
            )
            rewritten += last.rewritten
            conflicts += last.conflicts
            if last.work == 0:
                break
        refused_now = False
        if not last.failed:
            # The last pass opened every record and found none unbound: from now on an unbound record
            # can only be one copied in from elsewhere (an old dump), so the ring refuses them.
            refused_now = side.ring.accept_legacy
            await refuse_unbound_records(side.repository, side.provider, side.trust)
    finally:
        await side.aclose()
    result = Upgrade(
        rewritten,
        conflicts,
        last.opened,
        passes,
        last.failed,
        time.monotonic() - started,
        # The last pass saw every bound record, the ones this run rewrote included.
        already_bound=max(already - rewritten, 0),
        refuses_unbound=not last.failed,
    )
    _say(
        out,
        f"upgrade-records: rewrote {result.rewritten:,} record(s) in format 2 in {result.seconds:.1f} s "
        f"({result.passes} pass(es)"
        + (f", {result.conflicts:,} replaced by clients meanwhile" if result.conflicts else "")
        + f"); {result.verified:,} record(s) verified"
        + (f"; {len(result.failed)} record(s) do not decrypt" if result.failed else ""),
    )
    if refused_now:
        _say(
            out,
            "upgrade-records: the key ring now refuses upstream-format records: one copied into a row from "
            "an old dump is an integrity failure, not a key served",
        )
    return result
