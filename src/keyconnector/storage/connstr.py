"""ADO.NET connection strings, as operators of the .NET service wrote them.

Operators keep their existing ``keyConnectorSettings__database__*ConnectionString`` values when they
switch to keyconnector, so every SQL backend has to read the ``Key=Value;Key=Value`` syntax with the
same rules as .NET's ``DbConnectionStringBuilder``:

- pairs are separated by ``;`` and empty pairs (``;;``, a trailing ``;``) are ignored;
- keys are case-insensitive, surrounding whitespace is ignored and ``==`` in a key stands for ``=``;
- a value may be quoted with ``'`` or ``"``; inside quotes ``;`` and ``=`` are literal and the quote
  character is written twice to stand for itself; an unquoted value is trimmed;
- when a key appears twice, the last one wins.

Nothing in this module ever puts a value into an error message: a connection string usually holds a
password, and a half-parsed one can leak a fragment of it. Errors name keys and positions only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from keyconnector.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class ConnectionString:
    """The parsed pairs. ``values`` is keyed by :func:`normalize_key`; ``spelling`` keeps each key as the
    operator wrote it, so that messages can quote the operator's own words back."""

    values: dict[str, str]
    spelling: dict[str, str]

    def get(self, *names: str) -> str | None:
        """The value of the first of ``names`` (synonyms) that is present."""
        for name in names:
            value = self.values.get(normalize_key(name))
            if value is not None:
                return value
        return None


def normalize_key(key: str) -> str:
    """Case- and spacing-insensitive form of a key, so ``Data Source``, ``data  source`` match."""
    return " ".join(key.split()).lower()


def parse_connection_string(text: str, setting: str) -> ConnectionString:
    """Split ``text`` into its pairs; a syntax error is a ConfigurationError naming ``setting``."""
    values: dict[str, str] = {}
    spelling: dict[str, str] = {}
    position = 0
    length = len(text)
    pair_number = 0
    while position < length:
        # Skip separators and whitespace between pairs.
        while position < length and (text[position] == ";" or text[position].isspace()):
            position += 1
        if position >= length:
            break
        pair_number += 1
        key, position = _read_key(text, position, setting, pair_number)
        value, position = _read_value(text, position, setting, key)
        normalized = normalize_key(key)
        values[normalized] = value
        spelling[normalized] = key
    return ConnectionString(values, spelling)


def _read_key(text: str, position: int, setting: str, pair_number: int) -> tuple[str, int]:
    chars: list[str] = []
    length = len(text)
    while True:
        if position >= length or text[position] == ";":
            # Do not quote the fragment: when quoting went wrong it can be part of a password.
            raise ConfigurationError(
                setting, f"entry number {pair_number} of the connection string has no '=' after its key"
            )
        char = text[position]
        if char == "=":
            if position + 1 < length and text[position + 1] == "=":
                chars.append("=")
                position += 2
                continue
            position += 1
            break
        chars.append(char)
        position += 1
    key = "".join(chars).strip()
    if not key:
        raise ConfigurationError(setting, f"entry number {pair_number} of the connection string has no key")
    return key, position


def _read_value(text: str, position: int, setting: str, key: str) -> tuple[str, int]:
    length = len(text)
    while position < length and text[position].isspace() and text[position] != ";":
        position += 1
    if position < length and text[position] in "'\"":
        quote = text[position]
        position += 1
        chars: list[str] = []
        while True:
            if position >= length:
                raise ConfigurationError(
                    setting, f"the quoted value of '{key}' in the connection string has no closing {quote}"
                )
            char = text[position]
            if char == quote:
                if position + 1 < length and text[position + 1] == quote:
                    chars.append(quote)
                    position += 2
                    continue
                position += 1
                break
            chars.append(char)
            position += 1
        while position < length and text[position] != ";":
            if not text[position].isspace():
                raise ConfigurationError(
                    setting,
                    f"unexpected characters after the quoted value of '{key}' in the connection string",
                )
            position += 1
        return "".join(chars), position
    end = text.find(";", position)
    if end < 0:
        end = length
    return text[position:end].strip(), end


def resolve(
    parsed: ConnectionString,
    setting: str,
    *,
    synonyms: Mapping[str, str],
    ignored: Iterable[str] = (),
    unsupported: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Map the parsed keys onto canonical names and reject what a backend does not understand.

    ``synonyms`` maps every accepted spelling to its canonical name; ``ignored`` lists keys that are
    harmless to accept and drop (pooling knobs and the like); ``unsupported`` maps keys that are valid
    for the .NET driver but that this backend cannot honour to the explanation to give. Unknown keys are
    reported by name, all at once, so that an operator fixes them in one go.
    """
    canonical_of = {normalize_key(name): canonical for name, canonical in synonyms.items()}
    ignored_keys = {normalize_key(name) for name in ignored}
    unsupported_keys = {normalize_key(name): why for name, why in (unsupported or {}).items()}
    out: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in parsed.values.items():
        if key in unsupported_keys:
            raise ConfigurationError(
                setting, f"the connection string key '{parsed.spelling[key]}' {unsupported_keys[key]}"
            )
        if key in canonical_of:
            out[canonical_of[key]] = value
        elif key not in ignored_keys:
            unknown.append(parsed.spelling[key])
    if unknown:
        names = ", ".join(f"'{name}'" for name in unknown)
        accepted = sorted({*synonyms, *ignored}, key=str.lower)
        raise ConfigurationError(
            setting,
            f"unknown connection string key{'s' if len(unknown) > 1 else ''} {names}; "
            f"accepted keys: {', '.join(accepted)}",
        )
    return out
