"""The filesystem certificate source and the PFX reader every PFX-based source shares."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

from keyconnector.certificates import from_pkcs12
from keyconnector.errors import ConfigurationError
from keyconnector.keypairs import open_key_provider
from keyconnector.keypairs.generate import self_signed_certificate
from keyconnector.runtime.settings import load_settings, side_of


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
    assert "keyConnectorSettings__certificate__provider" in str(caught.value)
    assert "carries no private key" in str(caught.value)
