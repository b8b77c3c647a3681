"""``keyconnector transfer`` and the start-up transfer of ``serve``: every user key, copied and proven.

Upstream's start-up transfer wrote its lock file before copying, skipped keys that failed, could
not be re-run and checked nothing. Here a record is opened with the source's data keys, sealed
with the target's and upserted with its dates unchanged, a batch per transaction, so a re-run
after a crash simply finishes the job. Then every target record is decrypted again and compared
with the source: only a transfer in which every record was copied *and* verified succeeds, and
only then is the lock file written.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from uuid import UUID

from keyconnector.core.envelope import DataKeys
from keyconnector.core.keyring import open_ring
from keyconnector.errors import (
    ENV_PREFIX,
    ConfigurationError,
    IntegrityFailure,
    KeyConnectorError,
    UsageError,
)
from keyconnector.keypairs import open_key_provider
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
from keyconnector.ops.report import add_json_option
from keyconnector.runtime import logs
from keyconnector.runtime.assemble import open_key_pair
from keyconnector.runtime.settings import Settings, SideSettings, side_of
from keyconnector.storage.base import UserKeyRecord
from keyconnector.storage.mongodump import MongoDump, read_mongo_dump
from keyconnector.storage.registry import inspect, open_repository

log = logging.getLogger("keyconnector.transfer")

T = TypeVar("T")

DEFAULT_BATCH_SIZE = 2000
"""Rows per transaction: large enough that a round trip is shared by thousands of records (the
speed of the copy), small enough that a batch is a short transaction and a crash loses little."""


@dataclass
class TransferResult:
    """What a transfer did, for the summary line and the lock file."""

    source: str
    target: str
    dry_run: bool = False
    records: int = 0
    """Rows read from the source."""
    copied: int = 0
    """Records with a key, written to the target (with ``dry_run``: that would be)."""
    without_key: int = 0
    """Rows whose key is NULL, copied as such."""
    verified: int = 0
    failed: list[UUID] = field(default_factory=list)
    copy_seconds: float = 0.0
    verify_seconds: float = 0.0

    def summary(self) -> str:
        """One line: copied, failed (the only records not copied), time and rate."""
        rate = self.records / self.copy_seconds if self.copy_seconds > 0 else 0.0
        line = (
            f"{'dry run: ' if self.dry_run else ''}transfer from {self.source} to {self.target}: "
            f"{'would copy' if self.dry_run else 'copied'} {self.copied + self.without_key:,} record(s) "
            f"({self.without_key:,} of them without a key), {len(self.failed):,} failed and not copied, "
            f"in {self.copy_seconds:.1f} s ({rate:,.0f} records/s)"
        )
        if not self.dry_run:
            verify_rate = self.verified / self.verify_seconds if self.verify_seconds > 0 else 0.0
            line += (
                f"; verified {self.verified:,} in {self.verify_seconds:.1f} s ({verify_rate:,.0f} records/s)"
            )
        return line


# -- opening both sides -------------------------------------------------------------------------------


class SideError(KeyConnectorError):
    """Opening the source or the target failed; the message says which (exit 1)."""


async def _side(name: str, opening: Awaitable[T], where: str = "") -> T:
    """``opening``, with a failure's message prefixed by the side it concerns (``where``: the file
    the side's settings came from, e.g. ``--target-env-file t.env``).

    The exception keeps its class, so its exit code too: a wrong target setting is 2, an
    unreachable target database or key provider 3, like the source's. Only the message changes,
    because an operator reading ``keyConnectorSettings__certificate__filesystemPassword: the password
    is wrong`` must know which of the two deployments' settings to fix."""
    try:
        return await opening
    except KeyConnectorError as exc:
        raise _named(name, where, exc) from None


def _named(name: str, where: str, exc: KeyConnectorError) -> KeyConnectorError:
    """``exc`` with its message prefixed by ``the <name> (<where>): `` (once). Its class stays: the
    exit code follows the class (``errors.exit_code_for``). A source's setting error names its own
    setting and passes unchanged (the source is the deployment's own settings)."""
    if name == "source" and isinstance(exc, ConfigurationError):
        return exc
    label = f"the {name}" + (f" ({where})" if where else "")
    if not str(exc).startswith(f"the {name}"):
        exc.args = (f"{label}: {exc}",)
    return exc


def _target_origin(args: argparse.Namespace) -> str:
    """Where the target's settings came from, for messages: the file option, or nothing
    (``transferTo__*`` settings name themselves)."""
    if getattr(args, "target_env_file", None):
        return f"--target-env-file {args.target_env_file}"
    if getattr(args, "target_config", None):
        return f"--target-config {args.target_config}"
    return ""


def _target_of(
    settings: Settings, target_settings: Settings | None, *, own_database: bool = False
) -> SideSettings:
    """The target: the target settings' own side, or else ``settings``' ``transferTo`` side.

    ``own_database``: the source is not the configured database (a MongoDB dump), so without another
    target the configured database is the target."""
    if target_settings is not None:
        return side_of(target_settings)
    target = side_of(settings, transfer=True)
    if own_database and target.database is None:
        if settings.database.provider == "mongo":
            raise ConfigurationError(
                "database.provider",
                "is mongo, the database being left: set it to the database to transfer the dump into "
                "(sqlite, postgresql, mysql or sqlserver), or give that one with transferTo__database__* "
                "or --target-env-file",
            )
        return side_of(settings)
    if target.database is None:
        raise ConfigurationError(
            "transferTo.database.provider",
            "is not set: give the target with the transferTo__database__*, transferTo__rsaKey__* and "
            "transferTo__certificate__* settings, or with --target-env-file / --target-config",
        )
    return target


async def _stored_state(side: SideSettings) -> tuple[str, bool]:
    """Read-only: the side's database description, and whether it holds a data key (so opening it
    with ``create=False`` will not make one)."""
    database, prefix, trust = side.require_database(), side.database_prefix, side.trust()
    state = inspect(database, prefix, trust=trust)
    if not state.has_schema:
        return state.description, False
    repository = await open_repository(database, prefix, trust=trust)
    try:
        # Both read, always: a key ring that cannot be read must fail here, before the target is touched.
        wrapped, ring = await repository.get_wrapped_data_key(), await repository.get_key_ring()
        return state.description, wrapped is not None or ring is not None
    finally:
        await repository.aclose()


async def _probe_target(target: SideSettings) -> tuple[Side | None, str]:
    """For a dry run: the target as it is, and its name. Its key pair is checked, but nothing is
    created: a target without a schema or data key yet yields no side (and a log line saying so)."""
    description, has_data_key = await _stored_state(target)
    if has_data_key:
        side = await open_side(target, name="target", create=False)
        return side, side.repository.description
    provider = await open_key_provider(target)
    try:
        await provider.check()
    finally:
        await provider.aclose()
    log.info("dry run: the target (%s) has no data key yet; the transfer would create it", description)
    return None, description


# -- a MongoDB dump as the source (upstream's release on mongo) -------------------------------------------


async def _open_dump_side(settings: Settings, dump: MongoDump) -> Side:
    """The dump as a read-only source side: its data key unwrapped by the deployment's key pair,
    the one upstream wrapped it with. The dump never held a key ring, so none is trusted or pinned
    (``keyRingAnchor`` is the target database's); opening it checks the key pair against its first
    records, as for any database."""
    provider = await open_key_pair(side_of(settings))
    try:
        opened = await open_ring(dump, provider, adopt=False)
    except BaseException:
        await provider.aclose()
        raise
    return Side(
        "source", settings.database, "database", dump, provider, opened.key_set(), opened.ring, opened.adopted
    )


# -- the copy and the verification ----------------------------------------------------------------------


async def _read_ahead(batches: AsyncIterator[list[UserKeyRecord]]) -> AsyncIterator[list[UserKeyRecord]]:
    """Yield each batch while the next one is already being read (the database works meanwhile)."""

    async def following() -> list[UserKeyRecord] | None:
        return await anext(batches, None)

    pending = asyncio.create_task(following())
    try:
        while (batch := await pending) is not None:
            pending = asyncio.create_task(following())
            yield batch
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)


def _open_record(keys: DataKeys, record: UserKeyRecord) -> bytes | None:
    """The user's key in clear (None for a row without one); raises ``IntegrityFailure``."""
    return None if record.key is None else keys.open(record.key, record.user_id)


def _reseal(
    batch: list[UserKeyRecord], source: DataKeys, target: DataKeys | None, result: TransferResult
) -> list[UserKeyRecord]:
    """The batch opened with the source's keys and sealed with the target's (opened only, when
    ``target`` is None); a record that does not open is counted as failed and left out."""
    sealed: list[UserKeyRecord] = []
    for record in batch:
        if record.key is None:
            result.without_key += 1
            sealed.append(record)
            continue
        user_id = record.user_id
        try:
            plaintext = source.open(record.key, user_id)
        except IntegrityFailure as exc:
            log.warning("user %s: the source record does not open: %s", user_id, exc)
            result.failed.append(user_id)
            continue
        result.copied += 1
        if target is not None:
            new = target.seal(plaintext, user_id)
            sealed.append(
                UserKeyRecord(
                    user_id, new, record.creation_date, record.revision_date, record.last_access_date
                )
            )
    result.records += len(batch)
    return sealed


async def copy_records(source: Side, target: Side | None, result: TransferResult, batch_size: int) -> None:
    """Open every source record, seal it for the target and upsert it, batch by batch.

    The write of one batch overlaps the reading and re-sealing of the next. ``target`` None (a dry
    run against a target without data key) only opens the source records; so does ``dry_run``.
    """
    started = time.monotonic()
    write: asyncio.Task[None] | None = None
    total = await source.repository.count_records()
    target_keys = target.keys if target is not None else None
    with Progress("transfer: copy", total) as progress:
        try:
            async for batch in _read_ahead(source.repository.iter_records(batch_size)):
                sealed = _reseal(batch, source.keys, target_keys, result)
                if write is not None:
                    await write
                    write = None
                if target is not None and not result.dry_run and sealed:
                    write = asyncio.create_task(target.repository.upsert_records(sealed))
                    await asyncio.sleep(0)  # let the write start before the next batch's CPU work
                progress.advance(len(batch))
            if write is not None:
                await write
        finally:
            if write is not None and not write.done():
                # Stopped by an error elsewhere: let the batch in flight commit or fail, not dangle.
                await asyncio.gather(write, return_exceptions=True)
    result.copy_seconds = time.monotonic() - started


async def verify_copy(source: Side, target: Side, result: TransferResult, batch_size: int) -> None:
    """Decrypt every target record and compare it with the source record of the same user.

    Both sides are read side by side; records wait in a small window until their counterpart comes
    (every backend lists users in the same GUID order, so the window stays about one batch; if not,
    it still works, with more memory). Target rows the source does not have are left alone.
    """
    started = time.monotonic()
    skip = set(result.failed)
    expected: dict[UUID, bytes | None] = {}
    """Source plaintexts still waiting for their target record."""
    found: dict[UUID, UserKeyRecord] = {}
    """Target records still waiting for their source record."""
    mismatched: list[UUID] = []

    def check(user_id: UUID, plaintext: bytes | None, record: UserKeyRecord) -> None:
        try:
            ok = _open_record(target.keys, record) == plaintext
        except IntegrityFailure as exc:
            log.warning("user %s: the target record does not open: %s", user_id, exc)
            ok = False
        if ok:
            result.verified += 1
        else:
            log.warning("user %s: the target record differs from the source", user_id)
            mismatched.append(user_id)

    sources = _read_ahead(source.repository.iter_records(batch_size))
    targets = _read_ahead(target.repository.iter_records(batch_size))
    with Progress("transfer: verify", result.records - len(skip)) as progress:
        sources_done = targets_done = False
        while not (sources_done and targets_done):
            source_batch, target_batch = await asyncio.gather(
                _next_or_none(sources, sources_done), _next_or_none(targets, targets_done)
            )
            sources_done, targets_done = source_batch is None, target_batch is None
            before = result.verified + len(mismatched)
            for record in source_batch or ():
                if record.user_id in skip:
                    continue
                try:
                    plaintext = _open_record(source.keys, record)
                except IntegrityFailure as exc:
                    log.warning("user %s: the source record no longer opens: %s", record.user_id, exc)
                    mismatched.append(record.user_id)
                    continue
                counterpart = found.pop(record.user_id, None)
                if counterpart is None:
                    expected[record.user_id] = plaintext
                else:
                    check(record.user_id, plaintext, counterpart)
            for record in target_batch or ():
                if record.user_id in expected:
                    check(record.user_id, expected.pop(record.user_id), record)
                else:
                    found[record.user_id] = record
            progress.advance(result.verified + len(mismatched) - before)
    for user_id in expected:
        log.warning("user %s: the record is missing from the target", user_id)
    result.failed += mismatched + list(expected)
    result.verify_seconds = time.monotonic() - started


async def _next_or_none(
    batches: AsyncIterator[list[UserKeyRecord]], done: bool
) -> list[UserKeyRecord] | None:
    return None if done else await anext(batches, None)


# -- the operation ------------------------------------------------------------------------------------


async def transfer(
    settings: Settings,
    target_settings: Settings | None = None,
    *,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mongo_dump: Path | None = None,
    target_origin: str = "",
) -> TransferResult:
    """Copy every user key of ``settings``' deployment to the target and verify the copy.

    The target is ``target_settings``' deployment, or ``settings``' ``transferTo`` one. With
    ``mongo_dump`` the source is that dump of upstream's MongoDB database (read with ``settings``'
    key pair) instead of the configured database, which is then the default target. Raises
    ``OperationFailed`` listing the users whose record was not copied and verified (all the others
    were); any other error stops the transfer, which can simply be run again.
    """
    result = await run_transfer(
        settings,
        target_settings,
        dry_run=dry_run,
        batch_size=batch_size,
        mongo_dump=mongo_dump,
        target_origin=target_origin,
    )
    failure = transfer_failure(result)
    if failure is not None:
        raise failure
    return result


def transfer_failure(result: TransferResult) -> OperationFailed | None:
    """The error of a transfer in which some records were not copied and verified, if any."""
    if not result.failed:
        return None
    what = "transfer (dry run)" if result.dry_run else "transfer"
    return OperationFailed(what, sorted(set(result.failed)))


async def run_transfer(
    settings: Settings,
    target_settings: Settings | None = None,
    *,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mongo_dump: Path | None = None,
    target_origin: str = "",
) -> TransferResult:
    """``transfer`` without raising for failed records: they are in ``result.failed``, so that the
    command can report them with the counts. ``target_origin`` names the file the target's settings
    came from, for its errors (``--target-env-file t.env``)."""
    if batch_size < 1:
        raise UsageError("--batch-size", "--batch-size must be at least 1")
    source_view = side_of(settings)
    target_view = _target_of(settings, target_settings, own_database=mongo_dump is not None)
    # The source first, read-only: a missing or empty source must not create the target's schema.
    dump = read_mongo_dump(mongo_dump) if mongo_dump is not None else None
    if dump is not None:
        source_description, has_data_key = dump.description, await dump.get_wrapped_data_key() is not None
    else:
        source_description, has_data_key = await _side("source", _stored_state(source_view))
    if not has_data_key:
        raise SideError(f"the source has no data key, so nothing to transfer ({source_description})")
    # A dump's data key is unwrapped before the target is opened: the dump is local and read-only,
    # and a key pair that cannot open it must not first give the target a data key of its own.
    dump_side = await _side("source", _open_dump_side(settings, dump)) if dump is not None else None
    # The target before the source's data keys, and its key pair before its database: a wrong target
    # key provider fails before anything is written.
    target: Side | None
    try:
        if dry_run:
            target, target_description = await _side("target", _probe_target(target_view), target_origin)
        else:
            target = await _side("target", open_side(target_view, name="target"), target_origin)
            target_description = target.repository.description
    except BaseException:
        if dump_side is not None:
            await dump_side.aclose()
        raise
    try:
        if dump_side is not None:
            source = dump_side
        else:
            source = await _side("source", open_side(source_view, name="source", create=False))
        try:
            if source.repository.description == target_description:
                raise ConfigurationError(
                    target_view.database_prefix,
                    f"the target is the source database ({target_description})",
                )
            result = TransferResult(source.repository.description, target_description, dry_run=dry_run)
            await copy_records(source, target, result, batch_size)
            if target is not None and not dry_run:
                await verify_copy(source, target, result, batch_size)
        finally:
            await source.aclose()
    finally:
        if target is not None:
            await target.aclose()
    return result


# -- start-up mode (upstream's transferTo.lockfilePath) ---------------------------------------------------


def run_startup_transfer(settings: Settings) -> None:
    """What ``serve`` does first when ``transferTo.lockfilePath`` is set: if the lock file is absent,
    transfer, and write the lock file only after every record was copied and verified.

    A failure raises (``OperationFailed`` naming the users), so ``serve`` exits non-zero without a
    lock file and the next start tries again; upstream wrote the lock first and skipped failures.
    """
    lock_setting = settings.transfer_to.lockfile_path
    if not lock_setting:
        return
    target = side_of(settings, transfer=True)
    if target.database is None or target.rsa_key is None:
        # Upstream runs it only with both sections given; its own appsettings.json sets the lock
        # path alone, which must not stop (or slow) a start.
        if target.database is not None or target.rsa_key is not None:
            given, missing = ("database", "rsaKey") if target.database is not None else ("rsaKey", "database")
            log.info(
                "start-up transfer skipped: %stransferTo__%s is set but not %stransferTo__%s (upstream "
                "runs it only with both); to copy to another database with the same key pair, or to "
                "another key pair in place, run `keyconnector transfer` or `keyconnector rotate-key-pair`",
                ENV_PREFIX,
                given,
                ENV_PREFIX,
                missing,
            )
        return
    lock = Path(lock_setting)
    if lock.exists():
        log.info("%s exists: the start-up transfer was done before; not transferring again", lock)
        return
    if not lock.parent.is_dir() or not os.access(lock.parent, os.W_OK):
        raise ConfigurationError(
            "transferTo.lockfilePath", f"the folder {lock.parent} does not exist or is not writable"
        )
    log.info("%s does not exist: transferring every user key before serving", lock)
    result = asyncio.run(run_transfer(settings))
    log.info("%s", result.summary())
    failure = transfer_failure(result)
    if failure is not None:
        raise failure
    _write_lock(lock, result)
    log.info("wrote %s: the start-up transfer will not run again", lock)


def _write_lock(lock: Path, result: TransferResult) -> None:
    """Atomically (temporary file, fsync, rename): a crash leaves either no lock file or a whole one."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = (
        f"{stamp} transferred and verified {result.verified:,} record(s) ({result.without_key:,} of them "
        f"without a key) from {result.source} to {result.target}\n"
    )
    fd, temporary = tempfile.mkstemp(prefix=lock.name + ".", suffix=".tmp", dir=lock.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, lock)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(lock.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# -- the command --------------------------------------------------------------------------------------


def cmd_transfer(args: argparse.Namespace) -> int:
    loaded = load_settings_from(args)
    loaded.warn_unknown(log)
    logs.configure(loaded.settings.logging)
    origin = _target_origin(args)
    try:
        target_settings = load_target_settings(args)
    except KeyConnectorError as exc:
        raise _named("target", origin, exc) from None
    mongo_dump = Path(args.from_mongo_dump) if args.from_mongo_dump else None
    result = asyncio.run(
        run_transfer(
            loaded.settings,
            target_settings,
            dry_run=args.dry_run,
            batch_size=args.batch_size,
            mongo_dump=mongo_dump,
            target_origin=origin,
        )
    )
    return finish(args, "transfer", transfer_document(result), [result.summary()], transfer_failure(result))


def transfer_document(result: TransferResult) -> dict[str, object]:
    """``transfer --json`` (docs/cli.md, section transfer)."""
    return {
        "dry_run": result.dry_run,
        "source": result.source,
        "target": result.target,
        "records": result.records,
        "copied": result.copied,
        "without_key": result.without_key,
        "verified": None if result.dry_run else result.verified,
        "failed": [str(user) for user in sorted(set(result.failed))],
        "copy_seconds": round(result.copy_seconds, 3),
        "verify_seconds": None if result.dry_run else round(result.verify_seconds, 3),
    }


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "transfer",
        help="copy every user key to another database and/or key pair, then verify the copy",
        description=(
            "Copy every user key from the configured database and key pair to the target (the "
            "transferTo__* settings, or --target-env-file/--target-config), re-encrypted for the "
            "target, dates unchanged; then decrypt every target record and compare it with the source. "
            "Safe to interrupt and run again. Exit 0 when every record was copied and verified, 1 when "
            "some failed (their user ids are listed; the others were copied), 2 for a settings error, "
            "3 when a database or key provider (of either side) cannot be reached. "
            "To leave upstream's MongoDB, the source is a dump of it instead (--from-mongo-dump)."
        ),
    )
    add_settings_arguments(parser, target=True)
    add_json_option(parser, "the summary (counts, failed user ids)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="open both sides and decrypt every source record, but write nothing",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"records per transaction (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--from-mongo-dump",
        metavar="DIR",
        help=(
            "the source is this mongodump folder (or folder of mongoexport files) of upstream's "
            "ApplicationData and UserKey collections, read with the configured key pair; the target is "
            "then the configured database unless transferTo__* or --target-env-file/--target-config "
            "give another (needs keyconnector[mongo])"
        ),
    )
    parser.set_defaults(func=cmd_transfer)
