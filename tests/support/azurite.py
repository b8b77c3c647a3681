"""Azurite, Microsoft's Azure Storage emulator, as a throwaway blob server for the ``azurestorage`` source.

``make test`` installs it with npm under ``.tools/``. Each test session starts one instance over
HTTP and one over HTTPS (a certificate for 127.0.0.1 issued by a CA made here, so that a test can
prove both the CA bundle setting and the refusal of an untrusted endpoint), each on a free port of
127.0.0.1 with its data in a fresh temporary directory, and stops them after.

Both use Azurite's built-in development account (``devstoreaccount1`` and its published key) with
path-style URLs (``http://127.0.0.1:PORT/devstoreaccount1``), which is what an operator writes as
``BlobEndpoint=`` for a non-Azure endpoint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyconnector.devtools import free_port
from keyconnector.keygen import self_signed_pfx
from tests.support.providers import ProviderEnv

AZURITE = Path(__file__).resolve().parents[2] / ".tools" / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""Azurite's development account key, published in Microsoft's documentation."""


# -- TLS material ------------------------------------------------------------------------------------


def make_tls_files(folder: Path, common_name: str = "Test Storage CA") -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 it issued: (ca.pem, server.pem, server-key.pem)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_path, cert_path, key_path


# -- the server --------------------------------------------------------------------------------------


class Azurite:
    """One azurite-blob process on a free port; ``tls`` makes it HTTPS with a certificate from ``ca``."""

    def __init__(self, *, tls: bool = False) -> None:
        if not AZURITE.exists():
            raise RuntimeError(f"Azurite is not installed at {AZURITE}: run `make test` (it installs it)")
        if shutil.which("node") is None:
            raise RuntimeError("Node.js is not installed (Azurite needs it): run `make test`")
        self.folder = Path(tempfile.mkdtemp(prefix="kc-azurite-"))
        self.port = free_port()
        self.scheme = "https" if tls else "http"
        self.ca: Path | None = None
        self._tls_args: list[str] = []
        if tls:
            self.ca, cert, key = make_tls_files(self.folder)
            self._tls_args = ["--cert", str(cert), "--key", str(key)]
        self.log = self.folder / "azurite.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/{ACCOUNT}"

    def connection_string(self, account_key: str = ACCOUNT_KEY) -> str:
        return (
            f"DefaultEndpointsProtocol={self.scheme};AccountName={ACCOUNT};AccountKey={account_key};"
            f"BlobEndpoint={self.endpoint};"
        )

    def start(self, timeout: float = 30) -> None:
        data = self.folder / "data"
        data.mkdir(exist_ok=True)
        with open(self.log, "ab") as handle:
            self.process = subprocess.Popen(
                [
                    str(AZURITE),
                    "--blobHost",
                    "127.0.0.1",
                    "--blobPort",
                    str(self.port),
                    "--location",
                    str(data),
                    "--silent",
                    "--skipApiVersionCheck",
                    "--loose",
                    "--disableTelemetry",
                    *self._tls_args,
                ],
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.folder,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Azurite exited with {self.process.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Azurite did not listen on {self.port} in {timeout:.0f}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def client(self) -> Any:
        """The SDK's service client, for setting up containers and blobs (and SAS tokens) in tests."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(
            self.connection_string(), connection_verify=str(self.ca) if self.ca else True
        )

    def upload(self, container: str, blob: str, data: bytes) -> None:
        from azure.core.exceptions import ResourceExistsError

        with self.client() as service:
            with contextlib.suppress(ResourceExistsError):
                service.create_container(container)
            service.get_blob_client(container, blob).upload_blob(data, overwrite=True)


def fresh_name(prefix: str) -> str:
    """A valid, unused container name (lower-case letters, digits, hyphens; 3 to 63 characters)."""
    return f"{prefix}-{secrets.token_hex(6)}"


def azurestorage_env(
    server: Azurite, container: str, blob: str, password: str, prefix: str = "certificate"
) -> dict[str, str]:
    base = "keyConnectorSettings__" + prefix.replace(".", "__")
    return {
        f"{base}__provider": "azurestorage",
        f"{base}__azureStorageConnectionString": server.connection_string(),
        f"{base}__azureStorageContainer": container,
        f"{base}__azureStorageFileName": blob,
        f"{base}__azureStorageFilePassword": password,
    }


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    server = Azurite()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def azurite_https() -> Iterator[Azurite]:
    server = Azurite(tls=True)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def azurestorage_certificate_provider(azurite: Azurite) -> ProviderEnv:
    """A fresh PFX in a fresh container of the session's Azurite, and the settings that load it."""
    password = "pfx-" + secrets.token_urlsafe(16)
    container, blob = fresh_name("kc"), "keyconnector.pfx"
    azurite.upload(container, blob, self_signed_pfx(password, bits=2048))
    env = {"keyConnectorSettings__rsaKey__provider": "certificate"}
    env.update(azurestorage_env(azurite, container, blob, password))
    return ProviderEnv(env=env, endpoint=("127.0.0.1", azurite.port), secrets=(ACCOUNT_KEY, password))
