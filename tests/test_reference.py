"""The generated configuration reference and the takeover guide, checked against the code.

Why: both pages name settings and commands that operators copy into env files and shells. The
reference must cover every field (and fail to generate when a field lacks its provider metadata),
its names must really land on the fields they claim, the committed page must match the model, and the
guide must not mention a command or setting that does not exist.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, SecretStr

from keyconnector.certificates import SOURCES
from keyconnector.cli import build_parser
from keyconnector.keypairs import PROVIDERS
from keyconnector.ops import reference
from keyconnector.ops.reference import Entry, IncompleteModelError
from keyconnector.runtime.settings import (
    CertificateSettings,
    RsaKeySettings,
    Settings,
    load_settings,
)
from keyconnector.runtime.settings.model import _meta
from keyconnector.storage.registry import BACKENDS, REMOVED

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
TAKEOVER = ROOT / "docs" / "takeover.md"

ENTRIES = reference.entries()


def by_env(name: str) -> Entry:
    return next(e for e in ENTRIES if e.env.lower() == name.lower())


# -- the page ------------------------------------------------------------------------------------------


def test_committed_reference_is_current() -> None:
    assert CONFIGURATION.read_text(encoding="utf-8") == reference.render(), (
        "docs/configuration.md is stale: run `keyconnector config-reference --output docs/configuration.md`"
    )


def test_check_command_exit_codes(tmp_path: Path) -> None:
    current = tmp_path / "configuration.md"
    command = [sys.executable, "-m", "keyconnector", "config-reference"]
    written = subprocess.run([*command, "--output", str(current)], capture_output=True, text=True, timeout=60)
    assert written.returncode == 0, written.stderr
    assert current.read_text(encoding="utf-8") == reference.render()
    fresh = subprocess.run([*command, "--check", str(current)], capture_output=True, text=True, timeout=60)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    current.write_text(current.read_text(encoding="utf-8").replace("poolSize", "poolsize"), encoding="utf-8")
    stale = subprocess.run([*command, "--check", str(current)], capture_output=True, text=True, timeout=60)
    assert stale.returncode == 1
    assert "is stale" in stale.stdout and "config-reference --output" in stale.stdout
    assert "poolSize" in stale.stdout  # the diff shows what changed
    missing = subprocess.run(
        [*command, "--check", str(tmp_path / "none.md")], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1 and "does not exist" in missing.stdout


def test_every_setting_is_on_the_page() -> None:
    page = reference.render()
    for entry in ENTRIES:
        if entry.section.startswith("transferTo.") and entry.names[-1] != "lockfilePath":
            # transferTo's copies are one line each, pointing at the original section
            prefix = reference.ENV_PREFIX + entry.section.replace(".", "__")
            assert f"`{prefix}__*`" in page
            continue
        assert f"| `{entry.env}` | `{entry.json_path}` |" in page, entry.env
    for variable in reference.ENVIRONMENT:
        assert f"| `{variable.name}` |" in page


def test_secrets_are_marked_and_never_shown() -> None:
    secrets = [e for e in ENTRIES if e.secret]
    assert {e.names[-1] for e in secrets} >= {
        "filesystemPassword",
        "pkcs11LoginPin",
        "postgreSqlConnectionString",
    }
    for entry in secrets:
        assert "**secret**" in entry.type_text and f"`{entry.names[-1]}File`" in entry.type_text
        assert entry.default_text in ("unset", "(secret)")
    assert not any("secret" in e.type_text for e in ENTRIES if not e.secret)


# -- the metadata ------------------------------------------------------------------------------------------


def test_provider_mapping_of_known_settings() -> None:
    assert by_env("keyConnectorSettings__rsaKey__awsKeyId").used_by == ("rsaKey.provider=awskms",)
    assert by_env("keyConnectorSettings__rsaKey__pkcs11LoginPin").used_by == ("rsaKey.provider=pkcs11",)
    assert by_env("keyConnectorSettings__certificate__vaultToken").used_by == ("certificate.provider=vault",)
    assert by_env("keyConnectorSettings__database__postgreSqlConnectionString").used_by == (
        "database.provider=postgresql",
    )
    assert by_env("keyConnectorSettings__transferTo__database__mySqlConnectionString").used_by == (
        "transferTo.database.provider=mysql",
    )
    assert by_env("keyConnectorSettings__audit__database").used_by == tuple(
        f"database.provider={p}" for p in ("sqlite", "postgresql", "mysql", "sqlserver")
    )
    for name in ("rateLimit__perUserBurst", "metrics__enabled", "audit__file", "webVaultUri"):
        assert by_env(reference.ENV_PREFIX + name).used_by == ("all",)
    assert by_env("keyConnectorSettings__compat__writeLegacyFormat").origin == "ours"
    assert by_env("keyConnectorSettings__rsaKey__awsEndpoint").origin == "ours"
    assert by_env("keyConnectorSettings__rsaKey__awsRegion").origin == "upstream"


def test_provider_choices_come_from_the_registries() -> None:
    assert by_env("keyConnectorSettings__rsaKey__provider").choices == tuple(PROVIDERS)
    assert by_env("keyConnectorSettings__certificate__provider").choices == tuple(SOURCES)
    assert by_env("keyConnectorSettings__database__provider").choices == tuple(BACKENDS)
    assert "`mongo`: refused" in by_env("keyConnectorSettings__database__provider").type_text
    registries = {
        "rsaKey": set(PROVIDERS),
        "certificate": set(SOURCES),
        "database": set(BACKENDS) | set(REMOVED),
    }
    # Every provider of every section uses at least one setting, and every usedBy names a real provider.
    for section, names in registries.items():
        used = {
            u.partition("=")[2] for e in ENTRIES for u in e.used_by if u.startswith(f"{section}.provider=")
        }
        assert used <= names
        # (rsaKey's `certificate` provider reads the certificate section, and rsaKey.wrapAlgorithm.)
        assert names - used == set(), section


class _NewField(RsaKeySettings):
    brand_new: str | None = None
    """Has a docstring but no usedBy metadata."""


class _NoDocstring(CertificateSettings):
    brand_new: str | None = Field(default=None, json_schema_extra=_meta("vault"))


class _WrongProvider(RsaKeySettings):
    brand_new: str | None = Field(default=None, json_schema_extra=_meta("awskmss"))
    """Names a provider that does not exist."""


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_NewField, "rsaKey.brand_new has no usedBy/origin metadata"),
        (_NoDocstring, "has no docstring"),
        (_WrongProvider, "'awskmss' is not a rsaKey.provider value"),
    ],
)
def test_a_new_field_without_metadata_fails(model: type[Any], message: str) -> None:
    class Model(Settings):
        rsa_key: model = Field(default=model(), alias="rsaKey")  # type: ignore[valid-type]
        certificate: model = Field(default=model())  # type: ignore[valid-type]

    with pytest.raises(IncompleteModelError, match=re.escape(message)):
        reference.entries(Model)


def test_every_field_of_the_model_has_metadata() -> None:
    """Walks the model directly (not through the generator), so this fails however a field was added."""
    seen = 0

    def walk(model: type[Any]) -> None:
        nonlocal seen
        for name, info in model.model_fields.items():
            sub = reference._section_model(info)
            if sub is not None:
                walk(sub)
                continue
            extra = info.json_schema_extra
            assert isinstance(extra, dict) and extra.get("usedBy") and extra.get("origin"), (
                f"{model.__name__}.{name}"
            )
            assert info.description, f"{model.__name__}.{name} has no docstring"
            seen += 1

    walk(Settings)
    assert seen == len(ENTRIES)


def test_environment_variables_are_read_where_the_page_says() -> None:
    for variable in reference.ENVIRONMENT:
        spec = importlib.util.find_spec(variable.module)
        assert spec is not None and spec.origin is not None, variable.module
        source = Path(spec.origin).read_text(encoding="utf-8")
        name = variable.name.rstrip("*")
        if name == variable.name and variable.module != "keyconnector.runtime.settings.loader":
            assert f'"{name}"' in source, f"{variable.name} is not read in {variable.module}"
        else:
            assert name in source, f"{variable.name} is not mentioned in {variable.module}"


# -- round trip: the names on the page land on their fields ----------------------------------------------


FORMED: dict[str, tuple[str, Any]] = {
    "keyRingAnchor": ("0123456789ABCDEF0123", "0123456789abcdef0123"),
    "pathBase": ("/sample-pathBase/", "/sample-pathBase"),
}
"""Settings whose text has a required form: a valid sample, as written and as held."""


def _sample(entry: Entry) -> tuple[str, Any]:
    """A valid value differing from the default, as text, and what the field should then hold."""
    info = entry.field
    default = info.get_default(call_default_factory=True)
    base = reference._base_type(entry.annotation)
    if entry.choices:
        value = next(c for c in reversed(entry.choices) if c != default)
        return value.upper() if entry.names[-1] == "provider" else value, value
    if base is bool:
        return ("false", False) if default is True else ("true", True)
    bounds = {
        kind: getattr(m, kind.lower())
        for m in info.metadata
        for kind in ("Ge", "Le")
        if hasattr(m, kind.lower())
    }
    if base is int:
        number = (default or bounds.get("Ge", 1)) + 1
        assert number <= bounds.get("Le", number)
        return str(number), number
    if base is float:
        number = (default or 1.0) / 2
        return str(number), number
    if base is SecretStr:
        return f"s3cret-{entry.names[-1]}", f"s3cret-{entry.names[-1]}"
    if entry.names[-1] in FORMED:
        return FORMED[entry.names[-1]]
    return f"sample-{entry.names[-1]}", f"sample-{entry.names[-1]}"


def _odd_case(name: str) -> str:
    return "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(name))


def _held(settings: Settings, entry: Entry) -> Any:
    value: Any = settings
    for part in entry.path:
        value = getattr(value, part)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _context(entry: Entry) -> dict[str, str]:
    """What a setting needs beside it: a connection string without ``database__provider`` is refused
    (unset, the provider is upstream's JSON file), so the database's connection strings get one."""
    if entry.section == "database" and entry.names[-1].endswith("ConnectionString"):
        return {"keyConnectorSettings__database__provider": "sqlite"}
    return {}


@pytest.mark.parametrize("spelling", ["odd-case", "colons"])
def test_every_name_lands_on_its_field(spelling: str) -> None:
    for entry in ENTRIES:
        name = (
            _odd_case(entry.env)
            if spelling == "odd-case"
            else "keyConnectorSettings:" + ":".join(entry.names)
        )
        text, expected = _sample(entry)
        loaded = load_settings(environ={**_context(entry), name: text})
        assert loaded.unknown == [], name
        assert _held(loaded.settings, entry) == expected, name


def test_every_secret_takes_a_file(tmp_path: Path) -> None:
    for entry in (e for e in ENTRIES if e.secret):
        path = tmp_path / entry.env
        path.write_text(f"from-file-{entry.env}\n", encoding="utf-8")
        loaded = load_settings(environ={**_context(entry), _odd_case(entry.env) + "File": str(path)})
        assert loaded.unknown == [] and _held(loaded.settings, entry) == f"from-file-{entry.env}"


def test_appsettings_paths_land_on_their_fields(tmp_path: Path) -> None:
    document: dict[str, Any] = {}
    expected: list[tuple[Entry, Any]] = []
    for entry in ENTRIES:
        text, value = _sample(entry)
        node = document
        for part in entry.names[:-1]:
            node = node.setdefault(part, {})
        node[entry.names[-1]] = text
        expected.append((entry, value))
    config = tmp_path / "appsettings.json"
    import json

    config.write_text(json.dumps({"keyConnectorSettings": document}), encoding="utf-8")
    loaded = load_settings(environ={}, config_file=config)
    assert loaded.unknown == []
    for entry, value in expected:
        assert _held(loaded.settings, entry) == value, entry.json_path


# -- the takeover guide -----------------------------------------------------------------------------------


def _code(text: str) -> str:
    """Fenced blocks and inline code spans: where the guide names commands (prose may say 'keyconnector')."""
    fenced = re.findall(r"^ *```[^\n]*\n(.*?)^ *```", text, flags=re.S | re.M)
    rest = re.sub(r"^ *```[^\n]*\n.*?^ *```", "", text, flags=re.S | re.M)
    return "\n".join(fenced + re.findall(r"`([^`\n]+)`", rest))


def test_takeover_guide_names_only_real_commands_and_settings() -> None:
    text = TAKEOVER.read_text(encoding="utf-8")
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    commands = set(subparsers.choices)  # type: ignore[arg-type]
    mentioned = set(re.findall(r"(?:^|[\s`(])keyconnector\s+([a-z][\w-]*)", _code(text), flags=re.M))
    assert {"check", "backup", "restore", "serve", "stats", "upgrade-records"} <= mentioned
    assert mentioned <= commands, f"not commands: {mentioned - commands}"
    for command in re.findall(r"`((?:rotate|upgrade|downgrade)-[a-z-]+)", text):
        # The one command that may be announced before it exists, and then only marked as such.
        assert command in commands or (
            command == "downgrade-records" and "*Not available in this version:*" in text
        ), command

    known = {e.env.lower() for e in ENTRIES} | {e.env.lower() + "file" for e in ENTRIES if e.secret}
    sections = {
        reference.ENV_PREFIX.lower() + "__".join(e.names[:i]).lower()
        for e in ENTRIES
        for i in range(1, len(e.names))
    }
    names = re.findall(r"keyConnectorSettings(?:__|:)[A-Za-z0-9_:]*[A-Za-z0-9]", text)
    assert len(names) > 10
    for name in names:
        lowered = name.lower().replace(":", "__")
        assert lowered in known or lowered in sections, f"{name} is not a setting"
    # Short forms like `compat__writeLegacyFormat` and `rateLimit__*` must be settings too.
    for short in re.findall(r"`([a-z][A-Za-z]+__[A-Za-z_]*[A-Za-z*])", text):
        if short.lower().startswith("keyconnectorsettings"):
            continue
        full = (reference.ENV_PREFIX + short).lower().removesuffix("__*")
        assert full in known or full in sections, f"{short} is not a setting"
