"""Whether a backup is this deployment's: its keys, its manifest's MAC and its key ring's anchor.

Why the manifest carries a MAC, and what restore trusts
    age encryption to a recipient is public-key encryption: anyone holding the recipient's public
    key can make a file that decrypts, and with the key pair's (public) certificate they can wrap a
    data key of their own, seal records under it and build a whole fake deployment. Restoring it
    would hand them every user's key enrolled afterwards. So a format-2 backup is authenticated by
    the deployment's key ring (``keyconnector.core.keyring``), which only a holder of a real data key
    can make:

    - ``backup`` opens the authenticated ring with the configured key pair and writes the manifest's
      ``mac``: HMAC-SHA256, keyed with ``ring.derive("backup/1")`` (HKDF of the ring's
      authentication key), over the manifest without ``mac`` as canonical JSON (sorted keys, no
      spaces, ASCII). The manifest's ``sha256`` covers the header (the ring and its anchor) and
      every record, so the MAC covers the whole payload. The command prints the ring's anchor.
    - ``restore`` authenticates the backup's ring with the configured key pair, decrypts every
      record with the keys of that ring (format-2 records are bound to their user), checks the MAC,
      and only then writes anything.
    - A forger can do all of that with a ring of their own, so restore also requires the ring to be
      *this deployment's*: its anchor must equal ``--expect-anchor`` when given, the pinned
      ``keyRingAnchor`` when set (both, when both are), else the anchor of the target database's
      own authenticated ring. ``--expect-anchor`` wins over the target's ring on purpose: it is how
      an operator knowingly replaces another deployment's database (with ``--replace``).
    - With none of the three (an empty target: disaster recovery), a backup encrypted to recipient
      keys is refused unless ``--expect-anchor`` names the anchor (from the backup command's
      output, the service's start-up log line "key ring revision N authenticated (anchor X)",
      ``keyconnector check`` or ``stats``). A passphrase backup proceeds: a forger does not know
      the passphrase the operator types, so the passphrase authenticates the file; the anchor is
      printed to be pinned.
    - Format-1 files (made before this) carry no MAC: refused in recipients mode unless
      ``--allow-unauthenticated``; restored with a warning in passphrase mode. Their ring, when it
      is of the earlier unauthenticated format (or absent), is written as it is and adopted by
      ``serve`` at its next start, under a new anchor.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from dataclasses import dataclass

from keyconnector.core.envelope import DataKey, DataKeys
from keyconnector.core.keyring import FORMAT as RING_FORMAT
from keyconnector.core.keyring import KeyRing, NotAdopted, RingTrust, authenticate, open_ring, wrap_for
from keyconnector.errors import IntegrityFailure, KeyConnectorError, StorageError
from keyconnector.keypairs import KeyProvider
from keyconnector.ops.backup.file import BackupFile
from keyconnector.ops.backup.format import (
    BATCH_SIZE,
    MAC_PURPOSE,
    BackupError,
    Contents,
    Header,
    manifest_mac,
)
from keyconnector.runtime.settings import Settings
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import Repository, StoredKeyRing
from keyconnector.storage.registry import inspect, open_repository

log = logging.getLogger("keyconnector.backup")


@dataclass(frozen=True)
class RestoreOptions:
    """What the operator said on the command line: how far to trust the file, and how to write it."""

    replace: bool = False
    expect_anchor: str | None = None
    allow_unauthenticated: bool = False
    batch_size: int = BATCH_SIZE


@dataclass
class BackupKeys:
    """The backup's data keys as the configured key pair unwraps them."""

    keys: DataKeys | None
    """None when the backup holds no data key at all."""
    ring: KeyRing | None
    """The backup's key ring, authenticated (``auth_key`` set); None for a ring of the earlier,
    unauthenticated format or none (``serve`` adopts what is restored)."""


async def open_backup_keys(header: Header, provider: KeyProvider, backup: BackupFile) -> BackupKeys:
    """Authenticate the backup's ring (or, for an earlier format, unwrap its keys) in memory: proves
    the key pair fits before anything is written. Raises ``RingRefused`` when the ring does not
    authenticate, another ``KeyConnectorError`` when this key pair cannot open its keys."""
    if header.key_ring is not None:
        try:
            ring = KeyRing.parse(header.key_ring)
        except StorageError:
            raise BackupError(f"{backup.path} is damaged: its key ring is not readable") from None
        if ring.format >= RING_FORMAT:
            keys = await authenticate(ring, provider, RingTrust(), header.data_key)
            if backup.format >= 2 and not hmac.compare_digest(header.anchor or "", ring.anchor):
                raise BackupError(
                    f"{backup.path} is forged or damaged: its header names key ring anchor {header.anchor}, "
                    f"but its key ring authenticates as {ring.anchor}; nothing was written"
                )
            return BackupKeys(DataKeys(keys, ring.current, accept_legacy=ring.accept_legacy), ring)
    if backup.format >= 2:
        raise BackupError(f"{backup.path} is damaged: it holds no authenticated key ring")
    return BackupKeys(await _backup_keys(header, provider), None)


async def _backup_keys(header: Header, provider: KeyProvider) -> DataKeys | None:
    """The data keys of a backup whose ring is of the earlier format (or absent): ``datakeys.wrap_for``,
    with the backup's ``ApplicationDatas`` wrap. None when it holds no data key."""
    if header.data_key is None and header.key_ring is None:
        return None
    ring = KeyRing.implicit() if header.key_ring is None else KeyRing.parse(header.key_ring)
    keys = {}
    for number in ring.active:
        try:
            wrapped, reader = wrap_for(ring, number, provider, header.data_key)
        except IntegrityFailure as exc:
            raise IntegrityFailure(f"in the backup: {exc}") from None
        try:
            blob = base64.b64decode(wrapped, validate=True)
        except (binascii.Error, ValueError):
            raise BackupError(f"the backup's wrap of data key version {number} is not base64") from None
        keys[number] = DataKey(await reader.unwrap(blob), number)
    return DataKeys(keys, ring.current)


def check_file_format(backup: BackupFile, options: RestoreOptions) -> str | None:
    """A format-1 file carries no MAC: refused in recipients mode unless the operator vouches for it."""
    if backup.format >= 2:
        return None
    if backup.passphrase:
        note = (
            f"{backup.path} is a format-1 backup (made before backups carried a MAC): only its passphrase "
            "authenticates it"
        )
        log.warning("%s", note)
        return note
    if not options.allow_unauthenticated:
        raise BackupError(
            f"{backup.path} is a format-1 backup encrypted to recipient keys: it carries no MAC, and anyone "
            "holding a recipient's public key can make such a file. Nothing was written. If you made this "
            "file yourself and kept it safe, give --allow-unauthenticated"
        )
    note = f"{backup.path} is a format-1 backup (no MAC), restored on --allow-unauthenticated"
    log.warning("%s", note)
    return note


def check_mac(contents: Contents, opened: BackupKeys, backup: BackupFile) -> None:
    """The manifest's MAC under the backup's own ring: proves the file is what its ring's holder wrote."""
    if backup.format < 2:
        return
    assert opened.ring is not None  # format 2 always holds an authenticated ring (open_backup_keys)
    expected = manifest_mac(opened.ring.derive(MAC_PURPOSE), contents.manifest)
    if not hmac.compare_digest(str(contents.manifest.get("mac", "")), expected):
        raise BackupError(
            f"{backup.path} does not authenticate: its manifest's MAC does not verify under its own key ring "
            "(the file was edited after it was made, or forged); nothing was written"
        )


async def _target_anchor(settings: Settings, provider: KeyProvider) -> tuple[str | None, str]:
    """The anchor of the target database's own authenticated ring, or None and why there is none.
    Reads only: a database without tables is not created."""
    state = inspect(settings.database, "database", trust=Trust.from_settings(settings))
    if not state.has_schema:
        return None, f"the target database has no Key Connector tables yet ({state.description})"
    repository = await open_repository(settings.database, "database", trust=Trust.from_settings(settings))
    try:
        opened = await open_ring(repository, provider, adopt=False)
    except NotAdopted:
        return None, f"the target database ({repository.description}) has no data key"
    except KeyConnectorError as exc:
        log.warning(
            "the key ring of %s does not authenticate, so it cannot vouch for the backup: %s",
            repository.description,
            exc,
        )
        return None, f"the key ring of the target database ({repository.description}) does not authenticate"
    finally:
        await repository.aclose()
    if opened.adopted:
        return (
            None,
            f"the key ring of the target database ({repository.description}) is not authenticated yet",
        )
    return opened.ring.anchor, f"the key ring of the target database ({repository.description})"


async def check_anchor(
    settings: Settings,
    provider: KeyProvider,
    ring: KeyRing,
    backup: BackupFile,
    options: RestoreOptions,
    *,
    verify_only: bool = False,
) -> str:
    """Refuse a backup whose ring is not this deployment's (see the module docstring for the rule);
    return what its anchor was checked against, for the operator."""
    anchor = ring.anchor
    references: list[tuple[str, str]] = []
    if options.expect_anchor:
        references.append((options.expect_anchor, "--expect-anchor"))
    if settings.key_ring_anchor:
        references.append((settings.key_ring_anchor, "keyConnectorSettings__keyRingAnchor"))
    why_none = ""
    if not references:
        target, where = await _target_anchor(settings, provider)
        if target is None:
            why_none = where
        else:
            references.append((target, where))
    for expected, where in references:
        if not hmac.compare_digest(expected, anchor):
            raise BackupError(
                f"the backup's key ring has anchor {anchor}, but {where} says {expected}: the backup was "
                "made by another deployment, or forged by someone holding only public keys; nothing was "
                "written. To replace this deployment with the other one knowingly, check the backup's anchor "
                "against that deployment's and give it as --expect-anchor"
            )
    if references:
        return f"key ring anchor {anchor} (matches {' and '.join(where for _, where in references)})"
    vouched = options.allow_unauthenticated and backup.format < 2  # the operator vouches for the file
    if backup.passphrase or vouched or verify_only:
        pin = f"pin it with keyConnectorSettings__keyRingAnchor={anchor}"
        if verify_only and not backup.passphrase:
            return (
                f"key ring anchor {anchor} (not compared: {why_none}; a restore there needs --expect-anchor)"
            )
        return f"key ring anchor {anchor} (not compared: {why_none}, and no anchor was given; {pin})"
    raise BackupError(
        f"{why_none} and no anchor was given to check the backup against: a backup encrypted to recipient "
        "keys can be forged by anyone holding a recipient's public key and the key pair's certificate. "
        "Nothing was written. Give --expect-anchor with your deployment's anchor, from a record kept apart "
        "from the backup (not read from the file): `keyconnector backup` printed it, `serve` logs it at "
        "start as 'key ring revision N authenticated (anchor X)', `keyconnector check` and `stats` show it"
    )


def same_content(stored: KeyRing, backup: KeyRing) -> bool:
    """The same ring apart from its revision and MAC (a restore writes it for the target's revision)."""
    return (
        stored.anchor == backup.anchor
        and stored.current == backup.current
        and stored.versions == backup.versions
        and stored.accept_legacy == backup.accept_legacy
        and stored.adopted == backup.adopted
    )


async def holds_backup_ring(
    repository: Repository, stored: StoredKeyRing, header: Header, opened: BackupKeys, provider: KeyProvider
) -> bool:
    """Whether the database's ring is the backup's: for an authenticated one, its content under the
    backup's authentication key (a ring with the same content but no valid MAC is not)."""
    if opened.ring is None:
        return header.key_ring is not None and stored.document == header.key_ring.document
    try:
        ring = KeyRing.parse(stored)
        trust = RingTrust(auth_key=opened.ring.auth_key)
        await authenticate(ring, provider, trust, await repository.get_wrapped_data_key())
    except KeyConnectorError:
        return False
    return same_content(ring, opened.ring)
