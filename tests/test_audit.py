"""The audit trail through real `keyconnector serve` processes: entries, chains, verify, sinks, failClosed."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service, base_env

StartService = Callable[..., Service]
KEY = "c2VjcmV0LWtleS1vZi10aGUtdXNlci0xMjM0NTY3OA=="


def _verify(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", "audit", "verify", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _env(issuer: DevIssuer, pfx: Pfx, folder: Path, **audit: str) -> dict[str, str]:
    env = base_env(issuer, pfx, folder / "kc.db")
    for name, value in audit.items():
        env[f"keyConnectorSettings__audit__{name}"] = value
    return env


def test_every_outcome_is_one_entry_without_secrets(
    start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> None:
    log = tmp_path / "audit.log"
    service = start_service(_env(issuer, pfx, tmp_path, file=str(log)))
    user, other = uuid.uuid4(), uuid.uuid4()
    token = issuer.mint(user)
    tokens = [token, issuer.mint(other), issuer.mint(uuid.uuid4(), scope=["offline_access"])]
    auth = {"Authorization": f"Bearer {token}", "Bitwarden-Client-Name": "desktop"}
    expected: list[tuple[str, int, uuid.UUID | None, str]] = []
    with service.client() as client:

        def call(method: str, outcome: str, status: int, who: uuid.UUID | None, **kwargs: Any) -> None:
            response = client.request(method, "/user-keys", **kwargs)
            assert response.status_code == status, response.text
            expected.append((outcome, status, who, response.headers["x-request-id"]))

        call("GET", "not_found", 404, user, headers=auth)
        call("POST", "bad_request", 415, user, headers=auth, content=b"{}")
        call("POST", "bad_request", 400, user, headers=auth, json={"nokey": 1})
        call("POST", "bad_request", 413, user, headers=auth, json={"key": "A" * 70000})
        call("POST", "created", 200, user, headers=auth, json={"key": KEY})
        call("POST", "already_exists", 400, user, headers=auth, json={"key": KEY})
        call("PUT", "replaced", 200, user, headers=auth, json={"key": KEY})
        call("GET", "read", 200, user, headers=auth)
        call("GET", "unauthorized", 401, None)
        call("GET", "unauthorized", 401, None, headers={"Authorization": "Bearer not.a.token"})
        call("GET", "forbidden", 403, None, headers={"Authorization": f"Bearer {tokens[2]}"})
        # Integrity: another user's row holding a damaged copy of the record.
        with sqlite3.connect(tmp_path / "kc.db") as db:
            (record,) = db.execute(
                'SELECT "Key" FROM "UserKeys" WHERE "Id" = ?', (str(user).upper(),)
            ).fetchone()
            damaged = record[:-8] + ("A" if record[-8] != "A" else "B") + record[-7:]
            db.execute(
                'INSERT INTO "UserKeys" ("Id", "Key", "CreationDate") VALUES (?, ?, ?)',
                (str(other).upper(), damaged, "2026-01-01 00:00:00"),
            )
        call("GET", "integrity", 500, other, headers={"Authorization": f"Bearer {tokens[1]}"})
    entries = _entries(log)
    assert len(entries) == len(expected)
    for entry, (outcome, status, who, request_id) in zip(entries, expected, strict=True):
        assert entry["outcome"] == outcome
        assert entry["status"] == status
        assert entry["requestId"] == request_id
        assert entry["client"] == "127.0.0.1"
        assert entry["method"] in ("GET", "POST", "PUT")
        assert entry["time"].endswith("Z")
        if who is not None:
            assert entry["user"] == str(who)
    assert entries[0]["clientName"] == "desktop"
    assert [entry["seq"] for entry in entries] == list(range(1, len(entries) + 1))
    text = log.read_text()
    assert KEY not in text and KEY[:20] not in text
    for secret in tokens:
        assert secret not in text and secret.split(".")[2][:20] not in text
    result = _verify(service.env, "--file", str(log))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"verified {len(entries)} entries in 1 chain" in result.stdout


def test_two_workers_write_chains_that_verify(
    start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> None:
    log = tmp_path / "audit.log"
    service = start_service(_env(issuer, pfx, tmp_path, file=str(log), stdout="true"), workers=2)
    tokens = [token for _, token in issuer.mint_many(150)]

    def get(token: str) -> int:
        with service.client() as client:  # a connection each, so both workers get requests
            return client.get("/user-keys", headers={"Authorization": f"Bearer {token}"}).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(get, tokens)) == {404}
    entries = _entries(log)
    requests = [entry for entry in entries if entry["outcome"] != "checkpoint"]
    assert len(requests) == 150
    assert len({entry["chain"] for entry in requests}) == 2
    result = _verify(service.env, "--file", str(log))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"verified {len(entries)} entries in 2 chain(s)" in result.stdout
    # The stdout sink wrote the same entries as whole lines into the service's output.
    stdout_lines = [line for line in service.logs().splitlines() if line.startswith('{"chain"')]
    assert len([line for line in stdout_lines if '"outcome":"checkpoint"' not in line]) == 150


@pytest.fixture
def trail(
    start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> tuple[list[str], dict[str, str]]:
    """Ten lines of one chain written by a real service, and its settings (verify needs its key)."""
    log = tmp_path / "audit.log"
    service = start_service(_env(issuer, pfx, tmp_path, file=str(log)))
    with service.client() as client:
        for _ in range(10):
            client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(uuid.uuid4())}"})
    lines = log.read_text().splitlines(keepends=True)
    assert len(lines) == 10
    return lines, service.env


def _tampered(tmp_path: Path, lines: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "tampered.log"
    path.write_text("".join(lines))
    return _verify(env, "--file", str(path))


def test_verify_needs_the_deployments_settings(
    trail: tuple[list[str], dict[str, str]], tmp_path: Path
) -> None:
    """The MACs are checked under a key from the data key: a file alone cannot be verified."""
    lines, service_env = trail
    env = {name: value for name, value in service_env.items() if not name.startswith("keyConnectorSettings")}
    env["keyConnectorSettings__certificate__filesystemPath"] = str(tmp_path / "missing.pfx")
    result = _tampered(tmp_path, lines, env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "audit verify checks MACs under a key that comes from the deployment's data key" in result.stderr


def test_verify_finds_removed_changed_and_swapped_lines(
    trail: tuple[list[str], dict[str, str]], tmp_path: Path
) -> None:
    lines, env = trail
    intact = _tampered(tmp_path, lines, env)
    assert intact.returncode == 0, intact.stdout + intact.stderr

    removed = _tampered(tmp_path, lines[:4] + lines[5:], env)
    assert removed.returncode == 1
    assert "line 5" in removed.stdout and "seq 5 removed" in removed.stdout, removed.stdout

    first_removed = _tampered(tmp_path, lines[1:], env)
    assert (
        first_removed.returncode == 1
        and "line 1" in first_removed.stdout
        and "removed" in first_removed.stdout
    )

    changed = list(lines)
    changed[2] = changed[2].replace('"outcome":"not_found"', '"outcome":"read"')
    assert changed[2] != lines[2]
    result = _tampered(tmp_path, changed, env)
    assert result.returncode == 1
    assert "line 3" in result.stdout and "changed" in result.stdout, result.stdout

    swapped = list(lines)
    swapped[5], swapped[6] = swapped[6], swapped[5]
    result = _tampered(tmp_path, swapped, env)
    assert result.returncode == 1
    assert (
        "line 6" in result.stdout and "reordered" in result.stdout and "seq 6 is at line 7" in result.stdout
    ), result.stdout


def _database_sink(start_service: StartService, env: dict[str, str], issuer: DevIssuer) -> None:
    env = dict(env, keyConnectorSettings__audit__database="true")
    service = start_service(env)
    with service.client() as client:
        for _ in range(5):
            client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(uuid.uuid4())}"})
        client.get("/user-keys")
    deadline = time.monotonic() + 15
    while True:
        result = _verify(env, "--database")
        if "verified 6 entries" in result.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.returncode == 0 and "verified 6 entries in 1 chain(s)" in result.stdout, (
        result.stdout + result.stderr
    )


def test_database_sink_on_sqlite(
    start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> None:
    env = _env(issuer, pfx, tmp_path)
    _database_sink(start_service, env, issuer)
    with sqlite3.connect(tmp_path / "kc.db") as db:
        db.execute("UPDATE keyconnector_audit SET outcome = 'read' WHERE seq = 3")
    result = _verify(env, "--database")
    assert result.returncode == 1 and "row id 3" in result.stdout and "changed" in result.stdout, (
        result.stdout
    )


def test_database_sink_on_postgresql(
    start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path, postgresql_server: Any
) -> None:
    env = _env(issuer, pfx, tmp_path)
    database = postgresql_server.create_database()
    env["keyConnectorSettings__database__provider"] = "postgresql"
    env["keyConnectorSettings__database__postgreSqlConnectionString"] = postgresql_server.connection_string(
        database
    )
    _database_sink(start_service, env, issuer)
    with postgresql_server.connect(database) as connection:
        connection.execute("DELETE FROM keyconnector_audit WHERE seq = 2")
    result = _verify(env, "--database")
    assert result.returncode == 1 and "seq 2 removed" in result.stdout, result.stdout


def test_database_sink_refused_on_the_json_backend(issuer: DevIssuer, pfx: Pfx, tmp_path: Path) -> None:
    env = _env(issuer, pfx, tmp_path, database="true")
    env["keyConnectorSettings__database__provider"] = "json"
    env["keyConnectorSettings__database__jsonFilePath"] = str(tmp_path / "data.json")
    service = Service(env, tmp_path / "json.log")
    with pytest.raises(RuntimeError, match="audit__database"):
        service.start(timeout=20)
    service.stop()


def test_fail_closed_refuses_keys_when_nothing_can_record(
    start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    unwritable = str(tmp_path / "a-file" / "audit.log")  # ENOTDIR, even for root
    user = uuid.uuid4()
    auth = {"Authorization": f"Bearer {issuer.mint(user)}"}
    open_service = start_service(_env(issuer, pfx, tmp_path, file=unwritable, failClosed="false"))
    with open_service.client() as client:
        assert client.post("/user-keys", headers=auth, json={"key": KEY}).status_code == 200
        response = client.get("/user-keys", headers=auth)
        assert response.status_code == 200 and response.json() == {"key": KEY}
    open_service.stop()
    assert "audit file sink" in open_service.logs()

    closed = start_service(_env(issuer, pfx, tmp_path, file=unwritable, failClosed="true"))
    with closed.client() as client:
        response = client.get("/user-keys", headers=auth)
        assert response.status_code == 503
        assert "audit trail is unavailable" in response.json()["message"]
        assert KEY not in response.text
        other = {"Authorization": f"Bearer {issuer.mint(uuid.uuid4())}"}
        assert client.post("/user-keys", headers=other, json={"key": KEY}).status_code == 503
        assert client.get("/user-keys", headers=other).status_code == 404  # nothing was stored


@pytest.mark.parametrize("limit", ["perUser", "perAddress"])
def test_rate_limited_attempts_are_audited(
    limit: str, start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> None:
    """A 429 is a refused attempt too, whether the middleware sends it before the endpoint runs (per
    address) or the endpoint answers it once the user is known (per user)."""
    trail_file = tmp_path / "audit.jsonl"
    env = _env(issuer, pfx, tmp_path, file=str(trail_file))
    env[f"keyConnectorSettings__rateLimit__{limit}PerMinute"] = "1"
    env[f"keyConnectorSettings__rateLimit__{limit}Burst"] = "2"
    service = start_service(env)
    user = uuid.uuid4()
    # Per address, only tokens that do not verify are refused (a verified token never is): the
    # address's budget is spent by a client sending a token signed by nobody the service trusts.
    token = issuer.mint(user) if limit == "perUser" else issuer.mint(user)[:-8] + "AAAAAAAA"
    headers = {"Authorization": f"Bearer {token}"}
    with service.client() as client:
        statuses = [client.get("/user-keys", headers=headers).status_code for _ in range(3)]
    first = ("not_found", 404) if limit == "perUser" else ("unauthorized", 401)
    assert statuses == [first[1], first[1], 429]
    deadline = time.monotonic() + 10
    while len(_entries(trail_file)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    entries = _entries(trail_file)
    assert [(e["outcome"], e["status"]) for e in entries] == [first, first, ("rate_limited", 429)]
    assert _verify(env, "--file", str(trail_file)).returncode == 0
