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
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyconnector.devtools import free_port
from keyconnector.devtools.tls import local_tls_files
from keyconnector.keypairs.generate import self_signed_pfx
from tests.support.processes import read_log, started, stop_process, wait_for_port
from tests.support.providers import ProviderEnv

AZURITE = Path(__file__).resolve().parents[2] / ".tools" / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""Azurite's development account key, published in Microsoft's documentation."""


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
            files = local_tls_files(self.folder, "Test Storage CA")
            self.ca = files.ca
            self._tls_args = ["--cert", str(files.certificate), "--key", str(files.key)]
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
        wait_for_port("127.0.0.1", self.port, self.process, what="Azurite", log=self.log, timeout=timeout)

    def logs(self) -> str:
        return read_log(self.log)

    def stop(self) -> None:
        stop_process(self.process)

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
    yield from started(Azurite())


@pytest.fixture(scope="session")
def azurite_https() -> Iterator[Azurite]:
    yield from started(Azurite(tls=True))


@pytest.fixture
def azurestorage_certificate_provider(azurite: Azurite) -> ProviderEnv:
    """A fresh PFX in a fresh container of the session's Azurite, and the settings that load it."""
    password = "pfx-" + secrets.token_urlsafe(16)
    container, blob = fresh_name("kc"), "keyconnector.pfx"
    azurite.upload(container, blob, self_signed_pfx(password, bits=2048))
    env = {"keyConnectorSettings__rsaKey__provider": "certificate"}
    env.update(azurestorage_env(azurite, container, blob, password))
    return ProviderEnv(env=env, endpoint=("127.0.0.1", azurite.port), secrets=(ACCOUNT_KEY, password))
