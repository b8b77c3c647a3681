"""Operations on a deployment's data: transfer, key-pair and data-key rotation, backup, statistics.

One module per command family, each exposing ``add_commands(commands)`` to register its
sub-commands on the ``keyconnector`` parser (``OPERATIONS`` lists them). What they share lives
here: opening one side of an operation (a database with its key pair and data keys), loading the
settings of a second deployment, and the error that lists the records that failed.

Every operation is safe to interrupt and run again: each batch is one transaction, writes are
upserts or compare-and-swaps, and the final state is verified, not assumed.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from keyconnector.crypto import DataKeys
from keyconnector.datakeys import (
    KeyRing,
    NotAdopted,
    RingTrust,
    accept_unbound_records,
    load_key_set,
    open_ring,
)
from keyconnector.errors import ConfigurationError, KeyConnectorError, StorageError
from keyconnector.keys import KeyProvider, open_key_provider
from keyconnector.settings import DatabaseSettings, LoadedSettings, Settings, load_with_env_file
from keyconnector.storage import Repository, migrate, open_repository
from keyconnector.tls import Trust

OPERATIONS: list[str] = [
    "keyconnector.ops.transfer",
    "keyconnector.ops.rotate",
    "keyconnector.ops.backup",
    "keyconnector.ops.stats",
    "keyconnector.ops.audit",
    "keyconnector.ops.upgrade",
    "keyconnector.ops.downgrade",
    "keyconnector.ops.docs",
]

Subcommands = Any
"""``argparse._SubParsersAction[ArgumentParser]`` (private in typeshed's eyes)."""


def add_commands(commands: Subcommands) -> None:
    for name in OPERATIONS:
        importlib.import_module(name).add_commands(commands)


def add_settings_arguments(parser: argparse.ArgumentParser, *, target: bool = False) -> None:
    """``--config``/``--env-file`` for the deployment, and with ``target`` the second deployment's."""
    parser.add_argument("--config", help="an appsettings-style JSON file (section keyConnectorSettings)")
    parser.add_argument("--env-file", help="a docker-style env file of keyConnectorSettings__... lines")
    if target:
        parser.add_argument(
            "--target-env-file",
            help="the target's settings as an env file (default: the transferTo__* settings)",
        )
        parser.add_argument("--target-config", help="the target's settings as an appsettings JSON file")


def load_settings_from(args: argparse.Namespace) -> LoadedSettings:
    return load_with_env_file(getattr(args, "env_file", None), getattr(args, "config", None))


def load_target_settings(args: argparse.Namespace) -> Settings | None:
    """The second deployment from ``--target-env-file``/``--target-config``, read in isolation
    (not merged with this process's environment), or None to use ``transferTo__*``."""
    env_file = getattr(args, "target_env_file", None)
    config = getattr(args, "target_config", None)
    if not env_file and not config:
        return None
    return load_with_env_file(env_file, config, isolated=True).settings


@dataclass
class Side:
    """One deployment's data as an operation sees it: database, key pair, data keys."""

    name: str
    """``source`` or ``target``: used in messages."""
    database: DatabaseSettings
    database_prefix: str
    repository: Repository
    provider: KeyProvider
    keys: DataKeys
    ring: KeyRing
    adopted: str | None = None
    """Without ``create``: set when the database holds no authenticated ring yet (what ``serve`` would
    adopt); ``ring`` is then only that proposal, and its authentication key exists nowhere else."""

    @property
    def trust(self) -> RingTrust:
        """What this side trusted when it opened: a later ring must carry the same authentication."""
        return RingTrust(self.ring.auth_key, self.ring.revision)

    async def aclose(self) -> None:
        try:
            await self.provider.aclose()
        finally:
            await self.repository.aclose()


async def open_side(
    settings: Settings, *, transfer: bool = False, name: str = "source", create: bool = True
) -> Side:
    """Open ``settings``' database and key pair (``transferTo`` ones with ``transfer``).

    The key pair is opened and checked (a real round trip) before the database is touched, so a
    wrong target key provider fails before anything is written. With ``create``, the schema is
    migrated and data key version 1 made if absent, as ``serve`` would; without it, nothing is
    written and a database without a data key is an error.
    """
    database = settings.transfer_to.database if transfer else settings.database
    prefix = "transferTo.database" if transfer else "database"
    if database is None:
        raise ConfigurationError(f"{prefix}.provider", "is not set")
    provider = await open_key_provider(settings, transfer=transfer)
    try:
        await provider.check()
        if create:
            migrate(database, prefix, trust=Trust.from_settings(settings))
        repository = await open_repository(database, prefix, trust=Trust.from_settings(settings))
    except BaseException:
        await provider.aclose()
        raise
    write_legacy = settings.compat.write_legacy_format
    adopted: str | None = None
    try:
        if create:
            # Makes data key version 1 and the authenticated ring if there are none (as serve would).
            keys, ring = await load_key_set(repository, provider, accept_legacy_when_new=write_legacy)
            if write_legacy and not ring.accept_legacy:
                ring = await accept_unbound_records(repository, provider, ring)
                keys = DataKeys(keys.keys, keys.current, accept_legacy=True)
        else:
            # The pinned anchor is the deployment's own, not the transfer target's.
            trust = RingTrust(anchor=None if transfer else settings.key_ring_anchor)
            try:
                opened = await open_ring(repository, provider, trust=trust, adopt=False)
            except NotAdopted:
                raise StorageError(
                    f"the {name} database has no data key yet (`keyconnector serve` makes one)"
                ) from None
            keys, ring, adopted = opened.key_set(), opened.ring, opened.adopted
        keys = keys.with_legacy_format(write_legacy)
    except BaseException:
        await repository.aclose()
        await provider.aclose()
        raise
    return Side(name, database, prefix, repository, provider, keys, ring, adopted)


class OperationFailed(KeyConnectorError):
    """Some records could not be processed; the others were. Exit non-zero, listing them."""

    def __init__(self, what: str, failed: list[UUID]) -> None:
        self.failed = failed
        shown = ", ".join(str(user) for user in failed[:50])
        more = f" and {len(failed) - 50} more" if len(failed) > 50 else ""
        super().__init__(f"{what}: {len(failed)} record(s) failed: {shown}{more}")
