"""The envelope: how a user's key is sealed under the data key, and how the data key is wrapped.

Upstream's record is ``base64(ciphertext || tag || nonce)`` with AES-256-GCM, a 12-byte random
nonce and no associated data. Records written by upstream must read here forever, and (while we
write that format) what we write must read in upstream, so that format is reproduced exactly.

Room for new formats: base64 never contains ``:``, so every record format after upstream's starts
with ``kc:<format>:``. A reader meeting a marker it does not know says so plainly instead of
mistaking the record for upstream's.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyconnector.errors import IntegrityError

DATA_KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
RECORD_MARKER = "kc:"

#: Upstream's wrapping for the certificate, PKCS#11 and Azure providers (kept for stored data).
OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
#: Upstream's wrapping for Google Cloud KMS (and AWS KMS ``RSAES_OAEP_SHA_256``).
OAEP_SHA256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def generate_data_key() -> bytes:
    return secrets.token_bytes(DATA_KEY_SIZE)


class DataKey:
    """The unwrapped data key, with its AES-GCM object built once (building it per call triples the cost)."""

    __slots__ = ("_aead", "version")

    def __init__(self, key: bytes, version: int = 0) -> None:
        if len(key) != DATA_KEY_SIZE:
            raise IntegrityError(
                f"the unwrapped data key is {len(key)} bytes long instead of {DATA_KEY_SIZE}: "
                "the key pair does not match the one that wrapped it"
            )
        self._aead = AESGCM(key)
        self.version = version

    def seal_legacy(self, plaintext: bytes) -> str:
        """Upstream's format: ``base64(ciphertext || tag || nonce)``, no associated data."""
        nonce = os.urandom(NONCE_SIZE)
        return base64.b64encode(self._aead.encrypt(nonce, plaintext, None) + nonce).decode("ascii")

    def open(self, record: str) -> bytes:
        """Decrypt a stored record of any format this version knows."""
        if record.startswith(RECORD_MARKER):
            version = record[len(RECORD_MARKER) :].split(":", 1)[0]
            raise IntegrityError(
                f"the record is in format '{version}', which this version of keyconnector does not know; "
                "upgrade keyconnector"
            )
        try:
            blob = base64.b64decode(record, validate=True)
        except (binascii.Error, ValueError):
            raise IntegrityError("the stored record is not valid base64") from None
        if len(blob) < NONCE_SIZE + TAG_SIZE:
            raise IntegrityError("the stored record is too short to be an AES-GCM envelope")
        try:
            return self._aead.decrypt(blob[-NONCE_SIZE:], blob[:-NONCE_SIZE], None)
        except InvalidTag:
            raise IntegrityError("the stored record does not decrypt under the data key") from None
