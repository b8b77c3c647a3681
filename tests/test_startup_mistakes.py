"""Start-up mistakes against the real ``keyconnector serve``: each ends in one clear line, exit 2,
before anything is written or "listening" is said; two servers never share a port; a clean stop
logs no error.

"Nothing written" is checked on the SQLite file itself: the first write of ``serve`` is the schema
migration, which creates it.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service, base_env


def _serve(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _refused(result: subprocess.CompletedProcess[str], database: Path, *named: str) -> str:
    """Exit 2, exactly one error line naming each of ``named``, no traceback, nothing written."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and "panicked" not in output, output
    assert "listening" not in output.lower(), output
    errors = [line for line in result.stderr.splitlines() if line.startswith("keyconnector:")]
    assert len(errors) == 1, output
    for name in named:
        assert name in errors[0], errors[0]
    assert not database.exists(), f"serve wrote {database} before refusing"
    return errors[0]


def _pair(folder: Path, *, days: tuple[int, int] = (-1, 30), other_key: bool = False) -> tuple[Path, Path]:
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0]))
        .not_valid_after(now + dt.timedelta(days=days[1]))
        .sign(key, hashes.SHA256())
    )
    if other_key:
        key = rsa.generate_private_key(65537, 2048)
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_a_port_held_by_another_program(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    database = tmp_path / "kc.db"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _serve(base_env(issuer, pfx, database), "--port", str(port))
    line = _refused(result, database, "--port", f"127.0.0.1:{port}", "ss -ltnp")
    assert "already in use" in line


def test_a_second_serve_on_the_same_port_is_refused_and_the_first_keeps_the_traffic(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx
) -> None:
    first = Service(base_env(issuer, pfx, tmp_path / "first.db"), tmp_path / "first.log", workers=2).start()
    try:
        second_db = tmp_path / "second.db"
        result = _serve(base_env(issuer, pfx, second_db), "--port", str(first.port), "--workers", "2")
        _refused(result, second_db, "--port", f"127.0.0.1:{first.port}", "already in use")
        # Every connection reaches the first service (a shared port would split them).
        for _ in range(40):
            with httpx.Client(timeout=5) as client:
                assert client.get(first.url + "/alive").status_code == 200
        assert first.process is not None and first.process.poll() is None
    finally:
        first.stop()


@pytest.mark.parametrize("port", ["99999", "0"])
def test_a_port_out_of_range(tmp_path: Path, issuer: DevIssuer, pfx: Pfx, port: str) -> None:
    database = tmp_path / "kc.db"
    result = _serve(base_env(issuer, pfx, database), "--port", port)
    _refused(result, database, "--port", port, "1 to 65535")


def test_a_port_out_of_range_in_aspnetcore_urls(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    database = tmp_path / "kc.db"
    env = base_env(issuer, pfx, database) | {"ASPNETCORE_URLS": "http://+:99999"}
    _refused(_serve(env), database, "ASPNETCORE_URLS", "1 to 65535")


def test_no_workers(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    database = tmp_path / "kc.db"
    result = _serve(base_env(issuer, pfx, database), "--port", str(free_port()), "--workers", "0")
    _refused(result, database, "--workers", "1 or more")


def test_a_host_that_does_not_resolve(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    database = tmp_path / "kc.db"
    result = _serve(
        base_env(issuer, pfx, database), "--host", "no-such-host.invalid", "--port", str(free_port())
    )
    _refused(result, database, "--host", "no-such-host.invalid")


def test_a_tls_key_that_is_not_the_certificates(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    database = tmp_path / "kc.db"
    cert, key = _pair(tmp_path, other_key=True)
    result = _serve(
        base_env(issuer, pfx, database),
        "--port",
        str(free_port()),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    )
    _refused(result, database, "--tls-key", "not the private key")


def test_an_unreadable_tls_certificate(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    database = tmp_path / "kc.db"
    _, key = _pair(tmp_path)
    missing = tmp_path / "missing.crt"
    result = _serve(
        base_env(issuer, pfx, database),
        "--port",
        str(free_port()),
        "--tls-cert",
        str(missing),
        "--tls-key",
        str(key),
    )
    _refused(result, database, "--tls-cert", str(missing), "cannot read")


def test_a_tls_certificate_that_is_not_pem(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    database = tmp_path / "kc.db"
    _, key = _pair(tmp_path)
    result = _serve(
        base_env(issuer, pfx, database),
        "--port",
        str(free_port()),
        "--tls-cert",
        str(key),
        "--tls-key",
        str(key),
    )
    _refused(result, database, "--tls-cert", "no PEM certificate")


def test_an_expired_tls_certificate_names_its_dates(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    database = tmp_path / "kc.db"
    cert, key = _pair(tmp_path, days=(-30, -2))
    result = _serve(
        base_env(issuer, pfx, database),
        "--port",
        str(free_port()),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    )
    expired = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).strftime("%Y-%m-%d")
    _refused(result, database, "--tls-cert", "has expired", expired)


@pytest.mark.parametrize("uri", ["htps://identity.example.com", "https//identity.example.com", "https://"])
def test_an_identity_url_with_a_typo(tmp_path: Path, issuer: DevIssuer, pfx: Pfx, uri: str) -> None:
    database = tmp_path / "kc.db"
    env = base_env(issuer, pfx, database) | {"keyConnectorSettings__identityServerUri": uri}
    _refused(
        _serve(env, "--port", str(free_port())), database, "keyConnectorSettings__identityServerUri", uri
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_clean_stop_logs_no_error(tmp_path: Path, issuer: DevIssuer, pfx: Pfx, sig: signal.Signals) -> None:
    """The signal goes to the whole process group, as Ctrl-C in a terminal and systemd's default
    ``KillMode=control-group`` send it: the workers get it as well as the parent."""
    service = Service(base_env(issuer, pfx, tmp_path / "kc.db"), tmp_path / "service.log", workers=2).start()
    assert service.process is not None
    time.sleep(0.5)
    service.stop(sig)
    logs = service.logs()
    assert service.process.returncode == 0, logs
    assert "[ERROR]" not in logs and "Unexpected exit" not in logs, logs
    assert "Respawning" not in logs, logs


def test_a_killed_worker_is_respawned_on_the_same_socket(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    """The workers serve on the parent's socket: a respawned one must get it too (it is sent to the
    new process, not named by a descriptor number that means nothing there)."""
    service = Service(base_env(issuer, pfx, tmp_path / "kc.db"), tmp_path / "service.log", workers=1).start()
    try:
        assert service.process is not None
        workers = _workers(service.process.pid)
        assert len(workers) == 1, workers
        os.kill(int(workers[0]), signal.SIGKILL)
        deadline = time.monotonic() + 30
        answered = False
        while time.monotonic() < deadline and not answered:
            try:
                answered = httpx.get(service.url + "/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                time.sleep(0.1)
        assert answered, service.logs()
        assert "Unexpected exit from worker-1" in service.logs()  # a real crash is still reported
        assert _workers(service.process.pid) not in ([], workers), service.logs()
    finally:
        service.stop()


def _workers(parent: int) -> list[str]:
    """The worker processes of a ``serve`` (spawned interpreters), by pid."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
