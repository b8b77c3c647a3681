""".NET's CurrentUser\\My certificate store as it lies on a Linux disk, for the ``store`` source.

.NET writes each certificate of that store as ``<THUMBPRINT>.pfx`` (upper-case SHA-1 thumbprint),
a PKCS#12 file without a password, in ``~/.dotnet/corefx/cryptography/x509stores/my/``. The helpers
here make such files (and the hand-made variants an operator may drop in) from fresh key pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from keyconnector.keypairs.generate import self_signed_certificate
from tests.support.providers import ProviderEnv


@dataclass(frozen=True)
class StoreEntry:
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @property
    def thumbprint(self) -> str:
        return thumbprint(self.certificate)


def thumbprint(certificate: x509.Certificate) -> str:
    """As Windows and .NET show it: SHA-1 of the DER certificate, upper-case hex."""
    return certificate.fingerprint(hashes.SHA1()).hex().upper()


def new_entry(common_name: str, bits: int = 2048) -> StoreEntry:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return StoreEntry(key, self_signed_certificate(key, common_name=common_name, days=30))


def pfx_bytes(entry: StoreEntry, password: str | None = None, *, with_key: bool = True) -> bytes:
    """A PKCS#12 file; without ``password`` unencrypted, as .NET writes its store files."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    )
    key = entry.key if with_key else None
    return pkcs12.serialize_key_and_certificates(b"kc", key, entry.certificate, None, encryption)


def write_dotnet_pfx(directory: Path, entry: StoreEntry) -> Path:
    """What ``X509Store.Add`` leaves on disk: ``<THUMBPRINT>.pfx``, owner-only."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{entry.thumbprint}.pfx"
    path.write_bytes(pfx_bytes(entry))
    path.chmod(0o600)
    return path


@pytest.fixture
def store_certificate_provider(tmp_path: Path) -> ProviderEnv:
    """A fresh key pair in a fresh .NET-style store directory, and the settings that find it."""
    entry = new_entry("Key Connector (store)")
    directory = tmp_path / "x509stores" / "my"
    write_dotnet_pfx(directory, entry)
    env = {
        "keyConnectorSettings__rsaKey__provider": "certificate",
        "keyConnectorSettings__certificate__provider": "store",
        "keyConnectorSettings__certificate__storeThumbprint": entry.thumbprint,
        "keyConnectorSettings__certificate__storeDirectory": str(directory),
    }
    return ProviderEnv(env=env, endpoint=None, secrets=())
