"""Private, throwaway PostgreSQL and MariaDB servers for the tests and the benchmark.

Each server is a real one, started from the distribution's binaries (``make test`` installs the
``postgresql`` and ``mariadb-server`` packages) into a fresh temporary directory, listening on a free
port of 127.0.0.1 with its socket inside that directory. The machine's own servers (5432, 3306, their
sockets and configuration files) are never touched: both are started with no configuration file at all.

Both servers refuse to run as root, so when the tests run as root the server process runs as the
distribution's service user (``postgres``, ``mysql``), which then owns the temporary directory. Both
use real password authentication over TCP, so that the tests see the same login errors an operator
would. Durability knobs are relaxed (no fsync): a restart test kills the server process, not the
machine, so the operating system's page cache keeps every committed write.

Also importable from ``bench/``: nothing here depends on pytest except the fixtures at the bottom.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyconnector.devtools import free_port
from tests.support.processes import port_open, started, stop_process, wait_for_port, wait_until

PASSWORD_ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def _password() -> str:
    # Includes characters a connection string must quote (';', '=', quotes): the product has to get
    # them through both ADO.NET quoting and the drivers.
    return "pw;'=\"" + "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(16))


def ado_quote(value: str) -> str:
    """A value as an ADO.NET connection string needs it: double quotes, doubled inside."""
    return '"' + value.replace('"', '""') + '"'


def _service_user(name: str) -> str | None:
    """The user to run a server as: ``name`` when we are root (servers refuse root), else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(f"running as root, but there is no '{name}' user to run the server as") from None
    return name


def _scratch(prefix: str, owner: str | None) -> Path:
    # Not pytest's tmp_path: that lives under a 0700 directory of root's that the service user
    # cannot enter.
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    if owner is not None:
        entry = pwd.getpwnam(owner)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    os.chmod(folder, 0o700)
    return folder


class _Server:
    """Shared life cycle: a data directory, a child process, stop and restart on the same port."""

    name = "server"
    user = "root"
    stop_signal = signal.SIGTERM
    """The server's "clean and quick" shutdown signal."""

    def __init__(self) -> None:
        self.port = free_port()
        self.password = _password()
        self.process: subprocess.Popen[bytes] | None = None
        self.folder = Path()
        self.log = Path()
        self._run_as: str | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """A real login works (the port opens a little before the server accepts logins)."""
        raise NotImplementedError

    def start(self, timeout: float = 60) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        handle = open(self.log, "ab")  # noqa: SIM115 - the child keeps it; closed with the process
        try:
            self.process = subprocess.Popen(
                self._command(),
                stdout=handle,
                stderr=subprocess.STDOUT,
                user=self._run_as,
                start_new_session=True,
                cwd=self.folder,
            )
        finally:
            handle.close()
        wait_for_port("127.0.0.1", self.port, self.process, what=self.name, log=self.log, timeout=timeout)
        wait_until(
            self._ready,
            self.process,
            what=self.name,
            log=self.log,
            timeout=timeout,
            waiting_for="accept a login",
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, *, kill: bool = False, timeout: float = 30) -> None:
        """Stop the server: a clean shutdown that does not wait for clients, or with ``kill`` a crash."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        stop_process(process, signal.SIGKILL if kill else self.stop_signal, timeout)
        if kill:
            # A killed postmaster leaves its children running for a moment; wait for the port.
            self._wait_port_free()

    def _wait_port_free(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not port_open("127.0.0.1", self.port, timeout=0.2):
                return
            time.sleep(0.05)

    def restart(self, down_seconds: float = 0.0, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        time.sleep(down_seconds)
        self.start()

    def destroy(self) -> None:
        self.stop(kill=True)  # throwaway: no need to wait for a clean shutdown
        shutil.rmtree(self.folder, ignore_errors=True)


# -- PostgreSQL ------------------------------------------------------------------------------------------


def postgres_bin(tool: str) -> str:
    """The newest installed major version's binary (Debian keeps them out of PATH)."""
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), key=lambda p: int(p.split("/")[4] or 0)
    )
    if candidates:
        return candidates[-1]
    found = shutil.which(tool)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {tool} is not installed (Debian package 'postgresql')")
    return found


class PostgresServer(_Server):
    """A private PostgreSQL cluster; superuser ``postgres`` with a password (scram-sha-256 over TCP)."""

    name = "PostgreSQL"
    user = "postgres"
    stop_signal = signal.SIGINT  # "fast": SIGTERM ("smart") would wait for every client to leave

    def __init__(self) -> None:
        super().__init__()
        self._run_as = _service_user("postgres")
        self.folder = _scratch("kc-postgres-", self._run_as)
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        pwfile = self.folder / "pw"
        pwfile.write_text(self.password + "\n")
        if self._run_as is not None:
            entry = pwd.getpwnam(self._run_as)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            os.chown(self.log.parent, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            [
                postgres_bin("initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--pwfile",
                str(pwfile),
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=self._run_as,
            cwd=self.folder,
        )
        pwfile.unlink()

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.folder),
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
        }
        command = [postgres_bin("postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def connect(self, database: str = "postgres", **kwargs: Any) -> Any:
        """A psycopg connection in autocommit mode (plain SQL for fixtures and assertions)."""
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            autocommit=True,
            connect_timeout=5,
            **kwargs,
        )

    def _ready(self) -> bool:
        try:
            with self.connect() as connection:
                connection.execute("SELECT 1")
            return True
        except Exception:
            return False

    def create_database(self, name: str | None = None) -> str:
        name = name or "kc_" + secrets.token_hex(4)
        with self.connect() as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return name

    def connection_string(self, database: str, extra: str = "") -> str:
        """What an operator of upstream wrote, in Npgsql's spelling."""
        return (
            f"Host=127.0.0.1;Port={self.port};Database={database};Username={self.user};"
            f"Password={ado_quote(self.password)}{extra}"
        )


# -- MariaDB -------------------------------------------------------------------------------------------


def mariadb_bin(tool: str) -> str:
    for folder in ("/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"):
        path = Path(folder) / tool
        if path.exists():
            return str(path)
    found = shutil.which(tool)
    if found is None:
        raise RuntimeError(f"MariaDB's {tool} is not installed (Debian package 'mariadb-server')")
    return found


class MariaDbServer(_Server):
    """A private MariaDB; user ``kc`` with a password and every privilege (``root`` only on the socket)."""

    name = "MariaDB"
    user = "kc"

    def __init__(self) -> None:
        super().__init__()
        self._run_as = _service_user("mysql")
        self.folder = _scratch("kc-mariadb-", self._run_as)
        self.data = self.folder / "data"
        self.socket = self.folder / "mariadb.sock"
        self.log = self.folder / "server.log"
        subprocess.run(
            [
                mariadb_bin("mariadb-install-db"),
                "--no-defaults",
                f"--datadir={self.data}",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
                "--skip-name-resolve",
                "--innodb-flush-log-at-trx-commit=2",
            ],
            check=True,
            capture_output=True,
            user=self._run_as,
            cwd=self.folder,
        )
        self._bootstrapped = False

    def _command(self) -> list[str]:
        command = [
            mariadb_bin("mariadbd"),
            "--no-defaults",
            f"--datadir={self.data}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.socket}",
            f"--pid-file={self.folder / 'mariadb.pid'}",
            "--skip-name-resolve",
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-doublewrite=0",
            "--innodb-buffer-pool-size=64M",
            "--skip-log-bin",
            "--max-connections=300",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
        ]
        if os.geteuid() == 0:
            command.append(f"--user={self._run_as or 'root'}")
        return command

    def _root(self) -> Any:
        import pymysql

        return pymysql.connect(unix_socket=str(self.socket), user="root", autocommit=True, connect_timeout=5)

    def connect(self, database: str | None = None, **kwargs: Any) -> Any:
        """A pymysql connection over TCP as ``kc``, in autocommit mode."""
        import pymysql

        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            database=database,
            autocommit=True,
            connect_timeout=5,
            **kwargs,
        )

    def _ready(self) -> bool:
        try:
            if not self._bootstrapped:
                # root authenticates by socket ownership; make the TCP user the product logs in as.
                connection = self._root()
                try:
                    with connection.cursor() as cursor:
                        for host in ("127.0.0.1", "localhost"):
                            cursor.execute(
                                f"CREATE USER IF NOT EXISTS 'kc'@'{host}' IDENTIFIED BY %s", (self.password,)
                            )
                            cursor.execute(f"GRANT ALL PRIVILEGES ON *.* TO 'kc'@'{host}' WITH GRANT OPTION")
                finally:
                    connection.close()
                self._bootstrapped = True
            self.connect().close()
            return True
        except Exception:
            return False

    def create_database(self, name: str | None = None) -> str:
        name = name or "kc_" + secrets.token_hex(4)
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        finally:
            connection.close()
        return name

    def connection_string(self, database: str, extra: str = "") -> str:
        """What an operator of upstream wrote, in MySqlConnector's spelling."""
        return (
            f"Server=127.0.0.1;Port={self.port};Database={database};Uid={self.user};"
            f"Pwd={ado_quote(self.password)}{extra}"
        )


@contextlib.contextmanager
def running(server_type: type[_Server]) -> Iterator[_Server]:
    """Create, start, and finally destroy a server (for scripts; tests use the fixtures)."""
    yield from started(server_type())


# -- pytest fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgresServer]:
    yield from started(PostgresServer())


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDbServer]:
    yield from started(MariaDbServer())


@pytest.fixture
def running_postgresql(postgresql_server: PostgresServer) -> PostgresServer:
    """The session's PostgreSQL, started again if a test left it stopped."""
    postgresql_server.start()
    return postgresql_server


@pytest.fixture
def running_mariadb(mariadb_server: MariaDbServer) -> MariaDbServer:
    """The session's MariaDB, started again if a test left it stopped."""
    mariadb_server.start()
    return mariadb_server
