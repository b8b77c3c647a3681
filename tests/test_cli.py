"""The command line: init, check, and serve's start-up behaviour (fail fast, listen, TLS, config file)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import ssl
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service, base_env


def keyconnector(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", *args],
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("keyconnectorsettings")}
    env.pop("ASPNETCORE_URLS", None)
    return env


def read_env(path: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")
    )


# -- init -----------------------------------------------------------------------------------------


def test_init_makes_a_4096_bit_pfx_a_private_password_and_an_upstream_env_file(tmp_path: Path) -> None:
    folder = tmp_path / "kc"
    result = keyconnector("init", str(folder))
    assert result.returncode == 0, result.stderr
    pfx, password, env_file = folder / "key.pfx", folder / "key.pfx.password", folder / "keyconnector.env"
    for path in (pfx, password, env_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    secret = password.read_text().strip()
    assert len(secret) >= 40
    bundle = pkcs12.load_pkcs12(pfx.read_bytes(), secret.encode())
    assert isinstance(bundle.key, rsa.RSAPrivateKey) and bundle.key.key_size == 4096
    env = read_env(env_file)
    assert env["keyConnectorSettings__certificate__filesystemPath"] == str(pfx)
    assert env["keyConnectorSettings__database__provider"] == "sqlite"
    assert secret not in env_file.read_text()

    again = keyconnector("init", str(folder))
    assert again.returncode == 1
    assert "not overwriting" in again.stderr
    assert password.read_text().strip() == secret


def test_init_without_urls_writes_placeholders_that_check_and_serve_refuse(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    """Development values in an env file work silently against nothing; a placeholder cannot: ``init``
    says it wrote them, and ``check`` and ``serve`` name each one still there and say to replace it."""
    folder = tmp_path / "kc"
    made = keyconnector("init", str(folder), "--key-bits", "2048")
    assert made.returncode == 0, made.stderr
    env_file = folder / "keyconnector.env"
    env = read_env(env_file)
    identity = env["keyConnectorSettings__identityServerUri"]
    web_vault = env["keyConnectorSettings__webVaultUri"]
    for value in (identity, web_vault):
        assert value.endswith("replace-me.invalid") and "localhost" not in value
    for name in ("keyConnectorSettings__identityServerUri", "keyConnectorSettings__webVaultUri"):
        assert name in made.stderr
    assert "placeholder" in made.stderr and "--identity-server-uri" in made.stderr

    checked = keyconnector("check", "--env-file", str(env_file))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    fails = [line for line in checked.stdout.splitlines() if line.startswith("FAIL")]
    for name in ("keyConnectorSettings__identityServerUri", "keyConnectorSettings__webVaultUri"):
        assert any(name in line and "replace" in line for line in fails), fails

    served = keyconnector("serve", "--env-file", str(env_file), "--port", str(free_port()))
    assert served.returncode == 2, served.stderr
    assert "keyConnectorSettings__identityServerUri" in served.stderr and "placeholder" in served.stderr
    assert not (folder / "keyconnector.db").exists()  # refused before anything was written

    # The identity server replaced, the web vault's placeholder still there: refused too, by name.
    with_issuer = dict(clean_env(), keyConnectorSettings__identityServerUri=issuer.url)
    served = keyconnector("serve", "--env-file", str(env_file), "--port", str(free_port()), env=with_issuer)
    assert served.returncode == 2, served.stderr
    assert "keyConnectorSettings__webVaultUri" in served.stderr and "placeholder" in served.stderr
    assert not (folder / "keyconnector.db").exists()


def test_serve_check_and_init_describe_themselves_and_every_init_option() -> None:
    from keyconnector.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("serve", "check", "init"):
        sub = commands.choices[name]
        assert sub.description and len(sub.description) > 40, name
    for action in commands.choices["init"]._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
    shown = keyconnector("init", "--help")
    assert shown.returncode == 0
    assert "replace-me.invalid" in shown.stdout  # the placeholder is documented where it is chosen


def test_version_prints_version_commit_python_and_openssl() -> None:
    """What an operator pastes into a ticket: the commit from the checkout it runs from, or from
    ``KEYCONNECTOR_COMMIT`` where there is none (the image's ``--build-arg COMMIT``)."""
    from cryptography.hazmat.backends.openssl.backend import backend

    from keyconnector import __version__
    from keyconnector.cli.version import COMMIT_ENV

    checkout = Path(__file__).resolve().parents[1]
    head = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        pytest.fail("the --version test needs the git checkout (the commit comes from it)")
    changed = subprocess.run(
        ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = clean_env()
    env.pop(COMMIT_ENV, None)
    shown = keyconnector("--version", env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 4, shown.stdout
    assert lines[0] == f"keyconnector {__version__}"
    assert lines[1] == f"commit {head.stdout.strip()}" + ("-dirty" if changed else "")
    assert lines[2] == f"Python {platform.python_version()} ({platform.python_implementation()})"
    assert lines[3] == f"{backend.openssl_version_text()} (cryptography), {ssl.OPENSSL_VERSION} (Python ssl)"

    image = dict(env, **{COMMIT_ENV: "0123456789abcdef0123456789abcdef01234567"})
    built = keyconnector("--version", env=image)
    assert built.returncode == 0, built.stderr
    assert built.stdout.splitlines()[1] == "commit 0123456789ab"


# -- check ----------------------------------------------------------------------------------------


def test_check_passes_on_a_good_deployment(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    result = keyconnector("check", env=base_env(issuer, pfx, tmp_path / "kc.db"))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("ok   key pair") for line in lines)
    assert any(line.startswith("ok   identity server") for line in lines)
    # A check only reads: it does not create the database it inspects.
    assert not (tmp_path / "kc.db").exists()


def test_check_names_each_broken_setting(tmp_path: Path, pfx: Pfx) -> None:
    env = clean_env()
    env.update(
        {
            "keyConnectorSettings__identityServerUri": f"http://127.0.0.1:{free_port()}",
            "keyConnectorSettings__database__provider": "sqlite",
            "keyConnectorSettings__database__sqliteConnectionString": f"Data Source={tmp_path / 'kc.db'}",
            "keyConnectorSettings__certificate__filesystemPath": str(pfx.path),
            "keyConnectorSettings__certificate__filesystemPassword": "wrong-password",
            "keyConnectorSettings__databse__provider": "typo",
        }
    )
    result = keyconnector("check", env=env)
    assert result.returncode == 1
    out = result.stdout
    assert "FAIL key pair: keyConnectorSettings__certificate__filesystemPassword" in out
    assert "FAIL identity server" in out and "identityServerUri" in out
    assert "keyConnectorSettings__databse__provider" in out
    assert "wrong-password" not in out + result.stderr


# -- serve: fail fast ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"keyConnectorSettings__database__provider": "oracle"}, "keyConnectorSettings__database__provider"),
        ({"keyConnectorSettings__database__provider": "mongo"}, "MongoDB"),
        ({"keyConnectorSettings__rsaKey__provider": "nope"}, "keyConnectorSettings__rsaKey__provider"),
        (
            {"keyConnectorSettings__certificate__provider": "nope"},
            "keyConnectorSettings__certificate__provider",
        ),
        ({"keyConnectorSettings__identityServerUri": ""}, "keyConnectorSettings__identityServerUri"),
        ({"keyConnectorSettings__certificate__filesystemPath": "/nonexistent/key.pfx"}, "filesystemPath"),
        ({"keyConnectorSettings__lastAccessFlushSeconds": "600"}, "lastAccessFlushSeconds"),
    ],
)
def test_serve_fails_fast_naming_the_setting(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, overrides: dict[str, str], expected: str
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env.update(overrides)
    result = keyconnector("serve", "--port", str(free_port()), env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert pfx.password not in result.stderr


def test_serve_refuses_rsa_keys_under_2048_bits(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    small = rsa.generate_private_key(65537, 1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "small")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(small.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(small, hashes.SHA256())
    )
    path = tmp_path / "small.pfx"
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(b"s", small, cert, None, serialization.NoEncryption())
    )
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__certificate__filesystemPath"] = str(path)
    env.pop("keyConnectorSettings__certificate__filesystemPassword")
    result = keyconnector("serve", "--port", str(free_port()), env=env)
    assert result.returncode == 2
    assert "1024 bits" in result.stderr and "2048" in result.stderr


# -- serve: how it listens and where settings come from --------------------------------------------------


def wait_alive(url: str, process: subprocess.Popen[bytes], **kwargs: object) -> httpx.Response:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "the service exited"
        try:
            return httpx.get(url + "/alive", timeout=2, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("the service did not answer")


def test_serve_honours_aspnetcore_urls(tmp_path: Path, issuer: DevIssuer, pfx: Pfx) -> None:
    port = free_port()
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["ASPNETCORE_URLS"] = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "keyconnector", "serve"], env=env, start_new_session=True
    )
    try:
        assert wait_alive(f"http://127.0.0.1:{port}", process).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_serve_speaks_tls_natively(tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service) -> None:
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    service: Service = start_service(
        base_env(issuer, pfx, tmp_path / "kc.db"),
        extra_args=("--tls-cert", str(cert_path), "--tls-key", str(key_path)),
    )
    user = uuid.uuid4()
    import ssl

    with httpx.Client(
        base_url=service.url, verify=ssl.create_default_context(cafile=cert_path), timeout=10
    ) as client:
        assert client.get("/alive").status_code == 200
        headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
        assert client.put("/user-keys", headers=headers, json={"key": "AAAA"}).status_code == 200
        assert client.get("/user-keys", headers=headers).json() == {"key": "AAAA"}
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{service.port}/alive", timeout=3)


def test_settings_from_an_appsettings_file_with_environment_overrides(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service
) -> None:
    config = tmp_path / "appsettings.json"
    config.write_text(
        json.dumps(
            {
                "Logging": {"LogLevel": {"Default": "Information"}},
                "keyConnectorSettings": {
                    "identityServerUri": "http://127.0.0.1:1",
                    "database": {
                        "provider": "sqlite",
                        "sqliteConnectionString": f"Data Source={tmp_path / 'file.db'}",
                    },
                    "certificate": {
                        "provider": "filesystem",
                        "filesystemPath": str(pfx.path),
                        "filesystemPassword": pfx.password,
                    },
                },
            }
        )
    )
    env = clean_env()
    # The environment wins over the file, names matched case-insensitively.
    env["KEYCONNECTORSETTINGS__IDENTITYSERVERURI"] = issuer.url
    service: Service = start_service(env, extra_args=("--config", str(config)))
    user = uuid.uuid4()
    with service.client() as client:
        headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
        assert client.put("/user-keys", headers=headers, json={"key": "AAAA"}).status_code == 200
    assert (tmp_path / "file.db").exists()


def test_the_service_starts_while_the_identity_server_is_down_and_recovers(
    tmp_path: Path, pfx: Pfx, start_service
) -> None:
    with DevIssuer() as down:
        down.set_available(False)
        service: Service = start_service(base_env(down, pfx, tmp_path / "kc.db"))
        token = down.mint(uuid.uuid4())
        with service.client() as client:
            response = client.get("/user-keys", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 503
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["message"]
            down.set_available(True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                response = client.get("/user-keys", headers={"Authorization": f"Bearer {token}"})
                if response.status_code != 503:
                    break
                time.sleep(0.25)
            assert response.status_code == 404


def test_the_demo_runs_the_whole_flow() -> None:
    result = keyconnector("demo", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GET /user-keys at the next login\n   -> 200" in result.stdout
    assert "== done" in result.stdout


def test_json_logs_to_stderr_and_a_log_file(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service
) -> None:
    log_file = tmp_path / "access.log"
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__logging__format"] = "json"
    env["keyConnectorSettings__logging__file"] = str(log_file)
    service: Service = start_service(env)
    user = uuid.uuid4()
    token = issuer.mint(user)
    with service.client() as client:
        assert client.get("/user-keys", headers={"Authorization": f"Bearer {token}"}).status_code == 404
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and str(user) not in (
        log_file.read_text() if log_file.exists() else ""
    ):
        time.sleep(0.05)
    for text in (log_file.read_text(), service.logs()):
        entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        mine = [e for e in entries if e.get("user_id") == str(user)]
        assert len(mine) == 1, text
        assert mine[0]["method"] == "GET" and mine[0]["path"] == "/user-keys" and mine[0]["status"] == 404
        assert mine[0]["request_id"] and mine[0]["duration_ms"] >= 0
        assert token not in text


def test_init_output_serves_as_is_through_env_file(tmp_path: Path, issuer: DevIssuer, start_service) -> None:
    folder = tmp_path / "kc"
    made = keyconnector(
        "init",
        str(folder),
        "--key-bits",
        "2048",
        "--identity-server-uri",
        issuer.url,
        "--web-vault-uri",
        "https://vault.example.com",
    )
    assert made.returncode == 0, made.stderr
    env_file = str(folder / "keyconnector.env")
    assert keyconnector("check", "--env-file", env_file).returncode == 0
    service: Service = start_service(clean_env(), extra_args=("--env-file", env_file))
    headers = {"Authorization": f"Bearer {issuer.mint(uuid.uuid4())}"}
    with service.client() as client:
        assert client.put("/user-keys", headers=headers, json={"key": "AAAA"}).status_code == 200
        assert client.get("/user-keys", headers=headers).json() == {"key": "AAAA"}
    assert (folder / "keyconnector.db").exists()


def test_env_files_are_read_like_docker_reads_them(tmp_path: Path) -> None:
    from keyconnector.errors import ConfigurationError
    from keyconnector.runtime.settings import read_env_file

    path = tmp_path / "kc.env"
    path.write_text(
        "# comment\n\n"
        "keyConnectorSettings__database__sqliteConnectionString=Data Source=/etc/bitwarden/kc.db\n"
        "export keyConnectorSettings__webVaultUri = https://vault.example.com/\n"
        "keyConnectorSettings__certificate__filesystemPassword='p@ss=word'\n"
        'keyConnectorSettings__identityServerUri="http://identity:5000"\r\n'
    )
    assert read_env_file(path) == {
        "keyConnectorSettings__database__sqliteConnectionString": "Data Source=/etc/bitwarden/kc.db",
        "keyConnectorSettings__webVaultUri": "https://vault.example.com/",
        "keyConnectorSettings__certificate__filesystemPassword": "p@ss=word",
        "keyConnectorSettings__identityServerUri": "http://identity:5000",
    }
    path.write_text("just some words\n")
    with pytest.raises(ConfigurationError, match="line 1"):
        read_env_file(path)
