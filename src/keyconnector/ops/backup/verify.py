"""``keyconnector restore --verify-only``: check a backup file, and with a key pair that fits, authenticate
it and decrypt every record. Writes nothing.
"""

from __future__ import annotations

from keyconnector.core.keyring import RingRefused
from keyconnector.errors import KeyConnectorError
from keyconnector.keypairs import KeyProvider, open_key_provider
from keyconnector.ops import OperationFailed
from keyconnector.ops.backup.authenticity import (
    BackupKeys,
    RestoreOptions,
    check_anchor,
    check_mac,
    open_backup_keys,
)
from keyconnector.ops.backup.file import BackupFile
from keyconnector.ops.backup.format import BackupError
from keyconnector.ops.backup.outcome import Restored
from keyconnector.runtime.settings import Settings, side_of


async def verify_backup(settings: Settings, backup: BackupFile, options: RestoreOptions) -> Restored:
    """Check the file; with a key pair that fits, authenticate it and decrypt every record. Writes nothing."""
    provider: KeyProvider | None = None
    note = ""
    opened: BackupKeys | None = None
    try:
        provider = await open_key_provider(side_of(settings))
        await provider.check()
    except KeyConnectorError as exc:
        note = f"; records not decrypted: the configured key pair is not usable ({exc})"
    try:
        if provider is not None:
            try:
                opened = await open_backup_keys(backup.header(), provider, backup)
            except RingRefused as exc:
                raise BackupError(f"the backup's key ring does not authenticate: {exc}") from None
            except BackupError:
                raise
            except KeyConnectorError as exc:
                note = f"; records not decrypted: {exc}"
        keys = None if opened is None else opened.keys
        contents, decryption = backup.check(options.batch_size, keys, decrypt=opened is not None)
        intact = (
            f"verify: {backup.path} is intact: {contents.records:,} records, made {contents.header.created} "
            f"from {contents.header.source}"
        )
        outcome = Restored(
            str(backup.path), True, contents.records, contents.header.created, contents.header.source
        )
        if note:
            outcome.notes.append(note.removeprefix("; "))
        if opened is None:
            outcome.text = intact + note
            return outcome
        check_mac(contents, opened, backup)
        if decryption.failed:
            raise OperationFailed(f"{intact}; but only {decryption.summary()}", decryption.failed)
        outcome.decryption = decryption
        parts = [intact, decryption.summary()]
        if opened.ring is not None:
            assert provider is not None
            outcome.anchor = opened.ring.anchor
            parts.append("its manifest's MAC verifies" if backup.format >= 2 else "format 1: no MAC")
            parts.append(
                await check_anchor(settings, provider, opened.ring, backup, options, verify_only=True)
            )
        else:
            parts.append("format 1 with a key ring of the earlier format: not authenticated")
        outcome.notes[:0] = parts[2:]
        outcome.text = "; ".join(parts) + note
        return outcome
    finally:
        if provider is not None:
            await provider.aclose()
