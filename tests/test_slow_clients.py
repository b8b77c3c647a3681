"""Idle and slow clients cannot hold the service: raw sockets against a real ``keyconnector serve``.

Each test opens connections the way an attacker (or a broken client) would: saying nothing,
sending half a request head, trickling a body one byte a second, or running many requests at once
under one user's token. The service is started with short timeouts so that a closure is seen within
seconds; the assertions allow the configured time plus a few seconds, never a tight measurement.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.devtools.tls import local_tls_files
from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import load_settings
from tests.conftest import Pfx, Service, base_env

HEADER_TIMEOUT = 2
BODY_TIMEOUT = 3
PER_USER = 2
SLACK = 4.0
"""Seconds allowed beyond a configured time: scheduling on a busy test machine, not a measurement."""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, pfx: Pfx) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("slow")
    env = base_env(issuer, pfx, folder / "kc.db")
    env["keyConnectorSettings__http__headerTimeoutSeconds"] = str(HEADER_TIMEOUT)
    env["keyConnectorSettings__http__bodyTimeoutSeconds"] = str(BODY_TIMEOUT)
    env["keyConnectorSettings__http__maxRequestsInFlightPerUser"] = str(PER_USER)
    running = Service(env, folder / "service.log").start()
    yield running
    running.stop()


def _connect(service: Service) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[float, bytes]:
    """Reads until the server closes the connection: (seconds it took, everything received).

    Fails when the connection is still open after ``seconds``.
    """
    started = time.monotonic()
    received = b""
    sock.settimeout(0.2)
    while time.monotonic() - started < seconds:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - started, received
        if not chunk:
            return time.monotonic() - started, received
        received += chunk
    raise AssertionError(f"the connection was still open after {seconds} s (received {received[:200]!r})")


def _body(key: bytes) -> bytes:
    return json.dumps({"key": base64.b64encode(key).decode()}).encode()


def _head(method: str, token: str, length: int) -> bytes:
    return (
        f"{method} /user-keys HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _get_key(service: Service, token: str) -> httpx.Response:
    return httpx.get(service.url + "/user-keys", headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_a_connection_that_sends_nothing_is_closed(service: Service) -> None:
    with _connect(service) as sock:
        took, received = _closed_within(sock, HEADER_TIMEOUT + SLACK)
    assert took >= HEADER_TIMEOUT - 0.5, "closed before the header timeout: the timeout is not the setting"
    assert not received.startswith(b"HTTP/1.1 2")


def test_an_idle_keep_alive_connection_is_closed(service: Service) -> None:
    with _connect(service) as sock:
        sock.sendall(b"GET /alive HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        took, _ = _closed_within(sock, HEADER_TIMEOUT + SLACK)
    assert took >= HEADER_TIMEOUT - 1.0


def test_half_a_request_head_is_closed_after_the_header_timeout(service: Service) -> None:
    with _connect(service) as sock:
        sock.sendall(b"GET /user-keys HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bea")
        _closed_within(sock, HEADER_TIMEOUT + SLACK)


def test_a_trickling_put_gets_408_and_leaves_the_key_unchanged(service: Service, issuer: DevIssuer) -> None:
    user = uuid.uuid4()
    token = issuer.mint(user)
    stored = secrets.token_bytes(32)
    created = httpx.post(
        service.url + "/user-keys",
        json={"key": base64.b64encode(stored).decode()},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert created.status_code == 200, created.text
    replacement = _body(secrets.token_bytes(32))
    answer = b""
    with _connect(service) as sock:
        sock.sendall(_head("PUT", token, len(replacement)))
        started = time.monotonic()
        sent = 0
        try:
            # One byte a second: the whole body would take a minute, far beyond the deadline.
            while time.monotonic() - started < BODY_TIMEOUT + SLACK and sent < len(replacement) - 1:
                sock.sendall(replacement[sent : sent + 1])
                sent += 1
                sock.settimeout(1.0)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the server: allowed, as long as it happened before the deadline below
        took = time.monotonic() - started
        if b"\r\n\r\n" in answer:
            _closed_within(sock, SLACK)  # after the 408, the connection is not kept
    assert took < BODY_TIMEOUT + SLACK, "the trickling body was still being read after the deadline"
    assert sent < len(replacement) - 1
    if answer:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        payload = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert "keyConnectorSettings__http__bodyTimeoutSeconds" in payload["message"]
    read = _get_key(service, token)
    assert read.status_code == 200 and base64.b64decode(read.json()["key"]) == stored


def test_requests_in_flight_per_user_are_capped_and_other_users_are_served(
    service: Service, issuer: DevIssuer
) -> None:
    busy, other = uuid.uuid4(), uuid.uuid4()
    busy_token = issuer.mint(busy)
    body = _body(secrets.token_bytes(32))
    holders = []
    try:
        for _ in range(PER_USER):  # PUTs whose bodies are held back: in flight until the body deadline
            sock = _connect(service)
            sock.sendall(_head("PUT", busy_token, len(body)) + body[:5])
            holders.append(sock)
        time.sleep(0.5)  # they have reached the endpoint and passed the token check
        refused = _get_key(service, busy_token)
        assert refused.status_code == 429, refused.text
        assert "keyConnectorSettings__http__maxRequestsInFlightPerUser" in refused.json()["message"]
        assert refused.headers["retry-after"]
        served = _get_key(service, issuer.mint(other))
        assert served.status_code == 404, served.text  # served: this user has no key
    finally:
        for sock in holders:
            sock.close()
    # The held requests end (closed by their clients): their places are given back.
    deadline = time.monotonic() + BODY_TIMEOUT + SLACK
    while True:
        again = _get_key(service, busy_token)
        if again.status_code == 404 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again.status_code == 404, again.text


def test_a_client_that_gives_up_mid_body_is_no_error(service: Service, issuer: DevIssuer) -> None:
    """A mobile client losing its network mid-PUT is ordinary: no ERROR, no traceback, nothing written."""
    user = uuid.uuid4()
    token = issuer.mint(user)
    body = _body(secrets.token_bytes(32))
    with _connect(service) as sock:
        sock.sendall(_head("PUT", token, len(body)) + body[:5])
        time.sleep(0.5)  # the endpoint is reading the body
    deadline = time.monotonic() + SLACK
    while str(user) not in service.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in service.logs().splitlines() if str(user) in line or "Traceback" in line]
    assert lines and all("ERROR" not in line and "Traceback" not in line for line in lines), lines
    assert _get_key(service, token).status_code == 404


def test_only_http_1_1_is_spoken(service: Service) -> None:
    """One request at a time per connection: an HTTP/2 preface (h2c) is not answered with HTTP/2 frames."""
    with _connect(service) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        _, received = _closed_within(sock, SLACK)
    # An HTTP/2 server's first frame is its SETTINGS frame: type 0x04 at byte 3.
    assert not (len(received) >= 9 and received[3] == 0x04), received[:40]


TLS_HANDSHAKE_SECONDS = 10
"""granian's own deadline for a TLS handshake (not configurable): a client that opens a connection and
never says hello is closed then."""


def test_over_tls_silent_and_idle_connections_are_closed_and_only_http_1_1_is_offered(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx
) -> None:
    tls_files = local_tls_files(tmp_path)
    cert, key = tls_files.certificate, tls_files.key
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__http__headerTimeoutSeconds"] = str(HEADER_TIMEOUT)
    service = Service(
        env, tmp_path / "service.log", extra_args=("--tls-cert", str(cert), "--tls-key", str(key))
    )
    service.start()
    try:
        context = ssl.create_default_context(cafile=str(tls_files.ca))
        context.set_alpn_protocols(["h2", "http/1.1"])
        with context.wrap_socket(_connect(service), server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() in (None, "http/1.1")
            took, _ = _closed_within(tls, HEADER_TIMEOUT + SLACK)  # handshake done, no request: idle
        assert took >= HEADER_TIMEOUT - 1.0
        with _connect(service) as silent:  # not even a ClientHello
            _closed_within(silent, TLS_HANDSHAKE_SECONDS + SLACK)
    finally:
        service.stop()


def test_the_settings_are_checked(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    for name, value in (("headerTimeoutSeconds", "0"), ("bodyTimeoutSeconds", "-1")):
        env = base_env(issuer, pfx, tmp_path / "kc.db")
        env[f"keyConnectorSettings__http__{name}"] = value
        with pytest.raises(ConfigurationError) as caught:
            load_settings(env)
        assert f"keyConnectorSettings__http__{name}" in str(caught.value)
