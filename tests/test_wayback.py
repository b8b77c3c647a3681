"""Issue 14: the way back to upstream stays visible, CORS is not off by omission, and ``pathBase``.

Against real ``keyconnector serve`` processes and the real ``check`` and ``stats`` commands:

- a database holding upstream-format records while ``compat.writeLegacyFormat`` is off: one WARNING
  at start (in the parent, not per worker) and a ``warn`` line in ``check``, naming the setting that
  keeps the way back open; none with the setting on;
- no ``webVaultUri``: a warning in the serve log and in ``check``, naming the setting;
- ``pathBase``: a proxy forwarding ``/key-connector/...`` unstripped is served, the unprefixed health
  probe keeps answering, and the access log and metrics name the unprefixed route.
"""

from __future__ import annotations

import base64
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.runtime.settings import load_settings
from tests.conftest import Pfx, Service, base_env

StartService = Callable[..., Service]
WRITE_LEGACY = "keyConnectorSettings__compat__writeLegacyFormat"
WEB_VAULT_SETTING = "keyConnectorSettings__webVaultUri"


def keyconnector(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The real command, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", *args], env=env, capture_output=True, text=True, timeout=60
    )


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


# -- pathBase ---------------------------------------------------------------------------------------------


def test_path_base_serves_the_prefixed_paths_and_keeps_the_unprefixed_probes(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: StartService
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__pathBase"] = "/key-connector/"
    env["keyConnectorSettings__logging__accessLog"] = "true"
    service = start_service(env)
    user = uuid.uuid4()
    headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
    key = new_key()
    with service.client() as client:
        created = client.post("/key-connector/user-keys", json={"key": key}, headers=headers)
        assert created.status_code == 200, created.text
        read = client.get("/key-connector/user-keys", headers=headers)
        assert read.status_code == 200, read.text
        assert read.json()["key"] == key
        # A proxy that strips the prefix, and the orchestrator's probes, need no prefix.
        assert client.get("/user-keys", headers=headers).json()["key"] == key
        for probe in ("/health", "/health/live", "/alive", "/key-connector/health", "/key-connector/alive"):
            assert client.get(probe).status_code == 200, probe
        assert client.get("/key-connector//user-keys/", headers=headers).status_code == 200
        # Only whole segments: '/key-connectorX' is not the prefix.
        wrong = client.get("/key-connectorX/user-keys", headers=headers)
        assert wrong.status_code == 404
        assert "/key-connectorX/user-keys" in wrong.json()["message"]
        metrics = client.get("/metrics").text
    routes = {line.split('route="')[1].split('"')[0] for line in metrics.splitlines() if 'route="' in line}
    assert "/user-keys" in routes and "/health" in routes
    assert not [route for route in routes if route.startswith("/key-connector")], routes
    service.stop()
    logged = service.logs()
    assert "/user-keys" in logged
    # The access log names the route once, unprefixed, except the refused '/key-connectorX' request.
    assert "/key-connector/user-keys" not in logged


@pytest.mark.parametrize("value", ["key-connector", "/key-connector?x=1", "/a//b", "/a/../b", "/a b"])
def test_a_malformed_path_base_stops_serve_naming_the_setting(
    value: str, tmp_path: Path, issuer: DevIssuer, pfx: Pfx
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__pathBase"] = value
    result = keyconnector("serve", "--port", "1", env=env)
    assert result.returncode == 2, result.stderr
    assert "keyConnectorSettings__pathBase" in result.stderr, result.stderr
    assert "must be a path prefix like /key-connector" in result.stderr, result.stderr
    assert not (tmp_path / "kc.db").exists()


@pytest.mark.parametrize(("value", "expected"), [("/", None), ("", None), ("/kc/", "/kc"), ("/a/b", "/a/b")])
def test_path_base_has_one_form(value: str, expected: str | None) -> None:
    settings = load_settings({"keyConnectorSettings__pathBase": value}).settings
    assert settings.path_base == expected
