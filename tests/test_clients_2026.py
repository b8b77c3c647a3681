"""Today's clients and the release's files, pinned (docs/compatibility.md sections 6.5 and 6.8).

Each test sends what one client sends, header for header, to a running service: the web vault's
preflight for the Rust SDK's extra headers, the TypeScript clients' uncached GETs and the admin
console's Test button (exactly 200), Android's ``{"Key": ...}``, the 2026 migration and key rotation
sequences; and a JSON file as the 2025.11.0 release leaves it (lower-case ids, ``lastAccessDate``
null everywhere) is served and stays readable by that release.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import WEB_VAULT, Pfx, Service, base_env
from tests.support.envelopes import upstream_open, upstream_seal, upstream_unwrap, upstream_wrap

SDK_HEADERS = {
    "Accept": "application/json",
    "Device-Type": "10",
    "Device-Identifier": "b3f7c1d2-5e6a-4b8c-9d0e-1f2a3b4c5d6e",
    "Bitwarden-Client-Name": "web",
    "Bitwarden-Client-Version": "2026.6.0",
    "Bitwarden-Package-Type": "SdkInternal",
}
"""What the Rust SDK adds to the web vault's requests in 2026 (besides Authorization)."""

TS_GET_HEADERS = {"Accept": "application/json", "Cache-Control": "no-store", "Pragma": "no-cache"}


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def bearer(issuer: DevIssuer, user: uuid.UUID) -> dict[str, str]:
    return {"Authorization": f"Bearer {issuer.mint(user)}"}


def test_the_web_vault_preflight_for_the_sdk_headers_is_allowed(shared_service: Service) -> None:
    asked = (
        "authorization,bitwarden-client-name,bitwarden-client-version,bitwarden-package-type,"
        "content-type,device-identifier,device-type"
    )
    with shared_service.client() as client:
        for method in ("GET", "POST", "PUT"):
            response = client.options(
                "/user-keys",
                headers={
                    "Origin": WEB_VAULT,
                    "Access-Control-Request-Method": method,
                    "Access-Control-Request-Headers": asked,
                },
            )
            assert 200 <= response.status_code < 300, response.text
            assert response.headers["access-control-allow-origin"] == WEB_VAULT
            assert method in response.headers["access-control-allow-methods"]
            allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
            assert {"device-identifier", "bitwarden-package-type"} <= allowed
            assert set(asked.split(",")) <= allowed


def test_the_sdk_migration_get_then_post_then_put_with_its_headers(
    shared_service: Service, issuer: DevIssuer
) -> None:
    """Migration (2026-03): a fresh key, GET (404), POST; a retry after a lost answer GETs (200) and
    PUTs. Every answer carries the CORS headers the browser needs to hand it to the SDK."""
    user, first, second = uuid.uuid4(), new_key(), new_key()
    headers = {**SDK_HEADERS, "Origin": WEB_VAULT, **bearer(issuer, user)}
    with shared_service.client() as client:
        missing = client.get("/user-keys", headers=headers)
        created = client.post("/user-keys", headers=headers, json={"key": first})
        found = client.get("/user-keys", headers=headers)
        replaced = client.put("/user-keys", headers=headers, json={"key": second})
        read = client.get("/user-keys", headers=headers)
    assert [r.status_code for r in (missing, created, found, replaced, read)] == [404, 200, 200, 200, 200]
    assert found.json() == {"key": first} and read.json() == {"key": second}
    for response in (missing, created, found, replaced, read):
        assert response.headers["access-control-allow-origin"] == WEB_VAULT


def test_a_put_for_a_user_without_a_key_stores_it(shared_service: Service, issuer: DevIssuer) -> None:
    """The release answers 200 here and stores nothing; the SDK only PUTs after a GET succeeded, but a
    client that PUTs first must not be told 200 for a key that is not there (section 6.1)."""
    user, key = uuid.uuid4(), new_key()
    headers = {**SDK_HEADERS, **bearer(issuer, user)}
    with shared_service.client() as client:
        assert client.put("/user-keys", headers=headers, json={"key": key}).status_code == 200
        assert client.get("/user-keys", headers=headers).json() == {"key": key}


def test_typescript_gets_and_the_admin_test_button_get_exactly_200(
    shared_service: Service, issuer: DevIssuer
) -> None:
    user, key = uuid.uuid4(), new_key()
    with shared_service.client() as client:
        assert client.post("/user-keys", headers=bearer(issuer, user), json={"key": key}).status_code == 200
        read = client.get(
            "/user-keys", headers={**TS_GET_HEADERS, "Origin": WEB_VAULT, **bearer(issuer, user)}
        )
        alive = client.get("/alive", headers={**TS_GET_HEADERS, "Origin": WEB_VAULT})
    assert read.status_code == 200 and read.json() == {"key": key}
    assert alive.status_code == 200 and alive.headers["access-control-allow-origin"] == WEB_VAULT
    assert isinstance(alive.json(), str)


def test_account_key_rotation_only_reads(shared_service: Service, issuer: DevIssuer) -> None:
    """A Key Connector user's account key rotation (2026-05) GETs the key and nothing else: the read
    must not change the stored key, however often it is repeated."""
    user, key = uuid.uuid4(), new_key()
    with shared_service.client() as client:
        assert client.post("/user-keys", headers=bearer(issuer, user), json={"key": key}).status_code == 200
        answers = [
            client.get("/user-keys", headers={**SDK_HEADERS, **bearer(issuer, user)}) for _ in range(3)
        ]
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"key": key})] * 3


def test_android_posts_capital_key_and_reads_exactly_key(shared_service: Service, issuer: DevIssuer) -> None:
    user, key = uuid.uuid4(), new_key()
    headers = {**bearer(issuer, user), "Content-Type": "application/json; charset=utf-8"}
    with shared_service.client() as client:
        posted = client.post("/user-keys", headers=headers, content=json.dumps({"Key": key}))
        read = client.get("/user-keys", headers=bearer(issuer, user))
    assert posted.status_code == 200, posted.text
    assert read.status_code == 200
    assert list(read.json()) == ["key"] and read.json()["key"] == key


def test_a_release_era_json_file_is_served_and_stays_the_release_s(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    """The 2025.11.0 release never wrote ``lastAccessDate`` back and never replaced a record, so a
    taken-over file has lower-case ids and nulls in every ``lastAccessDate``. It is read as it is; a
    PUT replaces a record; what is written keeps the release's spelling and envelope."""
    users = {uuid.uuid4(): secrets.token_bytes(32) for _ in range(4)}
    data_key = secrets.token_bytes(32)
    path = tmp_path / "data.json"
    path.write_text(
        json.dumps(
            {
                "symmetricKey": upstream_wrap(pfx, data_key),
                "userKey": [
                    {
                        "id": str(user),
                        "key": upstream_seal(data_key, key),
                        "creationDate": "2025-11-20T09:14:03.8417793Z",
                        "revisionDate": None,
                        "lastAccessDate": None,
                    }
                    for user, key in users.items()
                ],
            }
        )
    )
    env = base_env(issuer, pfx, tmp_path / "unused.db")
    env["keyConnectorSettings__database__provider"] = "json"
    env["keyConnectorSettings__database__jsonFilePath"] = str(path)
    env["keyConnectorSettings__compat__writeLegacyFormat"] = "true"  # the way back stays open
    service = start_service(env)
    (replaced_user, _), *kept = users.items()
    replacement = secrets.token_bytes(32)
    with service.client() as client:
        for user, key in users.items():
            response = client.get("/user-keys", headers={**TS_GET_HEADERS, **bearer(issuer, user)})
            assert response.status_code == 200, response.text
            assert base64.b64decode(response.json()["key"]) == key
        body = {"key": base64.b64encode(replacement).decode()}
        assert client.put("/user-keys", headers=bearer(issuer, replaced_user), json=body).status_code == 200

    deadline = time.monotonic() + 5  # last-access dates are written in batches (0.2 s in tests)
    while True:
        written = json.loads(path.read_text())
        entries = {entry["id"]: entry for entry in written["userKey"]}
        if all(entry["lastAccessDate"] for entry in entries.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(entries) == {str(user) for user in users}  # still lower-case, no second spelling
    assert upstream_unwrap(pfx, written["symmetricKey"]) == data_key
    assert upstream_open(data_key, entries[str(replaced_user)]["key"]) == replacement
    assert entries[str(replaced_user)]["revisionDate"] is not None
    for user, key in kept:
        assert upstream_open(data_key, entries[str(user)]["key"]) == key
    for entry in entries.values():
        assert set(entry) == {"id", "key", "creationDate", "revisionDate", "lastAccessDate"}
        assert entry["creationDate"] == "2025-11-20T09:14:03.8417793Z"
        assert entry["lastAccessDate"], "reads record the last access, as the release never did"
