"""Shared fixtures: a real development issuer, real key pairs, and real `keyconnector serve` processes.

Nothing here is mocked: a test talks HTTP to a service process on 127.0.0.1, which talks HTTP to
an issuer on 127.0.0.1 and reads a real database file.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.keypairs.generate import self_signed_pfx

pytest_plugins = [
    "tests.support.databases",
    "tests.support.backends",
    "tests.support.softhsm",
    "tests.support.opencryptoki",
    "tests.support.openbao",
    "tests.support.moto_kms",
    "tests.support.azure_keyvault",
    "tests.support.azurite",
    "tests.support.gcp_kms",
    "tests.support.certstore",
    "tests.support.kmip_manager",
]

WEB_VAULT = "https://vault.example.com"


@dataclass(frozen=True)
class Pfx:
    path: Path
    password: str


@pytest.fixture(scope="session")
def pfx(tmp_path_factory: pytest.TempPathFactory) -> Pfx:
    folder = tmp_path_factory.mktemp("pfx")
    password = "test-pfx-password"
    path = folder / "key.pfx"
    path.write_bytes(self_signed_pfx(password, bits=2048))
    return Pfx(path, password)


@pytest.fixture(scope="session")
def issuer() -> Iterator[DevIssuer]:
    with DevIssuer() as running:
        yield running


def base_env(issuer: DevIssuer, pfx: Pfx, database: Path) -> dict[str, str]:
    """A complete upstream-style environment for a service on SQLite and a PFX."""
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("keyconnectorsettings")}
    env.pop("ASPNETCORE_URLS", None)
    env.update(
        {
            "keyConnectorSettings__identityServerUri": issuer.url,
            "keyConnectorSettings__webVaultUri": WEB_VAULT + "/",
            "keyConnectorSettings__database__provider": "sqlite",
            "keyConnectorSettings__database__sqliteConnectionString": f"Data Source={database}",
            "keyConnectorSettings__rsaKey__provider": "certificate",
            "keyConnectorSettings__certificate__provider": "filesystem",
            "keyConnectorSettings__certificate__filesystemPath": str(pfx.path),
            "keyConnectorSettings__certificate__filesystemPassword": pfx.password,
            "keyConnectorSettings__lastAccessFlushSeconds": "0.2",
            # Tests send many requests from one address and user; the rate-limit tests set their own.
            "keyConnectorSettings__rateLimit__perUserPerMinute": "0",
            "keyConnectorSettings__rateLimit__perAddressPerMinute": "0",
            "keyConnectorSettings__rateLimit__failedAuthPerAddressPerMinute": "0",
        }
    )
    return env


SERVICE_LOGS: list[Path] = []
"""Every service log of this test process, scanned for secrets when the session ends."""

JWT_SHAPE = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{20,}")
KEY_SHAPE = re.compile(rb"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}=(?![A-Za-z0-9+/=])")


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_service_log(pfx: Pfx) -> Iterator[None]:
    """The whole suite as a leak test: after every test has run, no log of any service it started
    holds a token, a 32-byte key in base64 (user keys, data keys) or the PFX password. The tests
    provoke every error path on purpose, so this covers far more than one scenario can."""
    yield
    leaks: list[str] = []
    for path in SERVICE_LOGS:
        if not path.exists():
            continue
        text = path.read_bytes()
        for name, found in (
            ("an access token", JWT_SHAPE.search(text)),
            ("a base64 key", KEY_SHAPE.search(text)),
            ("the PFX password", re.search(re.escape(pfx.password.encode()), text)),
        ):
            if found is not None:
                leaks.append(f"{path}: {name} at byte {found.start()}")
    assert not leaks, "secrets in service logs:\n" + "\n".join(leaks[:20])


class Service:
    """A `keyconnector serve` process on a free port, with its stderr kept for assertions."""

    def __init__(
        self, env: dict[str, str], log_path: Path, *, workers: int = 1, extra_args: tuple[str, ...] = ()
    ):
        self.env = env
        self.log_path = log_path
        SERVICE_LOGS.append(log_path)
        self.workers = workers
        self.extra_args = extra_args
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.scheme = "https" if "--tls-cert" in extra_args else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30, *, ready: bool = True) -> Service:
        """Start and wait until ``/health/ready`` answers 200 (or only ``/health/live`` with ready=False)."""
        probe = "/health/ready" if ready else "/health/live"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keyconnector",
                "serve",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
                *self.extra_args,
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + probe, timeout=2, verify=False).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the service did not become ready:\n{self.logs()}")

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kwargs)  # type: ignore[arg-type]

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if hasattr(self, "_log"):
            self._log.close()


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[object]:
    """Factory: start_service(env, workers=1, extra_args=(), ready=True) -> Service, all stopped after."""
    started: list[Service] = []

    def start(
        env: dict[str, str], *, workers: int = 1, extra_args: tuple[str, ...] = (), ready: bool = True
    ) -> Service:
        service = Service(
            env, tmp_path / f"service-{len(started)}.log", workers=workers, extra_args=extra_args
        )
        started.append(service)
        return service.start(ready=ready)

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def shared_service(
    tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, pfx: Pfx
) -> Iterator[Service]:
    """One service for a whole test module (the API tests use fresh users, so they do not interfere)."""
    folder = tmp_path_factory.mktemp("service")
    service = Service(base_env(issuer, pfx, folder / "kc.db"), folder / "service.log")
    service.database = folder / "kc.db"  # type: ignore[attr-defined]
    service.start()
    yield service
    service.stop()
