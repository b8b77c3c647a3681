"""MariaDB failover under load, without restarting the service.

Two real MariaDB servers on this machine: a primary and a read-only replica following it by GTID,
semi-synchronously (tests/support/mariadb_replication.py). The service is given both, the way an
upstream operator writes it for MySqlConnector: ``Server=a,b;...;Load Balance=FailOver``. Under a
POST/GET/PUT/GET load from clients that retry as real ones do (tests/support/failover_load.py), the
primary is SIGKILLed and, a moment later, the replica promoted (``STOP SLAVE; RESET SLAVE ALL; SET
GLOBAL read_only = 0``). What must hold, as for PostgreSQL (tests/test_failover.py):

(a) every acknowledged write is readable afterwards, from the service and in the new primary;
(b) no request ended in a 5xx once the client's retries were spent, and every 5xx on the way was a
    503 with ``Retry-After`` (never a 500);
(c) the same service process served before and after: no restart;
(d) the service recovered within a generous bound; the measured time is printed.

The replica is listed first. The test user has every privilege, which in MariaDB 10.11 includes
``READ ONLY ADMIN``: the replica's ``read_only`` would not stop its writes. Only the service's own
check of ``@@read_only`` keeps them off the replica until it is promoted, and the test checks that
the replica had no session of the service when the primary was killed (migrations included: they
ran on the primary, or the replica would hold the tables and the primary none).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.storage.backends.mysql import load_balance, parse_target
from keyconnector.storage.sql.common import ServerTarget
from tests.conftest import Pfx, Service, base_env
from tests.support.databases import MariaDbServer, ado_quote
from tests.support.failover_load import (
    PLANNED,
    RECOVERY_BOUND,
    USERS,
    Entry,
    Load,
    load_and_fail_over,
    read_all,
    recover_after_silence,
)
from tests.support.mariadb_replication import PrimaryMariaDb, ReplicaMariaDb
from tests.support.replication import Blackhole

pytest_plugins = ["tests.support.mariadb_replication"]


def mysql_env(issuer: DevIssuer, pfx: Pfx, tmp_path: Path, connection_string: str) -> dict[str, str]:
    env = base_env(issuer, pfx, tmp_path / "unused.db")
    del env["keyConnectorSettings__database__sqliteConnectionString"]
    env["keyConnectorSettings__database__provider"] = "mysql"
    env["keyConnectorSettings__database__mySqlConnectionString"] = connection_string
    return env


def mysqlconnector_string(servers: list[MariaDbServer], database: str, extra: str = "") -> str:
    """Exactly what an upstream operator gives MySqlConnector: every server, comma-separated."""
    listed = ",".join(f"127.0.0.1:{server.port}" for server in servers)
    return (
        f"Server={listed};Database={database};Uid={servers[0].user};"
        f"Pwd={ado_quote(servers[0].password)}{extra}"
    )


def count_rows(server: MariaDbServer, database: str) -> int:
    connection = server.connect(database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM `UserKeys` WHERE `Key` IS NOT NULL")
            row = cursor.fetchone()
    finally:
        connection.close()
    return int(row[0]) if row else 0


def sessions_on(server: MariaDbServer, database: str) -> int:
    """Client sessions on ``database`` (the replication threads run as ``system user``)."""
    connection = server.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = %s AND USER = %s "
                "AND ID <> CONNECTION_ID()",
                (database, server.user),
            )
            row = cursor.fetchone()
    finally:
        connection.close()
    return int(row[0]) if row else 0


@pytest.mark.timeout(180)
def test_the_service_rides_through_a_mariadb_failover_without_a_restart(
    replicated_mariadb: tuple[PrimaryMariaDb, ReplicaMariaDb],
    start_service: object,
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
) -> None:
    primary, replica = replicated_mariadb
    database = primary.create_database()
    # The replica first: the service must pass it over (it is read-only) until it is promoted.
    connection_string = mysqlconnector_string([replica, primary], database, ";Load Balance=FailOver")
    service: Service = start_service(mysql_env(issuer, pfx, tmp_path, connection_string))  # type: ignore[operator]
    assert service.process is not None
    pid = service.process.pid

    ledger = {user: Entry({"Authorization": f"Bearer {token}"}) for user, token in issuer.mint_many(USERS)}
    load = Load(service.url, ledger)
    replica_sessions: list[int] = []

    def kill() -> None:
        replica_sessions.append(sessions_on(replica, database))
        primary.stop(kill=True)

    started = time.monotonic()
    killed_at, promoted_at = asyncio.run(load_and_fail_over(load, kill, replica.promote))
    load_seconds = time.monotonic() - started
    after_kill = [answered for sent, answered in load.acknowledged_writes if sent > killed_at]
    recovered_at = min(after_kill) if after_kill else None
    recovery = None if recovered_at is None else recovered_at - killed_at
    summary = (
        f"load {load_seconds:.1f}s, {load.completed} requests, statuses {dict(load.statuses)}, "
        f"{load.transport_errors} transport errors, {load.retries} retries; "
        f"first acknowledged write {recovery if recovery is None else round(recovery, 2)}s after the "
        f"kill, {None if recovered_at is None else round(recovered_at - promoted_at, 2)}s after the "
        "promotion"
    )
    print(summary)

    # Before the failover, nothing went to the replica although it is listed first.
    assert replica_sessions == [0], "the service connected to the read-only replica before its promotion"

    # (b) no 500 on the way, and every request settled without a 5xx.
    assert not load.without_retry_after, f"5xx other than 503 + Retry-After: {load.without_retry_after[:3]}"
    assert load.completed == PLANNED, summary
    assert not load.unresolved, f"{len(load.unresolved)} requests never succeeded: {load.unresolved[:5]}"
    assert not load.wrong, f"{len(load.wrong)} answers contradict the ledger: {load.wrong[:5]}"
    assert all(entry.acknowledged is not None and not entry.possible for entry in ledger.values())

    # (d) recovered by itself, within a generous bound.
    assert recovery is not None, "no write was acknowledged after the kill: " + summary
    assert recovery < RECOVERY_BOUND, summary

    # (c) no restart: the same process, still running.
    assert service.process.pid == pid and service.process.poll() is None
    assert httpx.get(service.url + "/health/ready", timeout=10).status_code == 200
    assert "unhandled error" not in service.logs()

    # (a) every acknowledged key, from the service and in the new primary.
    answers = asyncio.run(read_all(service.url, ledger))
    lost = [
        user for user, (status, key) in answers.items() if status != 200 or key != ledger[user].acknowledged
    ]
    assert not lost, f"{len(lost)} of {USERS} users lost their last acknowledged key"
    assert not replica.read_only()
    assert count_rows(replica, database) == USERS


def _target(connection_string: str) -> ServerTarget:
    settings = DatabaseSettings(mysql_connection_string=connection_string)
    return parse_target(settings, "keyConnectorSettings__database")


@pytest.mark.parametrize(
    ("connection_string", "hosts"),
    [
        ("Server=db1,db2:3307;Database=kc;Uid=kc;Pwd=pw", (("db1", 3306), ("db2", 3307))),
        ("Server=db1, db2;Port=3310;Database=kc;Uid=kc;Pwd=pw", (("db1", 3310), ("db2", 3310))),
        ("Host=[::1]:3306,db2;Database=kc;Uid=kc;Pwd=pw", (("::1", 3306), ("db2", 3306))),
        ("mysql://kc:p%40ss@db1:3306,db2:3307/kc", (("db1", 3306), ("db2", 3307))),
        ("mariadb://kc:pw@db1,db2/kc?load_balance=random", (("db1", 3306), ("db2", 3306))),
    ],
)
def test_server_lists_are_read_in_both_forms(connection_string: str, hosts: tuple[object, ...]) -> None:
    target = _target(connection_string)
    assert target.hosts == hosts and target.database == "kc"
    assert target.password in ("pw", "p@ss")


@pytest.mark.parametrize(
    ("given", "meaning"),
    [
        ("", "failover"),
        (";Load Balance=FailOver", "failover"),
        (";LoadBalance=InOrder", "failover"),
        (";Load Balance=RoundRobin", "failover"),
        (";Load Balance=LeastConnections", "failover"),
        (";Load Balance=FewestConnections", "failover"),
        (";Load Balance=Random", "random"),
        (";load balance=random", "random"),
    ],
)
def test_load_balance_decides_the_order_servers_are_tried_in(given: str, meaning: str) -> None:
    assert load_balance(_target(f"Server=db1,db2;Database=kc;Uid=kc;Pwd=pw{given}")) == meaning


@pytest.mark.parametrize(
    "connection_string",
    [
        "Server=db1,db2;Database=kc;Uid=kc;Pwd=secretpw;Load Balance=Sometimes",
        "mysql://kc:secretpw@db1,db2/kc?load_balance=sometimes",
    ],
)
def test_a_bad_load_balance_value_names_the_setting(connection_string: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        _target(connection_string)
    text = str(caught.value)
    assert "keyConnectorSettings__database__mySqlConnectionString" in text
    assert "Load Balance must be one of" in text and "secretpw" not in text


@pytest.mark.timeout(180)
def test_a_primary_that_drops_off_the_network_is_left_behind(
    replicated_mariadb: tuple[PrimaryMariaDb, ReplicaMariaDb],
    start_service: object,
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
) -> None:
    """The primary's machine goes silent (no reset, no refusal) and the replica is promoted: the
    service must stop waiting on the silent server and move to the new primary by itself, answering
    503 with ``Retry-After`` meanwhile."""
    primary, replica = replicated_mariadb
    database = primary.create_database()
    hole = Blackhole(("127.0.0.1", primary.port))
    try:
        connection_string = (
            f"Server=127.0.0.1:{hole.port},127.0.0.1:{replica.port};Database={database};"
            f"Uid={primary.user};Pwd={ado_quote(primary.password)};Connect Timeout=3;"
            "Default Command Timeout=5"
        )
        service: Service = start_service(mysql_env(issuer, pfx, tmp_path, connection_string))  # type: ignore[operator]
        users = issuer.mint_many(10)

        def fail_over() -> None:
            hole.vanish()
            primary.stop(kill=True)
            replica.promote()

        recovered, statuses = recover_after_silence(service.url, [token for _user, token in users], fail_over)
        print(f"recovered {recovered}s after the primary went silent; statuses {dict(statuses)}")
        assert recovered is not None and recovered < RECOVERY_BOUND, statuses
    finally:
        hole.close()
