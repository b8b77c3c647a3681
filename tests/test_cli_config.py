"""``config show``, ``status``, ``check``'s JSON, exit codes and start-up options, and "did you mean"
for a misspelt setting name or provider value: each run as an operator would, as a real subprocess
(``status`` against a real ``keyconnector serve``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

import keyconnector
from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.devtools.tls import local_tls_files
from tests.conftest import Pfx, Service, base_env

PREFIX = "keyConnectorSettings__"


def run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("keyconnectorsettings")}
    env.pop("ASPNETCORE_URLS", None)
    env.pop("KEYCONNECTOR_CONFIG", None)
    return env


def shown(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    """``config show --json``'s settings by env-var name."""
    assert result.returncode == 0, result.stdout + result.stderr
    return {entry["name"]: entry for entry in json.loads(result.stdout)["settings"]}


# -- config show ---------------------------------------------------------------------------------------


def test_config_show_says_where_each_setting_came_from(tmp_path: Path) -> None:
    """The real environment wins over the env file, which wins over the config file, over the default;
    and each value says which of them it came from, file named."""
    config = tmp_path / "appsettings.json"
    config.write_text(
        json.dumps(
            {
                "keyConnectorSettings": {
                    "identityServerUri": "https://from-config.example",
                    "webVaultUri": "https://vault-from-config.example",
                    "logging": {"level": "warning"},
                }
            }
        )
    )
    env_file = tmp_path / "kc.env"
    env_file.write_text(
        f"{PREFIX}identityServerUri=https://from-env-file.example\n"
        f"{PREFIX}webVaultUri=https://vault-from-env-file.example\n"
    )
    env = clean_env() | {f"{PREFIX}IDENTITYSERVERURI": "https://from-environment.example"}
    result = run("config", "show", "--json", "--config", str(config), "--env-file", str(env_file), env=env)
    settings = shown(result)

    identity = settings[f"{PREFIX}identityServerUri"]
    assert (identity["value"], identity["source"]) == ("https://from-environment.example", "environment")
    assert identity["written_as"] == f"{PREFIX}IDENTITYSERVERURI"
    vault = settings[f"{PREFIX}webVaultUri"]
    assert (vault["value"], vault["source"], vault["file"]) == (
        "https://vault-from-env-file.example",
        "env file",
        str(env_file),
    )
    level = settings[f"{PREFIX}logging__level"]
    assert (level["value"], level["source"], level["file"]) == ("warning", "config file", str(config))
    assert level["written_as"] == "logging:level"
    pool = settings[f"{PREFIX}database__poolSize"]
    assert (pool["value"], pool["source"], pool["file"]) == (10, "default", None)
    # The text form says the same, one aligned line per setting.
    text = run("config", "show", "--config", str(config), "--env-file", str(env_file), env=env)
    assert text.returncode == 0, text.stderr
    line = next(row for row in text.stdout.splitlines() if row.startswith(f"{PREFIX}webVaultUri "))
    assert line.split() == [
        f"{PREFIX}webVaultUri",
        "https://vault-from-env-file.example",
        "env",
        "file",
        str(env_file),
    ]
    assert "│" not in text.stdout and "+--" not in text.stdout  # no box drawing


def test_config_show_never_prints_a_secret_and_hides_names_unless_asked(tmp_path: Path) -> None:
    secrets = {
        "pfx": "pfx-Secret-1a",
        "db": "db-Secret-2b",
        "aws": "aws-Secret-3c",
        "kmip": "kmip-Secret-4d",
        "url": "url-Secret-5e",
    }
    kmip_file = tmp_path / "kmip-password"
    kmip_file.write_text(secrets["kmip"] + "\n")
    env = clean_env() | {
        f"{PREFIX}certificate__filesystemPassword": secrets["pfx"],
        f"{PREFIX}database__provider": "postgresql",
        f"{PREFIX}database__postgreSqlConnectionString": (
            f"Host=db.corp.example;Port=5432;Database=kc;Username=kc_owner;Password={secrets['db']}"
        ),
        f"{PREFIX}database__mySqlConnectionString": f"mysql://kc_my:{secrets['url']}@mysql.corp.example:3306/kc",
        f"{PREFIX}rsaKey__awsAccessKeyId": "AKIAIDENTIFYING",
        f"{PREFIX}rsaKey__awsAccessKeySecret": secrets["aws"],
        f"{PREFIX}rsaKey__kmipPasswordFile": str(kmip_file),
    }
    outputs = []
    for extra in ((), ("--json",), ("--reveal-names",), ("--json", "--reveal-names")):
        result = run("config", "show", *extra, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(result)
        for name, value in secrets.items():
            assert value not in result.stdout + result.stderr, (name, extra)

    hidden, revealed = shown(outputs[1]), shown(outputs[3])
    postgres = f"{PREFIX}database__postgreSqlConnectionString"
    assert (
        hidden[postgres]["value"] == "Host=<hidden>;Port=5432;Database=kc;Username=<hidden>;Password=********"
    )
    assert revealed[postgres]["value"] == (
        "Host=db.corp.example;Port=5432;Database=kc;Username=kc_owner;Password=********"
    )
    mysql = f"{PREFIX}database__mySqlConnectionString"
    assert hidden[mysql]["value"] == "mysql://<hidden>:********@<hidden>:3306/kc"
    assert revealed[mysql]["value"] == "mysql://kc_my:********@mysql.corp.example:3306/kc"
    key_id = f"{PREFIX}rsaKey__awsAccessKeyId"
    assert (hidden[key_id]["value"], hidden[key_id]["masked"]) == ("<hidden>", "names")
    assert revealed[key_id]["value"] == "AKIAIDENTIFYING"
    assert "AKIAIDENTIFYING" not in outputs[0].stdout and "db.corp.example" not in outputs[0].stdout
    kmip = revealed[f"{PREFIX}rsaKey__kmipPassword"]
    assert (kmip["value"], kmip["masked"], kmip["from_secret_file"]) == ("********", "secret", True)
    assert revealed[f"{PREFIX}rsaKey__awsAccessKeySecret"]["value"] == "********"
    # Unset secrets are not dressed up as set ones.
    assert revealed[f"{PREFIX}rsaKey__pkcs11LoginPin"]["value"] is None


# -- did you mean ------------------------------------------------------------------------------------------


def test_a_misspelt_setting_name_gets_did_you_mean(tmp_path: Path) -> None:
    env_file = tmp_path / "kc.env"
    env_file.write_text(f"{PREFIX}databse__provider=sqlite\n{PREFIX}rsaKey__awsRegoin=eu-west-1\n")
    result = run("config", "show", "--json", "--env-file", str(env_file), env=clean_env())
    assert result.returncode == 0, result.stderr
    unknown = {entry["name"]: entry for entry in json.loads(result.stdout)["unknown"]}
    assert unknown[f"{PREFIX}databse__provider"]["did_you_mean"] == f"{PREFIX}database__provider"
    assert unknown[f"{PREFIX}rsaKey__awsRegoin"]["did_you_mean"] == f"{PREFIX}rsaKey__awsRegion"
    assert unknown[f"{PREFIX}rsaKey__awsRegoin"]["source"] == "env file"
    # Every command's warning says it too.
    checked = run("check", "--env-file", str(env_file), env=clean_env() | {f"{PREFIX}identityServerUri": ""})
    expected = f"(a typo? did you mean {PREFIX}database__provider?)"
    assert f"ignoring unknown setting {PREFIX}databse__provider {expected}" in checked.stderr
    assert f"warn settings: unknown setting {PREFIX}databse__provider is ignored {expected}" in checked.stdout


def test_a_misspelt_provider_value_gets_did_you_mean(tmp_path: Path, pfx: Pfx, issuer: DevIssuer) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db") | {
        f"{PREFIX}database__provider": "postgress",
        f"{PREFIX}rsaKey__provider": "certficate",
    }
    result = run("check", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unknown database provider 'postgress'" in result.stdout
    assert "did you mean 'postgresql'?" in result.stdout
    assert "unknown RSA key provider 'certficate'" in result.stdout
    assert "did you mean 'certificate'?" in result.stdout
    far = run("check", env=env | {f"{PREFIX}database__provider": "oracle"})
    assert "unknown database provider 'oracle'" in far.stdout
    assert "did you mean" not in next(line for line in far.stdout.splitlines() if "database:" in line)


# -- check: JSON and exit codes ---------------------------------------------------------------------------


def check_json(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = run("check", "--json", *args, env=env)
    document = json.loads(result.stdout)
    assert document["exit_code"] == result.returncode, result.stdout
    assert document["ok"] is (result.returncode == 0)
    for entry in document["results"]:
        assert set(entry) == {"name", "ok", "status", "message", "unavailable"}, entry
        assert entry["status"] in {"ok", "warn", "fail"} and entry["ok"] is (entry["status"] != "fail")
    return result.returncode, document


def failures(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry for entry in document["results"] if not entry["ok"]]


def test_check_json_and_exit_codes(tmp_path: Path, pfx: Pfx, issuer: DevIssuer) -> None:
    good = base_env(issuer, pfx, tmp_path / "kc.db")
    code, document = check_json(good)
    assert code == 0 and document["ok"] is True and not failures(document)
    assert {"settings", "database", "key pair", "identity server"} <= {e["name"] for e in document["results"]}

    # A setting that does not load: a configuration error, 2 (it used to be 1 with "FAIL settings").
    code, document = check_json(good | {f"{PREFIX}lastAccessFlushSeconds": "600"})
    assert code == 2
    [failure] = failures(document)
    assert failure["name"] == "settings" and "lastAccessFlushSeconds" in failure["message"]
    plain = run("check", env=good | {f"{PREFIX}lastAccessFlushSeconds": "600"})
    assert plain.returncode == 2 and plain.stdout.startswith("FAIL settings: ")

    # Only a dependency that cannot be reached: 3, which a retry may cure.
    code, document = check_json(good | {f"{PREFIX}identityServerUri": f"http://127.0.0.1:{free_port()}"})
    assert code == 3
    [failure] = failures(document)
    assert failure["name"] == "identity server" and failure["unavailable"] is True

    # A wrong setting found while checking (the PFX password) with the same outage: 1.
    broken = good | {
        f"{PREFIX}identityServerUri": f"http://127.0.0.1:{free_port()}",
        f"{PREFIX}certificate__filesystemPassword": "not-the-password",
    }
    code, document = check_json(broken)
    assert code == 1
    assert {e["name"] for e in failures(document)} == {"key pair", "identity server"}
    assert "not-the-password" not in json.dumps(document)


def test_check_finds_a_port_in_use_and_a_mismatched_tls_pair(
    tmp_path: Path, pfx: Pfx, issuer: DevIssuer
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    first, second = local_tls_files(tmp_path / "one"), local_tls_files(tmp_path / "two")
    port = free_port()
    code, document = check_json(
        env, "--port", str(port), "--tls-cert", str(first.certificate), "--tls-key", str(first.key)
    )
    assert code == 0, document
    listen = next(e for e in document["results"] if e["name"] == "listen")
    assert listen["ok"] and f"127.0.0.1:{port}" in listen["message"]
    assert next(e for e in document["results"] if e["name"] == "tls")["ok"]

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        code, document = check_json(
            env, "--port", str(busy), "--tls-cert", str(first.certificate), "--tls-key", str(second.key)
        )
    assert code == 1
    failed = {e["name"]: e["message"] for e in failures(document)}
    assert set(failed) == {"listen", "tls"}, failed
    assert failed["listen"].startswith("--port") and str(busy) in failed["listen"]
    assert failed["tls"].startswith("--tls-key") and "is not the private key" in failed["tls"]

    code, document = check_json(env, "--host", "not an address", "--port", str(port))
    assert code == 1 and [e["name"] for e in failures(document)] == ["listen"]


# -- status ----------------------------------------------------------------------------------------------


def status(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    result = run("status", "--json", *args, env=env if env is not None else clean_env(), timeout=60)
    document = json.loads(result.stdout)
    assert document["exit_code"] == result.returncode, result.stdout + result.stderr
    return result.returncode, document


def test_status_of_a_running_service_then_a_stopped_one(tmp_path: Path, pfx: Pfx, issuer: DevIssuer) -> None:
    service = Service(base_env(issuer, pfx, tmp_path / "kc.db"), tmp_path / "service.log").start()
    try:
        code, document = status("--url", service.url)
        assert code == 0, document
        assert document["status"] == "ready" and document["reachable"] is True
        assert document["checks"]["database"] == "ok" and document["checks"]["identity"] == "ok"
        assert document["version"]  # from keyconnector_build_info on /metrics
        # The default URL is serve's: ASPNETCORE_URLS, a wildcard host asked on loopback.
        code, document = status(env=clean_env() | {"ASPNETCORE_URLS": f"http://+:{service.port}"})
        assert (code, document["url"]) == (0, f"http://127.0.0.1:{service.port}")
        text = run("status", "--url", service.url, env=clean_env())
        assert text.returncode == 0 and "status   ready" in text.stdout
    finally:
        service.stop()
    code, document = status("--url", service.url)
    assert code == 3 and document["reachable"] is False and document["status"] is None


def test_status_shows_workers_and_data_key_versions_and_a_rotation(
    tmp_path: Path, pfx: Pfx, issuer: DevIssuer
) -> None:
    """``--workers 2`` and the data-key versions, as the worker answering holds them; after
    ``rotate-data-key`` against the same database, the new version once the worker reloaded its ring
    (``keyRingRefreshSeconds``: waited for, as each worker looks on its own schedule)."""
    env = base_env(issuer, pfx, tmp_path / "kc.db") | {f"{PREFIX}keyRingRefreshSeconds": "0.5"}
    service = Service(env, tmp_path / "service.log", workers=2).start()
    try:
        ready = httpx.get(service.url + "/health/ready", timeout=10).json()
        assert ready["workers"] == 2 and ready["version"] == keyconnector.__version__, ready
        assert ready["dataKey"] == {"current": 1, "active": [1]}, ready
        code, document = status("--url", service.url)
        assert code == 0 and document["workers"] == 2, document
        assert document["data_key"] == {"current": 1, "active": [1]}, document
        text = run("status", "--url", service.url, env=clean_env())
        assert "workers  2" in text.stdout, text.stdout
        assert "data key version 1 seals; loaded: 1" in text.stdout, text.stdout

        rotated = run("rotate-data-key", "--settle-seconds", "0", env=env)
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        deadline = time.monotonic() + 20
        while True:
            code, document = status("--url", service.url)
            if document["data_key"]["current"] == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert code == 0 and document["data_key"]["current"] == 2, document
        assert 2 in document["data_key"]["active"], document
    finally:
        service.stop()


def test_status_of_a_degraded_service_is_1(tmp_path: Path, pfx: Pfx, issuer: DevIssuer) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the identity server is "down"
    env = base_env(issuer, pfx, tmp_path / "kc.db") | {f"{PREFIX}identityServerUri": down}
    service = Service(env, tmp_path / "service.log").start()
    try:
        code, document = status("--url", service.url)
        text = run("status", "--url", service.url, env=clean_env())
    finally:
        service.stop()
    assert code == 1 and document["status"] == "degraded", document
    assert document["checks"]["identity"] != "ok"
    assert text.returncode == 1 and "status   degraded" in text.stdout and "identity" in text.stdout


def test_status_over_https_trusts_the_deployments_ca_folder(
    tmp_path: Path, pfx: Pfx, issuer: DevIssuer
) -> None:
    (tmp_path / "tls").mkdir()
    tls = local_tls_files(tmp_path / "tls")
    service = Service(
        base_env(issuer, pfx, tmp_path / "kc.db"),
        tmp_path / "service.log",
        extra_args=("--tls-cert", str(tls.certificate), "--tls-key", str(tls.key)),
    ).start()
    try:
        trusted = clean_env() | {f"{PREFIX}caCertificatesDirectory": str(tls.ca.parent)}
        code, document = status("--url", service.url, env=trusted)
        assert code == 0 and document["status"] == "ready", document
        # Without the CA, the certificate is not trusted: not reached, never answered unverified.
        code, document = status("--url", service.url, env=clean_env())
        assert code == 3 and "certificate" in document["error"].lower(), document
    finally:
        service.stop()


def test_status_refuses_a_url_with_credentials_without_echoing_them() -> None:
    result = run("status", "--url", "http://admin:url-Secret-9z@127.0.0.1:1", env=clean_env())
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--url" in result.stderr and "user name or password" in result.stderr
    assert "url-Secret-9z" not in result.stdout + result.stderr
    bare = run("status", "--url", "127.0.0.1:5000", env=clean_env())
    assert bare.returncode == 2 and "is not an http:// or https:// URL" in bare.stderr
