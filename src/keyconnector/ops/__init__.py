"""Operations on a deployment's data: transfer, key-pair and data-key rotation, backup, statistics.

One module per command family, each exposing ``add_commands(commands)`` to register its
sub-commands on the ``keyconnector`` parser (``OPERATIONS`` lists them). What they share lives
here: opening one side of an operation (a database with its key pair and data keys, through
``assemble.open_core`` like ``serve`` and ``check``), loading the settings of a second deployment,
and the error that lists the records that failed.

Every operation is safe to interrupt and run again: each batch is one transaction, writes are
upserts or compare-and-swaps, and the final state is verified, not assumed.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any
from uuid import UUID

from keyconnector.errors import KeyConnectorError
from keyconnector.runtime.assemble import Side, open_core
from keyconnector.runtime.settings import LoadedSettings, Settings, SideSettings, load_with_env_file

__all__ = [
    "OPERATIONS",
    "OperationFailed",
    "Side",
    "Subcommands",
    "add_commands",
    "add_settings_arguments",
    "load_settings_from",
    "load_target_settings",
    "open_side",
]

OPERATIONS: list[str] = [
    "keyconnector.ops.check",
    "keyconnector.ops.config",
    "keyconnector.ops.status",
    "keyconnector.ops.transfer",
    "keyconnector.ops.rotate",
    "keyconnector.ops.backup",
    "keyconnector.ops.stats",
    "keyconnector.ops.audit",
    "keyconnector.ops.upgrade",
    "keyconnector.ops.downgrade",
    "keyconnector.ops.docs",
    "keyconnector.ops.completion",
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


async def open_side(side: SideSettings, *, name: str = "source", create: bool = True) -> Side:
    """Open the database and key pair of one side of the settings (``side_of(settings)``, or
    ``side_of(settings, transfer=True)`` for the ``transferTo`` target).

    ``assemble.open_core``, the one assembly ``serve`` and ``check`` use too: the key pair is
    opened and checked before the database is touched, so a wrong target key provider fails before
    anything is written. With ``create``, the schema is migrated and data key version 1 made if
    absent, as ``serve`` would; without it, nothing is written and a database without a data key is
    an error.
    """
    return await open_core(side, name=name, create=create, read_only=not create)


class OperationFailed(KeyConnectorError):
    """Some records could not be processed; the others were. Exit non-zero, listing them."""

    def __init__(self, what: str, failed: list[UUID]) -> None:
        self.failed = failed
        shown = ", ".join(str(user) for user in failed[:50])
        more = f" and {len(failed) - 50} more" if len(failed) > 50 else ""
        super().__init__(f"{what}: {len(failed)} record(s) failed: {shown}{more}")
