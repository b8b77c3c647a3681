"""The record and wrapping formats written out from docs/compatibility.md section 3, independently of
``keyconnector.core.envelope``: if the product's idea of the formats drifted, tests that read and write them
with the product's own code would drift with it and still pass.
"""

from __future__ import annotations

import base64
import os
import uuid

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import pkcs12

from tests.conftest import Pfx

OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- upstream's algorithm, written out from docs/compatibility.md section 3 ----------------------------------


def upstream_keys(pfx: Pfx) -> tuple[object, object]:
    bundle = pkcs12.load_pkcs12(pfx.path.read_bytes(), pfx.password.encode())
    assert bundle.key is not None and bundle.cert is not None
    return bundle.cert.certificate.public_key(), bundle.key


def upstream_wrap(pfx: Pfx, data_key: bytes) -> str:
    public, _ = upstream_keys(pfx)
    return base64.b64encode(public.encrypt(data_key, OAEP_SHA1)).decode()  # type: ignore[attr-defined]


def upstream_unwrap(pfx: Pfx, wrapped: str) -> bytes:
    _, private = upstream_keys(pfx)
    return private.decrypt(base64.b64decode(wrapped), OAEP_SHA1)  # type: ignore[attr-defined,no-any-return]


def upstream_seal(data_key: bytes, user_key: bytes) -> str:
    nonce = os.urandom(12)
    sealed = AESGCM(data_key).encrypt(nonce, user_key, None)  # ciphertext || tag
    return base64.b64encode(sealed + nonce).decode()


def upstream_open(data_key: bytes, record: str) -> bytes:
    """Raises ValueError for a record that is not base64 (a format-2 one: ':' is not base64), as
    upstream's strict base64 decoding does."""
    blob = base64.b64decode(record, validate=True)
    ciphertext_and_tag, nonce = blob[:-12], blob[-12:]
    return AESGCM(data_key).decrypt(nonce, ciphertext_and_tag, None)


def format2_open(data_key: bytes, user: uuid.UUID, record: str) -> bytes:
    """Our format 2 (``kc:2:<version>:base64(nonce || ciphertext || tag)``, associated data binding the
    user id and the version), written out here independently of keyconnector.core.envelope."""
    _, marker, version_text, body = record.split(":", 3)
    version = int(version_text)
    assert marker == "2", record[:10]
    blob = base64.b64decode(body, validate=True)
    aad = b"keyconnector/record/2|" + user.bytes + version.to_bytes(4, "big")
    return AESGCM(data_key).decrypt(blob[:12], blob[12:], aad)
