"""Issue 12, database transport: whoever can answer in the database's place can write it (plant a data
key of their own, swap users' records), so ``check`` and ``serve`` warn when a server database is not
on this machine and the connection does not check the server's certificate.

The verdict comes from the connection string alone (:func:`sqlcommon.transport_warning`), so most of
it is tested here on many strings, in every provider's spellings. The rest runs the real commands
against the private PostgreSQL and MariaDB servers: reached over loopback (``ok``), through a name
that does not resolve (the warning needs no connection), and through this machine's own non-loopback
address (a real, working connection that looks remote), where ``serve`` with several workers must log
the warning exactly once.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.ops.check import _check_transport
from keyconnector.runtime import server as server_module
from keyconnector.runtime.settings import load_settings
from keyconnector.storage.registry import server_target, warn_insecure_transport
from keyconnector.storage.sql.common import is_local_host, transport_summary, transport_warning
from tests.conftest import SERVICE_LOGS, Pfx, Service, base_env
from tests.support.databases import MariaDbServer, PostgresServer, ado_quote
from tests.support.tcpproxy import TcpProxy

PASSWORD = "Sup3r;Secret=pw'\""
"""Quoted where the form needs it; it must never appear in a message."""

SETTING = {
    "postgresql": "postgreSqlConnectionString",
    "mysql": "mySqlConnectionString",
    "sqlserver": "sqlServerConnectionString",
}

WARNING_WORDS = "is not on this machine"
"""A part of the warning's own text, to find and count it in output."""


def env_for(provider: str, connection_string: str, prefix: str = "database") -> dict[str, str]:
    path = prefix.replace(".", "__")
    return {
        f"keyConnectorSettings__{path}__provider": provider,
        f"keyConnectorSettings__{path}__{SETTING[provider]}": connection_string,
    }


def verdict(provider: str, connection_string: str, prefix: str = "database") -> str | None:
    """The transport warning for one connection string, read the way the service reads it."""
    settings = load_settings(env_for(provider, connection_string, prefix)).settings
    database = settings.database if prefix == "database" else settings.transfer_to.database
    assert database is not None
    target = server_target(database, prefix)
    assert target is not None
    message = transport_warning(target)
    assert message is None or "Sup3r" not in message  # the password, in either form
    return message


PG_AUTH = f"Database=kc;Username=kc;Password={ado_quote(PASSWORD)}"
MY_AUTH = f"Database=kc;Uid=kc;Pwd={ado_quote(PASSWORD)}"
MS_AUTH = f"Database=kc;User Id=kc;Password={ado_quote(PASSWORD)}"
URL_PASSWORD = "Sup3r%3BSecret%3Dpw"


# -- the verdict on connection strings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "connection_string"),
    [
        # Npgsql spelling: loopback names and addresses, IPv6 loopback in both forms, a socket folder.
        ("postgresql", f"Host=localhost;{PG_AUTH}"),
        ("postgresql", f"Host=LOCALHOST.;{PG_AUTH}"),
        ("postgresql", f"Host=127.0.0.1;Port=5433;{PG_AUTH}"),
        ("postgresql", f"Server=127.45.6.7;{PG_AUTH}"),
        ("postgresql", f"Host=::1;{PG_AUTH}"),
        ("postgresql", f"Host=[::1]:5433;{PG_AUTH}"),
        ("postgresql", f"Host=::ffff:127.0.0.1;{PG_AUTH}"),
        ("postgresql", f"Host=/var/run/postgresql;{PG_AUTH}"),
        ("postgresql", f"Host=localhost,127.0.0.2:5433;{PG_AUTH};SSL Mode=Disable"),
        # Remote, but verified: every spelling of the two verify modes.
        ("postgresql", f"Host=db.example.com;{PG_AUTH};SSL Mode=VerifyFull"),
        ("postgresql", f"Host=db.example.com;{PG_AUTH};SslMode=verify-full"),
        ("postgresql", f"Host=10.1.2.3;{PG_AUTH};SSL Mode=VerifyCA"),
        ("postgresql", f"Host=[2001:db8::5]:5432;{PG_AUTH};SSL Mode=verify-ca"),
        ("postgresql", f"Host=db.example.com;{PG_AUTH};SSL Mode=VerifyFull;Trust Server Certificate=false"),
        # URL form.
        ("postgresql", f"postgresql://kc:{URL_PASSWORD}@[::1]:5432/kc"),
        ("postgresql", f"postgres://kc:{URL_PASSWORD}@127.0.0.1/kc?sslmode=disable"),
        ("postgresql", f"postgresql://kc:{URL_PASSWORD}@db.example.com/kc?sslmode=verify-full"),
        ("postgresql", f"postgresql+asyncpg://kc:{URL_PASSWORD}@db.example.com/kc?sslmode=verify-ca"),
        # MySqlConnector spelling.
        ("mysql", f"Server=localhost;{MY_AUTH};SslMode=None"),
        ("mysql", f"Server=127.0.0.1;Port=3307;{MY_AUTH}"),
        ("mysql", f"Server=db.example.com;{MY_AUTH};SslMode=VerifyCA"),
        ("mysql", f"Server=db.example.com;{MY_AUTH};Ssl-Mode=VerifyFull"),
        ("mysql", f"Server=db.example.com;{MY_AUTH};SSL Mode=VERIFY_IDENTITY"),
        ("mysql", f"mysql://kc:{URL_PASSWORD}@db.example.com/kc?ssl_mode=VERIFY_IDENTITY"),
        ("mysql", f"mariadb://kc:{URL_PASSWORD}@localhost/kc"),
        # SqlClient spelling: Encrypt=True (the default) checks the certificate.
        ("sqlserver", f"Server=tcp:db.example.com,1433;{MS_AUTH}"),
        ("sqlserver", f"Server=tcp:db.example.com,1433;{MS_AUTH};Encrypt=True"),
        ("sqlserver", f"Server=db.example.com;{MS_AUTH};Encrypt=Strict"),
        ("sqlserver", f"Server=db.example.com;{MS_AUTH};Encrypt=Mandatory;TrustServerCertificate=False"),
        ("sqlserver", f"Server=(local);{MS_AUTH};Encrypt=False"),
        ("sqlserver", f"Server=.;{MS_AUTH};Encrypt=Optional"),
        ("sqlserver", f"Server=127.0.0.1\\SQLEXPRESS;{MS_AUTH};Encrypt=False"),
        ("sqlserver", f"Server=tcp:localhost,1433;{MS_AUTH};TrustServerCertificate=True"),
        ("sqlserver", f"mssql://kc:{URL_PASSWORD}@db.example.com/kc?encrypt=true"),
    ],
)
def test_local_or_verified_connections_get_no_warning(provider: str, connection_string: str) -> None:
    assert verdict(provider, connection_string) is None


@pytest.mark.parametrize(
    ("provider", "connection_string", "where", "mode", "fix"),
    [
        # Npgsql: no SSL mode means "prefer", which neither insists on TLS nor checks anything.
        (
            "postgresql",
            f"Host=db.example.com;{PG_AUTH}",
            "db.example.com:5432",
            "prefer",
            "SSL Mode=VerifyFull",
        ),
        (
            "postgresql",
            f"Host=10.0.0.5;Port=6432;{PG_AUTH};SSL Mode=Disable",
            "10.0.0.5:6432",
            "disable",
            None,
        ),
        ("postgresql", f"Host=db;{PG_AUTH};SslMode=Allow", "db:5432", "allow", None),
        ("postgresql", f"Host=db;{PG_AUTH};SSL Mode=Prefer", "db:5432", "prefer", None),
        ("postgresql", f"Host=db;{PG_AUTH};SSL Mode=Require", "db:5432", "require", None),
        (
            "postgresql",
            f"Host=[2001:db8::5]:5433;{PG_AUTH};SSL Mode=Require",
            "[2001:db8::5]:5433",
            "require",
            None,
        ),
        ("postgresql", f"Host=fe80::1%eth0;{PG_AUTH}", "[fe80::1%eth0]:5432", "prefer", None),
        # Names that only look local: a DNS answer is what an attacker forges.
        ("postgresql", f"Host=localhost.example.com;{PG_AUTH}", "localhost.example.com:5432", "prefer", None),
        ("postgresql", f"Host=127.0.0.1.nip.io;{PG_AUTH}", "127.0.0.1.nip.io:5432", "prefer", None),
        # Failover list: only the remote host is named.
        (
            "postgresql",
            f"Host=localhost,db2.example.com:5433;{PG_AUTH}",
            "db2.example.com:5433",
            "prefer",
            None,
        ),
        # A verify mode switched off again by Trust Server Certificate is not verified.
        (
            "postgresql",
            f"Host=db;{PG_AUTH};SSL Mode=VerifyFull;Trust Server Certificate=true",
            "db:5432",
            "require",
            "SSL Mode=VerifyFull and remove Trust Server Certificate",
        ),
        # URL form: the advice is in URL spelling.
        (
            "postgresql",
            f"postgresql://kc:{URL_PASSWORD}@db.example.com/kc",
            "db.example.com:5432",
            "prefer",
            "sslmode=verify-full",
        ),
        (
            "postgresql",
            f"postgres://kc:{URL_PASSWORD}@[2001:db8::7]:5432/kc?sslmode=require",
            "[2001:db8::7]:5432",
            "require",
            "sslmode=verify-full",
        ),
        # MySqlConnector.
        ("mysql", f"Server=db.example.com;{MY_AUTH}", "db.example.com:3306", "prefer", "SslMode=VerifyFull"),
        ("mysql", f"Server=db.example.com;{MY_AUTH};SslMode=None", "db.example.com:3306", "disable", None),
        (
            "mysql",
            f"Server=db.example.com;{MY_AUTH};SslMode=Preferred",
            "db.example.com:3306",
            "prefer",
            None,
        ),
        (
            "mysql",
            f"Server=192.168.1.20;Port=3307;{MY_AUTH};SslMode=Required",
            "192.168.1.20:3307",
            "require",
            None,
        ),
        (
            "mysql",
            f"mysql://kc:{URL_PASSWORD}@db.example.com:3306/kc?ssl_mode=REQUIRED",
            "db.example.com:3306",
            "require",
            "ssl_mode=VERIFY_IDENTITY",
        ),
        # SqlClient.
        (
            "sqlserver",
            f"Server=tcp:db.example.com,1433;{MS_AUTH};Encrypt=False",
            "db.example.com:1433",
            "prefer",
            "Encrypt=True;TrustServerCertificate=False",
        ),
        (
            "sqlserver",
            f"Server=db.example.com;{MS_AUTH};Encrypt=Optional",
            "db.example.com:1433",
            "prefer",
            None,
        ),
        (
            "sqlserver",
            f"Server=db.example.com,1444;{MS_AUTH};Encrypt=True;TrustServerCertificate=True",
            "db.example.com:1444",
            "require",
            "Encrypt=True;TrustServerCertificate=False",
        ),
        ("sqlserver", f"Server=db\\SQLEXPRESS;{MS_AUTH};Encrypt=no", "db\\SQLEXPRESS:1433", "prefer", None),
        (
            "sqlserver",
            f"mssql://kc:{URL_PASSWORD}@db.example.com/kc?encrypt=false",
            "db.example.com:1433",
            "prefer",
            "encrypt=true&trustservercertificate=false",
        ),
    ],
)
def test_remote_connections_without_verified_tls_are_warned_about(
    provider: str, connection_string: str, where: str, mode: str, fix: str | None
) -> None:
    message = verdict(provider, connection_string)
    assert message is not None
    assert message.startswith(f"keyConnectorSettings__database__{SETTING[provider]}: ")
    assert f"the database server {where} is not on this machine" in message
    assert f"(SSL mode {mode})" in message
    assert "plant" in message and "data key" in message and "records" in message
    if fix is not None:
        assert f"set {fix}, and have" in message
    assert PASSWORD not in message and URL_PASSWORD not in message


def test_the_warning_for_a_failover_list_names_only_the_remote_hosts() -> None:
    message = verdict("postgresql", f"Host=localhost,db1:5433,db2;{PG_AUTH}")
    assert message is not None
    assert "server db1:5433, db2:5432 is not" in message
    assert "localhost" not in message


def test_the_warning_names_the_transfer_target_by_its_own_setting() -> None:
    message = verdict("postgresql", f"Host=db.example.com;{PG_AUTH}", prefix="transferTo.database")
    assert message is not None
    assert message.startswith("keyConnectorSettings__transferTo__database__postgreSqlConnectionString: ")


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("[::1]", True),
        ("0:0:0:0:0:0:0:1", True),
        ("::ffff:127.0.0.1", True),
        ("/tmp/pg-socket", True),
        ("ip6-localhost", True),
        ("127.0.0.1\\SQLEXPRESS", True),
        ("128.0.0.1", False),
        ("10.0.0.1", False),
        ("::2", False),
        ("::ffff:10.0.0.1", False),
        ("fe80::1%lo", False),
        ("localhost.example.com", False),
        ("mylocalhost", False),
        ("db", False),
        ("0.0.0.0", False),
        ("", False),
    ],
)
def test_what_counts_as_this_machine(host: str, local: bool) -> None:
    assert is_local_host(host) is local


def test_the_ok_line_says_why() -> None:
    local = server_target(load_settings(env_for("postgresql", f"Host=::1;{PG_AUTH}")).settings.database)
    verified = server_target(
        load_settings(env_for("mysql", f"Server=db;{MY_AUTH};SslMode=VerifyCA")).settings.database
    )
    assert local is not None and verified is not None
    assert transport_summary(local) == "[::1]:5432 is on this machine"
    assert transport_summary(verified) == "verified TLS (SSL mode verify-ca) to db:3306"


@pytest.mark.parametrize(
    "env",
    [
        {
            "keyConnectorSettings__database__provider": "sqlite",
            "keyConnectorSettings__database__sqliteConnectionString": "Data Source=/srv/kc.db",
        },
        {
            "keyConnectorSettings__database__provider": "json",
            "keyConnectorSettings__database__jsonFilePath": "/srv/data.json",
        },
    ],
)
def test_files_are_never_warned_about(env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    database = load_settings(env).settings.database
    assert server_target(database) is None
    assert warn_insecure_transport(database) is None
    assert _check_transport(database) is None
    assert not caplog.records


def test_a_connection_string_that_does_not_parse_leaves_the_verdict_to_the_database_line() -> None:
    database = load_settings(env_for("postgresql", f"Host=db;{PG_AUTH};SSL Mode=Sometimes")).settings.database
    assert _check_transport(database) is None


def test_the_log_line_is_one_warning_taken_literally(caplog: pytest.LogCaptureFixture) -> None:
    """A '%' in the text (an IPv6 zone) must not be read as a format directive."""
    database = load_settings(env_for("postgresql", f"Host=fe80::1%eth0;{PG_AUTH}")).settings.database
    with caplog.at_level(logging.WARNING):
        message = warn_insecure_transport(database)
    assert message is not None and "fe80::1%eth0" in message
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, message)]


def test_serve_warns_about_the_transfer_target_only_while_the_transfer_is_to_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock = tmp_path / "transfer.lock"
    env = {
        **env_for("postgresql", f"Host=db.example.com;{PG_AUTH};SSL Mode=Require"),
        **env_for("mysql", f"Server=other.example.com;{MY_AUTH}", prefix="transferTo.database"),
        "keyConnectorSettings__transferTo__lockfilePath": str(lock),
        # Both target sections: upstream runs the start-up transfer only then, and so do we.
        "keyConnectorSettings__transferTo__rsaKey__provider": "certificate",
    }
    settings = load_settings(env).settings
    with caplog.at_level(logging.WARNING):
        server_module.warn_database_transport(settings)
    del env["keyConnectorSettings__transferTo__rsaKey__provider"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # half a target: no transfer, so no warning about its database
        server_module.warn_database_transport(load_settings(env).settings)
    assert len(caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        server_module.warn_database_transport(settings)
    texts = [record.getMessage() for record in caplog.records]
    assert len(texts) == 2
    assert texts[0].startswith("keyConnectorSettings__database__postgreSqlConnectionString: ")
    assert texts[1].startswith("keyConnectorSettings__transferTo__database__mySqlConnectionString: ")

    caplog.clear()
    lock.write_text("done\n")
    with caplog.at_level(logging.WARNING):
        server_module.warn_database_transport(settings)
    assert [record.getMessage() for record in caplog.records] == texts[:1]


# -- the commands, against real servers ---------------------------------------------------------------------


def non_loopback_address() -> str | None:
    """One of this machine's own IPv4 addresses outside 127.0.0.0/8 that a socket can bind, or None.

    ``gethostbyname(gethostname())`` is often a loopback address (127.0.1.1 on Debian), so the address
    of the interface that would carry traffic out is asked too: connecting a UDP socket sends nothing
    but picks the route and the source address.
    """
    candidates: list[str] = []
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        candidates += [str(info[4][0]) for info in infos]
    except OSError:
        pass
    for probe in ("192.0.2.1", "10.255.255.255", "198.51.100.1", "203.0.113.1"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.connect((probe, 9))
                candidates.append(udp.getsockname()[0])
        except OSError:
            continue
    for candidate in candidates:
        address = ipaddress.ip_address(candidate)
        if address.is_loopback or address.is_unspecified:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
                listener.bind((candidate, 0))
        except OSError:
            continue
        return candidate
    return None


@pytest.fixture(params=["postgresql", "mariadb"])
def server(request: pytest.FixtureRequest) -> PostgresServer | MariaDbServer:
    name = "running_postgresql" if request.param == "postgresql" else "running_mariadb"
    running: PostgresServer | MariaDbServer = request.getfixturevalue(name)
    return running


@pytest.fixture
def remote_looking(server: PostgresServer | MariaDbServer) -> Iterator[tuple[str, int]]:
    """The test server, reached through this machine's non-loopback address (a proxy listening there)."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to make a local server look remote")
    with TcpProxy(("127.0.0.1", server.port), host=address) as proxy:
        proxy.up()
        yield address, proxy.port


def database_env(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path, server: PostgresServer | MariaDbServer, host: str, port: int
) -> dict[str, str]:
    """A complete environment on ``server``'s fresh database, addressed as ``host:port``."""
    env = base_env(issuer, pfx, tmp_path / "unused.db")
    del env["keyConnectorSettings__database__sqliteConnectionString"]
    connection_string = server.connection_string(server.create_database())
    connection_string = connection_string.replace(f"=127.0.0.1;Port={server.port};", f"={host};Port={port};")
    provider = "postgresql" if isinstance(server, PostgresServer) else "mysql"
    env.update(env_for(provider, connection_string))
    return env


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", "check"], env=env, capture_output=True, text=True, timeout=90
    )


def lines_of(result: subprocess.CompletedProcess[str], name: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line[5:].startswith(name + ":")]


def test_check_on_a_loopback_server_says_ok(
    server: PostgresServer | MariaDbServer, issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> None:
    result = check(database_env(issuer, pfx, tmp_path, server, "127.0.0.1", server.port))
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines_of(result, "database transport") == [
        f"ok   database transport: 127.0.0.1:{server.port} is on this machine"
    ]
    assert lines_of(result, "database")[0].startswith("ok   database: ")
    assert WARNING_WORDS not in result.stdout + result.stderr


def test_check_warns_from_the_connection_string_alone_when_the_host_does_not_resolve(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> None:
    env = base_env(issuer, pfx, tmp_path / "unused.db")
    del env["keyConnectorSettings__database__sqliteConnectionString"]
    env.update(env_for("postgresql", f"Host=kc-db.invalid;Port=5432;{PG_AUTH};Timeout=3"))
    result = check(env)
    assert result.returncode == 3, result.stdout + result.stderr  # only the database cannot be reached: 3
    assert lines_of(result, "database")[0].startswith("FAIL database: ")
    [transport] = lines_of(result, "database transport")
    assert transport.startswith(
        "warn database transport: keyConnectorSettings__database__postgreSqlConnectionString: "
        "the database server kc-db.invalid:5432 is not on this machine"
    )
    assert "SSL Mode=VerifyFull" in transport
    assert PASSWORD not in result.stdout + result.stderr


def test_check_through_a_non_loopback_address_warns_and_still_passes(
    server: PostgresServer | MariaDbServer,
    remote_looking: tuple[str, int],
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
) -> None:
    host, port = remote_looking
    result = check(database_env(issuer, pfx, tmp_path, server, host, port))
    # A warning, not a failure: the database works, and a trusted private network may be intended.
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines_of(result, "database")[0].startswith("ok   database: ")
    [transport] = lines_of(result, "database transport")
    setting = SETTING["postgresql" if isinstance(server, PostgresServer) else "mysql"]
    assert transport.startswith(
        f"warn database transport: keyConnectorSettings__database__{setting}: "
        f"the database server {host}:{port} is not on this machine"
    )
    assert server.password not in result.stdout + result.stderr


def test_serve_logs_the_warning_once_with_several_workers(
    server: PostgresServer | MariaDbServer,
    remote_looking: tuple[str, int],
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
    start_service: object,
) -> None:
    host, port = remote_looking
    env = database_env(issuer, pfx, tmp_path, server, host, port)
    service: Service = start_service(env, workers=2)  # type: ignore[operator]
    assert httpx.get(service.url + "/health", timeout=5).text == "Healthy"
    service.stop()
    logs = service.logs()
    assert logs.count(WARNING_WORDS) == 1, logs
    [line] = [line for line in logs.splitlines() if WARNING_WORDS in line]
    assert "WARNING" in line and f"{host}:{port}" in line
    assert server.password not in logs


def test_serve_warns_before_it_waits_for_an_unreachable_database(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> None:
    env = base_env(issuer, pfx, tmp_path / "unused.db")
    del env["keyConnectorSettings__database__sqliteConnectionString"]
    env.update(env_for("postgresql", f"Host=kc-db.invalid;{PG_AUTH};Timeout=2"))
    log_path = tmp_path / "serve.log"
    SERVICE_LOGS.append(log_path)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "keyconnector", "serve", "--port", str(free_port()), "--workers", "2"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "database not reachable" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    logs = log_path.read_text(errors="replace")
    assert logs.count(WARNING_WORDS) == 1, logs
    assert logs.index(WARNING_WORDS) < logs.index("database not reachable")
    assert PASSWORD not in logs
