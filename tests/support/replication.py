"""A PostgreSQL primary and a streaming-replication standby on this machine, for the failover tests.

The primary is a :class:`~tests.support.databases.PostgresServer` started with synchronous
replication on (``synchronous_standby_names = '*'``, ``synchronous_commit = on``): a commit is
acknowledged only once the standby has it, which is what lets the failover test demand that every
acknowledged write survives the primary's death. The standby is made the way an operator makes one,
``pg_basebackup -R`` (which writes ``primary_conninfo`` and ``standby.signal``), and is promoted with
``pg_promote()``.

Both log in with the same superuser and password (the standby is a copy of the primary's catalog).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator

import pytest

from keyconnector.devtools import free_port
from tests.support.databases import PostgresServer, _scratch, postgres_bin
from tests.support.processes import wait_until


class PrimaryServer(PostgresServer):
    """A PostgreSQL cluster that waits for one synchronous standby before acknowledging a commit."""

    name = "PostgreSQL primary"

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "-c",
            "wal_level=replica",
            "-c",
            "max_wal_senders=4",
            "-c",
            "synchronous_standby_names=*",
            "-c",
            "synchronous_commit=on",
        ]

    def replicated(self) -> bool:
        """Whether a standby streams from this primary as a synchronous one."""
        try:
            with self.connect() as connection:
                row = connection.execute(
                    "SELECT count(*) FROM pg_stat_replication"
                    " WHERE sync_state = 'sync' AND state = 'streaming'"
                ).fetchone()
            return bool(row and row[0])
        except Exception:
            return False


class StandbyServer(PostgresServer):
    """A hot standby of ``primary`` made with ``pg_basebackup -R`` over the primary's Unix socket."""

    name = "PostgreSQL standby"

    def __init__(self, primary: PrimaryServer) -> None:
        # PostgresServer.__init__ would run initdb; a standby's data directory is a base backup instead.
        self.port = free_port()
        self.password = primary.password
        self.process = None
        self._run_as = primary._run_as
        self.folder = _scratch("kc-standby-", self._run_as)
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        if self._run_as is not None:
            entry = pwd.getpwnam(self._run_as)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            [
                postgres_bin("pg_basebackup"),
                "-h",
                str(primary.folder),  # the socket folder: local connections are trusted
                "-p",
                str(primary.port),
                "-U",
                "postgres",
                "-D",
                str(self.data),
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=self._run_as,
            cwd=self.folder,
        )

    def promote(self) -> None:
        """Make this standby the primary (``pg_promote`` waits until it accepts writes)."""
        with self.connect() as connection:
            connection.execute("SELECT pg_promote(true, 30)")

    def in_recovery(self) -> bool:
        with self.connect() as connection:
            row = connection.execute("SELECT pg_is_in_recovery()").fetchone()
        return bool(row and row[0])


@pytest.fixture
def replicated_postgresql() -> Iterator[tuple[PrimaryServer, StandbyServer]]:
    """A fresh primary with a synchronous standby streaming from it; both destroyed afterwards.

    Function-scoped: the failover test kills the primary and promotes the standby.
    """
    primary = PrimaryServer()
    standby: StandbyServer | None = None
    try:
        primary.start()
        standby = StandbyServer(primary)
        standby.start()
        assert primary.process is not None
        wait_until(
            primary.replicated,
            primary.process,
            what=primary.name,
            log=primary.log,
            timeout=30,
            waiting_for="see its standby streaming synchronously",
        )
        yield primary, standby
    finally:
        if standby is not None:
            standby.destroy()
        primary.destroy()


class Blackhole:
    """A TCP forwarder that can go silent, as a server's machine does when it drops off the network.

    Unlike :class:`~tests.support.tcpproxy.TcpProxy` (which resets connections: a crashed process),
    :meth:`vanish` keeps every connection open and accepts new ones but forwards nothing any more:
    no reset, no refusal, only silence, so a client learns of it only from its own timeouts.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        import socket
        import threading

        self.target = target
        self.port = free_port()
        self.silent = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def vanish(self) -> None:
        self.silent.set()

    def close(self) -> None:
        import contextlib

        with contextlib.suppress(OSError):
            self._listener.close()
        for connection in self._held:
            with contextlib.suppress(OSError):
                connection.close()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(client)
            if self.silent.is_set():
                continue  # accepted, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self._held.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: object, sink: object) -> None:
        import socket

        assert isinstance(source, socket.socket) and isinstance(sink, socket.socket)
        try:
            while data := source.recv(65536):
                if not self.silent.is_set():
                    sink.sendall(data)
        except OSError:
            pass
