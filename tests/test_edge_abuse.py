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
import logging
import os
import secrets
import socket
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.devtools.tls import local_tls_files
from keyconnector.runtime.logs import TextFormatter
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


# -- log injection -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged_service(
    tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, pfx: Pfx
) -> Iterator[tuple[Service, Path]]:
    """A service writing the text access log to a file of its own."""
    folder = tmp_path_factory.mktemp("logged")
    env = base_env(issuer, pfx, folder / "kc.db")
    log_file = folder / "service.log"
    env["keyConnectorSettings__logging__accessLog"] = "true"
    env["keyConnectorSettings__logging__file"] = str(log_file)
    service = Service(env, folder / "stderr.log")
    service.start()
    yield service, log_file
    service.stop()


def _raw_request(service: Service, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as conn:
        conn.sendall(request)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received


def _access_lines(log_file: Path, marker: str, timeout: float = 5.0) -> list[str]:
    """The log lines holding ``marker``, once there are some (and a moment later, for stragglers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        if marker in text:
            time.sleep(0.3)  # the access log is written in batches: let the whole batch arrive
            break
        time.sleep(0.05)
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    # Split on newlines only, as log shippers and grep do (splitlines would also split on \r, \x85...).
    return [line for line in text.split("\n") if marker in line]


def test_a_newline_in_the_path_adds_exactly_one_access_log_line(
    logged_service: tuple[Service, Path],
) -> None:
    service, log_file = logged_service
    marker, forged_marker = secrets.token_hex(6), secrets.token_hex(6)
    forged_line = f"2026-01-01 00:00:00.000 INFO    keyconnector.access: GET /user-keys 200 {forged_marker}"
    forged = f"/{marker}%0A{forged_line}"
    with service.client() as client:
        assert client.get(forged).status_code == 404
    lines = _access_lines(log_file, marker)
    assert len(lines) == 1, lines
    assert _access_lines(log_file, forged_marker) == lines  # the forged text is inside the one line
    assert f"/{marker}\\n2026-01-01" in lines[0]


@pytest.mark.parametrize("character", ["%0D", "%1B", "%00", "%7F", "%C2%85", "%E2%80%A8"])
def test_control_characters_in_the_path_are_escaped(
    logged_service: tuple[Service, Path], character: str
) -> None:
    service, log_file = logged_service
    marker = secrets.token_hex(6)
    with service.client() as client:
        client.get(f"/{marker}{character}tail")
    lines = _access_lines(log_file, marker)
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"{marker}\\" in line and "tail 404" in line, repr(line)
    assert all(ch == "\t" or (ch.isprintable() and ch not in "\x85\u2028") for ch in line), repr(line)


def test_a_request_id_with_control_characters_or_too_long_is_replaced(
    logged_service: tuple[Service, Path],
) -> None:
    service, log_file = logged_service
    marker = secrets.token_hex(6)
    response = _raw_request(
        service,
        f"GET /{marker} HTTP/1.1\r\nHost: x\r\nX-Request-Id: abc\x0bFORGED\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert b"FORGED" not in response
    with service.client() as client:
        long_id = client.get(f"/{marker}b", headers={"X-Request-Id": "a" * 65})
        assert long_id.headers["x-request-id"] != "a" * 65
        assert len(long_id.headers["x-request-id"]) <= 64
        kept = client.get(f"/{marker}c", headers={"X-Request-Id": "ok-id.1:2_3"})
        assert kept.headers["x-request-id"] == "ok-id.1:2_3"
    lines = _access_lines(log_file, marker)
    assert lines and not [line for line in lines if "FORGED" in line or "a" * 65 in line], lines
    assert [line for line in lines if line.endswith(" rid=ok-id.1:2_3")]


def test_the_text_formatter_keeps_one_record_on_one_line() -> None:
    """Every log message, not only the access log's, may carry a client's words (a path in a
    warning): the text formatter escapes them; a traceback keeps its own lines."""
    record = logging.LogRecord(
        "keyconnector.http",
        logging.WARNING,
        __file__,
        1,
        "%s %s: %s",
        ("GET", "/a\nFORGED\x1b[2J", "x"),
        None,
    )
    line = TextFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line
    assert line.endswith("GET /a\\nFORGED\\x1b[2J: x")
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert "Traceback (most recent call last):\n" in TextFormatter().format(record)


# -- huge or non-finite token times --------------------------------------------------------------


def _signed(issuer: DevIssuer, payload_text: str) -> str:
    """A token over a payload written as text (json.dumps cannot write ``Infinity`` for an int)."""
    return issuer.sign_payload(payload_text.encode())


def _claims_text(issuer: DevIssuer, user: uuid.UUID, **raw: str) -> str:
    claims = {
        "iss": issuer.issuer,
        "sub": str(user),
        "scope": ["api"],
        "amr": ["Application"],
        "client_id": "web",
        "nbf": int(time.time()) - 10,
        "exp": int(time.time()) + 3600,
    }
    text = json.dumps({name: value for name, value in claims.items() if name not in raw})
    return text[:-1] + "".join(f', "{name}": {value}' for name, value in raw.items()) + "}"


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "9" * 400},
        {"exp": "-" + "9" * 400},
        {"exp": "1e400"},
        {"exp": "Infinity"},
        {"exp": "NaN"},
        {"exp": "1" + "0" * 17},
        {"exp": "true"},
        {"nbf": "-" + "9" * 400},
        {"nbf": "9" * 400},
        {"nbf": "-Infinity"},
        {"nbf": "NaN"},
    ],
)
def test_out_of_range_or_non_finite_token_times_are_401(
    shared_service: Service, issuer: DevIssuer, claims: dict[str, str]
) -> None:
    token = _signed(issuer, _claims_text(issuer, uuid.uuid4(), **claims))
    with shared_service.client() as client:
        for _ in range(2):  # the second time through the cache, had the first been accepted
            response = client.get("/user-keys", headers=_bearer(token))
            assert response.status_code == 401, (response.status_code, response.text)
            assert response.json()["message"]


def test_a_payload_written_as_text_with_sane_times_is_accepted(
    shared_service: Service, issuer: DevIssuer
) -> None:
    """The control of the test above: the same construction with ordinary numbers works."""
    token = _signed(issuer, _claims_text(issuer, uuid.uuid4(), exp=str(int(time.time()) + 600)))
    with shared_service.client() as client:
        assert client.get("/user-keys", headers=_bearer(token)).status_code == 404


# -- token cache and key changes -----------------------------------------------------------------


def _rotating_service(start_service: StartService, own: DevIssuer, pfx: Pfx, tmp_path: Path) -> Service:
    return start_service(base_env(own, pfx, tmp_path / "kc.db"))


def _wait_status(service: Service, token: str, wanted: int, timeout: float = 15.0) -> int:
    """Ask until the answer is ``wanted``: a key-set refetch is throttled to one per few seconds."""
    deadline = time.monotonic() + timeout
    status = 0
    with service.client() as client:
        while time.monotonic() < deadline:
            status = client.get("/user-keys", headers=_bearer(token)).status_code
            if status == wanted:
                return status
            time.sleep(0.25)
    return status


def test_a_cached_token_is_dropped_when_its_kid_is_reused_with_a_new_key(
    start_service: StartService, pfx: Pfx, tmp_path: Path
) -> None:
    with DevIssuer() as own:
        service = _rotating_service(start_service, own, pfx, tmp_path)
        kid = own.current_kid
        token = own.mint(uuid.uuid4())
        with service.client() as client:
            assert client.get("/user-keys", headers=_bearer(token)).status_code == 404  # now cached
        # The old key stays published under another kid: the thumbprints only grow, but the kid the
        # token names now stands for a key that never signed it.
        own.replace_key(kid, keep_old_as=f"{kid}-old")
        fresh = own.mint(uuid.uuid4())
        # A token of the new key under the known kid fails the old key's check: that must make the
        # service look at the key set again, not refuse the new key until the hourly refresh.
        assert _wait_status(service, fresh, 404) == 404
        with service.client() as client:
            assert client.get("/user-keys", headers=_bearer(token)).status_code == 401
            moved = own.mint(uuid.uuid4(), kid=f"{kid}-old")
            assert client.get("/user-keys", headers=_bearer(moved)).status_code == 404


def test_a_cached_token_is_dropped_when_its_kid_is_replaced_outright(
    start_service: StartService, pfx: Pfx, tmp_path: Path
) -> None:
    with DevIssuer() as own:
        service = _rotating_service(start_service, own, pfx, tmp_path)
        kid = own.current_kid
        token = own.mint(uuid.uuid4())
        with service.client() as client:
            assert client.get("/user-keys", headers=_bearer(token)).status_code == 404
        own.replace_key(kid)
        assert _wait_status(service, own.mint(uuid.uuid4()), 404) == 404
        with service.client() as client:
            assert client.get("/user-keys", headers=_bearer(token)).status_code == 401


def test_a_cached_kidless_token_is_dropped_when_the_only_key_is_replaced(
    start_service: StartService, pfx: Pfx, tmp_path: Path
) -> None:
    with DevIssuer(flavour="vaultwarden") as own:
        service = _rotating_service(start_service, own, pfx, tmp_path)
        token = own.mint(uuid.uuid4(), amr=("Application",))
        with service.client() as client:
            assert client.get("/user-keys", headers=_bearer(token)).status_code == 404
        own.rotate(keep_old=False)
        fresh = own.mint(uuid.uuid4(), amr=("Application",))
        assert _wait_status(service, fresh, 404) == 404
        with service.client() as client:
            assert client.get("/user-keys", headers=_bearer(token)).status_code == 401


# -- file modes ----------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_the_service_creates_are_0600(
    start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> None:
    previous = os.umask(0o022)  # the usual umask, which would give 0644
    try:
        env = base_env(issuer, pfx, tmp_path / "kc.db")
        env["keyConnectorSettings__logging__file"] = str(tmp_path / "service.log")
        env["keyConnectorSettings__logging__accessLog"] = "true"
        env["keyConnectorSettings__audit__file"] = str(tmp_path / "audit.jsonl")
        service = start_service(env)
    finally:
        os.umask(previous)
    user = uuid.uuid4()
    headers = {**_bearer(issuer.mint(user)), "Content-Type": "application/json"}
    with service.client() as client:
        assert client.post("/user-keys", headers=headers, json={"key": _key()}).status_code == 200
        assert client.get("/user-keys", headers=headers).status_code == 200
    deadline = time.monotonic() + 5
    names = ["kc.db", "kc.db-wal", "kc.db-shm", "service.log", "audit.jsonl"]
    while time.monotonic() < deadline and not all((tmp_path / name).exists() for name in names):
        time.sleep(0.1)
    modes = {name: oct(_mode(tmp_path / name)) for name in names}
    assert modes == dict.fromkeys(names, oct(0o600)), modes


def test_permission_warnings_name_the_tls_key_audit_and_log_files(
    start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> None:
    tls = local_tls_files(tmp_path)
    key = tls.key
    audit = tmp_path / "audit.jsonl"
    audit.write_text("")
    log_file = tmp_path / "service.log"
    log_file.write_text("")
    for path in (key, audit, log_file):
        path.chmod(0o644)
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__audit__file"] = str(audit)
    env["keyConnectorSettings__logging__file"] = str(log_file)
    service = start_service(env, extra_args=("--tls-cert", str(tls.certificate), "--tls-key", str(key)))
    with httpx.Client(verify=False) as client:
        assert client.get(service.url + "/health/live").status_code == 200
    logs = service.logs() + log_file.read_text()
    assert f"{key} (--tls-key) can be accessed by its group and other users" in logs
    assert f"{audit} (keyConnectorSettings__audit__file) can be accessed" in logs
    assert f"{log_file} (keyConnectorSettings__logging__file) can be accessed" in logs
