"""The takeover guards of issue 14: a mistake during a takeover never makes a new data key over
existing records, never adopts a foreign database as empty, and says what the operator can do.

Each guard is driven through the real command (``keyconnector serve`` and ``keyconnector check`` as
processes) against real databases (SQLite files, PostgreSQL and MariaDB servers): it refuses with
exit 2 and one line naming the setting, writes nothing (no schema, no data key), and its option lets
the deployment through.
"""

from __future__ import annotations

import secrets
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.keypairs.base import rsa_fingerprint
from keyconnector.keypairs.generate import self_signed_pfx
from tests.conftest import Pfx, Service, base_env
from tests.support.backends import Backend
from tests.support.envelopes import upstream_seal, upstream_wrap
from tests.support.upstream import Row, build_sqlite

ALLOW_NEW_DATA_KEY = "keyConnectorSettings__database__allowNewDataKey"
CREATE_SCHEMA = "keyConnectorSettings__database__createSchema"


@pytest.fixture(scope="module")
def foreign_pfx(tmp_path_factory: pytest.TempPathFactory) -> Pfx:
    """Another deployment's key pair: what wrapped the data key of a database that is not ours."""
    path = tmp_path_factory.mktemp("foreign-pfx") / "foreign.pfx"
    path.write_bytes(self_signed_pfx("foreign-pfx-password", bits=2048))
    return Pfx(path, "foreign-pfx-password")


def fingerprint(pfx: Pfx) -> str:
    key, _, _ = pkcs12.load_key_and_certificates(pfx.path.read_bytes(), pfx.password.encode())
    assert isinstance(key, rsa.RSAPrivateKey)
    return rsa_fingerprint(key.public_key(), "rsa-oaep-sha1")


def run_command(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``keyconnector <args>`` as a process."""
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def serve_refuses(env: dict[str, str], *extra: str) -> str:
    """Run ``serve``; it must exit 2 before listening, with one line on stderr and no traceback."""
    done = run_command(env, "serve", "--port", str(free_port()), *extra)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("keyconnector:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def upstream_records(path: Path, pfx: Pfx | None, users: int = 3) -> None:
    """An upstream SQLite database with ``users`` records; the data key wrapped by ``pfx``, or none."""
    data_key = secrets.token_bytes(32)
    rows = [
        Row(
            str(uuid.uuid4()).upper(), upstream_seal(data_key, secrets.token_bytes(32)), "2024-01-01 00:00:00"
        )
        for _ in range(users)
    ]
    build_sqlite(path, rows, None if pfx is None else upstream_wrap(pfx, data_key))


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        return {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def application_datas(path: Path) -> list[str]:
    with sqlite3.connect(path) as connection:
        return [key for (key,) in connection.execute('SELECT "SymmetricKey" FROM "ApplicationDatas"')]


# -- never a fresh data key over existing data ----------------------------------------------------------


def test_records_without_a_data_key_are_refused_and_nothing_is_written(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx
) -> None:
    database = tmp_path / "kc.db"
    upstream_records(database, None)
    before = tables(database)
    env = base_env(issuer, pfx, database)

    line = serve_refuses(env)
    assert ALLOW_NEW_DATA_KEY in line and "3 user record" in line and "ApplicationDatas" in line
    assert tables(database) == before  # no schema of ours, no version table
    assert application_datas(database) == []

    checked = run_command(env, "check")
    assert checked.returncode == 1
    assert any(
        row.startswith("FAIL data key") and ALLOW_NEW_DATA_KEY in row for row in checked.stdout.splitlines()
    ), checked.stdout
    assert tables(database) == before


@pytest.mark.parametrize("how", ["option", "setting"])
def test_allowing_a_new_data_key_over_records_makes_one_and_says_so(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service], how: str
) -> None:
    database = tmp_path / "kc.db"
    upstream_records(database, None)
    env = base_env(issuer, pfx, database)
    extra: tuple[str, ...] = ()
    if how == "option":
        extra = ("--allow-new-data-key",)
    else:
        env[ALLOW_NEW_DATA_KEY] = "true"
        checked = run_command(env, "check")
        assert any(
            row.startswith("warn data key") and "would make a new data key" in row
            for row in checked.stdout.splitlines()
        ), checked.stdout

    service = start_service(env, extra_args=extra)
    logs = service.logs()
    assert "WARNING" in logs and "3 existing user record(s) become unreadable" in logs, logs
    assert len(application_datas(database)) == 1

    # Said once: later cold starts, without the option, take the ring (whose first records never
    # open) as it is, and make no other key.
    service.stop()
    again = start_service(base_env(issuer, pfx, database))
    assert "NEW data key" not in again.logs() and "REFUSED" not in again.logs()
    assert len(application_datas(database)) == 1


def test_a_data_key_wrapped_by_another_key_pair_is_refused_naming_both_fingerprints(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, foreign_pfx: Pfx
) -> None:
    database = tmp_path / "kc.db"
    upstream_records(database, foreign_pfx)
    before, stored = tables(database), application_datas(database)
    env = base_env(issuer, pfx, database)

    line = serve_refuses(env)
    assert fingerprint(pfx) in line and "ApplicationDatas" in line, line
    # The option never replaces a stored data key: that would destroy the only way to the records.
    line = serve_refuses(env, "--allow-new-data-key")
    assert fingerprint(pfx) in line
    assert tables(database) == before and application_datas(database) == stored

    checked = run_command(env, "check")
    assert any(row.startswith("FAIL data key") for row in checked.stdout.splitlines()), checked.stdout


def test_a_ring_wrapped_for_another_key_pair_names_its_fingerprints(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, foreign_pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    """A database an earlier keyconnector ran with another key pair: its ring names that pair."""
    database = tmp_path / "kc.db"
    upstream_records(database, foreign_pfx)
    service = start_service(base_env(issuer, foreign_pfx, database))
    service.stop()

    line = serve_refuses(base_env(issuer, pfx, database))
    assert fingerprint(pfx) in line and fingerprint(foreign_pfx) in line, line


# -- never a foreign database adopted as empty ----------------------------------------------------------


def test_a_foreign_sqlite_database_is_refused_unless_told(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    database = tmp_path / "kc.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total TEXT)")
        connection.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    env = base_env(issuer, pfx, database)

    line = serve_refuses(env)
    assert CREATE_SCHEMA in line and "customers" in line and "invoices" in line, line
    assert tables(database) == {"invoices", "customers"}
    checked = run_command(env, "check")
    assert any(
        row.startswith("FAIL database") and CREATE_SCHEMA in row for row in checked.stdout.splitlines()
    ), checked.stdout

    start_service(env, extra_args=("--create-schema",))
    assert {"invoices", "customers", "UserKeys", "ApplicationDatas"} <= tables(database)


def server_env(issuer: DevIssuer, pfx: Pfx, tmp_path: Path, backend: Backend) -> dict[str, str]:
    env = base_env(issuer, pfx, tmp_path / "unused.db")
    del env["keyConnectorSettings__database__sqliteConnectionString"]
    for name, value in backend.plain.items():
        env[f"keyConnectorSettings__database__{name}"] = value
    return env


def test_a_foreign_server_database_is_refused_unless_told(
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    server_backend: Backend,
    start_service: Callable[..., Service],
) -> None:
    server_backend.sql("CREATE TABLE wiki_pages (id INTEGER PRIMARY KEY, title VARCHAR(200))")
    env = server_env(issuer, pfx, tmp_path, server_backend)
    listed = "SELECT table_name FROM information_schema.tables WHERE table_schema = " + (
        "'public'" if server_backend.name == "postgresql" else "DATABASE()"
    )

    line = serve_refuses(env)
    assert CREATE_SCHEMA in line and "wiki_pages" in line, line
    assert [name for (name,) in server_backend.sql(listed)] == ["wiki_pages"]

    env[CREATE_SCHEMA] = "true"
    start_service(env)
    assert {"wiki_pages", "UserKeys", "ApplicationDatas"} <= {name for (name,) in server_backend.sql(listed)}


def test_a_server_database_that_does_not_exist_gets_the_exact_options(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, server_backend: Backend
) -> None:
    assert server_backend.server is not None
    missing = "kc_missing_" + secrets.token_hex(3)
    plain = dict(server_backend.plain)
    key = next(name for name in plain if name.endswith("ConnectionString"))
    plain[key] = server_backend.server.connection_string(missing)
    env = server_env(issuer, pfx, tmp_path, Backend(server_backend.name, plain, tmp_path))

    line = serve_refuses(env)
    assert f"CREATE DATABASE {'`' if server_backend.name == 'mariadb' else chr(34)}{missing}" in line, line
    assert key in line and "does not exist" in line
    assert server_backend.server.password not in line


# -- a new file is allowed, and said ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "json"])
def test_a_new_database_file_is_created_with_a_warning_and_check_says_would_create(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service], kind: str
) -> None:
    database = tmp_path / ("kc.db" if kind == "sqlite" else "data.json")
    env = base_env(issuer, pfx, database)
    if kind == "json":
        del env["keyConnectorSettings__database__sqliteConnectionString"]
        env["keyConnectorSettings__database__provider"] = "json"
        env["keyConnectorSettings__database__jsonFilePath"] = str(database)

    checked = run_command(env, "check")
    rows = checked.stdout.splitlines()
    assert any(row.startswith("ok   database") and "would create" in row for row in rows), checked.stdout
    assert any(row.startswith("ok   data key") and "would make data key version 1" in row for row in rows)
    assert not database.exists()

    service = start_service(env)
    warnings = [row for row in service.logs().splitlines() if "new, empty database" in row]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and str(database) in warnings[0], service.logs()
