"""Every key provider and certificate source, through a running `keyconnector serve`.

The provider fixtures (tests/support/*.py) each start a real or wire-faithful server (SoftHSM2,
OpenBao, moto, Azurite, the Azure Key Vault and Google Cloud KMS stand-ins) and hand over the
settings of a fresh key. Here the same checks run against each: a key stored and read back, a
restart that unwraps the stored data key again, `keyconnector check`, and no secret in any log.
For the network providers, an outage at start-up (through a proxy the test cuts) gives 503 and
the service recovers by itself once the provider is back.
"""

from __future__ import annotations

import base64
import secrets
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, base_env
from tests.support.providers import ProviderEnv
from tests.support.tcpproxy import TcpProxy

# openCryptoki's soft token does the pkcs11 key pair's RSA-OAEP-256, which SoftHSM2 2.6 refuses.
LOCAL = ["pkcs11_provider", "opencryptoki_sha256_provider", "store_certificate_provider"]
# Certificate sources fetch the PFX once at start; the RSA operations are then local.
FETCHED = ["vault_certificate_provider", "azurekv_certificate_provider", "azurestorage_certificate_provider"]
# Key providers whose every wrap/unwrap goes to the remote service.
REMOTE = ["vaulttransit_provider", "awskms_provider", "awskms_symmetric_provider", "azurekv_key_provider"]
REMOTE += ["gcpkms_provider", "kmip_rsa_provider", "kmip_aes_provider"]
ALL = LOCAL + FETCHED + REMOTE


def service_env(issuer: DevIssuer, pfx: Pfx, database: Path, provider: dict[str, str]) -> dict[str, str]:
    env = base_env(issuer, pfx, database)
    for name in list(env):
        if name.startswith(("keyConnectorSettings__rsaKey__", "keyConnectorSettings__certificate__")):
            del env[name]
    env.update(provider)
    return env


def bearer(issuer: DevIssuer, user: uuid.UUID) -> dict[str, str]:
    return {"Authorization": f"Bearer {issuer.mint(user)}"}


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def stored_data_key(database: Path) -> str | None:
    with sqlite3.connect(database) as conn:
        row = conn.execute('SELECT "SymmetricKey" FROM "ApplicationDatas" ORDER BY "Id" LIMIT 1').fetchone()
    return row[0] if row else None


@pytest.mark.parametrize("fixture", ALL)
def test_store_read_restart_and_check(
    fixture: str,
    request: pytest.FixtureRequest,
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
    start_service,  # type: ignore[no-untyped-def]
) -> None:
    provider: ProviderEnv = request.getfixturevalue(fixture)
    database = tmp_path / "kc.db"
    env = service_env(issuer, pfx, database, provider.env)
    user, key = uuid.uuid4(), new_key()

    first = start_service(env)
    with first.client() as client:
        assert client.post("/user-keys", json={"key": key}, headers=bearer(issuer, user)).status_code == 200
        assert client.get("/user-keys", headers=bearer(issuer, user)).json() == {"key": key}
        ready = client.get("/health/ready").json()
        assert ready["status"] == "ready", ready
        assert ready["checks"]["keyProvider"] == "ok"
    first.stop()
    wrapped = stored_data_key(database)
    assert wrapped, "the data key was not stored"

    second = start_service(env)
    with second.client() as client:
        assert client.get("/user-keys", headers=bearer(issuer, user)).json() == {"key": key}
    second.stop()
    assert stored_data_key(database) == wrapped, "the restart must unwrap the stored data key, not replace it"

    check = subprocess.run(
        [sys.executable, "-m", "keyconnector", "check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr

    logs = first.logs() + second.logs() + check.stdout + check.stderr
    for value in provider.secrets:
        assert value not in logs, f"a secret of {fixture} reached a log"


def wait_for_status(
    client: httpx.Client, method: str, path: str, status: int, **kwargs: object
) -> httpx.Response:
    deadline = time.monotonic() + 45
    while True:
        response = client.request(method, path, **kwargs)  # type: ignore[arg-type]
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


@pytest.mark.parametrize("fixture", FETCHED + REMOTE)
def test_unreachable_at_start_gives_503_then_recovers(
    fixture: str,
    request: pytest.FixtureRequest,
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
    start_service,  # type: ignore[no-untyped-def]
) -> None:
    provider: ProviderEnv = request.getfixturevalue(fixture)
    assert provider.endpoint is not None
    with TcpProxy(provider.endpoint) as proxy:
        env = service_env(issuer, pfx, tmp_path / "kc.db", provider.through(proxy.port))
        service = start_service(env, ready=False)
        user, key = uuid.uuid4(), new_key()
        with service.client() as client:
            refused = client.post("/user-keys", json={"key": key}, headers=bearer(issuer, user))
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["Retry-After"]) >= 1
            assert "unavailable" in refused.json()["message"]
            unready = client.get("/health/ready")
            # No data key yet: readiness says so and names no version (what `status` shows).
            assert unready.status_code == 503 and unready.json()["dataKey"] is None, unready.text
            assert "keyConnectorSettings__" in service.logs(), "the start-up error must name the setting"

            proxy.up()
            stored = wait_for_status(
                client, "POST", "/user-keys", 200, json={"key": key}, headers=bearer(issuer, user)
            )
            assert stored.status_code == 200, stored.text
            assert client.get("/user-keys", headers=bearer(issuer, user)).json() == {"key": key}
            assert client.get("/health/ready").json()["dataKey"] == {"current": 1, "active": [1]}

            if fixture in REMOTE:
                # Later outages: the data key is already unwrapped, so users are still served, and
                # readiness says "degraded" with the provider's error instead of pulling the instance.
                proxy.down()
                assert client.get("/user-keys", headers=bearer(issuer, user)).json() == {"key": key}
                degraded = wait_for_status(client, "GET", "/health/ready", 200)
                body = degraded.json()
                deadline = time.monotonic() + 20
                while body["status"] != "degraded" and time.monotonic() < deadline:
                    time.sleep(0.5)
                    body = client.get("/health/ready").json()
                assert body["status"] == "degraded", body
                assert body["checks"]["keyProvider"] != "ok"
                proxy.up()
                deadline = time.monotonic() + 30
                while body["status"] != "ready" and time.monotonic() < deadline:
                    time.sleep(0.5)
                    body = client.get("/health/ready").json()
                assert body["status"] == "ready", body
        assert service.process is not None and service.process.poll() is None, "the service must not exit"
        for value in provider.secrets:
            assert value not in service.logs()
