"""The envelope: how a user's key is sealed under the data key, and how the data key is wrapped.

Upstream's record is ``base64(ciphertext || tag || nonce)`` with AES-256-GCM, a 12-byte random
nonce and no associated data. Records written by upstream must read here forever, and (with
``compat.writeLegacyFormat``, for operators who may move back) what we write must read in upstream,
so that format is reproduced exactly. It is not bound to its user: a record copied into another
user's row decrypts there, which is why it is no longer the default (``keyconnector
upgrade-records`` rewrites the old ones).

Room for new formats: base64 never contains ``:``, so every record format after upstream's starts
with ``kc:<format>:``. A reader meeting a marker it does not know says so plainly instead of
mistaking the record for upstream's.

Format 2, ``kc:2:<data-key version>:base64(nonce || ciphertext || tag)``, names the data-key version
that sealed it (so data keys can be rotated record by record, online) and binds the record to its
user: the AES-GCM associated data is the user id and the version, so a record copied into another
user's row does not decrypt. Upstream's records carry no version; they belong to version 1, the
data key in ``ApplicationDatas``.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Mapping
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyconnector.errors import IntegrityFailure

DATA_KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
RECORD_MARKER = "kc:"
FORMAT_2 = "kc:2:"
LEGACY_VERSION = 1
"""The data-key version of upstream's records: the key wrapped in ``ApplicationDatas``."""


def generate_data_key() -> bytes:
    return secrets.token_bytes(DATA_KEY_SIZE)


def derive_key(root: bytes, purpose: str) -> bytes:
    """A 32-byte key for one ``purpose`` (HKDF-SHA256), so that one secret can key several MACs
    without a MAC made for one purpose ever verifying for another."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"keyconnector/" + purpose.encode()
    ).derive(root)


class DataKey:
    """The unwrapped data key, with its AES-GCM object built once (building it per call triples the cost)."""

    __slots__ = ("_aead", "version")

    def __init__(self, key: bytes, version: int = 0) -> None:
        if len(key) != DATA_KEY_SIZE:
            raise IntegrityFailure(
                f"the unwrapped data key is {len(key)} bytes long instead of {DATA_KEY_SIZE}: "
                "the key pair does not match the one that wrapped it"
            )
        self._aead = AESGCM(key)
        self.version = version

    def seal_legacy(self, plaintext: bytes) -> str:
        """Upstream's format: ``base64(ciphertext || tag || nonce)``, no associated data."""
        nonce = os.urandom(NONCE_SIZE)
        return base64.b64encode(self._aead.encrypt(nonce, plaintext, None) + nonce).decode("ascii")

    def seal(self, plaintext: bytes, user_id: UUID) -> str:
        """Format 2: versioned and bound to ``user_id``."""
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, plaintext, _associated_data(user_id, self.version))
        return f"{FORMAT_2}{self.version}:" + base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, record: str, user_id: UUID | None = None) -> bytes:
        """Decrypt a stored record of any format this version knows (format 2 needs ``user_id``)."""
        if record.startswith(RECORD_MARKER):
            return self._open_marked(record, user_id)
        try:
            blob = base64.b64decode(record, validate=True)
        except (binascii.Error, ValueError):
            raise IntegrityFailure("the stored record is not valid base64") from None
        if len(blob) < NONCE_SIZE + TAG_SIZE:
            raise IntegrityFailure("the stored record is too short to be an AES-GCM envelope")
        try:
            return self._aead.decrypt(blob[-NONCE_SIZE:], blob[:-NONCE_SIZE], None)
        except InvalidTag:
            raise IntegrityFailure("the stored record does not decrypt under the data key") from None

    def seal_secret(self, secret: bytes, context: bytes) -> str:
        """``secret`` encrypted under this data key for one ``context`` (the key ring's
        authentication key): only a holder of the data key can make or open it."""
        nonce = os.urandom(NONCE_SIZE)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, secret, context)).decode("ascii")

    def open_secret(self, sealed: str, context: bytes) -> bytes:
        try:
            blob = base64.b64decode(sealed, validate=True)
            return self._aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], context)
        except (binascii.Error, ValueError, InvalidTag):
            raise IntegrityFailure("the sealed secret does not open under this data key") from None

    def _open_marked(self, record: str, user_id: UUID | None) -> bytes:
        version = record_version(record)
        if version != self.version:
            raise IntegrityFailure(f"the record was sealed by data key version {version}, not {self.version}")
        if user_id is None:
            raise IntegrityFailure("a format 2 record can only be opened for its user")
        try:
            blob = base64.b64decode(record[record.index(":", len(FORMAT_2)) + 1 :], validate=True)
        except (binascii.Error, ValueError):
            raise IntegrityFailure("the stored record is not valid base64") from None
        if len(blob) < NONCE_SIZE + TAG_SIZE:
            raise IntegrityFailure("the stored record is too short to be an AES-GCM envelope")
        try:
            aad = _associated_data(user_id, version)
            return self._aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
        except InvalidTag:
            raise IntegrityFailure(
                "the stored record does not decrypt for this user: it was altered or copied from another "
                "user's row"
            ) from None


def _associated_data(user_id: UUID, version: int) -> bytes:
    return b"keyconnector/record/2|" + user_id.bytes + version.to_bytes(4, "big")


def record_version(record: str) -> int:
    """The data-key version a stored record needs: 1 for upstream's records."""
    if not record.startswith(RECORD_MARKER):
        return LEGACY_VERSION
    if not record.startswith(FORMAT_2):
        marker = record[len(RECORD_MARKER) :].split(":", 1)[0]
        raise IntegrityFailure(
            f"the record is in format '{marker[:20]}', which this version of keyconnector does not know; "
            "upgrade keyconnector"
        )
    head, sep, _ = record[len(FORMAT_2) :].partition(":")
    # ASCII digits in their one spelling: '²' is a digit to str.isdigit, and '01' would alias '1'.
    if not sep or not (head.isascii() and head.isdigit()) or len(head) > 9 or head != str(int(head)):
        raise IntegrityFailure("the stored record has no valid data-key version")
    return int(head)


def is_legacy(record: str) -> bool:
    """True for upstream's format (not bound to a user): what ``upgrade-records`` rewrites."""
    return not record.startswith(RECORD_MARKER)


class DataKeys:
    """Every data-key version a process can open, and the one it seals new records with.

    Every version seals in format 2, bound to the user. With ``write_legacy`` (the setting
    ``compat.writeLegacyFormat``), version 1 seals in upstream's format instead, so that a deployment
    that never rotated stays readable by upstream; later versions always seal in format 2 (upstream
    cannot read records of a rotated data key anyway).
    """

    __slots__ = ("accept_legacy", "current", "keys", "write_legacy")

    def __init__(
        self,
        keys: Mapping[int, DataKey],
        current: int,
        *,
        write_legacy: bool = False,
        accept_legacy: bool = True,
    ) -> None:
        if current not in keys:
            raise IntegrityFailure(f"the current data key version {current} is not loaded")
        self.keys = dict(keys)
        self.current = current
        self.write_legacy = write_legacy
        self.accept_legacy = accept_legacy
        """False once the authenticated key ring says every record is bound to its user: an
        upstream-format record is then one copied in from elsewhere (a replayed old row)."""

    def with_legacy_format(self, write_legacy: bool) -> DataKeys:
        """The same keys, sealing per ``compat.writeLegacyFormat`` (``load_key_set`` does not know it)."""
        return DataKeys(self.keys, self.current, write_legacy=write_legacy, accept_legacy=self.accept_legacy)

    @property
    def seals_legacy(self) -> bool:
        """Whether new records are written in upstream's (unbound) format."""
        return self.write_legacy and self.current == LEGACY_VERSION

    @property
    def sealing_key(self) -> DataKey:
        return self.keys[self.current]

    def seal(self, plaintext: bytes, user_id: UUID) -> str:
        key = self.keys[self.current]
        if self.write_legacy and self.current == LEGACY_VERSION:
            return key.seal_legacy(plaintext)
        return key.seal(plaintext, user_id)

    def open(self, record: str, user_id: UUID) -> bytes:
        version = record_version(record)
        key = self.keys.get(version)
        if key is None:
            raise UnknownVersionError(version)
        if not self.accept_legacy and not record.startswith(RECORD_MARKER):
            raise LegacyRefusedError(
                "the record is in upstream's format (not bound to its user), which this deployment no "
                "longer accepts since `keyconnector upgrade-records` bound every record: it was copied in "
                "from elsewhere, such as an old dump"
            )
        return key.open(record, user_id)


class UnknownVersionError(IntegrityFailure):
    """A record needs a data-key version this process has not loaded (rotated since it started?)."""

    def __init__(self, version: int) -> None:
        self.version = version
        super().__init__(f"the record needs data key version {version}, which is not loaded")


class LegacyRefusedError(IntegrityFailure):
    """An upstream-format record where the key ring says every record is bound to its user."""
