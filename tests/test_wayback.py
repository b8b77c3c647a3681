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
import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.runtime.settings import load_settings
from keyconnector.storage.base import UserKeyRecord
from keyconnector.storage.registry import migrate, open_repository
from tests.conftest import Pfx, Service, base_env
from tests.support.backends import run
from tests.support.envelopes import upstream_seal, upstream_wrap

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


# -- the way back stays visible ---------------------------------------------------------------------------


def seed_upstream_records(env: dict[str, str], pfx: Pfx, count: int, *, bound: int = 0) -> bytes:
    """A database as upstream leaves it: its wrapped data key and ``count`` records in its envelope
    (plus ``bound`` rows in format 2, as keyconnector writes them by default). The data key."""
    settings = load_settings(env).settings
    migrate(settings.database)
    data_key = secrets.token_bytes(32)
    now = datetime.now(UTC).replace(tzinfo=None)
    records = [
        UserKeyRecord(uuid.uuid4(), upstream_seal(data_key, secrets.token_bytes(32)), now, None, None)
        for _ in range(count)
    ]

    async def body() -> None:
        repository = await open_repository(settings.database)
        try:
            await repository.store_wrapped_data_key(upstream_wrap(pfx, data_key))
            await repository.upsert_records(records)
        finally:
            await repository.aclose()

    run(body())
    return data_key


def way_back_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if f"set {WRITE_LEGACY}=true to keep the way back" in line]


def test_upstream_records_without_write_legacy_format_warn_once_at_start_and_in_check(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: StartService
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    seed_upstream_records(env, pfx, 30)

    checked = keyconnector("check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = way_back_lines(checked.stdout)
    assert len(lines) == 1 and lines[0].startswith("warn way back: 30 of the first 30 records"), (
        checked.stdout
    )

    service = start_service(env, workers=2)
    user = uuid.uuid4()
    with service.client() as client:
        answer = client.post(
            "/user-keys", json={"key": new_key()}, headers={"Authorization": f"Bearer {issuer.mint(user)}"}
        )
        assert answer.status_code == 200, answer.text
    service.stop()
    lines = way_back_lines(service.logs())
    assert len(lines) == 1, service.logs()  # the parent's pre-flight, not once per worker
    assert "WARNING" in lines[0] and "upstream's format" in lines[0], lines[0]

    # The way back kept open: no warning anywhere.
    env[WRITE_LEGACY] = "true"
    checked = keyconnector("check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "way back" not in checked.stdout, checked.stdout
    quiet = start_service(env)
    quiet.stop()
    assert "way back" not in quiet.logs(), quiet.logs()


def test_a_database_without_upstream_records_gives_no_way_back_warning(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: StartService
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    service = start_service(env)
    with service.client() as client:
        headers = {"Authorization": f"Bearer {issuer.mint(uuid.uuid4())}"}
        assert client.post("/user-keys", json={"key": new_key()}, headers=headers).status_code == 200
    service.stop()
    again = start_service(env)  # now with a format-2 record in the database
    again.stop()
    checked = keyconnector("check", env=env)
    assert "way back" not in service.logs() + again.logs() + checked.stdout


# -- CORS off by omission ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "https://vault.example.com/#/login"])
def test_a_missing_or_unusable_web_vault_uri_is_a_warning_in_serve_and_check(
    value: str | None, tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: StartService
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    if value is None:
        del env[WEB_VAULT_SETTING]
    else:
        env[WEB_VAULT_SETTING] = value
    service = start_service(env, workers=2)
    service.stop()
    warnings = [line for line in service.logs().splitlines() if WEB_VAULT_SETTING in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], service.logs()
    assert "admin console's Key Connector Test button cannot reach this service" in warnings[0]

    checked = keyconnector("check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    cors = [line for line in checked.stdout.splitlines() if line.startswith("warn cors: ")]
    assert len(cors) == 1 and WEB_VAULT_SETTING in cors[0], checked.stdout


def test_a_web_vault_uri_that_is_an_origin_gives_no_warning(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")  # https://vault.example.com/ style, as upstream's docs
    checked = keyconnector("check", env=env)
    assert "cors" not in checked.stdout and WEB_VAULT_SETTING not in checked.stdout, checked.stdout


# -- stats per format and per version, before and after upgrade-records ------------------------------------


def stats_of(env: dict[str, str]) -> dict[str, object]:
    result = keyconnector("stats", "--json", env=env)
    assert result.returncode == 0, result.stderr
    figures: dict[str, object] = json.loads(result.stdout)
    return figures


def test_stats_counts_records_per_format_and_version_until_upgrade_records_is_finished(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: StartService
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    seed_upstream_records(env, pfx, 25)
    service = start_service(env)  # adopts the data key; writes 3 keys bound to their user
    with service.client() as client:
        for _ in range(3):
            headers = {"Authorization": f"Bearer {issuer.mint(uuid.uuid4())}"}
            assert client.post("/user-keys", json={"key": new_key()}, headers=headers).status_code == 200
    service.stop()

    before = stats_of(env)
    assert before["records_per_format"] == {"upstream": 25, "bound": 3, "unknown": 0}
    assert before["records_per_version"] == {"1": 28}
    table = keyconnector("stats", env=env).stdout
    for label, count in (("upstream's (not bound", 25), ("format 2 (bound", 3), ("unknown format", 0)):
        assert str(count) in next(line.split() for line in table.splitlines() if label in line), table

    upgraded = keyconnector("upgrade-records", env=env)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    after = stats_of(env)
    assert after["records_per_format"] == {"upstream": 0, "bound": 28, "unknown": 0}
    assert after["records_per_version"] == {"1": 28}
    checked = keyconnector("check", env=env)
    assert "way back" not in checked.stdout, checked.stdout


def test_stats_counts_a_record_of_an_unknown_format_as_unknown_not_bound(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx
) -> None:
    """A ``kc:`` marker this version cannot read is not a bound record: counting it as one would
    report ``upgrade-records`` finished while records remain that nothing here can open."""
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    seed_upstream_records(env, pfx, 4)
    settings = load_settings(env).settings
    now = datetime.now(UTC).replace(tzinfo=None)
    odd = [UserKeyRecord(uuid.uuid4(), key, now, None, None) for key in ("kc:7:1:AAAA", "kc:2:x:AAAA")]

    async def body() -> None:
        repository = await open_repository(settings.database)
        try:
            await repository.upsert_records(odd)
        finally:
            await repository.aclose()

    run(body())
    figures = stats_of(env)
    assert figures["records_per_format"] == {"upstream": 4, "bound": 0, "unknown": 2}
    assert figures["records_per_version"] == {"1": 4, "unknown": 2}


def test_after_a_rotation_the_way_back_warning_names_downgrade_records(
    tmp_path: Path, pfx: Pfx, request: pytest.FixtureRequest
) -> None:
    """With data key version 2 current, writeLegacyFormat cannot help: the warning says what can."""
    from tests.test_stats import write_deployment
    from tests.test_transfer import command_env, deployment

    source = deployment("sqlite", pfx, tmp_path, request)
    wanted = write_deployment(source, rotated=True)
    env = command_env(source)
    env[WRITE_LEGACY] = "true"  # no help once version 2 seals: the warning stays
    checked = keyconnector("check", env=env)
    lines = [line for line in checked.stdout.splitlines() if line.startswith("warn way back: ")]
    assert len(lines) == 1, checked.stdout + checked.stderr
    upstream = wanted["records_per_version"]["1"]
    assert f"{upstream} of the first " in lines[0], lines[0]
    assert "data key version 2 seals new and replaced keys" in lines[0], lines[0]
    assert "keyconnector downgrade-records" in lines[0], lines[0]
