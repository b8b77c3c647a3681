"""Start-up warnings for files that hold secrets and can be read or changed by other users.

The PFX holds the private key that unwraps the data key; the TLS key lets whoever reads it pose as
this service; the JSON and SQLite databases hold the user keys (encrypted, but a writable database
lets a local user swap records or delete them); the audit trail and the log file tell who read which
key when; a secret file holds a password or token. On a shared host, group or world access to any of
them hands that secret to every local account. Upstream never looks. We warn (naming the setting and
the path, never the content) and still start: refusing would turn a fixable permission slip into an
outage, and some
deployments deliberately share a group with a backup agent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from keyconnector.errors import ConfigurationError, setting_name
from keyconnector.runtime.settings import CONFIG_FILE_ENV, Settings
from keyconnector.runtime.settings.loader import (
    _field_map,
    _is_secret,
    _json_section,
    _section_model,
    _settings_section,
    _split_env_name,
)

log = logging.getLogger("keyconnector.permissions")

LOOSE_BITS = stat.S_IRWXG | stat.S_IRWXO
"""Any access by group or others (the execute bit on a data file is as wrong as the others)."""


def secret_files(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(setting path, file path) of every ``...File`` secret setting, as ``load_settings`` reads them.

    The same walk as the settings loader: the environment (``keyConnectorSettings__a__bFile``) and the
    ``KEYCONNECTOR_CONFIG`` JSON file. Recomputed here because the loaded settings hold the secret,
    not where it came from.
    """
    environ = os.environ if environ is None else environ
    found: dict[str, str] = {}
    config = environ.get(CONFIG_FILE_ENV)
    if config:
        # An unreadable settings file is reported by the loader itself.
        with contextlib.suppress(ConfigurationError):
            _walk_json(Settings, _settings_section(_json_section(Path(config))), [], found)
    for name, value in environ.items():
        parts = _split_env_name(name)
        if parts:
            _walk_path(Settings, parts, str(value), found)
    return sorted(found.items())


def _secret_leaf(model: type[BaseModel], key: str) -> str | None:
    """The upstream name of the secret that ``key`` (``somethingFile``) names a file for, if it does."""
    fields = _field_map(model)
    head = key.lower()
    if head in fields or not head.endswith("file"):
        return None
    entry = fields.get(head[:-4])
    if not _is_secret(entry):
        return None
    assert entry is not None
    return entry[1].alias or entry[0]


def _walk_path(model: type[BaseModel], parts: list[str], value: str, found: dict[str, str]) -> None:
    path: list[str] = []
    for part in parts[:-1]:
        entry = _field_map(model).get(part.lower())
        sub = _section_model(entry[1]) if entry is not None else None
        if entry is None or sub is None:
            return
        path.append(entry[1].alias or entry[0])
        model = sub
    leaf = _secret_leaf(model, parts[-1])
    if leaf is not None:
        found[".".join([*path, leaf])] = value


def _walk_json(
    model: type[BaseModel], section: Mapping[str, Any], path: list[str], found: dict[str, str]
) -> None:
    for key, value in section.items():
        if isinstance(value, Mapping):
            entry = _field_map(model).get(str(key).lower())
            sub = _section_model(entry[1]) if entry is not None else None
            if entry is not None and sub is not None:
                _walk_json(sub, value, [*path, entry[1].alias or entry[0]], found)
        elif isinstance(value, str):
            leaf = _secret_leaf(model, str(key))
            if leaf is not None:
                found[".".join([*path, leaf])] = value


def files_to_check(
    settings: Settings, environ: Mapping[str, str] | None = None, *, tls_key: str | None = None
) -> list[tuple[str, str]]:
    """(setting path, file path) of every file this deployment keeps a secret in.

    Besides the key material and the database: the TLS private key (``--tls-key``, named by its
    option, which ``_shown`` keeps as is), the audit trail (who read which key, and its chain can be
    rewritten by whoever may write it) and the log file (user ids, client addresses, error details).
    """
    files: list[tuple[str, str]] = []
    if tls_key:
        files.append(("--tls-key", tls_key))
    if settings.audit.file:
        files.append(("audit.file", settings.audit.file))
    if settings.logging.file:
        files.append(("logging.file", settings.logging.file))
    if settings.rsa_key.provider == "certificate" and settings.certificate.provider == "filesystem":
        files.append(("certificate.filesystemPath", settings.certificate.filesystem_path))
    from keyconnector.storage.registry import backend

    # A bad provider or connection string is reported, with its reason, by the migration that follows.
    with contextlib.suppress(ConfigurationError):
        database_files = backend(settings.database, "database").secret_files
        if database_files is not None:
            files += database_files(settings.database, "database")
    files += [(f"{setting}File", path) for setting, path in secret_files(environ)]
    return files


def _shown(setting: str) -> str:
    """A settings path as operators spell it; a command-line option (``--tls-key``) as it is."""
    return setting if setting.startswith("--") else setting_name(setting)


def loose_files(
    settings: Settings, environ: Mapping[str, str] | None = None, *, tls_key: str | None = None
) -> list[str]:
    """One sentence per file that group or others can access: the setting, the path, the mode."""
    problems: list[str] = []
    for setting, path in files_to_check(settings, environ, tls_key=tls_key):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # a missing file is the business of whoever opens it, with a better message
        if not stat.S_ISREG(mode) or not mode & LOOSE_BITS:
            continue
        who = " and ".join(
            part for part, bits in (("its group", stat.S_IRWXG), ("other users", stat.S_IRWXO)) if mode & bits
        )
        problems.append(
            f"{path} ({_shown(setting)}) can be accessed by {who} (mode {stat.S_IMODE(mode):04o}); "
            f"restrict it with: chmod 600 {path}"
        )
    return problems


def warn_loose_permissions(
    settings: Settings, environ: Mapping[str, str] | None = None, *, tls_key: str | None = None
) -> list[str]:
    """Log a WARNING per loose file (what ``serve`` does at start-up); returns the sentences."""
    problems = loose_files(settings, environ, tls_key=tls_key)
    for problem in problems:
        log.warning("%s", problem)
    return problems
