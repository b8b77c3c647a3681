"""Races: many requests for one user, and several instances starting on one empty database."""

from __future__ import annotations

import base64
import secrets
import sqlite3
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service, base_env


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_parallel_posts_for_one_user_give_one_200_and_the_rest_400(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service
) -> None:
    # The per-user cap on requests in flight would answer some of these 429 before they race: off,
    # so that every POST reaches the database.
    env = base_env(issuer, pfx, tmp_path / "kc.db") | {
        "keyConnectorSettings__http__maxRequestsInFlightPerUser": "0"
    }
    service: Service = start_service(env, workers=2)
    for _ in range(3):
        user = uuid.uuid4()
        headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
        keys = [b64(secrets.token_bytes(32)) for _ in range(24)]
        barrier = threading.Barrier(len(keys))

        def post(
            key: str, barrier: threading.Barrier = barrier, headers: dict[str, str] = headers
        ) -> tuple[int, str]:
            with httpx.Client(base_url=service.url, timeout=20) as client:
                barrier.wait()
                return client.post("/user-keys", headers=headers, json={"key": key}).status_code, key

        with ThreadPoolExecutor(len(keys)) as pool:
            results = list(pool.map(post, keys))
        statuses = sorted(status for status, _ in results)
        assert statuses.count(200) == 1, statuses
        assert statuses.count(400) == len(keys) - 1, statuses
        winner = next(key for status, key in results if status == 200)
        with service.client() as client:
            assert client.get("/user-keys", headers=headers).json() == {"key": winner}


def test_parallel_puts_and_posts_for_many_users_lose_nothing(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service
) -> None:
    service: Service = start_service(base_env(issuer, pfx, tmp_path / "kc.db"), workers=2)
    users = {uuid.uuid4(): b64(secrets.token_bytes(32)) for _ in range(120)}

    def write(item: tuple[uuid.UUID, str]) -> int:
        user, key = item
        method = "PUT" if user.int % 2 else "POST"
        with httpx.Client(base_url=service.url, timeout=20) as client:
            headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
            return client.request(method, "/user-keys", headers=headers, json={"key": key}).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(write, users.items())) == {200}
    with service.client() as client:
        for user, key in users.items():
            assert client.get(
                "/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"}
            ).json() == {"key": key}


def test_two_instances_starting_together_on_an_empty_database_share_one_data_key(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx
) -> None:
    database = tmp_path / "shared.db"
    env = base_env(issuer, pfx, database)
    services = [Service(env, tmp_path / f"instance-{i}.log", workers=2) for i in range(2)]
    threads = [threading.Thread(target=service.start) for service in services]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for service in services:
            assert service.process is not None and service.process.poll() is None, service.logs()
        written: dict[uuid.UUID, str] = {}
        for i in range(40):
            user, key = uuid.uuid4(), b64(secrets.token_bytes(32))
            with services[i % 2].client() as client:
                headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
                assert client.post("/user-keys", headers=headers, json={"key": key}).status_code == 200
            written[user] = key
        for user, key in written.items():
            for service in services:
                with service.client() as client:
                    headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
                    assert client.get("/user-keys", headers=headers).json() == {"key": key}
    finally:
        for service in services:
            service.stop()
    with sqlite3.connect(database) as conn:
        rows = conn.execute('SELECT "SymmetricKey" FROM "ApplicationDatas"').fetchall()
    assert len(rows) == 1 and rows[0][0]
