"""The filesystem certificate source, and the reader of PFX, PEM and DER files every file-based source
shares (upstream's release loads all three from ``certificate__filesystemPath``)."""

from __future__ import annotations

import asyncio
import base64
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    pkcs12,
)

from keyconnector.certificates import from_pkcs12, read_certificate
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.errors import ConfigurationError
from keyconnector.keypairs import open_key_provider
from keyconnector.keypairs.base import OAEP_SHA1
from keyconnector.keypairs.generate import self_signed_certificate
from keyconnector.runtime.settings import load_settings, side_of
from tests.conftest import Pfx, base_env


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_a_certificate_only_pfx_gives_the_public_key_without_a_private_key(key: rsa.RSAPrivateKey) -> None:
    certificate = self_signed_certificate(key, common_name="HSM certificate", days=30)
    data = pkcs12.serialize_key_and_certificates(
        b"kc", None, certificate, None, BestAvailableEncryption(b"pw")
    )
    loaded = from_pkcs12(data, "pw", "certificate.filesystemPassword", "test.pfx")
    assert loaded.private_key is None
    assert loaded.certificate == certificate
    assert loaded.public_key.public_numbers() == key.public_key().public_numbers()


def test_the_certificate_provider_refuses_a_pfx_without_its_key(
    key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    certificate = self_signed_certificate(key, common_name="HSM certificate", days=30)
    path = tmp_path / "cert-only.pfx"
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(b"kc", None, certificate, None, BestAvailableEncryption(b"pw"))
    )
    settings = load_settings(
        {
            "keyConnectorSettings__rsaKey__provider": "certificate",
            "keyConnectorSettings__certificate__filesystemPath": str(path),
            "keyConnectorSettings__certificate__filesystemPassword": "pw",
        }
    ).settings
    with pytest.raises(ConfigurationError) as caught:
        asyncio.run(open_key_provider(side_of(settings)))
    assert "keyConnectorSettings__certificate__filesystemPath" in str(caught.value)
    assert "carries no private key" in str(caught.value)


# -- PEM and DER, as upstream's release loads them --------------------------------------------------------


def pem_certificate(key: rsa.RSAPrivateKey) -> bytes:
    return self_signed_certificate(key, common_name="Key Connector", days=30).public_bytes(Encoding.PEM)


def pem_key(key: rsa.RSAPrivateKey, password: bytes | None = None, *, traditional: bool = False) -> bytes:
    encryption = BestAvailableEncryption(password) if password else NoEncryption()
    form = PrivateFormat.TraditionalOpenSSL if traditional else PrivateFormat.PKCS8
    return key.private_bytes(Encoding.PEM, form, encryption)


def certificate_env(path: Path, password: str | None = None) -> dict[str, str]:
    env = {
        "keyConnectorSettings__rsaKey__provider": "certificate",
        "keyConnectorSettings__certificate__filesystemPath": str(path),
    }
    if password is not None:
        env["keyConnectorSettings__certificate__filesystemPassword"] = password
    return env


def open_error(env: dict[str, str]) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        asyncio.run(open_key_provider(side_of(load_settings(env).settings)))
    return caught.value


def assert_unwraps_with(env: dict[str, str], key: rsa.RSAPrivateKey) -> None:
    """The provider opened from ``env`` holds ``key``: what it wraps, ``key`` unwraps, and back."""

    async def main() -> None:
        provider = await open_key_provider(side_of(load_settings(env).settings))
        try:
            data_key = secrets.token_bytes(32)
            assert key.decrypt(await provider.wrap(data_key), OAEP_SHA1) == data_key
            assert await provider.unwrap(key.public_key().encrypt(data_key, OAEP_SHA1)) == data_key
        finally:
            await provider.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("layout", "password"),
    [
        ("certificate then key", None),
        ("key then certificate", None),
        ("certificate then encrypted key", "pem-pw"),
        ("certificate then encrypted traditional key", "pem-pw"),
        ("chain with the key's certificate second", None),
    ],
)
def test_the_certificate_provider_takes_a_pem_file_with_its_key(
    key: rsa.RSAPrivateKey, tmp_path: Path, layout: str, password: str | None
) -> None:
    secret = password.encode() if password else None
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    blocks = {
        "certificate then key": [pem_certificate(key), pem_key(key)],
        "key then certificate": [pem_key(key), pem_certificate(key)],
        "certificate then encrypted key": [pem_certificate(key), pem_key(key, secret)],
        "certificate then encrypted traditional key": [
            pem_certificate(key),
            pem_key(key, secret, traditional=True),
        ],
        "chain with the key's certificate second": [
            pem_certificate(other),
            pem_certificate(key),
            pem_key(key),
        ],
    }[layout]
    path = tmp_path / "kc.pem"
    path.write_bytes(b"".join(blocks))
    assert_unwraps_with(certificate_env(path, password), key)


def test_an_encrypted_pem_key_names_the_password_setting(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "kc.pem"
    path.write_bytes(pem_certificate(key) + pem_key(key, b"right-pw"))
    missing = open_error(certificate_env(path))
    assert missing.setting == "certificate.filesystemPassword"
    assert f"the private key in the PEM file {path} is encrypted, and no password is set" in str(missing)
    wrong = open_error(certificate_env(path, "wrong-pw"))
    assert wrong.setting == "certificate.filesystemPassword"
    assert f"it does not decrypt the private key in the PEM file {path}" in str(wrong)
    assert "wrong-pw" not in str(wrong) and "right-pw" not in str(wrong)


@pytest.mark.parametrize("encoding", ["PEM", "DER"])
def test_a_certificate_without_its_key_where_a_pfx_is_expected_is_named_not_a_wrong_password(
    key: rsa.RSAPrivateKey, tmp_path: Path, encoding: str
) -> None:
    """Upstream's default PFX path given a certificate file: the message says what the file is and
    what the key provider needs, and never blames the password that is set."""
    certificate = self_signed_certificate(key, common_name="Key Connector", days=30)
    path = tmp_path / "key.pfx"
    path.write_bytes(certificate.public_bytes(Encoding.PEM if encoding == "PEM" else Encoding.DER))
    error = open_error(certificate_env(path, "a-pfx-password"))
    message = str(error)
    assert error.setting == "certificate.filesystemPath"  # the file is what is wrong, not the provider
    assert f"{path} ({encoding} certificate) carries no private key" in message
    assert "the 'certificate' RSA key provider needs the private key too" in message
    assert "password" not in message


@pytest.mark.parametrize("encoding", ["PEM", "DER"])
def test_a_pem_or_der_certificate_gives_the_public_key(
    key: rsa.RSAPrivateKey, tmp_path: Path, encoding: str
) -> None:
    certificate = self_signed_certificate(key, common_name="HSM certificate", days=30)
    data = certificate.public_bytes(Encoding.PEM if encoding == "PEM" else Encoding.DER)
    loaded = read_certificate(
        data,
        None,
        where="kc.crt",
        file_setting="certificate.filesystemPath",
        password_setting="certificate.filesystemPassword",
    )
    assert loaded.private_key is None and loaded.certificate == certificate
    assert loaded.public_key.public_numbers() == key.public_key().public_numbers()
    assert loaded.description == f"kc.crt ({encoding} certificate)"


@pytest.mark.parametrize(
    ("content", "setting", "words"),
    [
        ("garbage", "filesystemPath", "is neither a PFX (PKCS#12) nor a PEM or DER certificate"),
        ("key only", "filesystemPath", "holds no certificate (it holds: PRIVATE KEY)"),
        ("public key", "filesystemPath", "holds no certificate (it holds: PUBLIC KEY)"),
        ("mismatch", "filesystemPath", "none of the certificates in the PEM file"),
        ("two keys", "filesystemPath", "holds 2 private keys"),
        ("der key", "filesystemPath", "is a DER private key without its certificate"),
    ],
)
def test_pem_and_der_files_that_cannot_serve_are_named_for_what_they_are(
    key: rsa.RSAPrivateKey, tmp_path: Path, content: str, setting: str, words: str
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    data = {
        "garbage": b"this is not a key file\n",
        "key only": pem_key(key),
        "public key": public_pem,
        "mismatch": pem_certificate(other) + pem_key(key),
        "two keys": pem_certificate(key) + pem_key(key) + pem_key(other),
        "der key": key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()),
    }[content]
    path = tmp_path / "kc.file"
    path.write_bytes(data)
    error = open_error(certificate_env(path, "pw"))
    assert error.setting == f"certificate.{setting}"
    assert words in str(error), str(error)


def test_serve_with_a_pem_certificate_and_key(
    key: rsa.RSAPrivateKey,
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
    start_service,  # type: ignore[no-untyped-def]
) -> None:
    """A real ``serve`` on a PEM file holding the certificate and its encrypted key, then ``check``."""
    path = tmp_path / "kc.pem"
    path.write_bytes(pem_certificate(key) + pem_key(key, b"pem-pw"))
    path.chmod(0o600)
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env.update(certificate_env(path, "pem-pw"))
    user = uuid.uuid4()
    value = base64.b64encode(secrets.token_bytes(32)).decode()
    headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
    with start_service(env).client() as client:
        assert client.post("/user-keys", json={"key": value}, headers=headers).status_code == 200
        assert client.get("/user-keys", headers=headers).json() == {"key": value}
    result = subprocess.run(
        [sys.executable, "-m", "keyconnector", "check"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{path} (PEM certificate and private key)" in result.stdout
    assert "pem-pw" not in result.stdout + result.stderr
