"""``--tls-cert``/``--tls-key``, checked in ``serve``'s parent before anything is written.

granian reads the pair only in its workers: a wrong pair used to surface after "listening" as a
Rust panic in every worker, respawned in a loop, with the schema migrated and a data key created
meanwhile. Here the same mistakes end ``serve`` with one line naming the option: a file that cannot
be read, one that holds no PEM certificate or key, a key that is not the certificate's, a key
encrypted with a passphrase (granian is given none), a certificate not yet or no longer valid
(with its dates, so that the operator sees which one it is).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from keyconnector.errors import UsageError


def _read(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(option, f"cannot read {path}: {exc.strerror}") from None


def check_tls_pair(cert_path: str, key_path: str, now: dt.datetime | None = None) -> None:
    """Refuse, naming the option, a pair that granian could not serve or clients would reject."""
    certificates = _certificates(cert_path)
    leaf = certificates[0]
    key_pem = _read("--tls-key", key_path)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise UsageError(
            "--tls-key", f"{key_path} is encrypted with a passphrase; give the key unencrypted (mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise UsageError("--tls-key", f"{key_path} holds no PEM private key that can be read") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != leaf.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise UsageError(
            "--tls-key",
            f"{key_path} is not the private key of the certificate in {cert_path} "
            f"({leaf.subject.rfc4514_string() or 'no subject'}); give the pair that belongs together",
        )
    now = now or dt.datetime.now(dt.UTC)
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now < start or now > end:
        state = "is not valid yet" if now < start else "has expired"
        raise UsageError(
            "--tls-cert",
            f"the certificate in {cert_path} {state}: valid from {start:%Y-%m-%d %H:%M} "
            f"to {end:%Y-%m-%d %H:%M} UTC, now is {now:%Y-%m-%d %H:%M} UTC",
        )


def _certificates(path: str) -> list[x509.Certificate]:
    data = _read("--tls-cert", path)
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise UsageError(
            "--tls-cert",
            f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the chain as PEM",
        )
    return found
