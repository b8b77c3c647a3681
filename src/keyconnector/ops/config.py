"""``keyconnector config show``: every effective setting, its value and where it came from.

Why: settings arrive from four places (the real environment, ``--env-file``, the appsettings file of
``--config``/``KEYCONNECTOR_CONFIG``, and the defaults), merged with upstream's case-insensitive
rules, and a value set in one place silently loses to another. Like ``docker compose config``, this
prints the result of the merge, so that an operator sees what ``serve`` will use without reading code.

What is hidden, and why:

- secrets (every ``SecretStr`` field of the settings model: passwords, PINs, client secrets, tokens,
  secret keys) are always shown as ``********``; nothing reveals them;
- connection strings are ``SecretStr`` as a whole, but most of one is what an operator needs to see:
  it is shown key by key, with the password (``Password``, ``Pwd``, an account key, a SAS) masked
  always and the user and host names hidden unless ``--reveal-names``; a SQLite file path is shown;
- identifying values that are not secrets (account, tenant and application ids, AWS key ids and
  ARNs, user names, token serial numbers: the fields the model marks ``IDENTIFYING``) are hidden
  unless ``--reveal-names``, so that the default output can be pasted into a ticket.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr

from keyconnector.errors import ENV_PREFIX, KeyConnectorError
from keyconnector.ops import Subcommands, add_settings_arguments, load_settings_from
from keyconnector.ops.report import add_json_option, emit_json, plain_table, wants_json
from keyconnector.runtime.settings import IDENTIFYING, LoadedSettings, Origin, setting_paths

SECRET_MASK = "********"  # noqa: S105 - the mask shown instead of a secret, not one
NAME_MASK = "<hidden>"

SECRET_KEYS = frozenset(
    {"password", "pwd", "accountkey", "sharedaccesssignature", "sharedaccesskey", "token", "secret"}
)
"""Connection-string keys (and URL query parameters) whose value is a secret, compared without spaces
or case: masked always."""

NAME_KEYS = frozenset(
    {
        "host",
        "server",
        "datasource",
        "address",
        "addr",
        "networkaddress",
        "userid",
        "uid",
        "user",
        "username",
        "accountname",
        "blobendpoint",
    }
)
"""Connection-string keys that name a user or a host: hidden unless ``--reveal-names``."""


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser("config", help="show the effective settings and where each came from")
    actions = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="every effective setting, its value and where it came from (secrets masked)",
        description=(
            "Prints every setting (upstream's keyConnectorSettings__... names) with the value the service "
            "would use and where it came from: the environment, the env file (--env-file), the appsettings "
            "file (--config or KEYCONNECTOR_CONFIG) or the default; then the names that are not settings "
            "(typos), with the setting each probably meant. Secrets are always masked; user names, host "
            "names, account, tenant and key identifiers are hidden unless --reveal-names."
        ),
    )
    add_settings_arguments(show)
    show.add_argument(
        "--reveal-names",
        action="store_true",
        help="show user and host names, account, tenant and key identifiers (never secrets)",
    )
    add_json_option(show, "the settings")
    show.set_defaults(func=cmd_config_show)


@dataclass(frozen=True)
class Shown:
    """One setting as ``config show`` prints it."""

    name: str
    path: str
    value: Any
    origin: Origin | None
    masked: str | None
    """``secret`` (a secret, or a connection string's password, was masked), ``names`` (an identifying
    value was hidden) or None."""

    @property
    def source(self) -> str:
        return "default" if self.origin is None else self.origin.source

    def document(self) -> dict[str, Any]:
        origin = self.origin
        return {
            "name": self.name,
            "path": self.path,
            "value": self.value,
            "source": self.source,
            "file": origin.file if origin else None,
            "written_as": origin.name if origin else None,
            "from_secret_file": bool(origin and origin.via_file),
            "masked": self.masked,
        }

    def source_text(self) -> str:
        origin = self.origin
        if origin is None:
            return "default"
        text = origin.source + (f" {origin.file}" if origin.file else "")
        if origin.via_file:
            text += " (read from the file of ...File)"
        return text


def cmd_config_show(args: argparse.Namespace) -> int:
    loaded = load_settings_from(args)
    shown = effective(loaded, reveal_names=args.reveal_names)
    unknown = [
        {
            "name": name,
            "source": loaded.unknown_origins[name].source if name in loaded.unknown_origins else None,
            "file": loaded.unknown_origins[name].file if name in loaded.unknown_origins else None,
            "did_you_mean": loaded.suggestion(name),
        }
        for name in loaded.unknown
    ]
    if wants_json(args):
        emit_json(
            {
                "sources": loaded.sources,
                "names_revealed": bool(args.reveal_names),
                "settings": [each.document() for each in shown],
                "unknown": unknown,
                "upstream_logging": loaded.upstream_logging,
            }
        )
        return 0
    rows = [(each.name, _text(each.value), each.source_text()) for each in shown]
    print(plain_table(["SETTING", "VALUE", "SOURCE"], rows))
    if unknown:
        print()
        print("unknown settings (ignored):")
        for entry in unknown:
            meant = f"; did you mean {entry['did_you_mean']}?" if entry["did_you_mean"] else ""
            where = (
                f" ({entry['source']}{' ' + entry['file'] if entry['file'] else ''})"
                if entry["source"]
                else ""
            )
            print(f"  {entry['name']}{where}{meant}")
    if loaded.upstream_logging:
        print()
        print("upstream's logging settings (not used here): " + ", ".join(loaded.upstream_logging))
    if not args.reveal_names and any(NAME_MASK in _text(each.value) for each in shown):
        print()
        print(f"{NAME_MASK}: user, host, account and key names; --reveal-names shows them (never secrets)")
    return 0


def effective(loaded: LoadedSettings, *, reveal_names: bool) -> list[Shown]:
    """Every setting of ``loaded`` in the model's order, masked. A ``transferTo`` section that is not
    set at all is left out (it has no values, only the absence of a target)."""
    out: list[Shown] = []
    for path in setting_paths():
        found = _field_at(loaded.settings, path)
        if found is None:
            continue
        value, extra = found
        dotted = ".".join(path)
        shown, masked = _masked(value, extra, path[-1], reveal_names=reveal_names)
        out.append(Shown(ENV_PREFIX + "__".join(path), dotted, shown, loaded.origins.get(dotted), masked))
    return out


def _field_at(model: BaseModel, path: tuple[str, ...]) -> tuple[Any, dict[str, Any]] | None:
    """The value at the upstream ``path`` and its field's ``json_schema_extra``; None when a section
    on the way is unset."""
    current: Any = model
    extra: dict[str, Any] = {}
    for part in path:
        if not isinstance(current, BaseModel):
            return None
        fields = type(current).model_fields
        name = next(n for n, info in fields.items() if (info.alias or n) == part)
        raw_extra = fields[name].json_schema_extra
        extra = raw_extra if isinstance(raw_extra, dict) else {}
        current = getattr(current, name)
        if current is None and part != path[-1]:
            return None
    return current, extra


def _masked(value: Any, extra: dict[str, Any], alias: str, *, reveal_names: bool) -> tuple[Any, str | None]:
    if isinstance(value, SecretStr):
        if alias.endswith("ConnectionString"):
            return connection_string(
                value.get_secret_value(), sqlite=alias == "sqliteConnectionString", reveal_names=reveal_names
            )
        return SECRET_MASK, "secret"
    if extra.get(IDENTIFYING) and value is not None and not reveal_names:
        return NAME_MASK, "names"
    return value, None


def connection_string(
    text: str, *, sqlite: bool = False, reveal_names: bool = False
) -> tuple[str, str | None]:
    """``text`` with its password masked and, unless ``reveal_names``, its user and host names hidden.

    Both forms the backends read: ADO.NET pairs (``Host=db;Password=...``) and URLs
    (``postgresql://user:pass@db/kc``). A string that does not parse is masked whole: a half-parsed
    one could show a fragment of its password."""
    if "://" in text:
        return _url(text, reveal_names)
    from keyconnector.storage.connstr import normalize_key, parse_connection_string

    try:
        parsed = parse_connection_string(text, "connection string")
    except KeyConnectorError:
        return f"{SECRET_MASK} (does not parse; `keyconnector check` says why)", "secret"
    parts: list[str] = []
    masked: str | None = None
    for key, value in parsed.values.items():
        compact = normalize_key(key).replace(" ", "")
        if compact in SECRET_KEYS:
            value, masked = SECRET_MASK, "secret"
        elif compact in NAME_KEYS and not (sqlite and compact == "datasource") and not reveal_names:
            value, masked = NAME_MASK, masked or "names"
        parts.append(f"{parsed.spelling[key]}={value}")
    return ";".join(parts), masked


def _url(text: str, reveal_names: bool) -> tuple[str, str | None]:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return f"{SECRET_MASK} (does not parse; `keyconnector check` says why)", "secret"
    masked: str | None = None
    user = parts.username
    if user is not None and not reveal_names:
        user, masked = NAME_MASK, "names"
    password = None
    if parts.password is not None:
        password, masked = SECRET_MASK, "secret"
    host = parts.hostname or ""
    if host and not reveal_names:
        host, masked = NAME_MASK, masked or "names"
    netloc = host + (f":{port}" if port is not None else "")
    if user is not None:
        netloc = user + (f":{password}" if password is not None else "") + "@" + netloc
    query = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.replace("_", "").lower() in SECRET_KEYS | {"sslpassword"}:
            value, masked = SECRET_MASK, "secret"
        query.append((key, value))
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*<>/"), "")), masked


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
