"""``keyconnector restore``: write a checked backup into the configured database, then verify it there.

``restore`` reads the file twice: once to check all of it (nothing is written unless the whole file
is intact, authenticated and every record opens), once to write it in batches of upserts. A re-run
after a crash finds its own partial restore (the backup's data key, its ring's content, and only
rows identical to the backup's) and completes it.

The restored ring is written for the target's revision (the next one, with a new MAC): a ring
copied in with the backup's own revision would be refused as edited. Running services refuse a
ring replaced under them, so they are to be restarted after a restore.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from uuid import UUID

from keyconnector.core.envelope import DataKeys
from keyconnector.core.keyring import (
    UNADOPTED_RING,
    KeyRingConflict,
    NotAdopted,
    RingRefused,
    RingTrust,
    open_ring,
    save_ring,
)
from keyconnector.errors import KeyConnectorError
from keyconnector.keypairs import KeyProvider, open_key_provider
from keyconnector.ops import OperationFailed
from keyconnector.ops.backup.authenticity import (
    BackupKeys,
    RestoreOptions,
    check_anchor,
    check_file_format,
    check_mac,
    holds_backup_ring,
    open_backup_keys,
    same_content,
)
from keyconnector.ops.backup.file import BackupFile, Decryption
from keyconnector.ops.backup.format import (
    BATCH_SIZE,
    BackupError,
    Contents,
    Header,
    record_line,
    sha256_of_records,
)
from keyconnector.ops.backup.outcome import Restored
from keyconnector.ops.progress import Progress
from keyconnector.runtime.settings import Settings, side_of
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import Repository
from keyconnector.storage.registry import migrate, open_repository

log = logging.getLogger("keyconnector.backup")


RESTART_NOTE = (
    "restore: restart every running `keyconnector serve` on this database: a running service refuses a "
    "key ring replaced under it"
)


async def restore_backup(settings: Settings, backup: BackupFile, options: RestoreOptions) -> Restored:
    notes = [note for note in [check_file_format(backup, options)] if note]
    provider = await open_key_provider(side_of(settings))
    try:
        await provider.check()
        try:
            opened = await open_backup_keys(backup.header(), provider, backup)
        except RingRefused as exc:
            raise BackupError(
                f"the backup's key ring does not authenticate with the configured key pair: {exc}; nothing "
                "was written"
            ) from None
        except BackupError:
            raise
        except KeyConnectorError as exc:
            raise BackupError(
                f"the configured key pair cannot open the backup's data keys: {exc}; nothing was written"
            ) from None
        contents, decryption = backup.check(options.batch_size, opened.keys, decrypt=True)
        check_mac(contents, opened, backup)
        if decryption.failed:
            raise OperationFailed(
                f"restore refused, nothing was written: not every record of the backup opens under its own "
                f"data keys ({decryption.summary()})",
                decryption.failed,
            )
        if opened.ring is not None:
            notes.append(await check_anchor(settings, provider, opened.ring, backup, options))
        else:
            notes.append(_adoption_note(settings))
        migrate(settings.database, "database", trust=Trust.from_settings(settings))
        repository = await open_repository(settings.database, "database", trust=Trust.from_settings(settings))
        try:
            await _check_target(repository, contents, opened, provider, options.replace)
            await _write(repository, backup, contents, opened, provider, options.batch_size)
            line, decryption, kept = await _verify_restore(repository, provider, backup, contents, opened)
            target = repository.description
        finally:
            await repository.aclose()
    finally:
        await provider.aclose()
    header = contents.header
    return Restored(
        str(backup.path),
        False,
        contents.records,
        header.created,
        header.source,
        target=target,
        decryption=decryption,
        rows_kept=kept,
        anchor=None if opened.ring is None else opened.ring.anchor,
        notes=[*notes, RESTART_NOTE.removeprefix("restore: ")],
        text="\n".join([line, *(f"restore: {note}" for note in notes), RESTART_NOTE]),
    )


def _adoption_note(settings: Settings) -> str:
    note = (
        "the backup's key ring is of the earlier, unauthenticated format (or absent): `keyconnector serve` "
        "adopts it at its next start, under a new anchor"
    )
    if settings.key_ring_anchor:
        note += (
            f"; keyConnectorSettings__keyRingAnchor pins {settings.key_ring_anchor}, so serve will refuse it "
            "until that setting is removed (set it again to the anchor serve then logs)"
        )
    return note


async def _check_target(
    repository: Repository, contents: Contents, opened: BackupKeys, provider: KeyProvider, replace: bool
) -> None:
    """Refuse to mix the backup into a database in use, but let a re-run finish an interrupted restore
    of the same file (the backup's keys, and only rows identical to the backup's)."""
    if replace:
        return
    header = contents.header
    data_key = await repository.get_wrapped_data_key()
    ring = await repository.get_key_ring()
    if (data_key is not None and data_key != header.data_key) or (
        ring is not None and not await holds_backup_ring(repository, ring, header, opened, provider)
    ):
        raise BackupError(
            f"{repository.description} already holds another data key or key ring; nothing was written. "
            "Restore into an empty database, or give --replace to overwrite them (its records would no "
            "longer decrypt)"
        )
    rows = await repository.count_records()
    if rows == 0:
        return
    foreign = 0
    async for batch in repository.iter_records(BATCH_SIZE):
        for record in batch:
            if contents.digests.get(record.user_id.int) != hashlib.sha256(record_line(record)).digest():
                foreign += 1
    if foreign or data_key is None:
        raise BackupError(
            f"{repository.description} already holds {rows:,} rows ({foreign:,} not from this backup); "
            "nothing was written. Restore into an empty database, or give --replace to overwrite the rows "
            "of the users in the backup"
        )
    log.info(
        "the database holds %d of the backup's %d rows, identical (an interrupted restore): continuing",
        rows,
        contents.records,
    )


async def _write(
    repository: Repository,
    backup: BackupFile,
    contents: Contents,
    opened: BackupKeys,
    provider: KeyProvider,
    batch_size: int,
) -> None:
    """Keys first, then the rows: a restore interrupted anywhere is recognised and finished by a re-run."""
    header = contents.header
    if header.data_key is not None and await repository.get_wrapped_data_key() != header.data_key:
        await repository.set_wrapped_data_key(header.data_key)
    await _restore_ring(repository, header, opened, provider)
    with backup.read() as reader, Progress(f"restore into {repository.description}", contents.records) as bar:
        for batch in reader.batches(batch_size):
            await repository.upsert_records(batch)
            bar.advance(len(batch))
    if reader.contents.sha256 != contents.sha256:
        raise BackupError(f"{backup.path} changed while it was being restored; run the restore again")


async def _restore_ring(
    repository: Repository, header: Header, opened: BackupKeys, provider: KeyProvider
) -> None:
    """Write the backup's ring. An authenticated one is written for the target's next revision (MACed
    again with the same authentication key): one copied with the backup's revision would be refused."""
    stored = await repository.get_key_ring()
    if opened.ring is not None:
        if stored is not None and await holds_backup_ring(repository, stored, header, opened, provider):
            return
        ring = copy.deepcopy(opened.ring)
        ring.revision = 0 if stored is None else stored.revision
        try:
            await save_ring(repository, ring)
        except KeyRingConflict:
            raise BackupError(
                "the key ring was changed by another process meanwhile; run the restore again"
            ) from None
        return
    if header.key_ring is not None:
        wanted = header.key_ring.document
    elif stored is not None:
        # The target rotated, the backup did not: version 1 only, adopted again at the next start.
        wanted = UNADOPTED_RING
    else:
        return
    if stored is not None and stored.document == wanted:
        return
    if not await repository.put_key_ring(wanted, 0 if stored is None else stored.revision):
        raise BackupError("the key ring was changed by another process meanwhile; run the restore again")


async def _restored_keys(
    repository: Repository, provider: KeyProvider, header: Header, opened: BackupKeys
) -> DataKeys | None:
    """The keys the database now gives, proving its ring is the backup's (by content, for an
    authenticated ring: the revision and MAC are the target's)."""
    if opened.ring is not None:
        try:
            now = await open_ring(
                repository, provider, trust=RingTrust(anchor=opened.ring.anchor), adopt=False
            )
        except KeyConnectorError as exc:
            raise BackupError(
                f"after the restore, the database's key ring does not authenticate: {exc}"
            ) from None
        if now.adopted or not same_content(now.ring, opened.ring):
            raise BackupError("after the restore, the database holds another key ring than the backup")
        return now.key_set()
    stored = await repository.get_key_ring()
    if header.key_ring is not None and (stored is None or stored.document != header.key_ring.document):
        raise BackupError("after the restore, the database holds another key ring than the backup")
    try:
        # An earlier-format ring: what serve will adopt (nothing is written here).
        return (await open_ring(repository, provider, adopt=False)).key_set()
    except NotAdopted:
        return None


async def _verify_restore(
    repository: Repository,
    provider: KeyProvider,
    backup: BackupFile,
    contents: Contents,
    opened: BackupKeys,
) -> tuple[str, Decryption, int]:
    """Prove the result from the database itself: the backup's rows are all there, identical, and every
    row decrypts with the configured key pair. The line for the operator, the decryption counts and
    the rows of other users kept."""
    header = contents.header
    if header.data_key is not None and await repository.get_wrapped_data_key() != header.data_key:
        raise BackupError("after the restore, the database holds another data key than the backup")
    keys = await _restored_keys(repository, provider, header, opened)
    decryption = Decryption()
    identical: list[bytes] = []
    changed: list[UUID] = []
    others = 0
    total = await repository.count_records()
    with Progress(f"verifying {repository.description}", total) as progress:
        async for batch in repository.iter_records(BATCH_SIZE):
            for record in batch:
                expected = contents.digests.get(record.user_id.int)
                digest = hashlib.sha256(record_line(record)).digest()
                if expected == digest:
                    identical.append(digest)
                elif expected is None:
                    others += 1
                else:
                    changed.append(record.user_id)
            decryption.add(batch, keys)
            progress.advance(len(batch))
    if changed:
        raise OperationFailed("restore: rows differ from the backup after writing them", changed)
    if len(identical) != contents.records or sha256_of_records(identical) != sha256_of_records(
        list(contents.digests.values())
    ):
        raise BackupError(
            f"restore: {len(identical):,} of the backup's {contents.records:,} rows are in the database"
        )
    if decryption.failed:
        summary = decryption.summary()
        raise OperationFailed(
            f"restore: written and identical to the backup, but {summary}", decryption.failed
        )
    extra = f"; {others:,} rows of users not in the backup were kept" if others else ""
    line = (
        f"restore: {contents.records:,} records from {backup.path} (made {header.created} from "
        f"{header.source}) are in {repository.description}, identical to the backup (count and "
        f"SHA-256); {decryption.summary()}{extra}"
    )
    return line, decryption, others
