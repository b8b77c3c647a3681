"""The real service (`keyconnector serve`) on PostgreSQL and MariaDB: upstream's settings, restarts,
an outage answered with 503 and Retry-After, and a database that comes up after the service."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service, base_env
from tests.support.databases import MariaDbServer, PostgresServer


def service_env(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path, server: PostgresServer | MariaDbServer, database: str
) -> dict[str, str]:
    env = base_env(issuer, pfx, tmp_path / "unused.db")
    del env["keyConnectorSettings__database__sqliteConnectionString"]
    if isinstance(server, PostgresServer):
        env["keyConnectorSettings__database__provider"] = "postgresql"
        env["keyConnectorSettings__database__postgreSqlConnectionString"] = server.connection_string(database)
    else:
        env["keyConnectorSettings__database__provider"] = "mysql"
        env["keyConnectorSettings__database__mySqlConnectionString"] = server.connection_string(database)
    return env


def auth(issuer: DevIssuer, user: uuid.UUID) -> dict[str, str]:
    return {"Authorization": f"Bearer {issuer.mint(user)}"}  # type: ignore[arg-type]


@pytest.fixture(params=["postgresql", "mariadb"])
def server(request: pytest.FixtureRequest) -> PostgresServer | MariaDbServer:
    name = "running_postgresql" if request.param == "postgresql" else "running_mariadb"
    running: PostgresServer | MariaDbServer = request.getfixturevalue(name)
    return running


def test_post_get_restart_outage_and_recovery(
    server: PostgresServer | MariaDbServer, issuer: DevIssuer, pfx: Pfx, tmp_path: Path, start_service: Any
) -> None:
    database = server.create_database()
    env = service_env(issuer, pfx, tmp_path, server, database)
    user = uuid.uuid4()
    key = base64.b64encode(bytes(range(32))).decode()
    service: Service = start_service(env, workers=2)
    with service.client() as client:
        assert client.post("/user-keys", json={"key": key}, headers=auth(issuer, user)).status_code == 200
        assert client.post("/user-keys", json={"key": key}, headers=auth(issuer, user)).status_code == 400
        assert client.get("/user-keys", headers=auth(issuer, user)).json() == {"key": key}
    service.stop()
    assert server.password not in service.logs()

    service = start_service(env)
    with service.client() as client:
        assert client.get("/user-keys", headers=auth(issuer, user)).json() == {"key": key}

        server.stop()
        try:
            started = time.monotonic()
            response = client.get("/user-keys", headers=auth(issuer, user))
            assert response.status_code == 503
            assert int(response.headers["retry-after"]) >= 1
            assert time.monotonic() - started < 8
            response = client.put("/user-keys", json={"key": key}, headers=auth(issuer, uuid.uuid4()))
            assert response.status_code == 503 and "retry-after" in response.headers
        finally:
            server.start()
        # The same process, without a restart: the pool reconnects by itself.
        assert client.get("/user-keys", headers=auth(issuer, user)).json() == {"key": key}
        other = uuid.uuid4()
        assert client.put("/user-keys", json={"key": key}, headers=auth(issuer, other)).status_code == 200
        assert client.get("/user-keys", headers=auth(issuer, other)).status_code == 200
    assert server.password not in service.logs()


def test_serve_waits_for_a_database_that_is_still_coming_up(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path, start_service: Any
) -> None:
    server = PostgresServer()  # its own: it must not be running when the service starts
    try:
        env = service_env(issuer, pfx, tmp_path, server, "postgres")
        outcome: dict[str, Any] = {}

        def start() -> None:
            try:
                outcome["service"] = start_service(env)
            except Exception as exc:  # reported below
                outcome["error"] = exc

        thread = threading.Thread(target=start)
        thread.start()
        # Start the database only once the service has found it missing (a loaded machine can take
        # seconds just to import and reach the first attempt).
        deadline = time.monotonic() + 60
        log = tmp_path / "service-0.log"
        while time.monotonic() < deadline and "database not reachable" not in (
            log.read_text(errors="replace") if log.exists() else ""
        ):
            assert thread.is_alive(), outcome
            time.sleep(0.2)
        assert thread.is_alive(), outcome
        server.start()
        thread.join(timeout=60)
        assert "service" in outcome, outcome
        service: Service = outcome["service"]
        assert "database not reachable" in service.logs()
        user = uuid.uuid4()
        with service.client() as client:
            body = {"key": base64.b64encode(b"k" * 32).decode()}
            assert client.post("/user-keys", json=body, headers=auth(issuer, user)).status_code == 200
            assert httpx.get(service.url + "/health", timeout=5).text == "Healthy"
    finally:
        server.destroy()
