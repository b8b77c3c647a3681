"""Properties of the two parsers an attacker or a typo can feed: stored records and connection strings.

Both read bytes that someone else wrote (a database row, an operator's setting), so every input must
end in a result or in the one documented error type, never in a stray ``ValueError`` that the HTTP
layer would turn into a 500 or that start-up would print with a traceback. ``make test`` runs the
default hypothesis profile; ``make fuzz`` loads the ``fuzz`` profile (see ``fuzz/profile.py``).
"""

from __future__ import annotations

import base64
import contextlib
import os
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from keyconnector.core.envelope import FORMAT_2, DataKey, generate_data_key, record_version
from keyconnector.errors import ConfigurationError, IntegrityFailure
from keyconnector.storage.connstr import normalize_key, parse_connection_string, resolve

RAW_KEY = generate_data_key()
"""One data key for every example: building it per example only slows the search down."""

keys = st.binary(min_size=1, max_size=1024)
users = st.uuids()
versions = st.integers(min_value=1, max_value=999_999_999)


def upstream_seal(key: bytes, plaintext: bytes) -> str:
    """Upstream's layout written out independently of keyconnector.core.envelope."""
    nonce = os.urandom(12)
    return base64.b64encode(AESGCM(key).encrypt(nonce, plaintext, None) + nonce).decode()


# -- record formats ------------------------------------------------------------------------------------


@given(keys, users, versions)
def test_format_2_round_trips(plaintext: bytes, user: uuid.UUID, version: int) -> None:
    data_key = DataKey(RAW_KEY, version)
    record = data_key.seal(plaintext, user)
    assert record.startswith(f"{FORMAT_2}{version}:")
    assert record_version(record) == version
    assert data_key.open(record, user) == plaintext


@given(keys, users, users, versions)
def test_format_2_never_opens_for_another_user(
    plaintext: bytes, user: uuid.UUID, other: uuid.UUID, version: int
) -> None:
    assume(user != other)
    record = DataKey(RAW_KEY, version).seal(plaintext, user)
    with pytest.raises(IntegrityFailure, match="does not decrypt for this user"):
        DataKey(RAW_KEY, version).open(record, other)


@given(keys, users, versions, versions)
def test_format_2_never_opens_under_another_version(
    plaintext: bytes, user: uuid.UUID, version: int, other: int
) -> None:
    """Relabelling the version in the header must fail in AES-GCM itself (the version is bound)."""
    assume(version != other)
    record = DataKey(RAW_KEY, version).seal(plaintext, user)
    relabelled = f"{FORMAT_2}{other}:" + record.rsplit(":", 1)[1]
    with pytest.raises(IntegrityFailure):
        DataKey(RAW_KEY, other).open(relabelled, user)
    with pytest.raises(IntegrityFailure):
        DataKey(RAW_KEY, other).open(record, user)


@given(keys)
def test_upstream_format_round_trips_both_ways(plaintext: bytes) -> None:
    data_key = DataKey(RAW_KEY)
    assert data_key.open(data_key.seal_legacy(plaintext)) == plaintext
    assert data_key.open(upstream_seal(RAW_KEY, plaintext)) == plaintext
    blob = base64.b64decode(data_key.seal_legacy(plaintext))
    assert AESGCM(RAW_KEY).decrypt(blob[-12:], blob[:-12], None) == plaintext


def _mutate(record: str, data: st.DataObject) -> str:
    kind = data.draw(st.sampled_from(["replace", "delete", "insert", "truncate", "flip-bytes"]))
    if kind == "flip-bytes":
        prefix, _, body = record.rpartition(":")
        prefix = prefix + ":" if prefix else ""
        blob = bytearray(base64.b64decode(body))
        index = data.draw(st.integers(0, len(blob) - 1))
        blob[index] ^= data.draw(st.integers(1, 255))
        return prefix + base64.b64encode(bytes(blob)).decode()
    if kind == "truncate":
        return record[: data.draw(st.integers(0, len(record) - 1))]
    index = data.draw(st.integers(0, len(record) - 1))
    char = data.draw(st.characters())
    if kind == "delete":
        return record[:index] + record[index + 1 :]
    if kind == "insert":
        return record[:index] + char + record[index:]
    return record[:index] + char + record[index + 1 :]


def _same_envelope(a: str, b: str) -> bool:
    """True when two records are the same envelope spelled differently (non-canonical base64 bits, or a
    version written as '01'): the same bytes under the same header, which may rightly still open."""
    try:
        head_a, _, body_a = a.rpartition(":")
        head_b, _, body_b = b.rpartition(":")
        same_head = (not head_a and not head_b) or (
            bool(head_a) and bool(head_b) and record_version(a) == record_version(b)
        )
        return same_head and base64.b64decode(body_a, validate=True) == base64.b64decode(
            body_b, validate=True
        )
    except (ValueError, IntegrityFailure):
        return False


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(keys, users, st.booleans(), st.data())
def test_any_mutation_fails_with_integrity_error_only(
    plaintext: bytes, user: uuid.UUID, legacy: bool, data: st.DataObject
) -> None:
    data_key = DataKey(RAW_KEY, 1 if legacy else 7)
    record = data_key.seal_legacy(plaintext) if legacy else data_key.seal(plaintext, user)
    mutated = _mutate(record, data)
    assume(mutated != record)
    try:
        opened = data_key.open(mutated, user)
    except IntegrityFailure:
        return
    # Only a different spelling of the very same envelope may still open, and then to the same key.
    assert _same_envelope(record, mutated), f"a mutated record opened: {mutated!r}"
    assert opened == plaintext


@given(st.text())
@example("\u00b2:x")  # a superscript two: str.isdigit() says yes, int() says no
@example("\u0661:x")  # an Arabic-Indic one: a second spelling of version 1
def test_record_version_raises_only_integrity_error(text: str) -> None:
    for record in (text, "kc:" + text, FORMAT_2 + text):
        try:
            version = record_version(record)
        except IntegrityFailure:
            continue
        assert isinstance(version, int)
        assert version >= 1 if record.startswith(FORMAT_2) else version == 1


@given(st.text(), users)
def test_opening_arbitrary_text_raises_only_integrity_error(text: str, user: uuid.UUID) -> None:
    for record in (text, FORMAT_2 + "1:" + text, FORMAT_2 + text):
        for opener in (DataKey(RAW_KEY, 1), DataKey(RAW_KEY, 2)):
            with contextlib.suppress(IntegrityFailure):
                opener.open(record, user)


# -- connection strings --------------------------------------------------------------------------------

SETTING = "database.postgreSqlConnectionString"
SYNONYMS = {"Host": "host", "Server": "host", "Port": "port", "Database": "database", "Password": "password"}
SECRET_MARK = "\u00a7"
"""Part of every generated password and of nothing else, so that a leaked fragment is recognisable."""

key_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters=";" + SECRET_MARK), min_size=1, max_size=12
).filter(lambda k: k.strip() != "" and not k.strip().startswith("="))


def ado_value(value: str, style: str) -> str:
    """``value`` as an operator writes it: bare when that is unambiguous, else quoted (quotes doubled).

    A bare value must not start with ``=`` (``a==b`` is the key ``a=b``) or a quote, hold ``;``, or
    have surrounding whitespace (trimmed)."""
    if style == "plain" and value == value.strip() and ";" not in value and value[:1] not in ("'", '"', "="):
        return value
    quote = "'" if style == "single" else '"'
    return quote + value.replace(quote, quote * 2) + quote


def ado_key(key: str) -> str:
    return key.replace("=", "==")


@given(st.text(max_size=300))
def test_arbitrary_text_raises_only_configuration_error(text: str) -> None:
    try:
        parsed = parse_connection_string(text, SETTING)
    except ConfigurationError as exc:
        assert exc.setting == SETTING
        return
    with contextlib.suppress(ConfigurationError):
        resolve(parsed, SETTING, synonyms=SYNONYMS)


@given(
    st.dictionaries(key_names, st.text(max_size=40), max_size=8),
    st.lists(st.sampled_from(["plain", "single", "double"]), min_size=8, max_size=8),
    st.sampled_from([";", "; ", " ;  ", ";;"]),
    st.booleans(),
)
def test_generated_pairs_round_trip(
    pairs: dict[str, str], styles: list[str], separator: str, trailing: bool
) -> None:
    # Keys that normalize to the same name are one key: the last wins, as in .NET.
    expected: dict[str, str] = {}
    for key, value in pairs.items():
        expected[normalize_key(key)] = value
    text = separator.join(
        f"{ado_key(key)}={ado_value(value, style)}"
        for (key, value), style in zip(pairs.items(), styles, strict=False)
    )
    parsed = parse_connection_string(text + (";" if trailing else ""), SETTING)
    assert parsed.values == expected


passwords = st.text(min_size=4, max_size=30).map(lambda p: p[:2] + SECRET_MARK + p[2:])
breakages = st.sampled_from(["", ";oops", ";=x", ";Colour=blue", ";Port='5432", ';Host="db"x', ";Port"])


@given(passwords, st.sampled_from(["plain", "single", "double"]), breakages, breakages, st.booleans())
def test_the_password_never_appears_in_an_error(
    password: str, style: str, before: str, after: str, first: bool
) -> None:
    pair = f"Password={ado_value(password, style)}"
    text = f"{pair}{after}" if first else f"Host=db{before};{pair}{after}"
    try:
        resolve(parse_connection_string(text, SETTING), SETTING, synonyms=SYNONYMS)
    except ConfigurationError as exc:
        assert SECRET_MARK not in str(exc), str(exc)
        assert password not in str(exc)
    else:
        parsed = parse_connection_string(text, SETTING)
        assert parsed.get("password") == password
