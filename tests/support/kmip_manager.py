"""A real KMIP key manager on loopback for the ``kmip`` key provider: PyKMIP's server over TLS with
client certificates (run by tests/support/kmip_server.py, which also lets it decrypt with RSA keys).

The session gets one server under a private CA, with one client certificate for the service (the
objects it creates belong to that certificate's common name, as PyKMIP's access policy wants).
Each provider fixture creates a fresh key there and hands over the settings that use it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyconnector.devtools import free_port
from tests.support.processes import read_log, stop_process, wait_until
from tests.support.providers import ProviderEnv

SERVER_SCRIPT = Path(__file__).with_name("kmip_server.py")
CLIENT_NAME = "keyconnector"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_pki(folder: Path) -> None:
    """``ca.crt``; ``server.crt``/``.key`` for 127.0.0.1 and localhost; ``client.crt``/``.key``
    (client authentication) for the service; ``stranger.crt``/``.key`` from another CA."""
    now = dt.datetime.now(dt.UTC)

    def authority(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        return certificate, key

    def leaf(
        ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], name: str, server: bool, stem: str
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca[0].subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        certificate = builder.sign(ca[1], hashes.SHA256())
        (folder / f"{stem}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(_pem_key(key))
        (folder / f"{stem}.key").chmod(0o600)

    ca = authority("KMIP test CA")
    (folder / "ca.crt").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    leaf(ca, "localhost", True, "server")
    leaf(ca, CLIENT_NAME, False, "client")
    other = authority("Another CA")
    (folder / "other-ca.crt").write_bytes(other[0].public_bytes(serialization.Encoding.PEM))
    leaf(other, CLIENT_NAME, False, "stranger")


@dataclass(frozen=True)
class KmipKey:
    uid: str
    name: str
    public_uid: str | None = None
    public_name: str | None = None


class KmipServer:
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="keyconnector-kmip-"))
        self.port = free_port()
        self.log = self.folder / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        write_pki(self.folder)

    def start(self, timeout: float = 30) -> KmipServer:
        with open(self.folder / "stdout.log", "ab") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-W", "ignore", str(SERVER_SCRIPT), str(self.folder), str(self.port)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                start_new_session=True,
            )
        wait_until(
            self._answers,
            self.process,
            what="PyKMIP server",
            log=self.folder / "stdout.log",
            timeout=timeout,
            waiting_for=f"accept TLS on 127.0.0.1:{self.port}",
            interval=0.1,
        )
        return self

    def _answers(self) -> bool:
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
                self.tls_context().wrap_socket(sock, server_hostname="127.0.0.1"),
            ):
                return True
        except OSError:
            return False

    def tls_context(self, stem: str = "client") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.folder / "ca.crt"))
        context.load_cert_chain(self.folder / f"{stem}.crt", self.folder / f"{stem}.key")
        return context

    def logs(self) -> str:
        return read_log(self.log) + read_log(self.folder / "stdout.log")

    def destroy(self) -> None:
        stop_process(self.process, timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- administration, with the service's client certificate -------------------------------------------

    def admin(self) -> Any:
        """A PyKMIP client (pie API) on this server, checking its certificate and host name."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from kmip.core import enums
            from kmip.pie.client import ProxyKmipClient
            from kmip.services.kmip_client import KMIPProxy
        context = self.tls_context()

        class Proxy(KMIPProxy):  # type: ignore[misc]
            def _create_socket(self, sock: socket.socket) -> None:
                self.socket = context.wrap_socket(sock, server_hostname="127.0.0.1")
                self.socket.settimeout(10)

        client = ProxyKmipClient(config_file="/dev/null", kmip_version=enums.KMIPVersion.KMIP_1_4)
        client.proxy = Proxy(
            host="127.0.0.1", port=self.port, config_file="/dev/null", kmip_version=enums.KMIPVersion.KMIP_1_4
        )
        client.open()
        return client

    def new_aes_key(self, *, activate: bool = True) -> KmipKey:
        from kmip.core import enums

        name = f"kc-aes-{uuid.uuid4().hex[:10]}"
        client = self.admin()
        try:
            masks = [enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT]
            uid = client.create(
                enums.CryptographicAlgorithm.AES, 256, name=name, cryptographic_usage_mask=masks
            )
            if activate:
                client.activate(uid)
        finally:
            client.close()
        return KmipKey(str(uid), name)

    def new_rsa_key(self, bits: int = 2048) -> KmipKey:
        from kmip.core import enums

        name = f"kc-rsa-{uuid.uuid4().hex[:10]}"
        client = self.admin()
        try:
            public, private = client.create_key_pair(
                enums.CryptographicAlgorithm.RSA,
                bits,
                public_name=f"{name}-public",
                private_name=name,
                public_usage_mask=[enums.CryptographicUsageMask.ENCRYPT],
                private_usage_mask=[enums.CryptographicUsageMask.DECRYPT],
            )
            client.activate(private)
            client.activate(public)
        finally:
            client.close()
        return KmipKey(str(private), name, str(public), f"{name}-public")

    def settings(self, key: KmipKey, port: int | None = None) -> dict[str, str]:
        prefix = "keyConnectorSettings__rsaKey__"
        env = {
            f"{prefix}provider": "kmip",
            f"{prefix}kmipServerHost": "127.0.0.1",
            f"{prefix}kmipServerPort": str(port or self.port),
            f"{prefix}kmipClientCertificate": str(self.folder / "client.crt"),
            f"{prefix}kmipClientKey": str(self.folder / "client.key"),
            f"{prefix}kmipCaBundle": str(self.folder / "ca.crt"),
            f"{prefix}kmipKeyId": key.uid,
        }
        if key.public_uid:
            env[f"{prefix}kmipPublicKeyId"] = key.public_uid
        return env


@dataclass(frozen=True)
class KmipProviderEnv(ProviderEnv):
    """Host and port are separate settings here, so a redirect rewrites the port setting."""

    def through(self, port: int) -> dict[str, str]:
        return {**self.env, "keyConnectorSettings__rsaKey__kmipServerPort": str(port)}


def _provider_env(server: KmipServer, key: KmipKey, *, credentials: bool) -> KmipProviderEnv:
    env = server.settings(key)
    secrets_: tuple[str, ...] = ()
    if credentials:
        password = "kmip-" + secrets.token_urlsafe(18)
        env["keyConnectorSettings__rsaKey__kmipUsername"] = "keyconnector"
        env["keyConnectorSettings__rsaKey__kmipPassword"] = password
        secrets_ = (password,)
    secrets_ += ((server.folder / "client.key").read_text().splitlines()[1],)
    return dataclasses.replace(
        KmipProviderEnv(env=env, endpoint=("127.0.0.1", server.port)), secrets=secrets_
    )


@pytest.fixture(scope="session")
def kmip_server() -> Iterator[KmipServer]:
    """One PyKMIP server for the session (started on first use)."""
    server = KmipServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def kmip_rsa_provider(kmip_server: KmipServer) -> KmipProviderEnv:
    """The ``kmip`` provider on a fresh RSA key pair: server-side OAEP-SHA-256 decryption."""
    return _provider_env(kmip_server, kmip_server.new_rsa_key(), credentials=False)


@pytest.fixture
def kmip_aes_provider(kmip_server: KmipServer) -> KmipProviderEnv:
    """The ``kmip`` provider on a fresh AES-256 key, with a username/password credential too."""
    return _provider_env(kmip_server, kmip_server.new_aes_key(), credentials=True)
