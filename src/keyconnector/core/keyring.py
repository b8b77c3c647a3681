"""Data-key versions and the key pairs that wrap them: the key ring, authenticated.

Upstream has one data key, wrapped once, in ``ApplicationDatas``. Rotating either the data key or
the key pair needs more: several data-key versions alive at once (records are re-encrypted one
batch at a time, online), and each version wrapped by more than one key pair while a key-pair
rotation is rolled out (instances still running with the old settings must keep working).

That state is one JSON document in our table ``keyconnector_key_ring``, changed only by
compare-and-swap on its revision, so concurrent operators and services never lose each other's
changes. Version 1 is the key in ``ApplicationDatas`` (upstream's); its wrap there is kept as long
as version 1 is in use, so upstream (and an instance of ours with the old settings) keeps reading
the old records. Each wrap is filed under the fingerprint of the key pair that made it
(``KeyProvider.fingerprint``), so a process finds its own wrap without trying every key pair. The
fingerprint names the wrap algorithm too (``rsa-oaep-sha1:``/``rsa-oaep-sha256:``), so one key pair
can hold a SHA-1 and a SHA-256 wrap of a version while a deployment moves (``rsaKey.wrapAlgorithm``);
a process prefers its own algorithm's wrap and reads upstream's of the same key pair until it has
one. ``ApplicationDatas`` always holds upstream's algorithm (``keypairs.base.upstream_view``).

Why the ring is authenticated
    Wrapping is public-key encryption: anyone who can write the database and has the (public)
    certificate can wrap a data key of their choosing. Without more, such a writer could add a
    version, make it current and read every record sealed afterwards; or delete the ring so that a
    retired version comes back from ``ApplicationDatas``. So every ring carries:

    - an *authentication key* (32 random bytes, made once per deployment and kept for good), sealed
      with AES-GCM under every active data-key version (``seal``). Only a holder of a real data key
      can make or open a seal, and the ring's ``mac`` (HMAC-SHA256 under a key derived from the
      authentication key) covers everything else: versions, wraps, seals, the current version, the
      revision and whether upstream-format records are still accepted. A version added with the
      public key alone has no valid seal and the ring no valid MAC: it is refused;
    - its ``revision`` inside the MAC (a ring copied from an older row is seen), and tombstones for
      retired versions (``ApplicationDatas`` cannot bring version 1 back once it is retired);
    - the *anchor*: a short fingerprint of the authentication key, logged at start and shown by
      ``check`` and ``stats``. Pinned with ``keyRingAnchor``, even a process starting cold refuses a
      ring made by anyone else.

    Trust starts from the data key the deployment already uses: the first start of this version
    adopts ``ApplicationDatas`` (or a ring written by an earlier keyconnector) after checking that
    the stored records open under it, and every later ring must carry that authentication key. A
    running process also refuses a ring whose revision goes backwards. What is left to a writer
    who also wipes the ring of a deployment whose records are all on version 1 is a re-adoption by
    a process that starts cold without ``keyRingAnchor``: see the README's threat model.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from keyconnector.core.envelope import (
    LEGACY_VERSION,
    DataKey,
    DataKeys,
    derive_key,
    generate_data_key,
    record_version,
)
from keyconnector.errors import IntegrityFailure, KeyConnectorError, StorageError
from keyconnector.keypairs.base import KeyProvider, readers, upstream_view
from keyconnector.storage.base import KeyRingStore, RecordStore, Repository, StoredKeyRing, UserKeyRecord

log = logging.getLogger("keyconnector.datakeys")

ACTIVE = "active"
RETIRED = "retired"
FORMAT = 2
"""Format 1 (written before the ring was authenticated) is adopted once, then rewritten as 2."""
SAMPLE_SIZE = 200
"""Records read at a cold start to check the ring against what the database really holds."""
_MAC_PURPOSE = "key-ring/mac"
_ANCHOR_PURPOSE = "key-ring/anchor"
_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _canonical(body: dict[str, Any]) -> bytes:
    return _encoder.encode(body).encode()


UNADOPTED_RING = json.dumps(
    {
        "format": 1,
        "current": LEGACY_VERSION,
        "versions": {str(LEGACY_VERSION): {"state": ACTIVE, "wraps": {}}},
    }
)
"""A ring that only says "version 1, from ApplicationDatas": adopted (authenticated) at the next start."""


class KeyRingConflict(KeyConnectorError):
    """Another process changed the key ring at the same time; reload and try again."""


class RotationRefused(KeyConnectorError):
    """The key ring is not in a state where the asked change is safe; the message says what to do first."""


class RingRefused(IntegrityFailure):
    """The stored key ring failed authentication (or contradicts the records or an earlier ring):
    someone without a data key changed it. Nothing it says is used."""


class NotAdopted(KeyConnectorError):
    """No authenticated key ring yet, and the caller may not write one (``check``); the message says
    what ``serve`` would do. ``abandons``: how many user records the data key ``serve`` would make
    can never open (only with ``allow_new_data_key``; 0 for a database without records)."""

    def __init__(self, message: str, *, abandons: int = 0) -> None:
        super().__init__(message)
        self.abandons = abandons


class NewDataKeyRefused(StorageError):
    """The takeover guard: the database holds user records but no data key, and making one (which
    could never open them) was not allowed. The composition root names the setting that allows it."""

    def __init__(self, records: int, *, at_least: bool) -> None:
        self.records = records
        super().__init__(
            f"the database holds {'at least ' if at_least else ''}{records} user record(s) but no data key "
            "(ApplicationDatas is empty and there is no key ring): refusing to make a new one, which could "
            "never open them. Restore ApplicationDatas from a backup, or check that this is the right "
            "database"
        )


class ForeignDataKey(IntegrityFailure):
    """The database holds a data key, but not one this key pair opens: the key-pair settings are
    another deployment's, or the database is. Never a reason to make a new data key."""


@dataclass
class RingVersion:
    version: int
    state: str = ACTIVE
    created: str = ""
    wraps: dict[str, str] = field(default_factory=dict)
    """Key-pair fingerprint -> base64 of the wrapped data key."""
    seal: str | None = None
    """The ring's authentication key sealed under this version's data key (active versions only)."""


@dataclass
class KeyRing:
    revision: int
    """0 when nothing is stored yet (a deployment that was never started by this version)."""
    current: int
    versions: dict[int, RingVersion]
    accept_legacy: bool = True
    """Whether upstream-format (unbound) records are still accepted; see ``upgrade-records``."""
    format: int = FORMAT
    document_revision: int = 0
    """The revision the MAC covers; a row whose revision column says otherwise was edited."""
    mac: str = ""
    adopted: str = ""
    """How trust in this ring began (a note for people; covered by the MAC)."""
    abandoned: int = 0
    """User records that were in the database when data key version 1 was made without a key to
    open them (``allowNewDataKey``; covered by the MAC, written only when not 0): a cold start then
    does not refuse the ring because the first records do not open under it."""
    auth_key: bytes | None = field(default=None, repr=False, compare=False)
    """The authentication key, once this process has opened a seal and checked the MAC with it."""
    digest: str = field(default="", compare=False)
    """SHA-256 of the stored document this was parsed from (or last written as): a cheap way for a
    running service to see that the row changed, without authenticating it again every time."""

    @classmethod
    def implicit(cls) -> KeyRing:
        """What a database without a stored ring holds: version 1, in ``ApplicationDatas``."""
        return cls(revision=0, current=LEGACY_VERSION, versions={LEGACY_VERSION: RingVersion(LEGACY_VERSION)})

    @classmethod
    def parse(cls, stored: StoredKeyRing) -> KeyRing:
        """The stored document as written, not yet authenticated."""
        try:
            document: Any = json.loads(stored.document)
            versions = {
                int(number): RingVersion(
                    int(number),
                    str(entry["state"]),
                    str(entry.get("created", "")),
                    {str(fp): str(wrap) for fp, wrap in dict(entry["wraps"]).items()},
                    None if entry.get("seal") is None else str(entry["seal"]),
                )
                for number, entry in document["versions"].items()
            }
            ring_format = int(document.get("format", 1))
            ring = cls(
                revision=stored.revision,
                current=int(document["current"]),
                versions=versions,
                accept_legacy=document.get("unboundRecords", "accepted") != "refused",
                format=ring_format,
                document_revision=int(document.get("revision", 0)),
                mac=str(document.get("mac", "")),
                adopted=str(document.get("adopted", "")),
                abandoned=int(document.get("abandonedRecords", 0)),
                digest=stored_digest(stored),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(
                f"the key ring (table keyconnector_key_ring) is not readable: {exc!r}"
            ) from None
        if ring.current not in versions or versions[ring.current].state != ACTIVE:
            raise StorageError(f"the key ring names version {ring.current} as current, but it is not active")
        return ring

    def _body(self, revision: int) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "revision": revision,
            "current": self.current,
            "unboundRecords": "accepted" if self.accept_legacy else "refused",
            "adopted": self.adopted,
            **({"abandonedRecords": self.abandoned} if self.abandoned else {}),
            "versions": {
                str(number): {
                    "state": entry.state,
                    "created": entry.created,
                    "wraps": entry.wraps,
                    **({"seal": entry.seal} if entry.seal is not None else {}),
                }
                for number, entry in sorted(self.versions.items())
            },
        }

    def _mac(self, body: dict[str, Any]) -> str:
        assert self.auth_key is not None
        return hmac.new(derive_key(self.auth_key, _MAC_PURPOSE), _canonical(body), hashlib.sha256).hexdigest()

    def dump(self, revision: int) -> str:
        """The document for ``revision``, authenticated: only a process holding the key can write one."""
        if self.auth_key is None:
            raise AssertionError("an unauthenticated key ring cannot be written")
        unsealed = [number for number in self.active if self.versions[number].seal is None]
        if unsealed:
            raise AssertionError(f"active data key version(s) {unsealed} carry no seal")
        body = self._body(revision)
        return json.dumps({**body, "mac": self._mac(body)}, sort_keys=True)

    def mac_verifies(self, auth_key: bytes) -> bool:
        body = self._body(self.document_revision)
        expected = hmac.new(derive_key(auth_key, _MAC_PURPOSE), _canonical(body), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.mac)

    @property
    def anchor(self) -> str:
        """The fingerprint of the authentication key (``keyRingAnchor``): not a secret."""
        return anchor_of(self.auth_key) if self.auth_key is not None else ""

    @property
    def active(self) -> list[int]:
        return sorted(number for number, entry in self.versions.items() if entry.state == ACTIVE)

    def fingerprints(self) -> set[str]:
        return {fp for number in self.active for fp in self.versions[number].wraps}

    def seal_versions(self, keys: dict[int, DataKey]) -> None:
        """Seal the authentication key under every active version (after adding one, say)."""
        assert self.auth_key is not None
        for number, key in keys.items():
            entry = self.versions[number]
            if entry.state == ACTIVE and entry.seal is None:
                entry.seal = key.seal_secret(self.auth_key, _seal_context(number))

    def derive(self, purpose: str) -> bytes:
        """A key for another part of the deployment (the audit trail, backups), bound to this ring."""
        if self.auth_key is None:
            raise AssertionError("the key ring is not authenticated")
        return derive_key(self.auth_key, purpose)


def stored_digest(stored: StoredKeyRing | None) -> str:
    """Identifies a stored row (revision and document) without parsing or authenticating it."""
    if stored is None:
        return ""
    return hashlib.sha256(f"{stored.revision}:{stored.document}".encode()).hexdigest()


def anchor_of(auth_key: bytes) -> str:
    return derive_key(auth_key, _ANCHOR_PURPOSE)[:10].hex()


def _seal_context(version: int) -> bytes:
    return b"keyconnector/key-ring/auth|" + version.to_bytes(4, "big")


@dataclass(frozen=True)
class RingTrust:
    """What a process already knows about the ring, so that a later one must agree with it."""

    auth_key: bytes | None = field(default=None, repr=False)
    revision: int = 0
    anchor: str | None = None
    """``keyRingAnchor``: the authentication key's fingerprint the operator pinned."""


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def precise_now_text() -> str:
    """``now_text`` with milliseconds: a new data-key version's creation time, from which a resumed
    rotation computes how much of the settle time is left."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def read_ring(repository: KeyRingStore) -> KeyRing:
    """The stored ring as written, unauthenticated: for showing it (``stats``), never for using it."""
    stored = await repository.get_key_ring()
    return KeyRing.implicit() if stored is None else KeyRing.parse(stored)


async def save_ring(repository: KeyRingStore, ring: KeyRing) -> KeyRing:
    """Compare-and-swap; raises ``KeyRingConflict`` when someone else changed it first."""
    document = ring.dump(ring.revision + 1)
    if not await repository.put_key_ring(document, ring.revision):
        raise KeyRingConflict("the key ring was changed by another process meanwhile; run the command again")
    ring.revision += 1
    ring.document_revision = ring.revision
    ring.digest = stored_digest(StoredKeyRing(ring.revision, document))
    return ring


def _decode(wrapped: str, where: str) -> bytes:
    try:
        return base64.b64decode(wrapped, validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityFailure(f"{where} is not valid base64") from None


def _has_wrap(entry: RingVersion | None, provider: KeyProvider) -> bool:
    return entry is not None and any(reader.fingerprint in entry.wraps for reader in readers(provider))


def wrap_for(
    ring: KeyRing, version: int, provider: KeyProvider, application_datas: str | None
) -> tuple[str, KeyProvider]:
    """The wrap of ``version`` meant for ``provider``'s key pair, and the provider that opens it: its
    own in the ring, else upstream's algorithm's of the same key pair (``keypairs.base.readers``),
    else for version 1 ``application_datas`` (upstream's wrap, made before any key ring existed).

    Pure, so that a backup can be checked against a key pair before anything is written."""
    entry = ring.versions.get(version)
    if entry is None or entry.state != ACTIVE:
        raise IntegrityFailure(f"data key version {version} is not in the key ring (retired or never made)")
    for reader in readers(provider):
        found = entry.wraps.get(reader.fingerprint)
        if found is not None:
            return found, reader
    wrapped = application_datas if version == LEGACY_VERSION else None
    if wrapped is None:
        raise ForeignDataKey(
            f"data key version {version} is not wrapped for this key pair ({provider.description}; "
            f"fingerprint {provider.fingerprint}); it is wrapped for {len(entry.wraps)} other key pair(s) "
            f"({', '.join(sorted(entry.wraps))}). Run `keyconnector rotate-key-pair` with the settings of a "
            "key pair that has it, naming this one as the new pair"
        )
    return wrapped, upstream_view(provider)


async def unwrap_version(ring: KeyRing, version: int, provider: KeyProvider, wrapped: str) -> bytes:
    """``provider``'s unwrap of ``wrapped`` (data key ``version``); a wrap the key pair refuses is a
    ``ForeignDataKey`` naming this pair's fingerprint and those the ring knows the key for."""
    blob = _decode(wrapped, f"the wrap of data key version {version}")
    try:
        return await provider.unwrap(blob)
    except IntegrityFailure as exc:
        entry = ring.versions.get(version)
        others = sorted(set(entry.wraps) - {provider.fingerprint}) if entry is not None else []
        where = (
            f"the key ring holds it wrapped for {', '.join(others)}"
            if others
            else "ApplicationDatas holds it wrapped by another key pair (upstream does not record which)"
        )
        # The remedy is said here, not only by the composition (which adds the setting's name): a
        # worker or a report loading the keys later gets these words alone.
        raise ForeignDataKey(
            f"data key version {version} does not open with this key pair ({provider.description}; "
            f"fingerprint {provider.fingerprint}): {where} ({exc}); only the key pair that wrapped it "
            "opens it: use that one (restore it from a backup if it is lost; a new key pair never can)"
        ) from None


async def stored_wrap(
    repository: KeyRingStore, ring: KeyRing, version: int, provider: KeyProvider
) -> tuple[str, KeyProvider]:
    """``wrap_for`` with ``ApplicationDatas`` read from the database when version 1 needs it."""
    entry = ring.versions.get(version)
    legacy = None
    if version == LEGACY_VERSION and entry is not None and not _has_wrap(entry, provider):
        legacy = await repository.get_wrapped_data_key()
    return wrap_for(ring, version, provider, legacy)


async def unwrap_raw(repository: Repository, ring: KeyRing, version: int, provider: KeyProvider) -> bytes:
    """The 32 bytes of data key ``version``: only for re-wrapping them under another key pair."""
    wrapped, reader = await stored_wrap(repository, ring, version, provider)
    raw = await unwrap_version(ring, version, reader, wrapped)
    DataKey(raw, version)  # checks the length, with the message that says which key pair is wrong
    return raw


async def own_wrap(repository: Repository, ring: KeyRing, version: int, provider: KeyProvider) -> str:
    """``provider``'s own wrap of ``version``, in its own algorithm: the stored one (the ring's, or
    ``ApplicationDatas``), else a new one made from upstream's wrap of the same key pair. What a
    change of the ring files under ``provider.fingerprint``: never a wrap of another algorithm."""
    wrapped, reader = await stored_wrap(repository, ring, version, provider)
    if reader.fingerprint == provider.fingerprint:
        return wrapped
    raw = await unwrap_version(ring, version, reader, wrapped)
    DataKey(raw, version)
    return await wrap_checked(provider, raw, version)


@dataclass
class OpenedRing:
    ring: KeyRing
    keys: dict[int, DataKey]
    """Every active version, unwrapped by the caller's key pair."""
    adopted: str | None = None
    """Set when this call adopted (or made) the ring: what it adopted, for the log."""

    def key_set(self) -> DataKeys:
        return DataKeys(self.keys, self.ring.current, accept_legacy=self.ring.accept_legacy)


async def open_ring(
    repository: Repository,
    provider: KeyProvider,
    *,
    trust: RingTrust | None = None,
    adopt: bool = True,
    accept_legacy_when_new: bool = False,
    allow_new_data_key: bool = False,
) -> OpenedRing:
    """The authenticated key ring and every active data key, or ``RingRefused`` saying what is wrong.

    ``trust`` is what the caller trusted before (a running service's last ring, the pinned anchor).
    Without an earlier ring (a cold start), the first records of the database are checked against
    the ring too: a ring that lost versions the records need, or whose keys open none of them, is
    refused. A database without an authenticated ring is adopted (``adopt``: written, race-free
    across instances) or, without ``adopt``, ``NotAdopted`` says what ``serve`` would do.
    ``accept_legacy_when_new``: whether a ring made for a database without records accepts
    upstream-format records (``compat.writeLegacyFormat``). ``allow_new_data_key``: whether a
    database with user records but no data key gets one (``database.allowNewDataKey``); without it
    that is ``NewDataKeyRefused``, and a stored data key this key pair does not open is always
    ``ForeignDataKey``, never replaced.
    """
    trust = trust or RingTrust()
    for _ in range(5):
        stored = await repository.get_key_ring()
        ring = None if stored is None else KeyRing.parse(stored)
        if ring is None or ring.format < FORMAT:
            if trust.auth_key is not None:
                raise RingRefused(
                    "the key ring was deleted or replaced by an unauthenticated one while this process "
                    f"trusted revision {trust.revision}: someone without the data key changed the table "
                    "keyconnector_key_ring. Restore it (keyconnector restore) or investigate before "
                    "restarting"
                )
            adoption = await _adoption(
                repository,
                provider,
                ring,
                accept_legacy_when_new,
                create=adopt,
                allow_new_data_key=allow_new_data_key,
            )
            _check_anchor(adoption.ring, trust)
            if not adopt:
                return adoption  # what serve would adopt, not written
            try:
                await save_ring(repository, adoption.ring)
            except KeyRingConflict:
                continue  # another instance adopted first: authenticate what it wrote
            return adoption
        keys = await authenticate(ring, provider, trust, await _application_datas(repository, ring, provider))
        if trust.auth_key is None:
            await _check_records(repository, ring, keys, ring_missing=False)
        return OpenedRing(ring, keys)
    raise KeyRingConflict("the key ring kept changing while it was being read; try again")


async def _application_datas(repository: KeyRingStore, ring: KeyRing, provider: KeyProvider) -> str | None:
    """``ApplicationDatas``, read only when version 1 is active without a wrap for ``provider``."""
    entry = ring.versions.get(LEGACY_VERSION)
    if entry is not None and entry.state == ACTIVE and not _has_wrap(entry, provider):
        return await repository.get_wrapped_data_key()
    return None


async def authenticate(
    ring: KeyRing, provider: KeyProvider, trust: RingTrust, application_datas: str | None
) -> dict[int, DataKey]:
    """Authenticate a parsed ring with ``provider`` (``application_datas``: upstream's wrap of version 1,
    used when the ring holds none for this key pair) and return every active data key; sets
    ``ring.auth_key``. Raises ``RingRefused`` saying what is wrong. Reads no database, so that a
    backup's ring can be checked before anything is written."""
    if ring.format < FORMAT:
        raise RingRefused("the key ring was written before rings were authenticated; it is adopted at start")
    if ring.document_revision != ring.revision:
        raise RingRefused(
            f"the key ring's row says revision {ring.revision}, but its authenticated content was written "
            f"as revision {ring.document_revision}: the row was edited or an older ring copied in"
        )
    if ring.revision < trust.revision:
        raise RingRefused(
            f"the key ring went back from revision {trust.revision} to {ring.revision}: an older ring was "
            "copied in"
        )
    keys: dict[int, DataKey] = {}
    for number in ring.active:
        wrapped, reader = wrap_for(ring, number, provider, application_datas)
        try:
            keys[number] = DataKey(await unwrap_version(ring, number, reader, wrapped), number)
        except ForeignDataKey:
            if reader.fingerprint not in ring.versions[number].wraps:
                raise  # ApplicationDatas: upstream does not say which key pair made it
            # Filed under this very key pair and algorithm, yet it does not open: not a question of
            # settings, the ring was edited (a wrap replaced, or relabelled across algorithms).
            raise RingRefused(
                f"the key ring's wrap of data key version {number} filed under this key pair "
                f"({reader.fingerprint}) does not unwrap with it: the ring was edited (a wrap replaced, "
                "or one of another wrap algorithm filed under this one). Nothing in it is used"
            ) from None
    auth_key = trust.auth_key
    if auth_key is None:
        for number in ring.active:
            seal = ring.versions[number].seal
            if seal is None:
                continue
            try:
                candidate = keys[number].open_secret(seal, _seal_context(number))
            except IntegrityFailure:
                continue
            if ring.mac_verifies(candidate):
                auth_key = candidate
                break
    if auth_key is None or not ring.mac_verifies(auth_key):
        raise RingRefused(
            f"the key ring (revision {ring.revision}) does not authenticate: it was changed by someone who "
            "does not hold the data key (a version added or a wrap replaced with the public key alone, or "
            "the ring edited). Nothing in it is used"
        )
    for number in ring.active:
        if not _carries(keys[number], ring.versions[number].seal, number, auth_key):
            raise RingRefused(
                f"data key version {number} as this key pair unwraps it does not carry the key ring's "
                "authentication: its wrap was replaced (ApplicationDatas or the ring) with a key of "
                "someone else's choosing"
            ) from None
    ring.auth_key = auth_key
    _check_anchor(ring, trust)
    return keys


def _carries(key: DataKey, seal: str | None, version: int, auth_key: bytes) -> bool:
    """Whether ``seal`` is ``auth_key`` sealed under ``key``: the proof that ``key`` is the real one."""
    if seal is None:
        return False
    try:
        return hmac.compare_digest(key.open_secret(seal, _seal_context(version)), auth_key)
    except IntegrityFailure:
        return False


def _check_anchor(ring: KeyRing, trust: RingTrust) -> None:
    if trust.anchor and ring.auth_key is not None and not hmac.compare_digest(ring.anchor, trust.anchor):
        raise RingRefused(
            f"the key ring's anchor is {ring.anchor}, but keyConnectorSettings__keyRingAnchor pins "
            f"{trust.anchor}: this is not the ring the deployment was pinned to"
        )


async def _sample(repository: RecordStore) -> list[UserKeyRecord]:
    async for batch in repository.iter_records(SAMPLE_SIZE):
        return [record for record in batch if record.key]
    return []


async def _check_records(
    repository: Repository,
    ring: KeyRing,
    keys: dict[int, DataKey],
    *,
    ring_missing: bool,
    sample: list[UserKeyRecord] | None = None,
) -> None:
    """Refuse a ring that contradicts the first records: it lacks a version they were sealed by, or
    none of them opens under its keys (its keys were swapped for someone else's)."""
    records = await _sample(repository) if sample is None else sample
    newest = max(ring.versions)
    openable = 0
    for record in records:
        assert record.key is not None
        try:
            version = record_version(record.key)
        except IntegrityFailure:
            continue
        if version > newest:
            where = "there is no key ring" if ring_missing else f"the key ring ends at version {newest}"
            raise RingRefused(
                f"user records sealed by data key version {version} exist, but {where}: the ring was "
                "deleted or rolled back. Restore it from a backup (keyconnector restore) instead of "
                "letting a new one be made"
            )
        key = keys.get(version)
        if key is None:
            continue
        openable += 1
        try:
            key.open(record.key, record.user_id)
            return
        except IntegrityFailure:
            continue
    if openable and not ring.abandoned:  # abandoned records never open: the operator said so
        raise RingRefused(
            f"none of the first {openable} user record(s) opens under the data keys this key ring and key "
            "pair give: the data key in ApplicationDatas or the key ring was replaced"
        )


async def _adoption(
    repository: Repository,
    provider: KeyProvider,
    old: KeyRing | None,
    accept_legacy_when_new: bool,
    *,
    create: bool,
    allow_new_data_key: bool = False,
) -> OpenedRing:
    """The first authenticated ring of this deployment, made from what the database holds.

    The takeover guard lives here, where the only new data key of a deployment is made: user
    records without a data key get one only with ``allow_new_data_key``, logged at WARNING since
    those records become unreadable for good."""
    sample = await _sample(repository)
    abandoned = 0
    if old is None:
        wrapped = await repository.get_wrapped_data_key()
        adopted = "the data key in ApplicationDatas"
        if wrapped is None:
            if sample and not allow_new_data_key:
                raise NewDataKeyRefused(len(sample), at_least=len(sample) >= SAMPLE_SIZE)
            abandoned = len(sample)
            records = f"{'at least ' if abandoned >= SAMPLE_SIZE else ''}{abandoned} existing user record(s)"
            if not create:
                if abandoned:
                    raise NotAdopted(
                        f"no data key, but {records}: `serve` would make a new data key (allowNewDataKey "
                        "is set) and they become unreadable",
                        abandons=abandoned,
                    )
                raise NotAdopted("no data key yet: `serve` makes one at start")
            # ApplicationDatas is upstream's: always its algorithm, so that upstream can read it.
            upstream = upstream_view(provider)
            proposal = base64.b64encode(await upstream.wrap(generate_data_key())).decode("ascii")
            wrapped = await repository.store_wrapped_data_key(proposal)
            adopted = "a new data key" if wrapped == proposal else adopted
            if abandoned and wrapped == proposal:
                log.warning(
                    "made a NEW data key for a database that held %s and no data key (allowNewDataKey): "
                    "the %s become unreadable; they stay in the database untouched",
                    records,
                    records,
                )
        ring = KeyRing.implicit()
        ring.versions[LEGACY_VERSION].wraps[upstream_view(provider).fingerprint] = wrapped
        ring.versions[LEGACY_VERSION].created = now_text()
    else:
        ring = old
        adopted = f"the key ring of an earlier keyconnector (revision {old.revision})"
        for number in ring.active:
            entry = ring.versions[number]
            if not _has_wrap(entry, provider):
                wrapped, reader = await stored_wrap(repository, ring, number, provider)
                entry.wraps[reader.fingerprint] = wrapped
    raws = {number: await unwrap_raw(repository, ring, number, provider) for number in ring.active}
    keys = {number: DataKey(raw, number) for number, raw in raws.items()}
    for number, raw in raws.items():  # rsaKey.wrapAlgorithm other than upstream's: its own wrap too
        entry = ring.versions[number]
        if provider.fingerprint not in entry.wraps:
            entry.wraps[provider.fingerprint] = await wrap_checked(provider, raw, number)
            if old is None:
                # The ring starts with this algorithm alone; ApplicationDatas keeps upstream's wrap,
                # which an instance with upstream's algorithm still reads (``wrap_for``).
                del entry.wraps[upstream_view(provider).fingerprint]
    ring.abandoned = abandoned  # before the check: records of an abandoned deployment cannot open
    await _check_records(repository, ring, keys, ring_missing=old is None, sample=sample)
    ring.accept_legacy = bool(sample) or accept_legacy_when_new
    ring.adopted = f"{adopted}, {now_text()}"
    ring.auth_key = generate_data_key()
    ring.mac = ""
    ring.seal_versions(keys)
    if not create:
        return OpenedRing(ring, keys, f"no authenticated key ring yet: `serve` adopts {adopted} at start")
    return OpenedRing(ring, keys, adopted)


async def load_ring(repository: Repository, provider: KeyProvider, trust: RingTrust | None = None) -> KeyRing:
    """The authenticated ring (adopted first if need be)."""
    return (await open_ring(repository, provider, trust=trust)).ring


async def load_key_set(
    repository: Repository,
    provider: KeyProvider,
    trust: RingTrust | None = None,
    *,
    accept_legacy_when_new: bool = False,
    allow_new_data_key: bool = False,
) -> tuple[DataKeys, KeyRing]:
    """Every active data-key version this key pair can unwrap, and the authenticated ring they came from."""
    opened = await open_ring(
        repository,
        provider,
        trust=trust,
        accept_legacy_when_new=accept_legacy_when_new,
        allow_new_data_key=allow_new_data_key,
    )
    notice = algorithm_notice(opened.ring, provider)
    if notice is not None:
        log.warning("%s", notice)
    elif len(readers(provider)) > 1:
        log.info(
            "the key pair wraps with %s in the key ring; ApplicationDatas keeps upstream's RSA-OAEP (SHA-1) "
            "wrap of data key version 1, which is what upstream and `downgrade-records` read",
            provider.fingerprint.partition(":")[0],
        )
    if opened.adopted:
        log.warning(
            "adopted %s as the root of the authenticated key ring (anchor %s; pin it with "
            "keyConnectorSettings__keyRingAnchor); upstream-format records are %s",
            opened.adopted,
            opened.ring.anchor,
            "accepted until `keyconnector upgrade-records`" if opened.ring.accept_legacy else "refused",
        )
    return opened.key_set(), opened.ring


def algorithm_notice(ring: KeyRing, provider: KeyProvider) -> str | None:
    """Said when ``provider`` reads some active version through upstream's algorithm's wrap of its
    key pair (``rsaKey.wrapAlgorithm`` changed without ``rotate-key-pair``): it works, but the
    deployment has not left SHA-1 yet."""
    if len(readers(provider)) < 2:
        return None
    lacking = [number for number in ring.active if provider.fingerprint not in ring.versions[number].wraps]
    if not lacking:
        return None
    return (
        f"data key version(s) {', '.join(map(str, lacking))} have no wrap of this key pair's algorithm "
        f"({provider.fingerprint.partition(':')[0]}) in the key ring and are read through upstream's "
        "RSA-OAEP (SHA-1) wrap: run `keyconnector rotate-key-pair` with the old settings and these as the "
        "target (the same key pair, the new keyConnectorSettings__rsaKey__wrapAlgorithm), then "
        "`rotate-key-pair --retire-old` with these settings"
    )


# -- changes of the ring (``keyconnector rotate-key-pair`` and ``rotate-data-key``) ----------------------


async def change_ring(
    repository: Repository,
    provider: KeyProvider,
    change: Callable[[KeyRing], Awaitable[bool]],
    *,
    attempts: int = 5,
    trust: RingTrust | None = None,
    dry_run: bool = False,
) -> tuple[KeyRing, bool]:
    """Apply ``change`` to the stored, authenticated ring in one compare-and-swap.

    ``change`` edits the ring it is given and says whether it changed anything (nothing is stored
    otherwise). When another process changed the ring meanwhile, the ring is reloaded (and
    authenticated again) and ``change`` applied again, so its decisions are always taken on the ring
    it replaces. ``provider`` authenticates it: a ring changed by someone without the data key is
    refused (``RingRefused``), never built upon.

    ``dry_run``: ``change`` decides on the ring as it is (or as ``serve`` would adopt it) and the
    result is returned, but nothing is stored, so a ``--dry-run`` takes exactly the real run's
    decisions and refusals.
    """
    if dry_run:
        ring = (await open_ring(repository, provider, trust=trust, adopt=False)).ring
        return ring, await change(ring)
    for attempt in range(1, attempts + 1):
        ring = await load_ring(repository, provider, trust)
        if not await change(ring):
            return ring, False
        try:
            return await save_ring(repository, ring), True
        except KeyRingConflict:
            if attempt == attempts:
                raise
            log.info("the key ring changed meanwhile; deciding again (attempt %d)", attempt + 1)
    raise AssertionError("unreachable")


async def wrap_checked(provider: KeyProvider, raw: bytes, version: int) -> str:
    """``raw`` wrapped by ``provider``, proven to unwrap again before anything relies on it (a KMS
    wraps with a local public key but unwraps remotely: a wrong key id would otherwise go unseen)."""
    wrapped = await provider.wrap(raw)
    if not hmac.compare_digest(await provider.unwrap(wrapped), raw):
        raise IntegrityFailure(
            f"{provider.description} does not unwrap its own wrap of data key version {version}"
        )
    return base64.b64encode(wrapped).decode("ascii")


async def _opens_to(provider: KeyProvider, wrapped: str | None, raw: bytes) -> bool:
    if wrapped is None:
        return False
    try:
        return hmac.compare_digest(await provider.unwrap(_decode(wrapped, "a stored wrap")), raw)
    except IntegrityFailure:
        return False


async def add_key_pair(
    repository: Repository, current: KeyProvider, new: KeyProvider, *, dry_run: bool = False
) -> tuple[KeyRing, list[int]]:
    """Wrap every active data-key version for ``new`` too, in one compare-and-swap of the ring.

    ``current`` (the configured pair) unwraps each version; its own wraps stay, so instances still
    running with it keep working. A deployment without a ring gets one, with version 1's wrap from
    ``ApplicationDatas`` filed under ``current``'s fingerprint. Idempotent: a version that already has
    a wrap ``new`` opens to the right key is left alone. Returns the versions newly wrapped (with
    ``dry_run``: that would be, each proven by a real wrap and unwrap with ``new``; nothing stored).
    """
    added: list[int] = []

    async def change(ring: KeyRing) -> bool:
        added.clear()
        changed = False
        for version in ring.active:
            entry = ring.versions[version]
            raw = await unwrap_raw(repository, ring, version, current)
            if current.fingerprint not in entry.wraps:
                entry.wraps[current.fingerprint] = await own_wrap(repository, ring, version, current)
                entry.created = entry.created or now_text()
                changed = True
            if await _opens_to(new, entry.wraps.get(new.fingerprint), raw):
                continue
            entry.wraps[new.fingerprint] = await wrap_checked(new, raw, version)
            added.append(version)
            changed = True
        return changed

    ring, _ = await change_ring(repository, current, change, dry_run=dry_run)
    return ring, added


@dataclass
class KeyPairRetirement:
    ring: KeyRing
    removed: list[str]
    """Fingerprints of the key pairs whose wraps were removed."""
    application_datas_updated: bool


async def retire_other_key_pairs(
    repository: Repository, provider: KeyProvider, *, dry_run: bool = False
) -> KeyPairRetirement:
    """Keep only ``provider``'s wraps, and make ``ApplicationDatas`` hold its wrap of version 1.

    Refuses (``RotationRefused``, nothing written) when some active version has no wrap that
    ``provider`` unwraps: retiring the other pairs would then lose that version. The ring is changed
    first; ``ApplicationDatas`` after, so a crash in between is finished by running it again.
    ``dry_run``: the same checks and the same answer (what would be removed and updated), nothing stored.
    """
    removed: set[str] = set()
    mine = provider.fingerprint

    async def refuse_if_missing(ring: KeyRing) -> None:
        missing: list[int] = []
        for version in ring.active:
            try:
                await unwrap_raw(repository, ring, version, provider)
            except IntegrityFailure:
                missing.append(version)
        if missing:
            raise RotationRefused(
                f"refusing to retire the other key pairs: data key version(s) "
                f"{', '.join(map(str, missing))} have no wrap for the configured key pair "
                f"({provider.description}). Run `keyconnector rotate-key-pair` with the old settings, "
                "naming this key pair as the new one, then retire"
            )

    # Before authenticating (which needs every version): say plainly which ones this pair lacks.
    await refuse_if_missing(await read_ring(repository))

    async def change(ring: KeyRing) -> bool:
        removed.clear()
        await refuse_if_missing(ring)
        changed = False
        for version in ring.active:
            entry = ring.versions[version]
            wrapped = entry.wraps.get(mine) or await own_wrap(repository, ring, version, provider)
            removed.update(fp for fp in entry.wraps if fp != mine)
            if entry.wraps != {mine: wrapped}:
                entry.wraps = {mine: wrapped}
                changed = True
        return changed

    ring, _ = await change_ring(repository, provider, change, dry_run=dry_run)
    updated = await store_upstream_wrap(repository, ring, provider, dry_run=dry_run)
    return KeyPairRetirement(ring, sorted(removed), updated)


async def store_upstream_wrap(
    repository: Repository, ring: KeyRing, provider: KeyProvider, *, dry_run: bool = False
) -> bool:
    """Make ``ApplicationDatas`` hold version 1 (when active) as upstream reads it with ``provider``'s
    key pair: its wrap in upstream's algorithm (``keypairs.base.upstream_view``), whatever algorithm
    the ring's wraps use. Returns whether it was (with ``dry_run``: would be) written."""
    entry = ring.versions.get(LEGACY_VERSION)
    if entry is None or entry.state != ACTIVE:
        return False
    upstream = upstream_view(provider)
    stored = await repository.get_wrapped_data_key()
    mine = entry.wraps.get(upstream.fingerprint)
    if mine is not None:  # the ring holds upstream's wrap itself: the same bytes
        if stored == mine:
            return False
        if not dry_run:
            await repository.set_wrapped_data_key(mine)
        return True
    raw = await unwrap_raw(repository, ring, LEGACY_VERSION, provider)
    if await _opens_to(upstream, stored, raw):
        return False
    if not dry_run:
        await repository.set_wrapped_data_key(await wrap_checked(upstream, raw, LEGACY_VERSION))
    return True


async def start_data_key_version(
    repository: Repository, provider: KeyProvider, *, dry_run: bool = False
) -> tuple[KeyRing, int | None]:
    """Make a new data-key version, wrapped by ``provider`` only, and make it current.

    Refuses while active versions are wrapped by another key pair (instances running with it could
    not unwrap the new version). Makes nothing while a rotation is unfinished (an active version
    besides the current one): that rotation is to be finished first. Returns the new version, or
    None when none was made. Version numbers are never reused, retired ones included. ``dry_run``:
    the same refusals, the version that would be made (its key wrapped and unwrapped once, to prove
    the key pair can), nothing stored.
    """
    made: list[int] = []
    mine = provider.fingerprint

    async def change(ring: KeyRing) -> bool:
        made.clear()
        others = ring.fingerprints() - {mine}
        if others:
            raise RotationRefused(
                f"refusing to make a new data key: the active data-key versions are also wrapped by "
                f"{len(others)} other key pair(s) ({', '.join(sorted(others))}), and instances running "
                "with those could not unwrap the new version. Finish the key-pair rotation first: "
                "`keyconnector rotate-key-pair --retire-old` with the new key pair's settings"
            )
        if len(ring.active) > 1:
            return False
        for version in ring.active:
            entry = ring.versions[version]
            if mine not in entry.wraps:
                entry.wraps[mine] = await own_wrap(repository, ring, version, provider)
                entry.created = entry.created or now_text()
        number = max(ring.versions) + 1
        raw = generate_data_key()
        ring.versions[number] = RingVersion(
            number, ACTIVE, precise_now_text(), {mine: await wrap_checked(provider, raw, number)}
        )
        ring.seal_versions({number: DataKey(raw, number)})  # carries the ring's authentication forward
        ring.current = number
        made.append(number)
        return True

    ring, _ = await change_ring(repository, provider, change, dry_run=dry_run)
    return ring, (made[0] if made else None)


async def retire_versions(
    repository: Repository, provider: KeyProvider, versions: Collection[int]
) -> tuple[KeyRing, list[int]]:
    """Mark ``versions`` retired and drop their wraps and seals (never the current one), in one
    compare-and-swap. The entry stays as a tombstone: the authenticated ring says the version is
    gone, so neither ``ApplicationDatas`` nor an older ring can bring it back unseen.

    The caller has checked that no record uses them: a retired key is gone for good.
    """
    retired: list[int] = []

    async def change(ring: KeyRing) -> bool:
        retired.clear()
        for version in sorted(versions):
            entry = ring.versions.get(version)
            if entry is None or entry.state != ACTIVE or version == ring.current:
                continue
            entry.state = RETIRED
            entry.wraps = {}
            entry.seal = None
            retired.append(version)
        return bool(retired)

    ring, _ = await change_ring(repository, provider, change)
    return ring, retired


async def accept_unbound_records(repository: Repository, provider: KeyProvider, ring: KeyRing) -> KeyRing:
    """Make the ring accept upstream-format records again: ``compat.writeLegacyFormat`` writes them
    (the way back to upstream), and a ring refusing them would refuse those writes on the next read."""

    async def change(stored: KeyRing) -> bool:
        changed = not stored.accept_legacy
        stored.accept_legacy = True
        return changed

    trust = RingTrust(ring.auth_key, ring.revision)
    changed_ring, changed = await change_ring(repository, provider, change, trust=trust)
    if changed:
        log.warning(
            "keyConnectorSettings__compat__writeLegacyFormat is set: the key ring accepts upstream-format "
            "(unbound) records again, so a record copied from another user's row or an old dump opens "
            "until `keyconnector upgrade-records` runs without that setting"
        )
    return changed_ring


async def refuse_unbound_records(repository: Repository, provider: KeyProvider, trust: RingTrust) -> KeyRing:
    """Make the ring refuse upstream-format records: only once every record was verified bound."""

    async def change(stored: KeyRing) -> bool:
        changed = stored.accept_legacy
        stored.accept_legacy = False
        return changed

    ring, _ = await change_ring(repository, provider, change, trust=trust)
    return ring
