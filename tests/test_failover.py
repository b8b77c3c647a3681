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
import base64
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
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
from tests.support.replication import Blackhole, PrimaryServer, StandbyServer

pytest_plugins = ["tests.support.replication"]

USERS = 150
CLIENTS = 16
STEPS = ("POST", "GET", "PUT", "GET")
PLANNED = USERS * len(STEPS)
KILL_AFTER = PLANNED // 3
PROMOTE_AFTER_SECONDS = 1.0
"""Between the primary's death and the promotion: a failover manager's detection time, shortened."""
REQUEST_DEADLINE = 25.0
"""How long one client keeps retrying one request."""
LOAD_DEADLINE = 60.0
RECOVERY_BOUND = 30.0


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Entry:
    """One user's ledger: the last acknowledged key and the keys of writes of unknown outcome."""

    headers: dict[str, str]
    acknowledged: str | None = None
    possible: set[str] = field(default_factory=set)

    def acceptable(self) -> set[str | None]:
        return {self.acknowledged, *self.possible}


@dataclass
class Load:
    url: str
    ledger: dict[uuid.UUID, Entry]
    completed: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    without_retry_after: list[str] = field(default_factory=list)
    transport_errors: int = 0
    retries: int = 0
    unresolved: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    acknowledged_writes: list[tuple[float, float]] = field(default_factory=list)
    """(sent, answered) of each write's successful try (monotonic): the first one sent after the kill
    marks the recovery."""
    kill_due: asyncio.Event = field(default_factory=asyncio.Event)

    async def call(
        self, client: httpx.AsyncClient, method: str, entry: Entry, key: str | None = None
    ) -> tuple[httpx.Response | None, bool, float]:
        """The answer (None: retries spent), whether an earlier try may have applied, and when the
        answered try was sent."""
        uncertain = False
        sent = 0.0
        body = None if key is None else {"key": key}
        deadline = time.monotonic() + REQUEST_DEADLINE
        attempt = 0
        while time.monotonic() < deadline:
            if attempt:
                self.retries += 1
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
            attempt += 1
            sent = time.monotonic()
            try:
                response = await client.request(method, "/user-keys", json=body, headers=entry.headers)
            except httpx.TransportError:
                self.transport_errors += 1
                uncertain = True
                continue
            self.statuses[response.status_code] += 1
            if response.status_code >= 500:
                if response.status_code != 503 or "retry-after" not in response.headers:
                    self.without_retry_after.append(f"{method} {response.status_code}: {response.text[:300]}")
                uncertain = True
                continue
            return response, uncertain, sent
        return None, uncertain, sent

    def _done_one(self) -> None:
        self.completed += 1
        if self.completed >= KILL_AFTER:
            self.kill_due.set()

    async def write(self, client: httpx.AsyncClient, method: str, user: uuid.UUID) -> None:
        entry, key = self.ledger[user], new_key()
        response, uncertain, sent = await self.call(client, method, entry, key)
        self._done_one()
        if response is None:
            entry.possible.add(key)
            self.unresolved.append(f"{method} for {user}")
        elif response.status_code == 200:
            self.acknowledged_writes.append((sent, time.monotonic()))
            entry.acknowledged, entry.possible = key, set()
        elif method == "POST" and response.status_code == 400 and uncertain:
            # Only this task writes this user: "already has a key" after a broken try means that try
            # was applied. The GET that follows checks it.
            entry.acknowledged, entry.possible = key, set()
        else:
            self.wrong.append(f"{method} for {user}: {response.status_code} {response.text[:200]}")

    async def read(self, client: httpx.AsyncClient, user: uuid.UUID) -> None:
        entry = self.ledger[user]
        response, _, _ = await self.call(client, "GET", entry)
        self._done_one()
        if response is None:
            self.unresolved.append(f"GET for {user}")
        elif response.status_code != 200 or response.json().get("key") not in entry.acceptable():
            self.wrong.append(f"GET for {user} after its write: {response.status_code}")

    async def run(self) -> None:
        queue: asyncio.Queue[uuid.UUID] = asyncio.Queue()
        for user in self.ledger:
            queue.put_nowait(user)

        async def worker(client: httpx.AsyncClient) -> None:
            while not queue.empty():
                user = queue.get_nowait()
                for step in STEPS:
                    if step == "GET":
                        await self.read(client, user)
                    else:
                        await self.write(client, step, user)

        async with httpx.AsyncClient(base_url=self.url, timeout=15) as client:
            await asyncio.gather(*(worker(client) for _ in range(CLIENTS)))


async def load_and_fail_over(
    load: Load, primary: PrimaryServer, standby: StandbyServer
) -> tuple[float, float]:
    """Run the load; once ``KILL_AFTER`` requests completed, SIGKILL the primary, then promote the standby.

    Returns when the primary was dead and when the promotion completed (monotonic)."""
    times: list[float] = []

    async def fail_over() -> None:
        await load.kill_due.wait()
        await asyncio.to_thread(primary.stop, kill=True)
        times.append(time.monotonic())
        await asyncio.sleep(PROMOTE_AFTER_SECONDS)
        await asyncio.to_thread(standby.promote)
        times.append(time.monotonic())

    task = asyncio.create_task(fail_over())
    try:
        await asyncio.wait_for(load.run(), LOAD_DEADLINE)
        await asyncio.wait_for(task, 30)
    finally:
        task.cancel()
    return times[0], times[1]


async def read_all(url: str, ledger: dict[uuid.UUID, Entry]) -> dict[uuid.UUID, tuple[int, str | None]]:
    answers: dict[uuid.UUID, tuple[int, str | None]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=15) as client:
        semaphore = asyncio.Semaphore(CLIENTS)

        async def one(user: uuid.UUID) -> None:
            async with semaphore:
                response = await client.get("/user-keys", headers=ledger[user].headers)
                answers[user] = (response.status_code, response.json().get("key"))

        await asyncio.gather(*(one(user) for user in ledger))
    return answers


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
    killed_at, promoted_at = asyncio.run(load_and_fail_over(load, primary, standby))
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
        with httpx.Client(base_url=service.url, timeout=30) as client:
            for _user, token in users:
                response = client.post(
                    "/user-keys", json={"key": new_key()}, headers={"Authorization": f"Bearer {token}"}
                )
                assert response.status_code == 200
            hole.vanish()
            primary.stop(kill=True)
            standby.promote()
            vanished = time.monotonic()
            recovered = None
            statuses: Counter[int] = Counter()
            token = users[0][1]
            while time.monotonic() - vanished < 90:
                try:
                    response = client.put(
                        "/user-keys", json={"key": new_key()}, headers={"Authorization": f"Bearer {token}"}
                    )
                except httpx.TransportError:
                    statuses[0] += 1
                    continue
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    recovered = time.monotonic() - vanished
                    break
                assert response.status_code == 503 and "retry-after" in response.headers, response.text
                time.sleep(0.5)
        print(f"recovered {recovered}s after the primary went silent; statuses {dict(statuses)}")
        assert recovered is not None and recovered < RECOVERY_BOUND, statuses
    finally:
        hole.close()
