"""Making a new key pair, as upstream's documentation does with openssl, but in one step."""

from __future__ import annotations

import datetime as dt
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID


def new_password() -> str:
    """256 bits, URL-safe: survives env files, shells and YAML unquoted."""
    return secrets.token_urlsafe(32)


def self_signed_certificate(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, *, common_name: str, days: int = 36500
) -> x509.Certificate:
    """What upstream's documentation makes with ``openssl req -x509``: the key pair's own certificate."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def self_signed_pfx(password: str, *, bits: int = 4096, common_name: str = "Key Connector") -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    cert = self_signed_certificate(key, common_name=common_name)
    # PBES2 with AES-256 and a SHA-256 MAC: readable by OpenSSL 1.1+, .NET (so upstream) and us.
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(100_000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password.encode())
    )
    return pkcs12.serialize_key_and_certificates(common_name.encode(), key, cert, None, encryption)
