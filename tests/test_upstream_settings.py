"""The release's settings as operators have them (docs/compatibility.md section 6): upstream's
defaults, an ``appsettings.json`` as ASP.NET Core reads it, ``Serilog__`` lines in env files, and the
start-up transfer that runs only when upstream would run it. Each against the real command."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import WEB_VAULT, Pfx, Service, base_env
from tests.support.envelopes import upstream_seal, upstream_wrap

SETTINGS = "keyConnectorSettings__"


def release_json_file(path: Path, pfx: Pfx, users: dict[uuid.UUID, bytes]) -> None:
    """A data.json as the 2025.11.0 release leaves it."""
    data_key = secrets.token_bytes(32)
    document = {
        "symmetricKey": upstream_wrap(pfx, data_key),
        "userKey": [
            {
                "id": str(user),
                "key": upstream_seal(data_key, key),
                "creationDate": "2025-11-20T09:14:03.8417793Z",
                "revisionDate": None,
                "lastAccessDate": None,
            }
            for user, key in users.items()
        ],
    }
    path.write_text(json.dumps(document))


def without_database(env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if not name.startswith(SETTINGS + "database__")}


def read_key(service: Service, issuer: DevIssuer, user: uuid.UUID) -> bytes:
    with service.client() as client:
        response = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["key"])


def test_no_database_provider_means_upstream_s_json_file(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    users = {uuid.uuid4(): secrets.token_bytes(32) for _ in range(3)}
    path = tmp_path / "data.json"
    release_json_file(path, pfx, users)
    env = without_database(base_env(issuer, pfx, tmp_path / "unused.db"))
    env[SETTINGS + "database__jsonFilePath"] = str(path)
    service = start_service(env)
    for user, key in users.items():
        assert read_key(service, issuer, user) == key
    assert not (tmp_path / "unused.db").exists()


def test_a_connection_string_without_a_provider_is_refused_not_taken_for_json(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx
) -> None:
    """An older keyconnector's settings relied on SQLite being the default: starting on an empty
    JSON file instead would be a new, empty database made silently."""
    env = without_database(base_env(issuer, pfx, tmp_path / "kc.db"))
    env[SETTINGS + "database__sqliteConnectionString"] = f"Data Source={tmp_path / 'kc.db'}"
    env[SETTINGS + "database__jsonFilePath"] = str(tmp_path / "data.json")
    result = subprocess.run(
        [sys.executable, "-m", "keyconnector", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert f"{SETTINGS}database__provider: is not set" in result.stderr
    assert f"{SETTINGS}database__sqliteConnectionString is set" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data.json").exists() and not (tmp_path / "kc.db").exists()


def test_appsettings_json_with_comments_and_trailing_commas(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    users = {uuid.uuid4(): secrets.token_bytes(32)}
    data = tmp_path / "data.json"
    release_json_file(data, pfx, users)
    config = tmp_path / "appsettings.json"
    config.write_text(
        "{\n"
        "  // As upstream ships it: ASP.NET Core reads comments and trailing commas.\n"
        '  "keyConnectorSettings": {\n'
        f'    "webVaultUri": "{WEB_VAULT}", /* the one CORS origin */\n'
        '    "database": {\n'
        '      "provider": "json",\n'
        f'      "jsonFilePath": "{data}", // "a string // with slashes, stays"\n'
        "    },\n"
        "  },\n"
        '  "Serilog": { "MinimumLevel": "Information", },\n'
        "}\n"
    )
    env = without_database(base_env(issuer, pfx, tmp_path / "unused.db"))
    del env[SETTINGS + "webVaultUri"]
    service = start_service(env, extra_args=("--config", str(config)))
    user, key = next(iter(users.items()))
    assert read_key(service, issuer, user) == key
    with service.client() as client:
        preflight = client.options(
            "/user-keys", headers={"Origin": WEB_VAULT, "Access-Control-Request-Method": "GET"}
        )
    assert preflight.headers.get("access-control-allow-origin") == WEB_VAULT
    assert (
        "Serilog (in appsettings.json): upstream's logging settings (Serilog) are not used" in service.logs()
    )


def test_an_invalid_appsettings_json_names_the_line(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    config = tmp_path / "appsettings.json"
    config.write_text('{\n  // fine\n  "keyConnectorSettings": {\n    "webVaultUri": oops\n  }\n}\n')
    result = subprocess.run(
        [sys.executable, "-m", "keyconnector", "serve", "--port", str(free_port()), "--config", str(config)],
        env=base_env(issuer, pfx, tmp_path / "kc.db"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is not valid JSON (line 4:" in result.stderr


def test_serilog_lines_in_an_env_file_get_one_notice_and_no_typo_warning(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    env_file = tmp_path / "key-connector.override.env"
    env_file.write_text(
        "Serilog__MinimumLevel__Default=Information\n"
        "Serilog__WriteTo__0__Name=Console\n"
        "Serilog__WriteTo__1__Name=File\n"
        "Serilog__WriteTo__1__Args__path=/etc/bitwarden/logs/log.txt\n"
    )
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    service = start_service(env, extra_args=("--env-file", str(env_file)))
    logs = service.logs()
    assert logs.count("upstream's logging settings (Serilog) are not used here") == 1, logs
    assert "Serilog__MinimumLevel__Default" in logs and f"{SETTINGS}logging__file" in logs
    assert "unknown setting Serilog" not in logs and "Traceback" not in logs

    checked = subprocess.run(
        [sys.executable, "-m", "keyconnector", "check", "--env-file", str(env_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "warn settings: Serilog__MinimumLevel__Default" in checked.stdout, checked.stdout


def test_the_start_up_transfer_runs_only_with_both_target_sections(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    """Upstream's default lock path with no transferTo settings never blocks a start (the folder
    need not exist), and half a target is skipped with one line, not taken for a transfer."""
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env[SETTINGS + "transferTo__lockfilePath"] = str(tmp_path / "no-such-folder" / "transfer.lock")
    service = start_service(env)
    assert "start-up transfer" not in service.logs()
    service.stop()

    target = tmp_path / "target.db"
    env[SETTINGS + "transferTo__database__provider"] = "sqlite"
    env[SETTINGS + "transferTo__database__sqliteConnectionString"] = f"Data Source={target}"
    service = start_service(env)
    logs = service.logs()
    assert logs.count("start-up transfer skipped") == 1, logs
    assert f"{SETTINGS}transferTo__database is set but not {SETTINGS}transferTo__rsaKey" in logs
    assert not target.exists()
