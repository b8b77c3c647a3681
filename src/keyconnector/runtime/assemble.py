"""One assembly of a deployment's core: database, key pair and data keys, put together in one place.

``serve``'s pre-flight, each server worker, ``keyconnector check`` and the operations (``ops``) all
need the same parts, and each used to put them together its own way; they drifted (``check`` once
unwrapped ApplicationDatas itself and contradicted ``serve`` in the middle of a key-pair rotation).
:func:`open_core` is now the one way, with options for what the callers differ in:

- ``create``: migrate the schema (make it if absent) first (``serve``'s pre-flight, the operations
  that write);
- ``read_only``: never write anything, not even an adoption of the key ring (``check``, ``stats``,
  dry runs, the source of a transfer). Without it, the stored data key (or an earlier
  keyconnector's ring) is adopted, or data key version 1 made, as ``serve`` does at start;
- ``tolerate_outage``: a key provider that cannot be reached does not fail the opening (a worker
  starts, answers 503 and recovers by itself); the data keys are then left to the caller to load
  when the provider is back (``service.KeyService`` does, lazily).

Every step takes the side of the settings it opens (``settings.side_of``: the deployment's own, or
its ``transferTo`` target), resolved once by the caller.

The takeover guards live here too, so that every caller gets them: a database holding user records
but no data key gets a new one only with ``database.allowNewDataKey``, and a stored data key this key
pair does not open is refused, never replaced (both a ``ConfigurationError``: ``serve`` exits 2).
:func:`guard_before_writing` runs them read-only before anything is migrated, so a refused takeover
leaves the database exactly as it was (the foreign-database guard is the schema migration's own).

The steps are public too (:func:`open_key_pair`, :func:`open_database`, :func:`load_data_keys`),
for ``check``, which reports each on its own line and goes on after a failure. Whatever the
caller, the key pair is opened and checked before the database is touched, so that a wrong (target)
key provider fails before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

from keyconnector.core.envelope import DataKeys
from keyconnector.core.keyring import (
    ForeignDataKey,
    KeyRing,
    NewDataKeyRefused,
    NotAdopted,
    RingRefused,
    RingTrust,
    accept_unbound_records,
    load_key_set,
    open_ring,
)
from keyconnector.errors import (
    KEY_PAIR_ADVICE,
    ConfigurationError,
    KeyConnectorError,
    KeyPairMissing,
    StorageError,
    setting_name,
)
from keyconnector.keypairs import KeyProvider, open_key_provider
from keyconnector.runtime.settings import DatabaseSettings, SideSettings
from keyconnector.storage.base import Repository
from keyconnector.storage.registry import inspect, migrate, open_repository


@dataclass
class Core:
    """One side of the settings opened: its database and key pair (the data keys not loaded)."""

    name: str
    """What messages call this side (``source``, ``target``, ``service's``)."""
    database: DatabaseSettings
    database_prefix: str
    """The settings path of ``database`` (``database`` or ``transferTo.database``), for messages."""
    repository: Repository
    provider: KeyProvider

    async def aclose(self) -> None:
        try:
            await self.provider.aclose()
        finally:
            await self.repository.aclose()


@dataclass
class Side(Core):
    """One deployment's data as an operation sees it: database, key pair, and the data keys."""

    keys: DataKeys
    ring: KeyRing
    adopted: str | None = None
    """Read-only: set when the database holds no authenticated ring yet (what ``serve`` would
    adopt); ``ring`` is then only that proposal, and its authentication key exists nowhere else."""

    @property
    def trust(self) -> RingTrust:
        """What this side trusted when it opened: a later ring must carry the same authentication."""
        return RingTrust(self.ring.auth_key, self.ring.revision)


@dataclass(frozen=True)
class LoadedKeys:
    """The data keys as loaded through the authenticated key ring."""

    keys: DataKeys
    ring: KeyRing
    adopted: str | None
    """What was adopted (``create``) or would be adopted by ``serve`` (read-only), or None."""


async def open_key_pair(
    side: SideSettings, *, tolerate_outage: bool = False, checked: bool = True
) -> KeyProvider:
    """The side's key provider, checked by a real wrap/unwrap round trip unless ``tolerate_outage``
    (the check would fail during an outage, and the point of tolerating one is to start anyway).

    ``checked=False`` leaves the round trip to the caller: ``check`` reports it on its own line and
    still tries the data keys when it fails (a wrap that fails while the unwrap of the stored data
    key works says which half of the key pair is wrong)."""
    try:
        provider = await open_key_provider(side, tolerate_outage=tolerate_outage)
    except KeyPairMissing as exc:
        holds_data_key = await _holds_data_key(side)
        raise ConfigurationError(exc.setting, f"{exc.missing}; {_key_pair_advice(holds_data_key)}") from None
    if tolerate_outage or not checked:
        return provider
    try:
        await provider.check()
    except BaseException:
        await provider.aclose()
        raise
    return provider


async def _holds_data_key(side: SideSettings) -> bool | None:
    """Whether the side's database holds a data key (ApplicationDatas or a key ring), read-only; None
    when the database cannot tell (unreachable, not a database of ours)."""
    try:
        database = side.require_database()
        state = inspect(database, side.database_prefix, trust=side.trust())
        if not state.has_schema:
            return False
        repository = await open_repository(database, side.database_prefix, trust=side.trust())
        try:
            return (
                await repository.get_key_ring() is not None
                or await repository.get_wrapped_data_key() is not None
            )
        finally:
            await repository.aclose()
    except KeyConnectorError:
        return None


def _key_pair_advice(holds_data_key: bool | None) -> str:
    """What to do about a missing key pair, by what the database holds: the certificate source cannot
    see it, and the one advice that ruins a deployment (make a new key pair, which can never open the
    stored data key) must not be given where a data key exists."""
    if holds_data_key is None:
        return KEY_PAIR_ADVICE  # the database cannot tell: both cases, each with its advice
    if holds_data_key:
        return (
            "the database already holds a data key: restore the PFX that wrapped it from a backup (a new "
            "key pair can never open that data key, nor the user keys sealed with it)"
        )
    return (
        "the database holds no data key yet, so this is a new deployment: make a key pair with "
        "`keyconnector init`"
    )


async def open_database(side: SideSettings, *, create: bool) -> Repository:
    """The side's repository; with ``create`` the schema is migrated (made if absent) first.
    Database TLS trusts the side's ``Trust`` (``caCertificatesDirectory``)."""
    database, prefix, trust = side.require_database(), side.database_prefix, side.trust()
    if create:
        migrate(database, prefix, trust=trust)
    return await open_repository(database, prefix, trust=trust)


async def load_data_keys(
    repository: Repository,
    provider: KeyProvider,
    side: SideSettings,
    *,
    read_only: bool,
) -> LoadedKeys:
    """Every active data key this key pair unwraps, through the authenticated key ring.

    Without ``read_only``, as ``serve`` does at start: the stored data key (or an earlier
    keyconnector's ring) is adopted, or data key version 1 made, and ``compat.writeLegacyFormat``
    makes the ring accept upstream-format records. With it nothing is written: ``NotAdopted`` when
    there is no data key at all, and ``adopted`` says what ``serve`` would adopt. ``RingRefused``
    either way when the stored ring does not authenticate.
    """
    write_legacy = side.write_legacy_format
    allow_new = side.require_database().allow_new_data_key
    # The pinned anchor is the deployment's own: the transferTo side has none (``side_of``).
    trust = RingTrust(anchor=side.key_ring_anchor)
    adopted: str | None = None
    try:
        if not read_only:
            keys, ring = await load_key_set(
                repository, provider, trust, accept_legacy_when_new=write_legacy, allow_new_data_key=allow_new
            )
            if write_legacy and not ring.accept_legacy:
                ring = await accept_unbound_records(repository, provider, ring)
                keys = DataKeys(keys.keys, keys.current, accept_legacy=True)
        else:
            opened = await open_ring(
                repository, provider, trust=trust, adopt=False, allow_new_data_key=allow_new
            )
            keys, ring, adopted = opened.key_set(), opened.ring, opened.adopted
    except NewDataKeyRefused as exc:
        raise ConfigurationError(
            f"{side.database_prefix}.allowNewDataKey",
            f"{exc}. Set this to true (or run `keyconnector serve --allow-new-data-key`) only to abandon "
            "those records for good",
        ) from None
    except ForeignDataKey as exc:
        # Named by the setting that picks the key pair (the PFX's path, the KMS key): that is what
        # points at the wrong one, not rsaKey.provider.
        raise ConfigurationError(
            side.key_pair_setting,
            f"{exc}. Point this setting at the key pair that wrapped it (`keyconnector rotate-key-pair` "
            "moves the data key to a new key pair only when run with the old one). If the key pair is "
            "right, the database is the wrong one "
            f"(the {setting_name(side.database_prefix)}__* settings); a stored data key is never "
            "replaced by a new one",
        ) from None
    return LoadedKeys(keys.with_legacy_format(write_legacy), ring, adopted)


async def guard_before_writing(side: SideSettings, provider: KeyProvider) -> None:
    """The takeover guards, read-only, before the schema is migrated or a data key made: a foreign
    database, a database that does not exist, records without a data key this key pair opens, each a
    ``ConfigurationError`` that leaves the database untouched.

    A database or key provider that cannot be reached raises ``UnavailableError``: ``serve`` then
    waits for the database as usual, and the data-key load after the migration applies the same
    guards. A ring that does not authenticate is left to that load too (``serve`` starts with 503)."""
    database = side.require_database()
    state = inspect(database, side.database_prefix, trust=side.trust())
    if not state.has_schema:
        return
    repository = await open_repository(database, side.database_prefix, trust=side.trust())
    try:
        await load_data_keys(repository, provider, side, read_only=True)
    except (NotAdopted, RingRefused):
        pass
    finally:
        await repository.aclose()


async def guard_side(side: SideSettings) -> None:
    """:func:`guard_before_writing` with the side's own key pair, opened without its round trip (a key
    provider that is down must not stop ``serve``, which starts and answers 503 until it is back)."""
    provider = await open_key_pair(side, tolerate_outage=True)
    try:
        await guard_before_writing(side, provider)
    finally:
        await provider.aclose()


@overload
async def open_core(
    side: SideSettings,
    *,
    name: str = ...,
    create: bool = ...,
    read_only: bool = ...,
    tolerate_outage: Literal[False] = ...,
) -> Side: ...


@overload
async def open_core(
    side: SideSettings,
    *,
    name: str = ...,
    create: bool = ...,
    read_only: bool = ...,
    tolerate_outage: Literal[True],
) -> Core: ...


async def open_core(
    side: SideSettings,
    *,
    name: str = "source",
    create: bool = False,
    read_only: bool = False,
    tolerate_outage: bool = False,
) -> Core:
    """Open one side of the settings; ``aclose()`` it when done.

    The key pair first (checked unless ``tolerate_outage``), then the database (migrated with
    ``create``), then the data keys (adopted or made as ``serve`` would; never written with
    ``read_only``, where a database without a data key is a ``StorageError`` naming ``name``).
    With ``tolerate_outage`` the data keys are not loaded: the result is a :class:`Core`, and
    loading them is the caller's, retried until the provider answers.
    """
    if create and read_only:
        raise TypeError("open_core: create and read_only exclude each other (a programming error)")
    database = side.require_database()
    provider = await open_key_pair(side, tolerate_outage=tolerate_outage)
    try:
        if create:
            await guard_before_writing(side, provider)
        repository = await open_database(side, create=create)
    except BaseException:
        await provider.aclose()
        raise
    core = Core(name, database, side.database_prefix, repository, provider)
    if tolerate_outage:
        return core
    try:
        try:
            loaded = await load_data_keys(repository, provider, side, read_only=read_only)
        except NotAdopted:
            raise StorageError(
                f"the {name} database has no data key yet (`keyconnector serve` makes one)"
            ) from None
    except BaseException:
        await core.aclose()
        raise
    return Side(
        name, database, side.database_prefix, repository, provider, loaded.keys, loaded.ring, loaded.adopted
    )
