"""A MariaDB primary and a replica on this machine, for the MariaDB failover test.

The primary is a :class:`~tests.support.databases.MariaDbServer` with its binary log on and
semi-synchronous replication (built into MariaDB since 10.3) waiting at ``AFTER_SYNC``: a commit is
acknowledged to the client only once the replica has the transaction in its relay log, which is what
lets the failover test demand that every acknowledged write survives the primary's death. It is turned on
once the replica is following (:meth:`PrimaryMariaDb.wait_for_replicas`). The
timeout is long (60 s) so that a slow machine does not quietly fall back to asynchronous replication
in the middle of the test; :meth:`PrimaryMariaDb.semi_synchronous` says whether it did.

The replica is a second fresh server, started ``--read-only``, replicating by GTID from the start of
the primary's binary log (which holds everything, the primary having been bootstrapped with it on).
It is promoted the way an operator or a failover manager (MaxScale, orchestrator) does it:
``STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0``.

Both log in with the same user and password, as a real cluster's nodes do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.databases import MariaDbServer
from tests.support.processes import wait_until

SEMI_SYNC_TIMEOUT_MS = 60_000


class PrimaryMariaDb(MariaDbServer):
    """Binary log on, GTID replication, semi-synchronous (lossless: ``AFTER_SYNC``)."""

    name = "MariaDB primary"
    server_id = 1

    def _command(self) -> list[str]:
        command = [part for part in super()._command() if part != "--skip-log-bin"]
        return [
            *command,
            f"--server-id={self.server_id}",
            f"--log-bin={self.data / 'binlog'}",
            "--binlog-format=ROW",
            f"--rpl-semi-sync-master-timeout={SEMI_SYNC_TIMEOUT_MS}",
            "--rpl-semi-sync-master-wait-point=AFTER_SYNC",
        ]

    def wait_for_replicas(self) -> None:
        """Turn semi-synchronous replication on (once the replica exists: turned on earlier, the
        bootstrap's own commits would each wait out the timeout for a replica not yet there)."""
        connection = self._root()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET GLOBAL rpl_semi_sync_master_enabled = ON")
        finally:
            connection.close()

    def status(self, name: str) -> str | None:
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SHOW GLOBAL STATUS LIKE %s", (name,))
                row = cursor.fetchone()
        finally:
            connection.close()
        return None if row is None else str(row[1])

    def semi_synchronous(self) -> bool:
        """Whether a replica is connected as a semi-synchronous one and the primary waits for it."""
        try:
            return self.status("Rpl_semi_sync_master_clients") not in (None, "0") and (
                self.status("Rpl_semi_sync_master_status") == "ON"
            )
        except Exception:
            return False


class ReplicaMariaDb(MariaDbServer):
    """A read-only replica of ``primary`` (same user and password), semi-synchronous."""

    name = "MariaDB replica"
    server_id = 2

    def __init__(self, primary: PrimaryMariaDb) -> None:
        super().__init__()
        self.password = primary.password
        self.primary = primary

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            f"--server-id={self.server_id}",
            "--read-only=1",
            "--rpl-semi-sync-slave-enabled=ON",
            "--skip-slave-start",
        ]

    def _execute(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        connection = self._root()
        try:
            with connection.cursor() as cursor:
                for statement, parameters in statements:
                    cursor.execute(statement, parameters or None)
        finally:
            connection.close()

    def follow(self) -> None:
        """Replicate from the primary by GTID, from the start of its binary log."""
        self._execute(
            (
                "CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = %s, MASTER_USER = %s, "
                "MASTER_PASSWORD = %s, MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 1",
                (self.primary.port, self.primary.user, self.primary.password),
            ),
            ("START SLAVE", ()),
        )

    def promote(self) -> None:
        """Make this replica the writable server, as a careful failover manager would.

        First apply everything received (semi-synchronous replication acknowledges a commit once the
        replica has *received* it): ``RESET SLAVE ALL`` deletes the relay log, applied or not."""
        connection = self._root()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SHOW SLAVE STATUS")
                row = cursor.fetchone()
                names = [column[0] for column in cursor.description or ()]
                received = dict(zip(names, row, strict=True)).get("Gtid_IO_Pos") if row else None
                if received:
                    cursor.execute("SELECT MASTER_GTID_WAIT(%s, 30)", (received,))
                    waited = cursor.fetchone()
                    assert waited is not None and waited[0] == 0, "the replica did not catch up in 30 s"
        finally:
            connection.close()
        self._execute(("STOP SLAVE", ()), ("RESET SLAVE ALL", ()), ("SET GLOBAL read_only = 0", ()))

    def read_only(self) -> bool:
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT @@global.read_only")
                row = cursor.fetchone()
        finally:
            connection.close()
        return bool(row and row[0])


@pytest.fixture
def replicated_mariadb() -> Iterator[tuple[PrimaryMariaDb, ReplicaMariaDb]]:
    """A fresh primary with a semi-synchronous replica; both destroyed afterwards.

    Function-scoped: the failover test kills the primary and promotes the replica.
    """
    primary = PrimaryMariaDb()
    replica: ReplicaMariaDb | None = None
    try:
        primary.start()
        replica = ReplicaMariaDb(primary)
        replica.start()
        replica.follow()
        primary.wait_for_replicas()
        assert primary.process is not None
        wait_until(
            primary.semi_synchronous,
            primary.process,
            what=primary.name,
            log=primary.log,
            timeout=30,
            waiting_for="see its replica connected semi-synchronously",
        )
        yield primary, replica
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()
