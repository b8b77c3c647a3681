"""Taking over an upstream deployment: its data reads here, and what we write reads in upstream.

The upstream side is written out independently in this file from docs/compatibility.md section 3 (plain SQL,
plain JSON, the cryptography library): none of it goes through the product's own storage or
crypto code, so a shared mistake cannot hide.
"""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service, base_env
from tests.support.envelopes import (
    upstream_open,
    upstream_seal,
    upstream_unwrap,
    upstream_wrap,
)

UPSTREAM_SQLITE_DDL = [
    'CREATE TABLE "__EFMigrationsHistory" ("MigrationId" TEXT NOT NULL CONSTRAINT "PK___EFMigrationsHistory" '
    'PRIMARY KEY, "ProductVersion" TEXT NOT NULL)',
    'CREATE TABLE "ApplicationDatas" ("Id" INTEGER NOT NULL CONSTRAINT "PK_ApplicationDatas" PRIMARY KEY '
    'AUTOINCREMENT, "SymmetricKey" TEXT NULL)',
    'CREATE TABLE "UserKeys" ("Id" TEXT NOT NULL CONSTRAINT "PK_UserKeys" PRIMARY KEY, "Key" TEXT NULL, '
    '"CreationDate" TEXT NOT NULL, "RevisionDate" TEXT NULL, "LastAccessDate" TEXT NULL)',
]


def make_users(n: int) -> dict[uuid.UUID, bytes]:
    return {uuid.uuid4(): secrets.token_bytes(32) for _ in range(n)}


def build_upstream_sqlite(path: Path, pfx: Pfx, users: dict[uuid.UUID, bytes]) -> bytes:
    data_key = secrets.token_bytes(32)
    conn = sqlite3.connect(path)
    for ddl in UPSTREAM_SQLITE_DDL:
        conn.execute(ddl)
    conn.execute("INSERT INTO \"__EFMigrationsHistory\" VALUES ('20210820155938_InitialCreate', '5.0.9')")
    conn.execute(
        'INSERT INTO "ApplicationDatas" ("SymmetricKey") VALUES (?)', (upstream_wrap(pfx, data_key),)
    )
    for i, (user, key) in enumerate(users.items()):
        conn.execute(
            'INSERT INTO "UserKeys" VALUES (?, ?, ?, ?, ?)',
            (
                str(user).upper(),
                upstream_seal(data_key, key),
                f"2023-0{1 + i % 9}-1{i % 10} 08:15:3{i % 10}.123456{i % 10}",
                None if i % 2 else "2024-02-29 23:59:59.9999999",
                None if i % 3 else "2025-12-31 00:00:00",
            ),
        )
    conn.commit()
    conn.close()
    return data_key


def schema_of(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        return sorted(
            conn.execute(
                "SELECT name, sql FROM sqlite_master "
                "WHERE name IN ('UserKeys', 'ApplicationDatas', '__EFMigrationsHistory')"
            ).fetchall()
        )


def legacy_env(issuer: DevIssuer, pfx: Pfx, database: Path) -> dict[str, str]:
    """A service that keeps writing upstream's format, for operators who may move back to upstream."""
    return base_env(issuer, pfx, database) | {"keyConnectorSettings__compat__writeLegacyFormat": "true"}


# -- the tests -------------------------------------------------------------------------------------


def test_an_upstream_sqlite_database_is_taken_over_in_place(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    database = tmp_path / "kc.db"
    users = make_users(25)
    data_key = build_upstream_sqlite(database, pfx, users)
    before = schema_of(database)

    service = start_service(legacy_env(issuer, pfx, database))
    with service.client() as client:
        for user, key in users.items():
            response = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})
            assert response.status_code == 200
            assert base64.b64decode(response.json()["key"]) == key

        # With writeLegacyFormat, what we write, upstream reads: decrypt a new record with upstream's
        # algorithm, by hand.
        newcomer, new_key = uuid.uuid4(), secrets.token_bytes(32)
        headers = {"Authorization": f"Bearer {issuer.mint(newcomer)}"}
        body = {"key": base64.b64encode(new_key).decode()}
        assert client.post("/user-keys", headers=headers, json=body).status_code == 200

    assert schema_of(database) == before
    with sqlite3.connect(database) as conn:
        history = conn.execute('SELECT * FROM "__EFMigrationsHistory"').fetchall()
        wrapped_rows = conn.execute('SELECT "SymmetricKey" FROM "ApplicationDatas"').fetchall()
        record, created = conn.execute(
            'SELECT "Key", "CreationDate" FROM "UserKeys" WHERE "Id" = ?', (str(newcomer).upper(),)
        ).fetchone()
    assert history == [("20210820155938_InitialCreate", "5.0.9")]
    assert len(wrapped_rows) == 1 and upstream_unwrap(pfx, wrapped_rows[0][0]) == data_key
    assert upstream_open(data_key, record) == new_key
    assert len(created) >= 19 and created[10] == " "  # yyyy-MM-dd HH:mm:ss[.FFFFFFF]


def test_a_new_database_is_created_as_upstream_would_and_reads_with_upstream_crypto_when_asked(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    database = tmp_path / "fresh.db"
    service = start_service(legacy_env(issuer, pfx, database))
    users = make_users(5)
    with service.client() as client:
        for user, key in users.items():
            headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
            assert (
                client.put(
                    "/user-keys", headers=headers, json={"key": base64.b64encode(key).decode()}
                ).status_code
                == 200
            )
    with sqlite3.connect(database) as conn:
        history = conn.execute('SELECT "MigrationId" FROM "__EFMigrationsHistory"').fetchall()
        (wrapped,) = conn.execute(
            'SELECT "SymmetricKey" FROM "ApplicationDatas" ORDER BY "Id" LIMIT 1'
        ).fetchone()
        rows = dict(conn.execute('SELECT "Id", "Key" FROM "UserKeys"').fetchall())
    assert history == [("20210820155938_InitialCreate",)]
    data_key = upstream_unwrap(pfx, wrapped)
    for user, key in users.items():
        assert upstream_open(data_key, rows[str(user).upper()]) == key


def test_an_upstream_json_database_is_taken_over(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    users = make_users(10)
    data_key = secrets.token_bytes(32)
    document = {
        "symmetricKey": upstream_wrap(pfx, data_key),
        "userKey": [
            {
                "id": str(user),
                "key": upstream_seal(data_key, key),
                "creationDate": "2023-05-01T10:20:30.1234567Z",
                "revisionDate": None,
                "lastAccessDate": "2024-01-02T03:04:05Z",
            }
            for user, key in users.items()
        ],
    }
    path = tmp_path / "data.json"
    path.write_text(json.dumps(document, indent=2))
    env = legacy_env(issuer, pfx, tmp_path / "unused.db")
    env["keyConnectorSettings__database__provider"] = "json"
    env["keyConnectorSettings__database__jsonFilePath"] = str(path)
    service = start_service(env)
    newcomer, new_key = uuid.uuid4(), secrets.token_bytes(32)
    with service.client() as client:
        for user, key in users.items():
            response = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})
            assert response.status_code == 200
            assert base64.b64decode(response.json()["key"]) == key
        headers = {"Authorization": f"Bearer {issuer.mint(newcomer)}"}
        assert (
            client.post(
                "/user-keys", headers=headers, json={"key": base64.b64encode(new_key).decode()}
            ).status_code
            == 200
        )

    written = json.loads(path.read_text())
    assert upstream_unwrap(pfx, written["symmetricKey"]) == data_key
    entries = {entry["id"].lower(): entry for entry in written["userKey"]}
    assert len(entries) == len(users) + 1
    assert upstream_open(data_key, entries[str(newcomer)]["key"]) == new_key
    for user, key in users.items():
        assert upstream_open(data_key, entries[str(user)]["key"]) == key


def test_by_default_new_records_are_bound_and_upstream_records_still_read(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    """Without writeLegacyFormat: the data key stays upstream's (ApplicationDatas unwraps with upstream's
    algorithm), upstream's records keep reading, but new records are format 2 (``kc:2:1:``), bound to
    their user, which upstream's algorithm cannot open."""
    database = tmp_path / "kc.db"
    users = make_users(3)
    data_key = build_upstream_sqlite(database, pfx, users)
    service = start_service(base_env(issuer, pfx, database))
    newcomer, new_key = uuid.uuid4(), secrets.token_bytes(32)
    with service.client() as client:
        for user, key in users.items():
            response = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})
            assert response.status_code == 200 and base64.b64decode(response.json()["key"]) == key
        headers = {"Authorization": f"Bearer {issuer.mint(newcomer)}"}
        body = {"key": base64.b64encode(new_key).decode()}
        assert client.post("/user-keys", headers=headers, json=body).status_code == 200
        response = client.get("/user-keys", headers=headers)
        assert base64.b64decode(response.json()["key"]) == new_key
    with sqlite3.connect(database) as conn:
        (wrapped,) = conn.execute('SELECT "SymmetricKey" FROM "ApplicationDatas"').fetchone()
        (record,) = conn.execute(
            'SELECT "Key" FROM "UserKeys" WHERE "Id" = ?', (str(newcomer).upper(),)
        ).fetchone()
    assert upstream_unwrap(pfx, wrapped) == data_key
    assert record.startswith("kc:2:1:")
    with pytest.raises((InvalidTag, ValueError)):  # the bytes or the tag: either way upstream cannot read it
        upstream_open(data_key, record)
