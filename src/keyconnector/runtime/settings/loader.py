"""Reading the settings as upstream's operators write them.

Upstream is an ASP.NET service: settings come from the ``keyConnectorSettings`` section of an
``appsettings.json`` file, overridden by environment variables such as
``keyConnectorSettings__database__provider``, with names matched case-insensitively. An operator
taking over an existing deployment keeps their env file, so this module accepts exactly those
names (and the ``:`` separator that ASP.NET also accepts), and reports anything it does not know
instead of silently ignoring a typo.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

# KEYCONNECTOR_CONFIG, read here (load_settings); named in errors so that --help can show it cheaply.
from keyconnector.errors import CONFIG_FILE_ENV as CONFIG_FILE_ENV
from keyconnector.errors import ENV_PREFIX, ConfigurationError, UsageError, did_you_mean
from keyconnector.runtime.settings.model import Settings

ENVIRONMENT = "environment"
ENV_FILE = "env file"
CONFIG_FILE = "config file"
DEFAULT = "default"


@dataclass(frozen=True)
class Origin:
    """Where one setting's value came from (``keyconnector config show``): ``source`` is one of
    ``environment``, ``env file`` or ``config file``; ``name`` is the name as written there (an
    env-var name, or for the config file the key path under ``keyConnectorSettings``); ``file`` the
    env file or appsettings file; ``via_file`` the ``...File`` name whose file held a secret."""

    source: str
    name: str
    file: str | None = None
    via_file: bool = False


class LoadedSettings:
    """The settings plus what the loader noticed on the way (unknown names are typos, usually)."""

    def __init__(
        self,
        settings: Settings,
        unknown: list[str],
        sources: list[str],
        upstream_logging: list[str] | None = None,
        origins: dict[str, Origin] | None = None,
        unknown_origins: dict[str, Origin] | None = None,
    ) -> None:
        self.settings = settings
        self.unknown = unknown
        self.sources = sources
        self.upstream_logging = upstream_logging or []
        """``Serilog__...`` names found: upstream's logging settings, which operators' env files
        carry; not ours, not typos either, so they get one notice instead of a warning each."""
        self.origins = origins or {}
        """Dotted upstream path (``database.provider``) -> where its value came from; a setting
        missing here has its default."""
        self.unknown_origins = unknown_origins or {}
        """Each name of ``unknown`` -> where it was written."""

    def suggestion(self, name: str) -> str | None:
        """The known setting an unknown ``name`` most likely meant (env-var spelling), or None."""
        return suggest_setting(name)

    def warn_unknown(self, log: logging.Logger) -> None:
        """One WARNING per unknown name, with the setting it probably meant (every command)."""
        for name in self.unknown:
            meant = self.suggestion(name)
            if meant:
                log.warning("ignoring unknown setting %s (a typo? did you mean %s?)", name, meant)
            else:
                log.warning("ignoring unknown setting %s (a typo?)", name)

    def upstream_logging_notice(self) -> str | None:
        """The one line said about ``upstream_logging`` (by ``serve`` and ``check``), or None."""
        if not self.upstream_logging:
            return None
        names = ", ".join(self.upstream_logging[:3]) + (", ..." if len(self.upstream_logging) > 3 else "")
        return (
            f"{names}: upstream's logging settings (Serilog) are not used here; keyconnector logs to "
            f"stderr, and {ENV_PREFIX}logging__level, {ENV_PREFIX}logging__format and "
            f"{ENV_PREFIX}logging__file set the level, the form and a log file"
        )


def _field_map(model: type[BaseModel]) -> dict[str, tuple[str, FieldInfo]]:
    """Lower-cased upstream name -> (python field name, field)."""
    out: dict[str, tuple[str, FieldInfo]] = {}
    for name, info in model.model_fields.items():
        out[name.lower()] = (name, info)
        out[name.replace("_", "").lower()] = (name, info)
        if info.alias:
            out[info.alias.lower()] = (name, info)
    return out


def _section_model(info: FieldInfo) -> type[BaseModel] | None:
    annotation = info.annotation
    candidates = getattr(annotation, "__args__", (annotation,))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _place(
    model: type[BaseModel],
    target: dict[str, Any],
    path: list[str],
    value: Any,
    unknown: list[str],
    raw: str,
    placed: dict[str, tuple[str, bool]] | None = None,
    trail: tuple[str, ...] = (),
) -> None:
    """Put ``value`` at ``path`` in ``target`` (upstream's case-insensitive names), noting in
    ``placed`` the dotted upstream path it set (-> the raw name, and whether a ``...File`` held it)."""
    fields = _field_map(model)
    head = path[0].lower()
    via_file = False
    if head not in fields and len(path) == 1 and head.endswith("file") and _is_secret(fields.get(head[:-4])):
        # Container secrets: every secret setting ``x`` also accepts ``xFile``, a path to read it from.
        head, value, via_file = head[:-4], _read_secret_file(raw, value), True
    if head not in fields:
        unknown.append(raw)
        return
    name, info = fields[head]
    step = (*trail, info.alias or name)
    sub = _section_model(info)
    if len(path) == 1:
        if sub is not None and isinstance(value, Mapping):
            for key, inner in value.items():
                _place(model, target, [head, str(key)], inner, unknown, f"{raw}__{key}", placed, trail)
            return
        if sub is not None:
            unknown.append(raw)
            return
        target[name] = value
        if placed is not None:
            placed[".".join(step)] = (raw, via_file)
        return
    if sub is None:
        unknown.append(raw)
        return
    child = target.setdefault(name, {})
    _place(sub, child, path[1:], value, unknown, raw, placed, step)


def setting_paths(
    model: type[BaseModel] = Settings, trail: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every setting's upstream path (``("database", "provider")``), in the model's order: what
    ``config show`` lists and what an unknown name is compared with."""
    for name, info in model.model_fields.items():
        step = (*trail, info.alias or name)
        sub = _section_model(info)
        if sub is None:
            yield step
        else:
            yield from setting_paths(sub, step)


def suggest_setting(raw: str) -> str | None:
    """The env-var name of the setting closest to the unknown ``raw`` name, or None. Compared after
    the prefix, case-insensitively, as the loader matches names."""
    parts = _split_env_name(raw)
    if not parts:
        return None
    known = {"__".join(path).lower(): ENV_PREFIX + "__".join(path) for path in setting_paths()}
    hint = did_you_mean("__".join(parts), known, cutoff=0.75)
    if not hint:
        return None
    return known[hint.split("'")[1]]


def _is_secret(entry: tuple[str, FieldInfo] | None) -> bool:
    return entry is not None and "SecretStr" in str(entry[1].annotation)


def _read_secret_file(setting: str, path: Any) -> str:
    try:
        return Path(str(path)).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigurationError(
            _dotted(setting), f"cannot read the secret file {path}: {exc.strerror}"
        ) from None


def _dotted(raw: str) -> str:
    parts = _split_env_name(raw)
    return ".".join(parts) if parts else raw


def _split_env_name(name: str) -> list[str] | None:
    lowered = name.lower()
    for prefix in (ENV_PREFIX.lower(), "keyconnectorsettings:"):
        if lowered.startswith(prefix):
            rest = name[len(prefix) :]
            return [part for part in rest.replace(":", "__").split("__") if part]
    return None


def strip_jsonc(text: str) -> str:
    """JSON as ASP.NET Core's configuration reads ``appsettings.json``: ``//`` and ``/* */``
    comments and trailing commas are allowed there, so upstream's own files carry them. They are
    removed here outside strings (a comment becomes spaces and keeps its newlines, so the line numbers
    of a later JSON error stay right); anything else stays strict JSON."""
    out: list[str] = []
    i, n = 0, len(text)
    pending_comma: int | None = None  # index in ``out`` of a comma that may turn out to be trailing
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            pending_comma = None
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        elif c == ",":
            pending_comma = len(out)
            out.append(c)
            i += 1
        elif c in "}]":
            if pending_comma is not None:
                out[pending_comma] = " "
            pending_comma = None
            out.append(c)
            i += 1
        else:
            if not c.isspace():
                pending_comma = None
            out.append(c)
            i += 1
    return "".join(out)


def _json_section(path: Path) -> Mapping[str, Any]:
    try:
        document = json.loads(strip_jsonc(path.read_text(encoding="utf-8-sig")))
    except FileNotFoundError:
        raise UsageError("--config", f"the settings file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise UsageError(
            "--config", f"the settings file {path} is not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    if not isinstance(document, dict):
        raise UsageError("--config", f"the settings file {path} must hold a JSON object")
    return document


def _settings_section(document: Mapping[str, Any]) -> Mapping[str, Any]:
    for key, value in document.items():
        if key.lower() == "keyconnectorsettings" and isinstance(value, dict):
            return value
    return {}


_SERILOG_PREFIXES = ("serilog__", "serilog:")


def _check_implicit_provider(settings: Settings) -> None:
    """``database__provider`` unset means upstream's default, the JSON file. An operator who set
    another database's connection string but not the provider meant that database (a copy of an
    older keyconnector's settings, whose default was SQLite, or a forgotten line): starting on an
    empty JSON file instead would be a new database created silently."""
    database = settings.database
    if "provider" in database.model_fields_set:
        return
    given = [
        alias
        for name, alias in (
            ("sqlite_connection_string", "sqliteConnectionString"),
            ("postgresql_connection_string", "postgreSqlConnectionString"),
            ("mysql_connection_string", "mySqlConnectionString"),
            ("sqlserver_connection_string", "sqlServerConnectionString"),
        )
        if getattr(database, name) is not None
    ]
    if given:
        raise ConfigurationError(
            "database.provider",
            f"is not set, which means upstream's default 'json' (the file {database.json_file_path}), but "
            f"{ENV_PREFIX}database__{given[0]} is set; set {ENV_PREFIX}database__provider to the database "
            "you mean (sqlite, postgresql, mysql, sqlserver), or remove that connection string",
        )


def read_env_file(path: str | Path) -> dict[str, str]:
    """A docker-style env file, as upstream deployments keep them: ``NAME=value`` per line.

    Values are taken literally (``Data Source=/x.db`` needs no quoting); a value wrapped in one pair
    of matching quotes is unwrapped, as docker compose does. Blank lines and ``#`` comments are skipped.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError("--env-file", f"cannot read the env file {path}: {exc.strerror}") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise UsageError("--env-file", f"{path}, line {number}: expected NAME=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: str | Path | None = None
) -> LoadedSettings:
    """Merge the appsettings JSON file (if any) and the environment, environment winning.

    Raises ``ConfigurationError`` naming the first invalid setting by its upstream name.
    """
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(CONFIG_FILE_ENV):
        config_file = environ[CONFIG_FILE_ENV]
    nested: dict[str, Any] = {}
    unknown: list[str] = []
    sources: list[str] = []
    upstream_logging: list[str] = []
    origins: dict[str, Origin] = {}
    unknown_origins: dict[str, Origin] = {}
    if config_file is not None:
        path = Path(config_file)
        document = _json_section(path)
        upstream_logging += [f"{key} (in {path.name})" for key in document if key.lower() == "serilog"]
        section = _settings_section(document)
        placed: dict[str, tuple[str, bool]] = {}
        known = len(unknown)
        for key, value in section.items():
            _place(Settings, nested, [str(key)], value, unknown, f"{ENV_PREFIX}{key}", placed)
        for dotted, (raw, via_file) in placed.items():
            written = raw.removeprefix(ENV_PREFIX).replace("__", ":")
            origins[dotted] = Origin(CONFIG_FILE, written, str(path), via_file)
        for raw in unknown[known:]:
            unknown_origins[raw] = Origin(
                CONFIG_FILE, raw.removeprefix(ENV_PREFIX).replace("__", ":"), str(path)
            )
        sources.append(str(path))
    env_names = sorted((k for k in environ if _split_env_name(k)), key=str.lower)
    for key in env_names:
        parts = _split_env_name(key)
        assert parts is not None
        if not parts:
            continue
        placed = {}
        known = len(unknown)
        _place(Settings, nested, parts, environ[key], unknown, key, placed)
        for dotted, (raw, via_file) in placed.items():
            origins[dotted] = Origin(ENVIRONMENT, raw, None, via_file)
        for raw in unknown[known:]:
            unknown_origins[raw] = Origin(ENVIRONMENT, raw)
    if env_names:
        sources.append("environment")
    upstream_logging += sorted((k for k in environ if k.lower().startswith(_SERILOG_PREFIXES)), key=str.lower)
    try:
        settings = Settings(**nested)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(_upstream_path(Settings, [str(p) for p in first["loc"]]))
        # Never echo the input: it may be a password.
        raise ConfigurationError(location, str(first["msg"]).lower()) from None
    _check_implicit_provider(settings)
    return LoadedSettings(settings, unknown, sources, upstream_logging, origins, unknown_origins)


def load_with_env_file(
    env_file: str | Path | None, config_file: str | Path | None, *, isolated: bool = False
) -> LoadedSettings:
    """Settings as the command line gives them: ``--env-file`` lines under the real environment
    (the environment wins, as with docker's ``--env-file`` plus ``-e``), over ``--config``.

    The env file's lines are also put into ``os.environ`` (without overriding), because server
    workers inherit the environment. With ``isolated`` (a second deployment's settings, e.g. the
    target of a transfer), only the file counts and ``os.environ`` is left alone.
    """
    if isolated:
        loaded = load_settings(read_env_file(env_file) if env_file else {}, config_file)
        return _from_env_file(loaded, set(read_env_file(env_file)) if env_file else set(), env_file)
    taken: set[str] = set()
    if env_file:
        # Names match case-insensitively (and ``:`` is ``__``), so the real environment's
        # ``KEYCONNECTORSETTINGS__IDENTITYSERVERURI`` must keep the file's ``...identityServerUri`` out:
        # both in os.environ, which one won would depend on their sort order.
        present = {_comparable(name) for name in os.environ}
        for name, value in read_env_file(env_file).items():
            if _comparable(name) not in present:
                os.environ[name] = value
                taken.add(name)
    return _from_env_file(load_settings(config_file=config_file), taken, env_file)


def _comparable(name: str) -> str:
    return name.lower().replace(":", "__")


def _from_env_file(loaded: LoadedSettings, names: set[str], env_file: str | Path | None) -> LoadedSettings:
    """Relabel as ``env file`` what the env file set (the real environment's names stay ``environment``:
    they won over the file's lines)."""
    if not names:
        return loaded

    def relabel(origin: Origin) -> Origin:
        if origin.source == ENVIRONMENT and origin.name in names:
            return replace(origin, source=ENV_FILE, file=str(env_file))
        return origin

    loaded.origins = {path: relabel(origin) for path, origin in loaded.origins.items()}
    loaded.unknown_origins = {name: relabel(origin) for name, origin in loaded.unknown_origins.items()}
    return loaded


def _upstream_path(model: type[BaseModel], loc: list[str]) -> list[str]:
    out: list[str] = []
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or part not in current.model_fields:
            out.append(part)
            current = None
            continue
        info = current.model_fields[part]
        out.append(info.alias or part)
        current = _section_model(info)
    return out
