"""Prometheus metrics through real `keyconnector serve` processes, scraped and parsed as Prometheus would.

The services run two workers, so a scrape answered by one of them must still add up what both did
(prometheus_client's multiprocess mode, set up by the server's parent process).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import Settings
from keyconnector.telemetry.metrics import LATENCY_BUCKETS, DeferredHistogram, start_parent_side
from tests.conftest import Pfx, Service, base_env
from tests.support.moto_kms import isolated_aws_files, kms_provider_env

StartService = Callable[..., Service]
KEY = base64.b64encode(bytes(range(32))).decode()
Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for n, found, v in samples if n == name and labels.items() <= found.items())


def eventually(url: str, check: Callable[[Samples], bool], seconds: float = 10) -> Samples:
    """Scrape until ``check`` holds: mirrored counters are copied once a second per worker."""
    deadline = time.monotonic() + seconds
    while True:
        samples = scrape(url)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def per_worker(folder: Path, tmp: Path) -> dict[str, Samples]:
    """Each worker's own values, read from its files alone (the multiprocess directory holds one
    set of files per process id)."""
    found: dict[str, Samples] = {}
    for file in folder.glob("counter_*.db"):
        pid = file.stem.removeprefix("counter_")
        alone = tmp / f"worker-{pid}"
        alone.mkdir(parents=True)
        shutil.copy(file, alone / file.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
        found[pid] = [(s.name, dict(s.labels), s.value) for m in registry.collect() for s in m.samples]
    return found


def both_workers_listening(service: Service, folder: Path, tmp: Path, seconds: float = 20) -> None:
    """Wait until each of two workers has answered a request: the service is ready once one is, and a
    worker still starting would leave the kernel only the other to give connections to."""
    deadline = time.monotonic() + seconds
    seen: set[str] = set()
    attempt = 0
    while len(seen) < 2 and time.monotonic() < deadline:
        for _ in range(8):  # fresh connections, which the kernel spreads over the listening workers
            assert httpx.get(service.url + "/health/live", timeout=10).status_code == 200
        attempt += 1
        seen = {
            pid
            for pid, own in per_worker(folder, tmp / f"probe-{attempt}").items()
            if value(own, "keyconnector_http_requests_total", route="/health/live")
        }
        time.sleep(0.1)
    assert len(seen) == 2, f"the second worker never answered: {seen}"


def test_two_workers_add_up(start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path) -> None:
    folder = tmp_path / "multiproc"  # the operator's own directory: used as it is, and left in place
    folder.mkdir()
    unwritable = tmp_path / "a-file"
    unwritable.write_text("")
    env = base_env(issuer, pfx, tmp_path / "kc.db") | {
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "keyConnectorSettings__audit__file": str(unwritable / "audit.log"),  # ENOTDIR: every entry fails
        "keyConnectorSettings__rateLimit__perUserPerMinute": "1",
        "keyConnectorSettings__rateLimit__perUserBurst": "2",
    }
    service = start_service(env, workers=2)
    both_workers_listening(service, folder, tmp_path)
    users = [uuid.uuid4() for _ in range(12)]
    tokens = {user: issuer.mint(user) for user in users}

    def store_and_read(user: uuid.UUID) -> list[int]:
        # A client per user: separate connections, which the kernel spreads over the workers.
        with service.client() as client:
            auth = {"Authorization": f"Bearer {tokens[user]}"}
            stored = client.post("/user-keys", headers=auth, json={"key": KEY}).status_code
            read = client.get("/user-keys", headers=auth).status_code
            return [stored, read]

    with ThreadPoolExecutor(6) as pool:
        statuses = [status for pair in pool.map(store_and_read, users) for status in pair]
    assert statuses == [200] * 24
    limited = users[0]
    with service.client() as client:
        auth = {"Authorization": f"Bearer {tokens[limited]}"}
        # Two more reads of one user: its bucket (burst 2) is empty in whichever worker served it
        # twice already; with two workers, five more requests meet an empty bucket at least once.
        limited_statuses = [client.get("/user-keys", headers=auth).status_code for _ in range(5)]
        assert client.get("/user-keys").status_code == 401
        assert client.get(f"/no/such/{limited}").status_code == 404
    rejected = limited_statuses.count(429)
    assert rejected >= 1 and set(limited_statuses) <= {200, 429}

    user_keys_requests = 24 + 5 + 1
    samples = eventually(
        service.url + "/metrics",
        lambda s: (
            value(s, "keyconnector_audit_unrecorded_entries_total") >= user_keys_requests
            and value(s, "keyconnector_token_cache_lookups_total", result="hit") >= 12
            and value(s, "keyconnector_http_requests_total", route="/user-keys") >= user_keys_requests
        ),
    )
    requests = "keyconnector_http_requests_total"
    assert value(samples, requests, route="/user-keys", method="POST", status="200") == 12
    assert value(samples, requests, route="/user-keys", method="GET", status="200") == 12 + 5 - rejected
    assert value(samples, requests, route="/user-keys", method="GET", status="429") == rejected
    assert value(samples, requests, route="/user-keys", method="GET", status="401") == 1
    assert value(samples, requests, route="unmatched", method="GET", status="404") == 1
    histogram = "keyconnector_http_request_duration_seconds"
    assert value(samples, histogram + "_count", route="/user-keys", method="GET") == 12 + 5 + 1
    assert value(samples, histogram + "_bucket", route="/user-keys", method="GET", le="+Inf") == 18
    assert value(samples, histogram + "_sum", route="/user-keys", method="GET") > 0
    assert value(samples, "keyconnector_rate_limit_rejections_total", limit="perUserPerMinute") == rejected
    # The sink also counts its failed open (one per worker) besides every entry it could not write.
    assert value(samples, "keyconnector_audit_failures_total", sink="file") >= user_keys_requests
    assert value(samples, "keyconnector_audit_unrecorded_entries_total") == user_keys_requests
    assert value(samples, "keyconnector_token_validation_failures_total", reason="missing") == 1
    assert value(samples, "keyconnector_token_cache_lookups_total", result="hit") >= 12
    assert value(samples, "keyconnector_token_cache_lookups_total", result="miss") >= 12
    database = "keyconnector_database_operation_duration_seconds_count"
    assert value(samples, database, backend="sqlite", operation="get_key") == 12 + 5 - rejected
    assert value(samples, database, backend="sqlite", operation="create_key") == 12
    assert value(samples, database, backend="sqlite", operation="get_key_ring") >= 2  # a load per worker
    provider = "keyconnector_key_provider_operation_duration_seconds_count"
    # The data key, unwrapped once by each worker.
    assert value(samples, provider, provider="certificate", operation="unwrap") >= 2
    assert value(samples, "keyconnector_key_provider_errors_total") == 0
    assert value(samples, "keyconnector_database_errors_total") == 0
    assert [labels["version"] for n, labels, v in samples if n == "keyconnector_build_info" and v == 1]

    # No label may carry a user id, a token or the client's address.
    secrets = {str(user) for user in users} | set(tokens.values()) | {"127.0.0.1"}
    for name, labels, _ in samples:
        for label in labels.values():
            assert not any(secret in label for secret in secrets), (name, labels)

    # Both workers served, and the scrape added them up.
    workers = {
        pid: value(own, requests, route="/user-keys")
        for pid, own in per_worker(folder, tmp_path).items()
        if value(own, requests, route="/user-keys")
    }
    assert len(workers) == 2, f"one worker served everything: {workers}"
    assert sum(workers.values()) == value(samples, requests, route="/user-keys") == 12 + 12 + 5 + 1
    service.stop()
    assert folder.is_dir(), "an operator's PROMETHEUS_MULTIPROC_DIR is not ours to remove"


def test_separate_port(start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path) -> None:
    port = free_port()
    scratch = tmp_path / "tmp"  # the service's TMPDIR: where its private metrics directory goes
    scratch.mkdir()
    env = base_env(issuer, pfx, tmp_path / "kc.db") | {
        "TMPDIR": str(scratch),
        "keyConnectorSettings__metrics__port": str(port),
        "keyConnectorSettings__metrics__host": "127.0.0.1",
    }
    service = start_service(env, workers=2)
    with service.client() as client:
        refused = client.get("/metrics")
        assert refused.status_code == 404
        assert f"port {port}" in refused.json()["message"]
        assert "keyConnectorSettings__metrics__port" in refused.json()["message"]
        assert client.get("/alive").status_code == 200
    samples = eventually(
        f"http://127.0.0.1:{port}/metrics",
        lambda s: value(s, "keyconnector_http_requests_total", route="/alive") >= 1,
    )
    assert value(samples, "keyconnector_http_requests_total", route="/alive", status="200") == 1
    assert value(samples, "keyconnector_http_requests_total", route="/metrics", status="404") == 1
    private = list(scratch.glob("keyconnector-metrics-*"))
    assert len(private) == 1 and private[0].stat().st_mode & 0o777 == 0o700
    service.stop()
    assert not private[0].exists(), "the private metrics directory must go with the service"


def test_disabled(start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db") | {"keyConnectorSettings__metrics__enabled": "false"}
    service = start_service(env)
    with service.client() as client:
        refused = client.get("/metrics")
        assert refused.status_code == 404
        assert "keyConnectorSettings__metrics__enabled" in refused.json()["message"]


def test_key_provider_errors_are_counted(
    start_service: StartService, issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> None:
    """A KMS nobody answers at (a port nothing listens on): every wrap is an error, and counted."""
    provider = kms_provider_env(
        f"http://127.0.0.1:{free_port()}",
        "alias/keyconnector-test",
        symmetric=True,
        files=isolated_aws_files(tmp_path),
    )
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    for name in list(env):
        if name.startswith(("keyConnectorSettings__rsaKey__", "keyConnectorSettings__certificate__")):
            del env[name]
    service = start_service(env | provider.env, ready=False)
    with service.client() as client:
        auth = {"Authorization": f"Bearer {issuer.mint(uuid.uuid4())}"}
        assert client.post("/user-keys", headers=auth, json={"key": KEY}).status_code == 503
    samples = eventually(
        service.url + "/metrics",
        lambda s: value(s, "keyconnector_key_provider_errors_total", provider="awskms") >= 1,
    )
    assert value(samples, "keyconnector_key_provider_errors_total", provider="awskms") >= 1
    assert value(samples, "keyconnector_http_requests_total", route="/user-keys", status="503") == 1


def test_token_failure_reasons_are_a_fixed_set() -> None:
    """Every refusal carries a reason from a fixed set, decided where it is raised: the metric label
    can never be the message, let alone the token."""
    import ast
    import inspect

    from keyconnector.auth import validator

    allowed = {
        "missing",
        "malformed",
        "expired",
        "not_yet_valid",
        "bad_signature",
        "unknown_key",
        "bad_algorithm",
        "wrong_issuer",
        "policy",
    }
    tree = ast.parse(inspect.getsource(validator))
    used = {
        node.args[1].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) in {"_unauthorized", "AuthError"}
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    }
    assert used and used <= allowed, used - allowed
    assert validator._forbidden("no").reason == "policy"
    assert validator._unauthorized("no").reason == "malformed"


def test_deferred_histogram_matches_observe() -> None:
    """The deferred histogram writes prometheus_client's internals: it must give what ``observe`` gives
    (this fails first if a prometheus_client upgrade changes them)."""
    registry = CollectorRegistry()
    direct = Histogram("direct_seconds", "d", ["op"], buckets=LATENCY_BUCKETS, registry=registry)
    later = Histogram("later_seconds", "l", ["op"], buckets=LATENCY_BUCKETS, registry=registry)
    deferred = DeferredHistogram(later.labels("x"))
    for seconds in (0.0002, 0.001, 0.0011, 0.003, 0.049, 5.0, 7.5, 0.0):
        direct.labels("x").observe(seconds)
        deferred.observe(seconds)
    deferred.flush()
    deferred.flush()  # a second flush adds nothing

    def samples(prefix: str) -> list[tuple[str, dict[str, str], float]]:
        return [
            (sample.name.removeprefix(prefix), dict(sample.labels), sample.value)
            for metric in registry.collect()
            for sample in metric.samples
            if sample.name.startswith(prefix) and not sample.name.endswith("_created")
        ]

    assert samples("direct") == samples("later")
    assert ("_seconds_count", {"op": "x"}, 8.0) in samples("later")


def test_a_taken_metrics_port_names_the_setting(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # mkdtemp reads TMPDIR again
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings.model_validate(
            {"metrics": {"port": port, "host": "127.0.0.1"}, "identityServerUri": issuer.url}
        )
        with pytest.raises(ConfigurationError) as raised:
            start_parent_side(settings, "127.0.0.1")
    tempfile.tempdir = None
    assert "keyConnectorSettings__metrics__port" in str(raised.value)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert not list(tmp_path.glob("keyconnector-metrics-*")), "the private directory is removed"
