"""PostgreSQL failover under load, without restarting the service.

Two real PostgreSQL servers on this machine: a primary and a standby made with ``pg_basebackup -R``,
replicating synchronously (tests/support/replication.py). The service is given both, the way an
upstream operator writes it for Npgsql: ``Host=a:1,b:2;...;Target Session Attributes=primary``.
Under a POST/GET/PUT/GET load from clients that retry as real ones do, the primary is SIGKILLed
and, a moment later, the standby promoted (what a failover manager such as Patroni does). What must
hold:

(a) every acknowledged write is readable afterwards, from the service and in the new primary;
(b) no request ended in a 5xx once the client's retries were spent, and every 5xx on the way was a
    503 with ``Retry-After`` (never a 500);
(c) the same service process served before and after: no restart;
(d) the service recovered within a generous bound; the measured time is printed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.storage.backends.postgresql import parse_target, read_attributes, write_attributes
from keyconnector.storage.sql.common import ServerTarget
from tests.conftest import Pfx, Service, base_env
from tests.support.databases import PostgresServer, ado_quote
from tests.support.failover_load import (
    PLANNED,
    RECOVERY_BOUND,
    USERS,
    Entry,
    Load,
    load_and_fail_over,
    new_key,
    read_all,
    recover_after_silence,
)
from tests.support.replication import Blackhole, PrimaryServer, StandbyServer

pytest_plugins = ["tests.support.replication"]


def postgresql_env(issuer: DevIssuer, pfx: Pfx, tmp_path: Path, connection_string: str) -> dict[str, str]:
    env = base_env(issuer, pfx, tmp_path / "unused.db")
    del env["keyConnectorSettings__database__sqliteConnectionString"]
    env["keyConnectorSettings__database__provider"] = "postgresql"
    env["keyConnectorSettings__database__postgreSqlConnectionString"] = connection_string
    return env


def npgsql_string(hosts: list[PostgresServer], database: str, attributes: str) -> str:
    """Exactly what an upstream operator gives Npgsql: every host, and which kind of server to use."""
    listed = ",".join(f"127.0.0.1:{server.port}" for server in hosts)
    return (
        f"Host={listed};Database={database};Username=postgres;"
        f"Password={ado_quote(hosts[0].password)};Target Session Attributes={attributes}"
    )


def url_string(hosts: list[PostgresServer], database: str, query: str) -> str:
    """The libpq/SQLAlchemy URL form of the same: ``postgresql://user:pw@h1:p1,h2:p2/db?...``."""
    listed = ",".join(f"127.0.0.1:{server.port}" for server in hosts)
    return f"postgresql://postgres:{quote(hosts[0].password, safe='')}@{listed}/{database}?{query}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("form", ["npgsql-primary-first", "url-standby-first"])
def test_the_service_rides_through_a_postgresql_failover_without_a_restart(
    form: str,
    replicated_postgresql: tuple[PrimaryServer, StandbyServer],
    start_service: object,
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
) -> None:
    primary, standby = replicated_postgresql
    database = primary.create_database()
    if form == "npgsql-primary-first":
        connection_string = npgsql_string([primary, standby], database, "primary")
    else:
        # The order must not matter: the service finds the primary whichever host is listed first.
        connection_string = url_string([standby, primary], database, "target_session_attrs=read-write")
    env = postgresql_env(issuer, pfx, tmp_path, connection_string)
    service: Service = start_service(env)  # type: ignore[operator]
    assert service.process is not None
    pid = service.process.pid

    ledger = {user: Entry({"Authorization": f"Bearer {token}"}) for user, token in issuer.mint_many(USERS)}
    load = Load(service.url, ledger)
    started = time.monotonic()
    killed_at, promoted_at = asyncio.run(
        load_and_fail_over(load, lambda: primary.stop(kill=True), standby.promote)
    )
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
    assert not standby.in_recovery()
    with standby.connect(database) as connection:
        rows = connection.execute('SELECT count(*) FROM "UserKeys" WHERE "Key" IS NOT NULL').fetchone()
    assert rows is not None and rows[0] == USERS


def sessions_on(server: PostgresServer, database: str) -> int:
    """The service's connections to ``server`` (its pools name themselves ``keyconnector``)."""
    with server.connect() as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'keyconnector'",
            (database,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_writes_go_to_the_primary_even_when_reads_may_use_a_standby(
    replicated_postgresql: tuple[PrimaryServer, StandbyServer],
    start_service: object,
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
) -> None:
    """``prefer-standby`` with the standby listed first: Npgsql would send writes there too, and each
    would fail as read-only. Here the key ring and every write go to the primary; only user-key reads
    use the standby. Two service processes: a key written through one is read at once through the
    other, which never wrote it and so reads it on the standby: the answer is never stale (the writer
    commits with ``synchronous_commit=remote_apply``)."""
    primary, standby = replicated_postgresql
    database = primary.create_database()
    env = postgresql_env(issuer, pfx, tmp_path, npgsql_string([standby, primary], database, "prefer-standby"))
    writer: Service = start_service(env)  # type: ignore[operator]
    reader: Service = start_service(env)  # type: ignore[operator]
    with writer.client() as writing, reader.client() as reading:
        for _user, token in issuer.mint_many(20):
            headers = {"Authorization": f"Bearer {token}"}
            for method in ("POST", "PUT"):
                key = new_key()
                response = writing.request(method, "/user-keys", json={"key": key}, headers=headers)
                assert response.status_code == 200, response.text
                # Straight after the write, elsewhere: the answer must be the key just written.
                for client in (reading, writing):
                    read = client.get("/user-keys", headers=headers)
                    assert read.status_code == 200 and read.json()["key"] == key
    assert sessions_on(standby, database) >= 1, "the reads never used the standby"
    assert sessions_on(primary, database) >= 1


def _target(connection_string: str) -> ServerTarget:
    settings = DatabaseSettings(postgresql_connection_string=connection_string)
    return parse_target(settings, "keyConnectorSettings__database")


@pytest.mark.parametrize(
    ("connection_string", "hosts"),
    [
        ("postgresql://kc:p%40ss@db1:5432,db2:5433/kc", (("db1", 5432), ("db2", 5433))),
        ("postgresql://kc:pw@[::1]:5432,db2/kc", (("::1", 5432), ("db2", 5432))),
        ("postgres://kc:pw@db1,db2/kc?target_session_attrs=primary", (("db1", 5432), ("db2", 5432))),
        ("Host=db1:5432,db2:5433;Database=kc;Username=kc;Password=pw", (("db1", 5432), ("db2", 5433))),
    ],
)
def test_multi_host_strings_are_read_in_both_forms(connection_string: str, hosts: tuple[object, ...]) -> None:
    target = _target(connection_string)
    assert target.hosts == hosts and target.database == "kc"
    assert target.password in ("pw", "p@ss")


@pytest.mark.parametrize(
    ("attributes", "writes", "reads"),
    [
        (None, "primary", None),
        ("any", "primary", None),
        ("primary", "primary", None),
        ("read-write", "read-write", None),
        ("prefer-standby", "primary", "prefer-standby"),
        ("PreferStandby", "primary", "prefer-standby"),
        ("standby", "primary", "standby"),
        ("read-only", "primary", "read-only"),
    ],
)
def test_writes_always_ask_for_a_primary_and_reads_use_standbys_only_when_asked(
    attributes: str | None, writes: str, reads: str | None
) -> None:
    extra = f";Target Session Attributes={attributes}" if attributes else ""
    target = _target(f"Host=db1,db2;Database=kc;Username=kc;Password=pw{extra}")
    assert (write_attributes(target), read_attributes(target)) == (writes, reads)


def test_one_host_is_used_as_given() -> None:
    target = _target("Host=db1;Database=kc;Username=kc;Password=pw;Target Session Attributes=prefer-standby")
    assert (write_attributes(target), read_attributes(target)) == (None, None)


@pytest.mark.parametrize(
    "connection_string",
    [
        "Host=db1,db2;Database=kc;Username=kc;Password=pw;Load Balance Hosts=sometimes",
        "postgresql://kc:pw@db1,db2/kc?load_balance_hosts=sometimes",
    ],
)
def test_a_bad_load_balance_hosts_value_names_the_setting(connection_string: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        _target(connection_string)
    text = str(caught.value)
    assert "keyConnectorSettings__database__postgreSqlConnectionString" in text
    assert "Load Balance Hosts must be true or false" in text and "pw" not in text


@pytest.mark.timeout(180)
def test_a_primary_that_drops_off_the_network_is_left_behind(
    replicated_postgresql: tuple[PrimaryServer, StandbyServer],
    start_service: object,
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
) -> None:
    """The primary's machine goes silent (no reset, no refusal) and the standby is promoted: the
    service must stop waiting on the silent host and find the new primary by itself."""
    primary, standby = replicated_postgresql
    database = primary.create_database()
    hole = Blackhole(("127.0.0.1", primary.port))
    try:
        connection_string = (
            f"Host=127.0.0.1:{hole.port},127.0.0.1:{standby.port};Database={database};Username=postgres;"
            f"Password={ado_quote(primary.password)};Target Session Attributes=primary;Timeout=3;"
            "Command Timeout=5"
        )
        service: Service = start_service(postgresql_env(issuer, pfx, tmp_path, connection_string))  # type: ignore[operator]
        users = issuer.mint_many(10)

        def fail_over() -> None:
            hole.vanish()
            primary.stop(kill=True)
            standby.promote()

        recovered, statuses = recover_after_silence(
            service.url, [token for _user, token in users], fail_over, transport_errors=True
        )
        print(f"recovered {recovered}s after the primary went silent; statuses {dict(statuses)}")
        assert recovered is not None and recovered < RECOVERY_BOUND, statuses
    finally:
        hole.close()
