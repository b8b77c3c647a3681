"""Issue 15, the edge under abuse: each flaw reproduced against a running ``keyconnector serve``.

- ``HEAD /user-keys`` with a body must not reach the write branch;
- a ``%0A`` (or any control character) in a logged request field must not forge access-log lines;
- a signed token whose ``exp``/``nbf`` is out of range or not finite is a 401, never a 500 or eternal;
- a cached token must not outlive the key that vouched for it (kid reused, kid-less key replaced);
- the files the service creates (SQLite and its -wal/-shm, logs, audit) are 0600 from the first write.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.devtools.tls import local_tls_files
from tests.conftest import Pfx, Service, base_env

StartService = Callable[..., Service]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


# -- HEAD ----------------------------------------------------------------------------------------


def test_head_with_a_body_leaves_the_key_unchanged(shared_service: Service, issuer: DevIssuer) -> None:
    user = uuid.uuid4()
    headers = {**_bearer(issuer.mint(user)), "Content-Type": "application/json"}
    original = _key()
    with shared_service.client() as client:
        assert client.post("/user-keys", headers=headers, json={"key": original}).status_code == 200
        head = client.request("HEAD", "/user-keys", headers=headers, content=json.dumps({"key": _key()}))
        assert head.status_code == 405, head.status_code
        assert "GET" in head.headers.get("allow", "") and "HEAD" not in head.headers.get("allow", "")
        assert head.content == b""
        assert client.get("/user-keys", headers=headers).json() == {"key": original}


def test_head_without_a_user_key_creates_none(shared_service: Service, issuer: DevIssuer) -> None:
    user = uuid.uuid4()
    headers = {**_bearer(issuer.mint(user)), "Content-Type": "application/json"}
    with shared_service.client() as client:
        head = client.request("HEAD", "/user-keys", headers=headers, content=json.dumps({"key": _key()}))
        assert head.status_code == 405
        assert client.get("/user-keys", headers=headers).status_code == 404
