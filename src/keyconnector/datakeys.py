"""Data-key versions and the key pairs that wrap them: the key ring.

Upstream has one data key, wrapped once, in ``ApplicationDatas``. Rotating either the data key or
the key pair needs more: several data-key versions alive at once (records are re-encrypted one
batch at a time, online), and each version wrapped by more than one key pair while a key-pair
rotation is rolled out (instances still running with the old settings must keep working).

That state is one JSON document in our table ``keyconnector_key_ring``, changed only by
compare-and-swap on its revision, so concurrent operators and services never lose each other's
changes. A deployment that never rotated has no document at all: version 1 is then simply the key
in ``ApplicationDatas``, exactly as upstream sees it. Version 1 is always that key; its wrap in
``ApplicationDatas`` is kept as long as version 1 is in use, so upstream (and an instance of ours
with the old settings) keeps reading the old records.

Each wrap is filed under the fingerprint of the key pair that made it (``KeyProvider.fingerprint``),
so a process finds its own wrap without trying every key pair it cannot use.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from keyconnector.crypto import LEGACY_VERSION, DataKey, KeySet, generate_data_key
from keyconnector.errors import IntegrityError, KeyConnectorError, StorageError
from keyconnector.keys import KeyProvider
from keyconnector.storage import Repository, StoredKeyRing

log = logging.getLogger("keyconnector.datakeys")

ACTIVE = "active"
RETIRED = "retired"


class KeyRingConflict(KeyConnectorError):
    """Another process changed the key ring at the same time; reload and try again."""


class RotationRefused(KeyConnectorError):
    """The key ring is not in a state where the asked change is safe; the message says what to do first."""


@dataclass
class RingVersion:
    version: int
    state: str = ACTIVE
    created: str = ""
    wraps: dict[str, str] = field(default_factory=dict)
    """Key-pair fingerprint -> base64 of the wrapped data key."""


@dataclass
class KeyRing:
    revision: int
    """0 when nothing is stored yet (a deployment that never rotated)."""
    current: int
    versions: dict[int, RingVersion]

    @classmethod
    def implicit(cls) -> KeyRing:
        return cls(revision=0, current=LEGACY_VERSION, versions={LEGACY_VERSION: RingVersion(LEGACY_VERSION)})

    @classmethod
    def parse(cls, stored: StoredKeyRing) -> KeyRing:
        try:
            document: Any = json.loads(stored.document)
            versions = {
                int(number): RingVersion(
                    int(number), str(entry["state"]), str(entry.get("created", "")), dict(entry["wraps"])
                )
                for number, entry in document["versions"].items()
            }
            ring = cls(revision=stored.revision, current=int(document["current"]), versions=versions)
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(
                f"the key ring (table keyconnector_key_ring) is not readable: {exc!r}"
            ) from None
        if ring.current not in versions or versions[ring.current].state != ACTIVE:
            raise StorageError(f"the key ring names version {ring.current} as current, but it is not active")
        return ring

    def dump(self) -> str:
        return json.dumps(
            {
                "format": 1,
                "current": self.current,
                "versions": {
                    str(number): {"state": entry.state, "created": entry.created, "wraps": entry.wraps}
                    for number, entry in sorted(self.versions.items())
                },
            },
            sort_keys=True,
        )

    @property
    def active(self) -> list[int]:
        return sorted(number for number, entry in self.versions.items() if entry.state == ACTIVE)

    def fingerprints(self) -> set[str]:
        return {fp for number in self.active for fp in self.versions[number].wraps}


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def precise_now_text() -> str:
    """``now_text`` with milliseconds: a new data-key version's creation time, from which a resumed
    rotation computes how much of the settle time is left."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def load_ring(repository: Repository) -> KeyRing:
    stored = await repository.get_key_ring()
    return KeyRing.implicit() if stored is None else KeyRing.parse(stored)


async def save_ring(repository: Repository, ring: KeyRing) -> KeyRing:
    """Compare-and-swap; raises ``KeyRingConflict`` when someone else changed it first."""
    if not await repository.put_key_ring(ring.dump(), ring.revision):
        raise KeyRingConflict("the key ring was changed by another process meanwhile; run the command again")
    ring.revision += 1
    return ring


def _decode(wrapped: str, where: str) -> bytes:
    try:
        return base64.b64decode(wrapped, validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError(f"{where} is not valid base64") from None


async def bootstrap_data_key(repository: Repository, provider: KeyProvider) -> DataKey | None:
    """Make data key version 1 if the database has none; return it unless a key ring exists.

    Race-free across processes and hosts: every instance proposes a key, the repository keeps the
    first one stored, and an instance whose proposal lost unwraps the winner's. So two instances
    starting together on an empty database end up with the same data key.

    Once a key ring exists, ``ApplicationDatas`` is not unwrapped here (None is returned): during a
    key-pair rotation it still holds the old pair's wrap, which an instance started with the new
    pair cannot open, and version 1 may be retired. ``load_key_set`` then finds this key pair's
    wraps in the ring.
    """
    wrapped = await repository.get_wrapped_data_key()
    if wrapped is None:
        candidate = generate_data_key()
        proposal = base64.b64encode(await provider.wrap(candidate)).decode("ascii")
        wrapped = await repository.store_wrapped_data_key(proposal)
        if wrapped == proposal:
            log.info("created a new data key, wrapped by %s", provider.description)
            return DataKey(candidate, LEGACY_VERSION)
    if await repository.get_key_ring() is not None:
        return None
    blob = _decode(wrapped, "the stored data key (ApplicationDatas.SymmetricKey)")
    return DataKey(await provider.unwrap(blob), LEGACY_VERSION)


async def unwrap_version(
    repository: Repository, ring: KeyRing, version: int, provider: KeyProvider
) -> DataKey:
    """Data key ``version``, unwrapped by ``provider`` from the wrap made for its key pair."""
    if version == LEGACY_VERSION and ring.revision == 0:
        made = await bootstrap_data_key(repository, provider)
        if made is not None:
            return made
    return DataKey(await unwrap_raw(repository, ring, version, provider), version)


def wrap_for(ring: KeyRing, version: int, provider: KeyProvider, application_datas: str | None) -> str:
    """The wrap of ``version`` meant for ``provider``'s key pair: its own in the ring, else for
    version 1 ``application_datas`` (upstream's wrap, made before any key ring existed).

    Pure, so that a backup can be checked against a key pair before anything is written."""
    entry = ring.versions.get(version)
    if entry is None or entry.state != ACTIVE:
        raise IntegrityError(f"data key version {version} is not in the key ring (retired or never made)")
    wrapped = entry.wraps.get(provider.fingerprint)
    if wrapped is None and version == LEGACY_VERSION:
        wrapped = application_datas
    if wrapped is None:
        raise IntegrityError(
            f"data key version {version} is not wrapped for this key pair ({provider.description}); it is "
            f"wrapped for {len(entry.wraps)} other key pair(s). Run `keyconnector rotate-key-pair` with the "
            "settings of a key pair that has it, naming this one as the new pair"
        )
    return wrapped


async def stored_wrap(repository: Repository, ring: KeyRing, version: int, provider: KeyProvider) -> str:
    """``wrap_for`` with ``ApplicationDatas`` read from the database when version 1 needs it."""
    entry = ring.versions.get(version)
    legacy = None
    if version == LEGACY_VERSION and entry is not None and provider.fingerprint not in entry.wraps:
        legacy = await repository.get_wrapped_data_key()
    return wrap_for(ring, version, provider, legacy)


async def unwrap_raw(repository: Repository, ring: KeyRing, version: int, provider: KeyProvider) -> bytes:
    """The 32 bytes of data key ``version``: only for re-wrapping them under another key pair."""
    wrapped = await stored_wrap(repository, ring, version, provider)
    raw = await provider.unwrap(_decode(wrapped, f"the wrap of data key version {version}"))
    DataKey(raw, version)  # checks the length, with the message that says which key pair is wrong
    return raw


async def load_key_set(repository: Repository, provider: KeyProvider) -> tuple[KeySet, KeyRing]:
    """Every active data-key version this key pair can unwrap, and the ring they came from."""
    ring = await load_ring(repository)
    keys = {number: await unwrap_version(repository, ring, number, provider) for number in ring.active}
    return KeySet(keys, ring.current), ring


# -- changes of the ring (``keyconnector rotate-key-pair`` and ``rotate-data-key``) ----------------------


async def change_ring(
    repository: Repository, change: Callable[[KeyRing], Awaitable[bool]], *, attempts: int = 5
) -> tuple[KeyRing, bool]:
    """Apply ``change`` to the stored ring in one compare-and-swap.

    ``change`` edits the ring it is given and says whether it changed anything (nothing is stored
    otherwise). When another process changed the ring meanwhile, the ring is reloaded and ``change``
    applied again, so its decisions are always taken on the ring it replaces.
    """
    for attempt in range(1, attempts + 1):
        ring = await load_ring(repository)
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
        raise IntegrityError(
            f"{provider.description} does not unwrap its own wrap of data key version {version}"
        )
    return base64.b64encode(wrapped).decode("ascii")


async def _opens_to(provider: KeyProvider, wrapped: str | None, raw: bytes) -> bool:
    if wrapped is None:
        return False
    try:
        return hmac.compare_digest(await provider.unwrap(_decode(wrapped, "a stored wrap")), raw)
    except IntegrityError:
        return False


async def add_key_pair(
    repository: Repository, current: KeyProvider, new: KeyProvider
) -> tuple[KeyRing, list[int]]:
    """Wrap every active data-key version for ``new`` too, in one compare-and-swap of the ring.

    ``current`` (the configured pair) unwraps each version; its own wraps stay, so instances still
    running with it keep working. A deployment without a ring gets one, with version 1's wrap from
    ``ApplicationDatas`` filed under ``current``'s fingerprint. Idempotent: a version that already has
    a wrap ``new`` opens to the right key is left alone. Returns the versions newly wrapped.
    """
    added: list[int] = []

    async def change(ring: KeyRing) -> bool:
        added.clear()
        changed = False
        for version in ring.active:
            entry = ring.versions[version]
            raw = await unwrap_raw(repository, ring, version, current)
            if current.fingerprint not in entry.wraps:
                entry.wraps[current.fingerprint] = await stored_wrap(repository, ring, version, current)
                entry.created = entry.created or now_text()
                changed = True
            if await _opens_to(new, entry.wraps.get(new.fingerprint), raw):
                continue
            entry.wraps[new.fingerprint] = await wrap_checked(new, raw, version)
            added.append(version)
            changed = True
        return changed

    ring, _ = await change_ring(repository, change)
    return ring, added


@dataclass
class KeyPairRetirement:
    ring: KeyRing
    removed: list[str]
    """Fingerprints of the key pairs whose wraps were removed."""
    application_datas_updated: bool


async def retire_other_key_pairs(repository: Repository, provider: KeyProvider) -> KeyPairRetirement:
    """Keep only ``provider``'s wraps, and make ``ApplicationDatas`` hold its wrap of version 1.

    Refuses (``RotationRefused``, nothing written) when some active version has no wrap that
    ``provider`` unwraps: retiring the other pairs would then lose that version. The ring is changed
    first; ``ApplicationDatas`` after, so a crash in between is finished by running it again.
    """
    removed: set[str] = set()
    mine = provider.fingerprint

    async def change(ring: KeyRing) -> bool:
        removed.clear()
        missing: list[int] = []
        changed = False
        for version in ring.active:
            entry = ring.versions[version]
            try:
                wrapped = await stored_wrap(repository, ring, version, provider)
                await unwrap_raw(repository, ring, version, provider)
            except IntegrityError:
                missing.append(version)
                continue
            if ring.revision == 0:
                continue  # no ring: ApplicationDatas is the only wrap, and it is ours
            removed.update(fp for fp in entry.wraps if fp != mine)
            if entry.wraps != {mine: wrapped}:
                entry.wraps = {mine: wrapped}
                changed = True
        if missing:
            raise RotationRefused(
                f"refusing to retire the other key pairs: data key version(s) "
                f"{', '.join(map(str, missing))} have no wrap for the configured key pair "
                f"({provider.description}). Run `keyconnector rotate-key-pair` with the old settings, "
                "naming this key pair as the new one, then retire"
            )
        return changed

    ring, _ = await change_ring(repository, change)
    updated = False
    entry = ring.versions.get(LEGACY_VERSION)
    if ring.revision > 0 and entry is not None and entry.state == ACTIVE:
        wrapped = entry.wraps[mine]
        if await repository.get_wrapped_data_key() != wrapped:
            await repository.set_wrapped_data_key(wrapped)
            updated = True
    return KeyPairRetirement(ring, sorted(removed), updated)


async def start_data_key_version(repository: Repository, provider: KeyProvider) -> tuple[KeyRing, int | None]:
    """Make a new data-key version, wrapped by ``provider`` only, and make it current.

    Refuses while active versions are wrapped by another key pair (instances running with it could
    not unwrap the new version). Makes nothing while a rotation is unfinished (an active version
    besides the current one): that rotation is to be finished first. Returns the new version, or
    None when none was made. Version numbers are never reused, retired ones included.
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
                entry.wraps[mine] = await stored_wrap(repository, ring, version, provider)
                entry.created = entry.created or now_text()
        number = max(ring.versions) + 1
        raw = generate_data_key()
        ring.versions[number] = RingVersion(
            number, ACTIVE, precise_now_text(), {mine: await wrap_checked(provider, raw, number)}
        )
        ring.current = number
        made.append(number)
        return True

    ring, _ = await change_ring(repository, change)
    return ring, (made[0] if made else None)


async def retire_versions(repository: Repository, versions: Collection[int]) -> tuple[KeyRing, list[int]]:
    """Mark ``versions`` retired and drop their wraps (never the current one), in one compare-and-swap.

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
            retired.append(version)
        return bool(retired)

    ring, _ = await change_ring(repository, change)
    return ring, retired
