"""The envelope: upstream's record format, written out independently, and the format marker."""

from __future__ import annotations

import base64
import os
import secrets

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyconnector.crypto import DataKey, generate_data_key
from keyconnector.errors import IntegrityError


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
    with pytest.raises(IntegrityError, match=reason):
        DataKey(generate_data_key()).open(record)


def test_a_tampered_record_or_another_data_key_fails_closed() -> None:
    data_key = DataKey(generate_data_key())
    record = bytearray(base64.b64decode(data_key.seal_legacy(b"k" * 32)))
    record[0] ^= 1
    with pytest.raises(IntegrityError, match="does not decrypt"):
        data_key.open(base64.b64encode(bytes(record)).decode())
    with pytest.raises(IntegrityError, match="does not decrypt"):
        DataKey(generate_data_key()).open(data_key.seal_legacy(b"k" * 32))


def test_a_data_key_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(IntegrityError, match="16 bytes"):
        DataKey(b"x" * 16)
