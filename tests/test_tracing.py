"""OpenTelemetry traces and request ids in logs, through a real `keyconnector serve`.

The traces go to a real OTLP/HTTP receiver in the test (the collector's wire format: protobuf
``ExportTraceServiceRequest`` posted to ``/v1/traces``), so what is checked is what a collector would
get, not what the SDK was asked to do.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service, base_env


class Receiver:
    """An OTLP/HTTP trace receiver: keeps every span it is sent, with its resource attributes."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for resource_spans in request.resource_spans:
                        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                attributes = {
                                    a.key: a.value.string_value or a.value.int_value for a in span.attributes
                                }
                                receiver.spans.append(
                                    {
                                        "name": span.name,
                                        "trace_id": span.trace_id.hex(),
                                        "span_id": span.span_id.hex(),
                                        "parent_span_id": span.parent_span_id.hex(),
                                        "kind": span.kind,
                                        "status": span.status.code,
                                        "attributes": attributes,
                                        "resource": resource,
                                    }
                                )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, name: str, count: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [span for span in self.spans if span["name"] == name]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no span {name!r} arrived; got {[s['name'] for s in self.spans]}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.server.shutdown()
    running.server.server_close()


def test_requests_are_traced_and_continue_the_callers_trace(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, receiver: Receiver
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env.update(
        {
            "keyConnectorSettings__tracing__enabled": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "kc-under-test",
        }
    )
    service = Service(env, tmp_path / "service.log", workers=2).start()
    try:
        user = uuid.uuid4()
        token = issuer.mint(user)
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
        with service.client() as client:
            posted = client.post(
                "/user-keys",
                json={"key": key},
                headers={
                    "Authorization": f"Bearer {token}",
                    "traceparent": f"00-{caller_trace}-{caller_span}-01",
                },
            )
            assert posted.status_code == 200
            got = client.get("/user-keys", headers={"Authorization": f"Bearer {token}"})
            assert got.status_code == 200
            assert client.get("/no/such/path/" + secrets.token_hex(4)).status_code == 404

        post_span = receiver.wait_for("POST /user-keys")[0]
        assert post_span["trace_id"] == caller_trace
        assert post_span["parent_span_id"] == caller_span
        assert post_span["attributes"]["http.response.status_code"] == 200
        assert post_span["attributes"]["http.route"] == "/user-keys"
        assert post_span["attributes"]["keyconnector.request_id"] == posted.headers["x-request-id"]
        assert post_span["resource"]["service.name"] == "kc-under-test"

        get_span = receiver.wait_for("GET /user-keys")[0]
        assert get_span["trace_id"] != caller_trace  # no traceparent: a trace of its own
        assert get_span["attributes"]["keyconnector.request_id"] == got.headers["x-request-id"]
        # The database read of the GET is a child of its span.
        reads = receiver.wait_for("database get_key", count=1)
        assert any(
            read["trace_id"] == get_span["trace_id"] and read["parent_span_id"] == get_span["span_id"]
            for read in reads
        )
        assert reads[0]["attributes"]["db.system"] == "sqlite"
        writes = receiver.wait_for("database create_key")
        assert writes[0]["trace_id"] == caller_trace
        # Each worker unwrapped the data key at start, outside any request.
        unwraps = receiver.wait_for("key provider unwrap", count=2)
        assert all(span["parent_span_id"] == "" for span in unwraps)
        # A scanner's paths do not become span names.
        receiver.wait_for("GET unmatched")
    finally:
        service.stop()
    everything = json.dumps(receiver.spans)
    assert str(user) not in everything and token not in everything and key not in everything


def test_tracing_without_its_package_names_the_extra(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    """The serve command with tracing on, in an interpreter where the SDK cannot be imported."""
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__tracing__enabled"] = "true"
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    # A sitecustomize that hides the OpenTelemetry SDK, as if the extra were not installed.
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'opentelemetry.sdk' or name.startswith('opentelemetry.sdk.'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, _Hide())\n"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "keyconnector", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "keyConnectorSettings__tracing__enabled" in result.stderr
    assert "pip install 'keyconnector[otel]'" in result.stderr


def test_log_lines_written_during_a_request_carry_its_id(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    """An error logged while handling a request can be matched with the answer the client got."""
    database = tmp_path / "kc.db"
    env = base_env(issuer, pfx, database)
    env["keyConnectorSettings__logging__format"] = "json"
    service = Service(env, tmp_path / "service.log").start()
    try:
        user = uuid.uuid4()
        headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
        with service.client() as client:
            key = base64.b64encode(secrets.token_bytes(32)).decode()
            assert client.post("/user-keys", json={"key": key}, headers=headers).status_code == 200
            # Damage the stored record: the next read is refused and logged as an error.
            with sqlite3.connect(database) as db:
                (record,) = db.execute('SELECT "Key" FROM "UserKeys"').fetchone()
                prefix, payload = record.rsplit(":", 1)
                damaged = bytearray(base64.b64decode(payload))
                damaged[-1] ^= 1
                db.execute(
                    'UPDATE "UserKeys" SET "Key" = ?', (f"{prefix}:{base64.b64encode(damaged).decode()}",)
                )
            answer = client.get("/user-keys", headers={**headers, "X-Request-Id": "probe-4711"})
        assert answer.status_code == 500
        assert answer.headers["x-request-id"] == "probe-4711"
    finally:
        service.stop()
    lines = [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]
    errors = [line for line in lines if line["level"] == "error" and line["logger"] == "keyconnector.http"]
    assert errors, service.logs()
    assert errors[-1]["request_id"] == "probe-4711"
    access = [line for line in lines if line["logger"] == "keyconnector.access" and line["status"] == 500]
    assert access[-1]["request_id"] == "probe-4711"
    # Lines outside any request carry none.
    assert all("request_id" not in line for line in lines if line["logger"] == "keyconnector.server")
