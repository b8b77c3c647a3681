"""The envelope: upstream's record format, written out independently, and the format marker."""

from __future__ import annotations

import base64
import os
import secrets
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyconnector.core.envelope import (
    DataKey,
    DataKeys,
    UnknownVersionError,
    generate_data_key,
    record_version,
)
from keyconnector.errors import IntegrityFailure


def upstream_seal(key: bytes, plaintext: bytes) -> str:
    nonce = os.urandom(12)
    return base64.b64encode(AESGCM(key).encrypt(nonce, plaintext, None) + nonce).decode()


def test_records_are_upstreams_layout_both_ways() -> None:
    raw = generate_data_key()
    data_key = DataKey(raw)
    user_key = secrets.token_bytes(32)
    record = data_key.seal_legacy(user_key)
    blob = base64.b64decode(record, validate=True)
    assert len(blob) == 32 + 16 + 12
    assert AESGCM(raw).decrypt(blob[-12:], blob[:-12], None) == user_key
    assert data_key.open(upstream_seal(raw, user_key)) == user_key


def test_nonces_are_fresh() -> None:
    data_key = DataKey(generate_data_key())
    assert len({data_key.seal_legacy(b"same") for _ in range(100)}) == 100


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"short").decode(), "too short"),
        ("kc:9:whatever", "format '9'"),
    ],
)
def test_unreadable_records_say_why(record: str, reason: str) -> None:
    with pytest.raises(IntegrityFailure, match=reason):
        DataKey(generate_data_key()).open(record)


def test_a_tampered_record_or_another_data_key_fails_closed() -> None:
    data_key = DataKey(generate_data_key())
    record = bytearray(base64.b64decode(data_key.seal_legacy(b"k" * 32)))
    record[0] ^= 1
    with pytest.raises(IntegrityFailure, match="does not decrypt"):
        data_key.open(base64.b64encode(bytes(record)).decode())
    with pytest.raises(IntegrityFailure, match="does not decrypt"):
        DataKey(generate_data_key()).open(data_key.seal_legacy(b"k" * 32))


def test_a_data_key_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(IntegrityFailure, match="16 bytes"):
        DataKey(b"x" * 16)


# -- format 2: versioned, bound to the user -----------------------------------------------------------


def test_format_2_names_its_version_and_reads_back_only_for_its_user() -> None:
    raw = generate_data_key()
    key = DataKey(raw, version=7)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    record = key.seal(b"alice's key", alice)
    assert record.startswith("kc:2:7:")
    assert record_version(record) == 7
    assert key.open(record, alice) == b"alice's key"
    # The layout, checked independently: base64(nonce || ciphertext || tag), AAD = user id + version.
    blob = base64.b64decode(record.split(":", 3)[3])
    aad = b"keyconnector/record/2|" + alice.bytes + (7).to_bytes(4, "big")
    assert AESGCM(raw).decrypt(blob[:12], blob[12:], aad) == b"alice's key"
    # Copied into Bob's row, it does not open for Bob.
    with pytest.raises(IntegrityFailure, match="copied from another user's row"):
        key.open(record, bob)


def test_format_2_refuses_a_changed_version_number() -> None:
    raw = generate_data_key()
    user = uuid.uuid4()
    record = DataKey(raw, version=2).seal(b"k", user)
    forged = record.replace("kc:2:2:", "kc:2:3:", 1)
    with pytest.raises(IntegrityFailure):
        DataKey(raw, version=3).open(forged, user)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ("kc:9:1:AAAA", "format '9'"),
        ("kc:2:x:AAAA", "no valid data-key version"),
        ("kc:2:1:not base64!", "not valid base64"),
        ("kc:2:1:AAAA", "too short"),
    ],
)
def test_unreadable_format_2_records_say_why(record: str, reason: str) -> None:
    with pytest.raises(IntegrityFailure, match=reason):
        DataKey(generate_data_key(), version=1).open(record, uuid.uuid4())


def test_a_key_set_seals_with_the_current_version_and_opens_every_loaded_one() -> None:
    user = uuid.uuid4()
    v1, v2 = DataKey(generate_data_key(), 1), DataKey(generate_data_key(), 2)
    legacy = DataKeys({1: v1}, 1, write_legacy=True).seal(b"old", user)
    assert record_version(legacy) == 1 and not legacy.startswith("kc:"), (
        "writeLegacyFormat: upstream's format"
    )
    bound = DataKeys({1: v1}, 1).seal(b"bound", user)
    assert bound.startswith("kc:2:1:"), "by default version 1 writes format 2 too"
    assert DataKeys({1: v1}, 1).open(bound, user) == b"bound"
    with pytest.raises(IntegrityFailure, match="copied from another user"):
        DataKeys({1: v1}, 1).open(bound, uuid.uuid4())
    assert DataKeys({1: v1, 2: v2}, 2, write_legacy=True).seal(b"x", user).startswith("kc:2:2:"), (
        "writeLegacyFormat only applies while version 1 seals"
    )
    both = DataKeys({1: v1, 2: v2}, 2)
    current = both.seal(b"new", user)
    assert record_version(current) == 2
    assert both.open(legacy, user) == b"old"
    assert both.open(current, user) == b"new"
    with pytest.raises(UnknownVersionError):
        DataKeys({1: v1}, 1).open(current, user)
