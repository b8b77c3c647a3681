"""Graceful drain through a real `keyconnector serve` with two workers.

SIGTERM goes to the server's main process only, as Docker, Kubernetes (PID 1) and systemd with
``KillMode=mixed`` send it. A request that is running when the signal arrives is one whose body is
still on its way: the test holds the body back, so the request is provably in flight, not merely
probably.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx

from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service, base_env


def _start(tmp_path: Path, issuer: DevIssuer, pfx: Pfx, drain_seconds: float) -> Service:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__shutdown__drainSeconds"] = str(drain_seconds)
    return Service(env, tmp_path / "service.log", workers=2).start()


def _open_slow_post(service: Service, token: str, body: bytes) -> socket.socket:
    """A POST whose headers and half of whose body have been sent: the worker is waiting in it."""
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    head = (
        f"POST /user-keys HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def _status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def _wait_for_refusal(service: Service, token: str, timeout: float = 5) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = httpx.get(
            service.url + "/user-keys", headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
        if answer.status_code == 503:
            return answer
        time.sleep(0.05)
    raise AssertionError("new requests were still served after SIGTERM")


def test_in_flight_requests_finish_and_new_ones_get_503(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    service = _start(tmp_path, issuer, pfx, drain_seconds=20)
    assert service.process is not None
    slow_user, other_user = uuid.uuid4(), uuid.uuid4()
    key = secrets.token_bytes(32)
    body = json.dumps({"key": base64.b64encode(key).decode()}).encode()
    sock = _open_slow_post(service, issuer.mint(slow_user), body)
    time.sleep(0.3)  # the request has reached a worker

    os.kill(service.process.pid, signal.SIGTERM)
    refused = _wait_for_refusal(service, issuer.mint(other_user))
    assert "shutting down" in refused.json()["message"]
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"
    assert refused.headers["x-request-id"]  # refused requests are logged like any other
    ready = httpx.get(service.url + "/health/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert httpx.get(service.url + "/health/live", timeout=5).status_code == 200
    assert service.process.poll() is None, "the server stopped with a request still running"

    sock.sendall(body[len(body) // 2 :])
    answer = sock.recv(65536)
    sock.close()
    assert _status_of(answer) == 200, answer

    service.process.wait(timeout=15)
    assert service.process.returncode == 0
    assert "drained in" in service.logs()
    service.stop()

    # The write that finished during the drain is there for the next instance.
    again = Service(service.env, tmp_path / "again.log").start()
    try:
        got = httpx.get(
            again.url + "/user-keys", headers={"Authorization": f"Bearer {issuer.mint(slow_user)}"}, timeout=5
        )
        assert got.status_code == 200
        assert base64.b64decode(got.json()["key"]) == key
    finally:
        again.stop()


def test_an_idle_service_stops_at_once(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    service = _start(tmp_path, issuer, pfx, drain_seconds=20)
    assert service.process is not None
    started = time.monotonic()
    os.kill(service.process.pid, signal.SIGTERM)
    service.process.wait(timeout=15)
    elapsed = time.monotonic() - started
    service.stop()
    assert service.process.returncode == 0
    assert elapsed < 8, f"an idle service took {elapsed:.1f}s to stop"


def test_the_drain_is_bounded(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    """A request that never finishes does not hold the process beyond drainSeconds (plus the
    workers' own stop time)."""
    service = _start(tmp_path, issuer, pfx, drain_seconds=1)
    assert service.process is not None
    body = json.dumps({"key": base64.b64encode(secrets.token_bytes(32)).decode()}).encode()
    sock = _open_slow_post(service, issuer.mint(uuid.uuid4()), body)
    time.sleep(0.3)
    started = time.monotonic()
    os.kill(service.process.pid, signal.SIGTERM)
    try:
        service.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        service.stop(signal.SIGKILL)
        raise AssertionError("a stuck request held the server past its drain time") from None
    finally:
        sock.close()
    elapsed = time.monotonic() - started
    service.stop()
    assert elapsed >= 1
    assert "drain took longer than 1s (keyConnectorSettings__shutdown__drainSeconds)" in service.logs()


def test_a_second_signal_stops_without_waiting(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    service = _start(tmp_path, issuer, pfx, drain_seconds=60)
    assert service.process is not None
    body = json.dumps({"key": base64.b64encode(secrets.token_bytes(32)).decode()}).encode()
    sock = _open_slow_post(service, issuer.mint(uuid.uuid4()), body)
    time.sleep(0.3)
    os.kill(service.process.pid, signal.SIGTERM)
    _wait_for_refusal(service, issuer.mint(uuid.uuid4()))
    started = time.monotonic()
    os.kill(service.process.pid, signal.SIGINT)
    try:
        service.process.wait(timeout=30)
    finally:
        sock.close()
        service.stop()
    assert time.monotonic() - started < 20
