"""The configuration reference (``docs/configuration.md``), generated from the settings model.

Why generated: a hand-kept list of ~100 settings drifts the day a field is added, and an operator
taking over an upstream deployment needs the exact spelling of every name. So this module walks
``keyconnector.runtime.settings.model.Settings`` (sections, aliases, defaults, constraints,
attribute docstrings) and the metadata each field carries (``usedBy``, ``origin``, a provider
field's ``choices``), and refuses to produce a reference when a field lacks any of it. The
provider names come from the registries the service dispatches on (``keyconnector.keypairs.PROVIDERS``
and the like), so the page cannot name a provider that does not exist.

Only names, types, defaults and descriptions are shown: no default is a secret, and a ``SecretStr``
field is marked secret (with its ``...File`` variant) whatever its default.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from keyconnector.errors import ENV_PREFIX
from keyconnector.runtime.settings import (
    CHOICES,
    CONFIG_FILE_ENV,
    ORIGIN,
    REFUSED,
    USED_BY,
    Settings,
)

ALL = "all"


class IncompleteModelError(Exception):
    """The settings model lacks what the reference needs (a developer's mistake, caught by the tests)."""


@dataclass(frozen=True)
class Entry:
    """One setting, as an operator writes it and as the loader places it."""

    path: tuple[str, ...]
    """Python field names from ``Settings`` down, e.g. ``("transfer_to", "database", "provider")``."""
    names: tuple[str, ...]
    """The upstream (alias) spelling of the same path, e.g. ``("transferTo", "database", "provider")``."""
    section: str
    """Dotted upstream path of the section holding it (``""`` at the top level)."""
    annotation: Any
    type_text: str
    default_text: str
    secret: bool
    origin: str
    used_by: tuple[str, ...]
    """Normalised: ``all`` or ``<section>.provider=<name>``."""
    choices: tuple[str, ...]
    description: str
    field: FieldInfo

    @property
    def env(self) -> str:
        return ENV_PREFIX + "__".join(self.names)

    @property
    def json_path(self) -> str:
        return ".".join(self.names)


def _section_model(info: FieldInfo) -> type[BaseModel] | None:
    for candidate in typing.get_args(info.annotation) or (info.annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _registry(spec: str) -> tuple[str, ...]:
    module, _, name = spec.partition(":")
    values: dict[str, Any] = getattr(importlib.import_module(module), name)
    return tuple(values)


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def _is_optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _base_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0] if len(args) == 1 else annotation
    return annotation


def pattern_choices(info: FieldInfo) -> tuple[str, ...]:
    """``^(a|b)$`` (optionally case-insensitive) as the values it allows; () for any other pattern."""
    for item in info.metadata:
        pattern = getattr(item, "pattern", None)
        if isinstance(pattern, str):
            match = re.fullmatch(r"\^(?:\(\?i\))?\(([\w|]+)\)\$", pattern)
            if match:
                return tuple(match.group(1).split("|"))
    return ()


def _bounds(info: FieldInfo) -> str:
    parts = []
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            parts.append(f"≥ {item.ge}")
        elif isinstance(item, annotated_types.Gt):
            parts.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Le):
            parts.append(f"≤ {item.le}")
        elif isinstance(item, annotated_types.Lt):
            parts.append(f"< {item.lt}")
    return ", ".join(parts)


def _type_text(info: FieldInfo, choices: tuple[str, ...], refused: tuple[str, ...], alias: str) -> str:
    base = _base_type(info.annotation)
    if base is SecretStr:
        return f"text, **secret** (or `{alias}File`: a file holding it)"
    if choices:
        text = "one of " + ", ".join(f"`{c}`" for c in choices)
        if refused:
            text += " (" + ", ".join(f"`{r}`" for r in refused) + ": refused, with a migration hint)"
        return text
    if base is bool:
        return "`true` / `false`"
    names = {int: "integer", float: "number", str: "text"}
    text = names.get(base, getattr(base, "__name__", str(base)))
    bounds = _bounds(info)
    return f"{text}, {bounds}" if bounds else text


def _default_text(info: FieldInfo, secret: bool) -> str:
    default = info.get_default(call_default_factory=True)
    if default is None:
        return "unset"
    if secret:
        return "(secret)"  # never printed; no secret setting has a default today
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    if default == "":
        return "empty"
    return f"`{default}`"


def _normalise_used_by(
    values: list[str], section: str, choices_of: dict[str, tuple[str, ...]]
) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        if value == ALL:
            out.append(ALL)
            continue
        selector, sep, name = value.partition("=")
        if not sep:
            selector, name = (f"{section}.provider" if section else "provider"), value
        known = choices_of.get(selector)
        if known is None:
            raise IncompleteModelError(
                f"usedBy '{value}' of section '{section}': {selector} has no provider registry"
            )
        if name not in known:
            raise IncompleteModelError(
                f"usedBy '{value}' of section '{section}': '{name}' is not a {selector} value"
            )
        out.append(f"{selector}={name}")
    return tuple(out)


def _walk(
    model: type[BaseModel],
    path: tuple[str, ...],
    names: tuple[str, ...],
    choices_of: dict[str, tuple[str, ...]],
) -> Iterator[Entry]:
    section = ".".join(names)
    # Provider fields first: the other fields' ``usedBy`` are checked against their values.
    for name, info in model.model_fields.items():
        extra = _extra(info)
        if CHOICES in extra:
            key = f"{section}.{name}" if section else name
            choices_of[key] = _registry(extra[CHOICES]) + (
                _registry(extra[REFUSED]) if REFUSED in extra else ()
            )
    for name, info in model.model_fields.items():
        alias = info.alias or name
        sub = _section_model(info)
        if sub is not None:
            yield from _walk(sub, (*path, name), (*names, alias), choices_of)
            continue
        where = ".".join((*names, alias))
        extra = _extra(info)
        if not extra.get(USED_BY) or extra.get(ORIGIN) not in ("upstream", "ours"):
            raise IncompleteModelError(
                f"the setting {where} has no usedBy/origin metadata: give its Field "
                "json_schema_extra=_meta(...) in keyconnector/runtime/settings/model.py"
            )
        if not info.description:
            raise IncompleteModelError(
                f"the setting {where} has no docstring in keyconnector/runtime/settings/model.py"
            )
        choices = _registry(extra[CHOICES]) if CHOICES in extra else pattern_choices(info)
        refused = _registry(extra[REFUSED]) if REFUSED in extra else ()
        secret = _base_type(info.annotation) is SecretStr
        yield Entry(
            path=(*path, name),
            names=(*names, alias),
            section=section,
            annotation=info.annotation,
            type_text=_type_text(info, choices, refused, alias),
            default_text=_default_text(info, secret),
            secret=secret,
            origin=str(extra[ORIGIN]),
            used_by=_normalise_used_by(list(extra[USED_BY]), section, choices_of),
            choices=choices,
            description=" ".join(info.description.split()),
            field=info,
        )


def entries(model: type[BaseModel] = Settings) -> list[Entry]:
    """Every setting of ``model``, ``transferTo``'s copies included, in the model's order.

    Raises ``IncompleteModelError`` for a setting without a docstring or ``usedBy``/``origin``
    metadata, or whose ``usedBy`` names a provider that does not exist."""
    return list(_walk(model, (), (), {}))


@dataclass(frozen=True)
class EnvironmentVariable:
    """An environment variable that is not a ``keyConnectorSettings__`` setting but changes behaviour."""

    name: str
    """A name, or a prefix ending in ``*``."""
    module: str
    """The module that reads it (or configures the library that does): tests check it is mentioned there."""
    used_by: str
    meaning: str


ENVIRONMENT: tuple[EnvironmentVariable, ...] = (
    EnvironmentVariable(
        "ASPNETCORE_URLS",
        "keyconnector.runtime.server",
        "`serve`, without `--host`/`--port`",
        "Where to listen, as upstream's image sets it (`http://+:5000`): the first URL's host and port; "
        "`+` and `*` mean every address. Without it (and without options): 127.0.0.1:5000.",
    ),
    EnvironmentVariable(
        CONFIG_FILE_ENV,
        "keyconnector.runtime.settings.loader",
        "every command",
        "An appsettings-style JSON file (section `keyConnectorSettings`) read under the environment; "
        "`--config FILE` sets it for `serve`'s workers.",
    ),
    EnvironmentVariable(
        "KEYCONNECTOR_BACKUP_PASSPHRASE",
        "keyconnector.ops.backup.protection",
        "`backup`, `restore` without `--passphrase-file`",
        "The backup's passphrase, for automation that cannot write a file (never a command-line option: "
        "`ps` would show it).",
    ),
    EnvironmentVariable(
        "OTEL_EXPORTER_OTLP_*",
        "keyconnector.telemetry.tracing",
        "`serve` with `tracing__enabled=true`",
        "The OpenTelemetry exporter's standard settings: endpoint, headers, certificate, timeout.",
    ),
    EnvironmentVariable(
        "OTEL_SERVICE_NAME",
        "keyconnector.telemetry.tracing",
        "`serve` with `tracing__enabled=true`",
        "The service name on every span (default `keyconnector`).",
    ),
    EnvironmentVariable(
        "PROMETHEUS_MULTIPROC_DIR",
        "keyconnector.telemetry.metrics",
        "`serve` with `metrics__enabled=true` (the default)",
        "The folder where workers share their metrics; when set it is used as it is and left in place, "
        "otherwise a private temporary folder is made and removed.",
    ),
    EnvironmentVariable(
        "AWS_REGION",
        "keyconnector.keypairs.awskms",
        "`rsaKey__provider=awskms`",
        "The region when `rsaKey__awsRegion` is empty; with empty `awsAccessKeyId`/`awsAccessKeySecret`, "
        "boto3's default chain also reads `AWS_*` credentials, profiles, container and instance roles.",
    ),
    EnvironmentVariable(
        "GOOGLE_APPLICATION_CREDENTIALS",
        "keyconnector.keypairs.gcpkms",
        "`rsaKey__provider=gcpkms`",
        "The service-account key file of Google's application default credentials (else the metadata "
        "server or `gcloud`'s login).",
    ),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _used_by_text(entry: Entry) -> str:
    if ALL in entry.used_by:
        return "all"
    grouped: dict[str, list[str]] = {}
    for item in entry.used_by:
        selector, _, name = item.partition("=")
        grouped.setdefault(selector, []).append(name)
    return "; ".join(
        f"`{selector}` = " + ", ".join(f"`{n}`" for n in names) for selector, names in grouped.items()
    )


def _section_doc(model: type[BaseModel]) -> str:
    doc = model.__doc__
    return _markdown(inspect.cleandoc(doc)) if doc else ""


HEADER = """\
<!-- Generated by `keyconnector config-reference --output docs/configuration.md` from
     src/keyconnector/runtime/settings/model.py. Do not edit: change the model (docstrings, metadata)
     and regenerate.
     `keyconnector config-reference --check docs/configuration.md` fails when this page is stale. -->

# Configuration reference

Every setting keyconnector reads, generated from its settings model. Names are upstream Key Connector's,
so an existing env file or `appsettings.json` works unchanged; settings marked *ours* are additions.

How to write a setting:

- **Environment variable** (or a line of a docker-style `--env-file`): the name in the first column,
  e.g. `keyConnectorSettings__database__provider=postgresql`. Names are case-insensitive and `:` may
  replace `__` (`keyConnectorSettings:database:provider`), as in ASP.NET.
- **appsettings.json**: the same path as nested objects inside `keyConnectorSettings`, e.g.
  `{"keyConnectorSettings": {"database": {"provider": "postgresql"}}}`; give the file with `--config FILE`
  or `KEYCONNECTOR_CONFIG`. The environment wins over the file, and the real environment over `--env-file`.
- **Secrets** (marked **secret**) also accept the same name with `File` appended, naming a file whose
  content (without its final newline) is the value, e.g.
  `keyConnectorSettings__certificate__filesystemPasswordFile=/run/secrets/pfx`. Secrets never appear
  in a log line or an error message.
- An unknown name is reported (`ignoring unknown setting ... (a typo?)`), never silently dropped;
  `keyconnector check` shows it too.
- **Used by** says which provider reads the setting: `rsaKey.provider` = `awskms` means it matters only
  when `keyConnectorSettings__rsaKey__provider=awskms`; *all* means whatever the providers.
"""


TABLE_HEADER = (
    "| setting (environment variable) | appsettings.json | type | default | used by | origin | description |"
)


def _markdown(text: str) -> str:
    """Docstrings are written in reStructuredText's ````literal````; Markdown wants one backtick."""
    return " ".join(text.replace("``", "`").split())


def render() -> str:
    """The whole Markdown page."""
    all_entries = entries()
    lines = [HEADER]
    sections: dict[str, list[Entry]] = {}
    for entry in all_entries:
        sections.setdefault(entry.section, []).append(entry)
    models = _section_models()
    documented: dict[type[BaseModel], str] = {}
    for section, members in sections.items():
        model = models[section]
        title = f"`{section}`" if section else "Top level"
        if model in documented:
            continue  # transferTo's copies: one line under transferTo, below
        documented[model] = section
        lines.append(f"## {title}\n")
        doc = _section_doc(model)
        if doc:
            lines.append(doc + "\n")
        if section == "transferTo":
            for sub_section, sub_model in models.items():
                if sub_section.startswith("transferTo.") and sub_model in documented:
                    original = documented[sub_model]
                    prefix = ENV_PREFIX + sub_section.replace(".", "__")
                    lines.append(
                        f"- `{prefix}__*`: every setting of [`{original}`](#{original.lower()}) "
                        f"(same names, types and defaults), for the transfer's target."
                    )
            lines.append("")
        lines.append(TABLE_HEADER)
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for entry in members:
            lines.append(
                "| "
                + " | ".join(
                    [
                        f"`{entry.env}`",
                        f"`{entry.json_path}`",
                        _cell(entry.type_text),
                        _cell(entry.default_text),
                        _cell(_used_by_text(entry)),
                        "*ours*" if entry.origin == "ours" else "upstream",
                        _cell(_markdown(entry.description)),
                    ]
                )
                + " |"
            )
        lines.append("")
    missing = [s for s, m in models.items() if s.startswith("transferTo.") and m not in documented]
    if missing:
        raise IncompleteModelError(f"transferTo sections without a documented original: {', '.join(missing)}")
    lines.append("## Environment variables that are not settings\n")
    lines.append("| variable | read by | what it does |")
    lines.append("| --- | --- | --- |")
    for variable in ENVIRONMENT:
        lines.append(f"| `{variable.name}` | {_cell(variable.used_by)} | {_cell(variable.meaning)} |")
    lines.append("")
    return "\n".join(lines)


def _section_models() -> dict[str, type[BaseModel]]:
    """Dotted upstream section path -> its model, in the model's order (the top level is ``""``)."""
    out: dict[str, type[BaseModel]] = {"": Settings}

    def walk(model: type[BaseModel], names: tuple[str, ...]) -> None:
        for name, info in model.model_fields.items():
            sub = _section_model(info)
            if sub is not None:
                path = (*names, info.alias or name)
                out[".".join(path)] = sub
                walk(sub, path)

    walk(Settings, ())
    return out
