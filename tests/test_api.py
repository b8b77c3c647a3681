"""docs/compatibility.md section 1, row by row, against a running service."""

from __future__ import annotations

import base64
import re
import secrets
import sqlite3
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import WEB_VAULT, Service

SDK_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json",
    "Device-Type": "8",
    "Bitwarden-Client-Name": "cli",
    "Bitwarden-Client-Version": "2026.11.0",
    "User-Agent": "Bitwarden_CLI/2026.11.0",
}


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def auth(issuer: DevIssuer, user: uuid.UUID | None = None, **claims: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {issuer.mint(user or uuid.uuid4(), **claims)}"}  # type: ignore[arg-type]


def db_row(service: Service, user: uuid.UUID) -> tuple[str | None, str, str | None, str | None] | None:
    database: Path = service.database  # type: ignore[attr-defined]
    with sqlite3.connect(database) as conn:
        return conn.execute(
            'SELECT "Key", "CreationDate", "RevisionDate", "LastAccessDate" FROM "UserKeys" WHERE "Id" = ?',
            (str(user).upper(),),
        ).fetchone()


@pytest.mark.parametrize("path", ["/alive", "/now"])
def test_alive_and_now_answer_the_utc_time_as_a_json_string(shared_service: Service, path: str) -> None:
    with shared_service.client() as client:
        response = client.get(path)
    assert response.status_code == 200
    value = response.json()
    assert isinstance(value, str)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z", value), value
    stamp = datetime.strptime(value[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 5


def test_health_is_plain_text_healthy(shared_service: Service) -> None:
    with shared_service.client() as client:
        response = client.get("/health")
        live = client.get("/health/live")
        ready = client.get("/health/ready")
    assert (response.status_code, response.text) == (200, "Healthy")
    assert response.headers["content-type"].startswith("text/plain")
    assert live.status_code == 200
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert checks["database"] == "ok" and checks["keyProvider"] == "ok" and checks["dataKey"] == "ok"
    # What `keyconnector status` shows: from memory, never key material (version numbers only).
    body = ready.json()
    assert body["workers"] == shared_service.workers and isinstance(body["version"], str), body
    assert body["dataKey"]["current"] in body["dataKey"]["active"], body


def test_get_without_a_stored_key_is_404(shared_service: Service, issuer: DevIssuer) -> None:
    with shared_service.client() as client:
        response = client.get("/user-keys", headers=auth(issuer))
    assert response.status_code == 404
    assert "message" in response.json()


def test_post_then_get_returns_the_key_uncached(shared_service: Service, issuer: DevIssuer) -> None:
    user, key = uuid.uuid4(), new_key()
    headers = auth(issuer, user)
    with shared_service.client() as client:
        created = client.post("/user-keys", headers=headers, json={"key": key})
        assert created.status_code == 200
        assert created.content == b""
        read = client.get("/user-keys", headers=headers)
    assert read.status_code == 200
    assert read.json() == {"key": key}
    assert read.headers["cache-control"] == "no-store"
    assert read.headers["content-type"].startswith("application/json")
    row = db_row(shared_service, user)
    assert row is not None and row[0] is not None and key not in row[0]
    assert row[2] is None  # no revision yet


def test_second_post_is_400_and_keeps_the_first_key(shared_service: Service, issuer: DevIssuer) -> None:
    user, first = uuid.uuid4(), new_key()
    headers = auth(issuer, user)
    with shared_service.client() as client:
        assert client.post("/user-keys", headers=headers, json={"key": first}).status_code == 200
        again = client.post("/user-keys", headers=headers, json={"key": new_key()})
        assert again.status_code == 400
        assert "already" in again.json()["message"]
        assert client.get("/user-keys", headers=headers).json() == {"key": first}


def test_put_creates_then_replaces_and_sets_the_revision_date(
    shared_service: Service, issuer: DevIssuer
) -> None:
    user, first, second = uuid.uuid4(), new_key(), new_key()
    headers = auth(issuer, user)
    with shared_service.client() as client:
        assert client.put("/user-keys", headers=headers, json={"key": first}).status_code == 200
        created = db_row(shared_service, user)
        assert created is not None and created[2] is None
        assert client.get("/user-keys", headers=headers).json() == {"key": first}
        assert client.put("/user-keys", headers=headers, json={"key": second}).status_code == 200
        assert client.get("/user-keys", headers=headers).json() == {"key": second}
    replaced = db_row(shared_service, user)
    assert replaced is not None
    assert replaced[1] == created[1]  # CreationDate untouched
    assert replaced[2] is not None  # RevisionDate set


def test_sdk_enrolment_get_then_post_with_sdk_headers(shared_service: Service, issuer: DevIssuer) -> None:
    user, key = uuid.uuid4(), new_key()
    headers = {**SDK_HEADERS, **auth(issuer, user)}
    with shared_service.client() as client:
        assert client.get("/user-keys", headers=headers).status_code == 404
        assert client.post("/user-keys", headers=headers, content=f'{{"Key":"{key}"}}').status_code == 200
        response = client.get("/user-keys", headers=headers)
    assert response.status_code == 200
    assert base64.b64decode(response.json()["key"]) == base64.b64decode(key)


@pytest.mark.parametrize("name", ["key", "Key", "KEY", "kEy"])
def test_the_key_property_name_is_case_insensitive(
    shared_service: Service, issuer: DevIssuer, name: str
) -> None:
    headers, key = auth(issuer), new_key()
    with shared_service.client() as client:
        assert client.post("/user-keys", headers=headers, json={name: key}).status_code == 200
        assert client.get("/user-keys", headers=headers).json() == {"key": key}


def test_a_configured_url_with_a_trailing_slash_still_works(
    shared_service: Service, issuer: DevIssuer
) -> None:
    headers, key = auth(issuer), new_key()
    base = shared_service.url + "/"  # what a client builds from "https://kc.example.com/" + "/user-keys"
    with shared_service.client() as client:
        assert client.post(base + "/user-keys", headers=headers, json={"key": key}).status_code == 200
        assert client.get(base + "/user-keys", headers=headers).json() == {"key": key}
        assert client.get(base + "/alive").status_code == 200


def test_users_only_ever_see_their_own_key(shared_service: Service, issuer: DevIssuer) -> None:
    alice, bob = auth(issuer), auth(issuer)
    with shared_service.client() as client:
        assert client.post("/user-keys", headers=alice, json={"key": new_key()}).status_code == 200
        assert client.get("/user-keys", headers=bob).status_code == 404


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer not.a.jwt", "Bearer a.b", "Bearer a b c"],
)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
def test_401_with_www_authenticate_and_a_message(
    shared_service: Service, authorization: str | None, method: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with shared_service.client() as client:
        response = client.request(method, "/user-keys", headers=headers, json={"key": new_key()})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["message"]


def test_an_expired_token_is_401(shared_service: Service, issuer: DevIssuer) -> None:
    now = int(time.time())
    token = issuer.mint(uuid.uuid4(), issued_at=now - 7200, not_before=now - 7200, lifetime=3600)
    with shared_service.client() as client:
        response = client.get("/user-keys", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert token not in response.text


@pytest.mark.parametrize(
    "claims",
    [
        {"scope": "api offline_access"},
        {"scope": None},
        {"scope": ["offline_access"]},
        {"amr": None},
        {"amr": ["pwd"]},
    ],
)
def test_403_when_the_token_fails_the_policy(
    shared_service: Service, issuer: DevIssuer, claims: dict[str, object]
) -> None:
    with shared_service.client() as client:
        response = client.get("/user-keys", headers=auth(issuer, **claims))
    assert response.status_code == 403
    assert response.json()["message"]


def test_403_when_sub_is_not_a_guid(shared_service: Service, issuer: DevIssuer) -> None:
    token = issuer.mint("not-a-guid")
    with shared_service.client() as client:
        response = client.get("/user-keys", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403


def test_password_logins_are_accepted_like_sso(shared_service: Service, issuer: DevIssuer) -> None:
    headers = auth(issuer, amr=["Application"], scope=["api"])
    with shared_service.client() as client:
        assert client.get("/user-keys", headers=headers).status_code == 404


def test_cors_preflight_from_the_web_vault(shared_service: Service) -> None:
    with shared_service.client() as client:
        response = client.options(
            "/user-keys",
            headers={
                "Origin": WEB_VAULT,
                "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": (
                    "authorization,content-type,bitwarden-client-name,cache-control,pragma"
                ),
            },
        )
    assert response.status_code in (200, 204)
    assert response.headers["access-control-allow-origin"] == WEB_VAULT
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "PUT" in response.headers["access-control-allow-methods"]
    assert "bitwarden-client-name" in response.headers["access-control-allow-headers"]


def test_cors_preflight_from_another_origin_gets_no_cors_headers(shared_service: Service) -> None:
    with shared_service.client() as client:
        response = client.options(
            "/user-keys",
            headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "GET"},
        )
    assert "access-control-allow-origin" not in response.headers


def test_cors_headers_on_real_requests_from_the_web_vault(shared_service: Service, issuer: DevIssuer) -> None:
    with shared_service.client() as client:
        ok = client.get("/alive", headers={"Origin": WEB_VAULT})
        denied = client.get("/user-keys", headers={"Origin": WEB_VAULT})
        foreign = client.get("/alive", headers={"Origin": "https://evil.example.com"})
    assert ok.headers["access-control-allow-origin"] == WEB_VAULT
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == WEB_VAULT
    assert "access-control-allow-origin" not in foreign.headers


def test_unknown_paths_and_methods_answer_json(shared_service: Service, issuer: DevIssuer) -> None:
    with shared_service.client() as client:
        missing = client.get("/nope")
        wrong = client.delete("/user-keys", headers=auth(issuer))
    assert missing.status_code == 404 and missing.json()["message"]
    assert wrong.status_code == 405 and wrong.json()["message"]


def test_reads_record_the_last_access_date(shared_service: Service, issuer: DevIssuer) -> None:
    user = uuid.uuid4()
    headers = auth(issuer, user)
    with shared_service.client() as client:
        assert client.post("/user-keys", headers=headers, json={"key": new_key()}).status_code == 200
        assert client.get("/user-keys", headers=headers).status_code == 200
    deadline = time.monotonic() + 10
    row = db_row(shared_service, user)
    while row is not None and row[3] is None and time.monotonic() < deadline:
        time.sleep(0.1)
        row = db_row(shared_service, user)
    assert row is not None and row[3] is not None
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{1,7})?", row[3])


def test_one_log_line_per_request_without_secrets(shared_service: Service, issuer: DevIssuer) -> None:
    user, key = uuid.uuid4(), new_key()
    token = issuer.mint(user)
    headers = {"Authorization": f"Bearer {token}"}
    with shared_service.client() as client:
        client.post("/user-keys", headers=headers, json={"key": key})
        client.get("/user-keys", headers=headers)
    time.sleep(0.3)
    logs = shared_service.logs()
    assert re.search(rf"GET /user-keys 200 [\d.]+ms user={user}", logs)
    assert re.search(rf"POST /user-keys 200 [\d.]+ms user={user}", logs)
    assert token not in logs
    assert key not in logs


def test_health_covers_the_database(tmp_path: Path, issuer: DevIssuer, pfx, start_service) -> None:
    from tests.conftest import base_env

    database = tmp_path / "kc.db"
    service: Service = start_service(base_env(issuer, pfx, database))
    database.rename(tmp_path / "moved.db")
    time.sleep(2.1)  # past the health cache
    with service.client() as client:
        health = client.get("/health")
        ready = client.get("/health/ready")
        live = client.get("/health/live")
    assert (health.status_code, health.text) == (503, "Unhealthy")
    assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
    assert live.status_code == 200


def test_access_times_still_batched_at_shutdown_are_written(
    tmp_path: Path, issuer: DevIssuer, pfx, start_service
) -> None:
    from tests.conftest import base_env

    database = tmp_path / "kc.db"
    env = base_env(issuer, pfx, database)
    env["keyConnectorSettings__lastAccessFlushSeconds"] = "60"
    service: Service = start_service(env)
    service.database = database  # type: ignore[attr-defined]
    user = uuid.uuid4()
    headers = auth(issuer, user)
    with service.client() as client:
        assert client.post("/user-keys", headers=headers, json={"key": new_key()}).status_code == 200
        assert client.get("/user-keys", headers=headers).status_code == 200
    row = db_row(service, user)
    assert row is not None and row[3] is None  # still in the batch
    service.stop()
    row = db_row(service, user)
    assert row is not None and row[3] is not None, service.logs()
