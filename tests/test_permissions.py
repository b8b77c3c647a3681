"""Start-up warnings for secret files that other users can read or change, seen in `serve`'s own log."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.runtime.permissions import loose_files, secret_files
from keyconnector.runtime.settings import load_settings
from tests.conftest import Pfx, Service, base_env

PREFIX = "keyConnectorSettings__"


def deployment(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, *, pfx_mode: int, db_mode: int, secret_mode: int
) -> dict[str, str]:
    """A service on a JSON database with the PFX password in a secret file, each file with its mode."""
    key = tmp_path / "key.pfx"
    shutil.copyfile(pfx.path, key)
    key.chmod(pfx_mode)
    database = tmp_path / "data.json"
    database.write_text("{}")
    database.chmod(db_mode)
    password = tmp_path / "pfx-password"
    password.write_text(pfx.password + "\n")
    password.chmod(secret_mode)
    env = base_env(issuer, pfx, tmp_path / "unused.db")
    env.pop(PREFIX + "certificate__filesystemPassword")
    env.pop(PREFIX + "database__sqliteConnectionString")
    env |= {
        PREFIX + "certificate__filesystemPath": str(key),
        PREFIX + "certificate__filesystemPasswordFile": str(password),
        PREFIX + "database__provider": "json",
        PREFIX + "database__jsonFilePath": str(database),
    }
    return env


def warnings_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if "can be accessed by" in line]


def test_serve_warns_exactly_for_the_loose_files(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    env = deployment(tmp_path, issuer, pfx, pfx_mode=0o644, db_mode=0o666, secret_mode=0o644)
    service = start_service(env)
    found = warnings_in(service.logs())
    assert len(found) == 3, service.logs()
    expected = {
        "key.pfx": ("certificate__filesystemPath", "0644", "other users"),
        "data.json": ("database__jsonFilePath", "0666", "its group and other users"),
        "pfx-password": ("certificate__filesystemPasswordFile", "0644", "other users"),
    }
    for name, (setting, mode, who) in expected.items():
        [line] = [line for line in found if f"{tmp_path}/{name} " in line]
        assert "WARNING" in line
        assert f"({PREFIX}{setting})" in line
        assert f"mode {mode}" in line and who in line
    assert pfx.password not in service.logs()


def test_serve_is_silent_about_private_files(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    env = deployment(tmp_path, issuer, pfx, pfx_mode=0o600, db_mode=0o600, secret_mode=0o400)
    service = start_service(env)
    assert warnings_in(service.logs()) == [], service.logs()
    assert service.client().get("/alive").status_code == 200


def test_group_access_alone_is_reported_and_the_sqlite_file_is_checked(tmp_path: Path, pfx: Pfx) -> None:
    database = tmp_path / "kc.db"
    database.write_bytes(b"")
    database.chmod(0o640)
    key = tmp_path / "key.pfx"
    shutil.copyfile(pfx.path, key)
    key.chmod(0o600)
    environ = {
        PREFIX + "database__provider": "sqlite",
        PREFIX + "database__sqliteConnectionString": f"Data Source={database}",
        PREFIX + "certificate__filesystemPath": str(key),
    }
    [problem] = loose_files(load_settings(environ).settings, environ)
    assert str(database) in problem and "its group" in problem and "other users" not in problem
    assert "sqliteConnectionString" in problem


def test_secret_files_are_found_in_the_environment_and_the_settings_file(tmp_path: Path) -> None:
    config = tmp_path / "appsettings.json"
    config.write_text(
        '{"keyConnectorSettings": {"rsaKey": {"vaultTransitTokenFile": "/run/secrets/vault"},'
        ' "database": {"jsonFilePath": "/x.json"}}}'
    )
    environ = {
        "KEYCONNECTOR_CONFIG": str(config),
        "KEYCONNECTORSETTINGS__DATABASE__POSTGRESQLCONNECTIONSTRINGFILE": "/run/secrets/pg",
        PREFIX + "certificate__filesystemPath": "/not/a/secret/file/setting",
        PREFIX + "logging__fileFile": "/not/a/secret",
    }
    assert secret_files(environ) == [
        ("database.postgreSqlConnectionString", "/run/secrets/pg"),
        ("rsaKey.vaultTransitToken", "/run/secrets/vault"),
    ]
