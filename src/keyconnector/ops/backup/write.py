"""``keyconnector backup``: writing the file, authenticated by the deployment's key ring.

The file is written under a temporary name (mode 0600 before any byte is in it) and given its name
only when complete and synced; a data key or key ring that changed while the backup ran (a rotation)
makes it fail rather than hold records it has no key for.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyconnector.core.keyring import (
    KeyRing,
    NotAdopted,
    RingRefused,
    RingTrust,
    load_key_set,
    now_text,
    open_ring,
)
from keyconnector.errors import UsageError
from keyconnector.keypairs import KeyProvider, open_key_provider
from keyconnector.ops.backup.format import FORMAT, MAC_PURPOSE, MAGIC, BackupError, PayloadWriter
from keyconnector.ops.backup.outcome import Made
from keyconnector.ops.backup.stream import Encryptor
from keyconnector.ops.progress import Progress
from keyconnector.runtime.settings import Settings, side_of
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import Repository, StoredKeyRing
from keyconnector.storage.registry import inspect, open_repository

if TYPE_CHECKING:
    from pyrage import x25519


async def make_backup(
    settings: Settings,
    output: Path,
    protection: bytes,
    recipients: list[x25519.Recipient],
    force: bool,
    batch_size: int,
) -> Made:
    """Write the backup; return what it holds and the key ring's anchor."""
    state = inspect(settings.database, "database", trust=Trust.from_settings(settings))
    if not state.has_schema:
        raise BackupError(f"{state.description} has no Key Connector tables: there is nothing to back up")
    provider = await open_key_provider(side_of(settings))
    try:
        await provider.check()
        repository = await open_repository(settings.database, "database", trust=Trust.from_settings(settings))
        try:
            ring = await _authenticated_ring(settings, repository, provider)
            return await _write_backup(repository, ring, output, protection, recipients, force, batch_size)
        finally:
            await repository.aclose()
    finally:
        await provider.aclose()


async def _authenticated_ring(settings: Settings, repository: Repository, provider: KeyProvider) -> KeyRing:
    """The database's authenticated key ring: its key MACs the manifest, its anchor names the deployment.

    A deployment no keyconnector of this version has started yet is adopted first, as ``serve`` would
    at its next start (the one write a backup may make, to keyconnector's own table): without an
    authenticated ring there is no key a restore could check the backup with. Such a backup is often
    taken during a takeover, while upstream still serves and writes upstream-format records, so a
    ring adopted here for a database without records accepts them (``serve`` would decide by
    ``compat.writeLegacyFormat``); ``upgrade-records`` tightens that later."""
    trust = RingTrust(anchor=settings.key_ring_anchor)
    try:
        opened = await open_ring(repository, provider, trust=trust, adopt=False)
        if not opened.adopted:
            return opened.ring
        _, ring = await load_key_set(repository, provider, trust, accept_legacy_when_new=True)
        return ring
    except NotAdopted:
        raise BackupError(
            f"{repository.description} has no data key yet: there is nothing to back up"
        ) from None
    except RingRefused as exc:
        raise BackupError(
            f"the key ring of {repository.description} does not authenticate ({exc}); no backup was written: "
            "it could not be restored. Restore the ring from an earlier backup"
        ) from None


async def _write_backup(
    repository: Repository,
    ring: KeyRing,
    output: Path,
    protection: bytes,
    recipients: list[x25519.Recipient],
    force: bool,
    batch_size: int,
) -> Made:
    data_key = await repository.get_wrapped_data_key()
    stored = await repository.get_key_ring()
    if stored is None or stored.revision != ring.revision:
        raise _changed_meanwhile()
    total = await repository.count_records()
    header: dict[str, Any] = {
        "format": FORMAT,
        "created": now_text(),
        "source": repository.description,
        "dataKey": data_key,
        "keyRing": {"revision": stored.revision, "document": stored.document},
        "anchor": ring.anchor,
    }
    try:
        fd, temp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
    except OSError as exc:
        raise unwritable(output, exc) from None
    temp = Path(temp_name)  # mkstemp makes it 0600, before any byte is in it
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(MAGIC + protection)
            out.flush()
            encryptor = Encryptor(out, recipients)
            try:
                payload = PayloadWriter(encryptor)
                payload.header(header)
                with Progress(f"backup of {repository.description}", total) as progress:
                    async for batch in repository.iter_records(batch_size):
                        payload.records(batch)
                        progress.advance(len(batch))
                await _check_unchanged(repository, data_key, stored)
                payload.manifest(header, ring.derive(MAC_PURPOSE))
            except BaseException:
                encryptor.abort()
                raise
            encryptor.finish()
            out.flush()
            os.fsync(out.fileno())
        _publish(temp, output, force)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return Made(payload.count, data_key is not None, repository.description, ring.anchor)


def unwritable(output: Path, exc: OSError) -> UsageError:
    """The folder of OUTPUT takes no new file (read-only, no permission, not a real folder): the
    operator's to fix, exit 2, not a bug."""
    return UsageError("OUTPUT", f"cannot write a file in the folder {output.parent}: {exc.strerror or exc}")


def _changed_meanwhile() -> BackupError:
    return BackupError(
        "the data key or the key ring changed while the backup ran (a rotation?); no backup was "
        "written: run it again"
    )


async def _check_unchanged(repository: Repository, data_key: str | None, ring: StoredKeyRing | None) -> None:
    """A rotation that ran meanwhile may have made records need keys this backup does not hold."""
    if await repository.get_wrapped_data_key() != data_key or await repository.get_key_ring() != ring:
        raise _changed_meanwhile()


def _publish(temp: Path, output: Path, force: bool) -> None:
    """Give the finished file its name: atomically, and without replacing a file unless ``force``."""
    if force:
        os.replace(temp, output)
    else:
        try:
            os.link(temp, output)
        except FileExistsError:
            raise UsageError("OUTPUT", f"{output} appeared while the backup ran; give --force") from None
        temp.unlink()
    with contextlib.suppress(OSError):
        folder = os.open(output.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
