"""Several `keyconnector serve` processes on one database behind a round-robin balancer, one of them
SIGKILLed in the middle of the load.

This is how an operator scales the service out, and the failure they must survive: a node dies with
requests in flight. The balancer (tests/support/roundrobin.py) skips a node it cannot connect to but
does not replay a request whose connection broke, so the clients here retry as real clients do, and
keep a ledger of what the service acknowledged. What must hold afterwards:

(a) no acknowledged write is lost; (b) the survivors serve every user, through the balancer and each
one directly; (c) the killed node got traffic before the kill and none after; (d) no request ended in a
5xx once the client's retries were spent; (e) the database holds exactly one row per user.

Every loop is bounded by a count and the whole load by a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import socket
import sqlite3
import struct
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service, base_env
from tests.support.databases import PostgresServer
from tests.support.roundrobin import RoundRobinProxy

NODES = 3
VICTIM = 1
USERS = 300
CLIENTS = 24
STEPS = ("POST", "GET", "PUT", "GET")
PLANNED = USERS * len(STEPS)
KILL_AFTER = PLANNED * 2 // 5
"""Completed requests before the kill: well into the load, with most of it still to come."""
ATTEMPTS = 12
"""Tries per request; the back-off between them adds up to a few seconds, longer than the
balancer needs to mark the dead node down."""
LOAD_DEADLINE = 40.0


@dataclass
class ClusterDatabase:
    """The database every node shares: its settings and a direct SQL read of ``UserKeys``."""

    settings: dict[str, str]
    rows: Callable[[], list[tuple[uuid.UUID, bool]]]
    """(user id, whether the key column is set) for every row."""


@pytest.fixture(params=["sqlite", "postgresql"])
def cluster_database(request: pytest.FixtureRequest, tmp_path: Path) -> ClusterDatabase:
    if request.param == "sqlite":
        path = tmp_path / "shared.db"

        def sqlite_rows() -> list[tuple[uuid.UUID, bool]]:
            with sqlite3.connect(path) as connection:
                found = connection.execute('SELECT "Id", "Key" IS NOT NULL FROM "UserKeys"').fetchall()
            return [(uuid.UUID(str(user)), bool(has_key)) for user, has_key in found]

        return ClusterDatabase(
            {
                "keyConnectorSettings__database__provider": "sqlite",
                "keyConnectorSettings__database__sqliteConnectionString": f"Data Source={path}",
            },
            sqlite_rows,
        )

    server: PostgresServer = request.getfixturevalue("running_postgresql")
    name = server.create_database()

    def postgres_rows() -> list[tuple[uuid.UUID, bool]]:
        with server.connect(name) as connection:
            found = connection.execute('SELECT "Id", "Key" IS NOT NULL FROM "UserKeys"').fetchall()
        return [(uuid.UUID(str(user)), bool(has_key)) for user, has_key in found]

    return ClusterDatabase(
        {
            "keyConnectorSettings__database__provider": "postgresql",
            "keyConnectorSettings__database__postgreSqlConnectionString": server.connection_string(name),
        },
        postgres_rows,
    )


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Entry:
    """What the clients know of one user's key.

    ``acknowledged`` is the last value a write was answered 200 for. ``possible`` holds the values of
    writes whose outcome is unknown (the connection broke, or a 5xx) and that no later answer settled.
    """

    headers: dict[str, str]
    acknowledged: str | None = None
    possible: set[str] = field(default_factory=set)

    def acceptable(self) -> set[str | None]:
        return {self.acknowledged, *self.possible}


@dataclass
class Load:
    """Counters and findings of the load phase, shared by the client tasks (one event loop)."""

    proxy_url: str
    ledger: dict[uuid.UUID, Entry]
    completed: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0
    retries: int = 0
    inferred_posts: int = 0
    unresolved: list[str] = field(default_factory=list)
    """Requests that never got a non-5xx answer within their attempts."""
    wrong: list[str] = field(default_factory=list)
    """Answers that contradict the ledger."""
    kill_due: asyncio.Event = field(default_factory=asyncio.Event)

    async def call(
        self, client: httpx.AsyncClient, method: str, entry: Entry, key: str | None = None
    ) -> tuple[httpx.Response | None, bool]:
        """One request with the client's retries; also whether an earlier attempt may have been applied."""
        uncertain = False
        body = None if key is None else {"key": key}
        for attempt in range(ATTEMPTS):
            if attempt:
                self.retries += 1
                await asyncio.sleep(min(0.05 * 2**attempt, 0.5))
            try:
                response = await client.request(method, "/user-keys", json=body, headers=entry.headers)
            except httpx.TransportError:
                self.transport_errors += 1
                uncertain = True
                continue
            self.statuses[response.status_code] += 1
            if response.status_code >= 500:
                uncertain = True
                continue
            return response, uncertain
        return None, uncertain

    def _done_one(self) -> None:
        self.completed += 1
        if self.completed >= KILL_AFTER:
            self.kill_due.set()

    async def write(self, client: httpx.AsyncClient, method: str, user: uuid.UUID) -> None:
        entry, key = self.ledger[user], new_key()
        response, uncertain = await self.call(client, method, entry, key)
        self._done_one()
        if response is None:
            entry.possible.add(key)
            self.unresolved.append(f"{method} for {user}")
        elif response.status_code == 200:
            entry.acknowledged, entry.possible = key, set()
        elif method == "POST" and response.status_code == 400 and uncertain:
            # Only this task writes this user, so "already has a key" after a broken attempt means
            # that attempt was applied: the key is ours. The GET that follows checks it.
            self.inferred_posts += 1
            entry.acknowledged, entry.possible = key, set()
        else:
            self.wrong.append(f"{method} for {user}: {response.status_code} {response.text[:200]}")

    async def read(self, client: httpx.AsyncClient, user: uuid.UUID) -> None:
        entry = self.ledger[user]
        response, _ = await self.call(client, "GET", entry)
        self._done_one()
        if response is None:
            self.unresolved.append(f"GET for {user}")
        elif response.status_code != 200 or response.json().get("key") not in entry.acceptable():
            self.wrong.append(f"GET for {user} after its write: {response.status_code}")

    async def run_user(self, client: httpx.AsyncClient, user: uuid.UUID) -> None:
        for step in STEPS:
            if step == "GET":
                await self.read(client, user)
            else:
                await self.write(client, step, user)

    async def run(self) -> None:
        queue: asyncio.Queue[uuid.UUID] = asyncio.Queue()
        for user in self.ledger:
            queue.put_nowait(user)

        async def worker(client: httpx.AsyncClient) -> None:
            while not queue.empty():
                await self.run_user(client, queue.get_nowait())

        # No keep-alive: one connection per request, so the balancer spreads requests, not sessions.
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=self.proxy_url, timeout=10, limits=limits) as client:
            await asyncio.gather(*(worker(client) for _ in range(CLIENTS)))


def _wait_until_group_gone(group: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.005)


async def load_and_kill(load: Load, victim: Service) -> float:
    """Run the load, SIGKILL ``victim`` once ``KILL_AFTER`` requests completed; returns when it was dead."""
    killed_at: list[float] = []

    async def killer() -> None:
        await load.kill_due.wait()
        assert victim.process is not None
        group = victim.process.pid
        await asyncio.to_thread(victim.stop, signal.SIGKILL)
        # The kernel completes TCP handshakes on a listening socket until the last process holding
        # it is gone: the workers of the group may outlive the reaped main process by a moment.
        await asyncio.to_thread(_wait_until_group_gone, group)
        killed_at.append(time.monotonic())

    kill_task = asyncio.create_task(killer())
    try:
        await asyncio.wait_for(load.run(), LOAD_DEADLINE)
        await asyncio.wait_for(kill_task, 10)
    finally:
        kill_task.cancel()
    return killed_at[0]


async def read_all(url: str, ledger: dict[uuid.UUID, Entry]) -> dict[uuid.UUID, tuple[int, Any]]:
    """Every user's GET from ``url`` (a transport error or 5xx is retried a few times)."""
    answers: dict[uuid.UUID, tuple[int, Any]] = {}
    semaphore = asyncio.Semaphore(CLIENTS)

    async def one(client: httpx.AsyncClient, user: uuid.UUID) -> None:
        async with semaphore:
            for attempt in range(5):
                try:
                    response = await client.get("/user-keys", headers=ledger[user].headers)
                except httpx.TransportError as exc:
                    answers[user] = (0, type(exc).__name__)
                else:
                    answers[user] = (response.status_code, response.json().get("key"))
                    if response.status_code < 500:
                        return
                await asyncio.sleep(0.1 * (attempt + 1))

    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
        await asyncio.gather(*(one(client, user) for user in ledger))
    return answers


class RawBackend:
    """A bare TCP backend: reads a request, then answers 200 or (``breaks``) resets the connection."""

    def __init__(self, *, breaks: bool) -> None:
        self.breaks = breaks
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                data = b""
                while b"\r\n\r\n" not in data and (chunk := connection.recv(4096)):
                    data += chunk
                self.requests += 1
                if self.breaks:
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def close(self) -> None:
        self.listener.close()


def test_the_balancer_skips_a_dead_backend_but_never_replays_a_broken_request() -> None:
    broken, healthy = RawBackend(breaks=True), RawBackend(breaks=False)
    dead = ("127.0.0.1", free_port())  # nothing listens there: connects are refused
    try:
        with (
            RoundRobinProxy([("127.0.0.1", broken.port), dead, ("127.0.0.1", healthy.port)]) as proxy,
            httpx.Client(
                base_url=proxy.url, timeout=5, limits=httpx.Limits(max_keepalive_connections=0)
            ) as client,
        ):
            # 1st connection: the breaking backend; the client sees the break, nobody else sees the PUT.
            with pytest.raises(httpx.TransportError):
                client.put("/user-keys", json={"key": "x"})
            assert (broken.requests, healthy.requests) == (1, 0)
            # 2nd: the dead one, refused: marked down, and this connection goes on to the next backend.
            assert client.get("/").status_code == 200
            # 3rd: the healthy one in its own turn; 4th: the breaking one again; 5th: the dead one's turn,
            # skipped without a connect while it is marked down.
            assert client.get("/").status_code == 200
            with pytest.raises(httpx.TransportError):
                client.get("/")
            assert client.get("/").status_code == 200
            assert (broken.requests, healthy.requests) == (2, 3)
            assert [s.connect_failures for s in proxy.stats] == [0, 1, 0]
            assert proxy.connections() == [2, 0, 3]
            assert proxy.stats[0].broken == 2  # reset by the backend, and reset on to the client
    finally:
        broken.close()
        healthy.close()


def mismatches(answers: dict[uuid.UUID, tuple[int, Any]], ledger: dict[uuid.UUID, Entry]) -> list[str]:
    """Users whose answer is not 200 with their acknowledged key, described without the key itself."""
    found = []
    for user, (status, key) in answers.items():
        if status != 200:
            found.append(f"{user}: {status or key}")
        elif key not in ledger[user].acceptable() or key is None:
            found.append(f"{user}: 200 with a {'missing' if key is None else 'different'} key")
    return found


@pytest.fixture
def nodes(
    cluster_database: ClusterDatabase, issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> Iterator[list[Service]]:
    """The cluster's service processes, started in parallel (the start is most of their cost)."""
    env = base_env(issuer, pfx, tmp_path / "unused.db")
    del env["keyConnectorSettings__database__sqliteConnectionString"]
    env.update(cluster_database.settings)
    started = [Service(env, tmp_path / f"node-{i}.log") for i in range(NODES)]
    try:
        with ThreadPoolExecutor(NODES) as pool:
            list(pool.map(Service.start, started))
        yield started
    finally:
        for node in started:
            node.stop()


def test_a_node_killed_under_load_loses_no_write_and_the_others_serve_everyone(
    cluster_database: ClusterDatabase, nodes: list[Service], issuer: DevIssuer
) -> None:
    ledger = {user: Entry({"Authorization": f"Bearer {token}"}) for user, token in issuer.mint_many(USERS)}
    victim, survivors = nodes[VICTIM], [node for i, node in enumerate(nodes) if i != VICTIM]

    with RoundRobinProxy([("127.0.0.1", node.port) for node in nodes], down_seconds=1.0) as proxy:
        load = Load(proxy.url, ledger)
        started = time.monotonic()
        killed_at = asyncio.run(load_and_kill(load, victim))
        load_seconds = time.monotonic() - started
        connections_at_kill = proxy.connections()
        through_proxy = asyncio.run(read_all(proxy.url, ledger))
        before_kill = [
            total - after
            for total, after in zip(proxy.connections(), proxy.connections_since(killed_at), strict=True)
        ]
        after_kill = proxy.connections_since(killed_at)
        stats = proxy.stats
        refused = proxy.refused

    summary = (
        f"load {load_seconds:.1f}s, {load.completed} requests, statuses {dict(load.statuses)}, "
        f"{load.transport_errors} transport errors, {load.retries} retries, "
        f"{load.inferred_posts} POSTs settled by a 400, per node before/after the kill "
        f"{before_kill}/{after_kill}, connect failures {[s.connect_failures for s in stats]}"
    )
    print(summary)

    # (d) every request got a definite, non-5xx answer in the end, and every answer fits the ledger.
    assert load.completed == PLANNED, summary
    assert not load.unresolved, f"{len(load.unresolved)} requests never succeeded: {load.unresolved[:5]}"
    assert not load.wrong, f"{len(load.wrong)} answers contradict the ledger: {load.wrong[:5]}"
    assert all(entry.acknowledged is not None and not entry.possible for entry in ledger.values())

    # (a) no lost writes: through the balancer, every user's key is the last acknowledged one (the
    # ledger has no write of unknown outcome left: (d) made sure every write was settled).
    lost = mismatches(through_proxy, ledger)
    assert not lost, f"{len(lost)} of {USERS} users lost their last acknowledged key, e.g. {lost[:3]}"

    # (b) each survivor, asked directly, serves every user the right key.
    for node in survivors:
        wrong = mismatches(asyncio.run(read_all(node.url, ledger)), ledger)
        assert not wrong, f"{node.url} does not serve {len(wrong)} of {USERS} users, e.g. {wrong[:3]}"
        assert "unhandled error" not in node.logs()

    # (c) the killed node carried its share before the kill and nothing after; the others carried on.
    assert victim.process is not None and victim.process.returncode == -signal.SIGKILL
    assert min(before_kill) >= KILL_AFTER // (2 * NODES), summary
    assert after_kill[VICTIM] == 0 and proxy.connections()[VICTIM] == connections_at_kill[VICTIM], summary
    assert all(after_kill[i] > 0 for i in range(NODES) if i != VICTIM), summary
    assert stats[VICTIM].connect_failures >= 1, "the balancer never noticed the dead node: " + summary
    assert refused == 0, summary
    # With every client always waiting on a request, about a third of them were on the victim.
    # Whether a request was in flight on the victim at the instant of the kill is chance (about half of
    # the runs on an idle 2-core machine had none): reported, not asserted, so the suite stays
    # deterministic. The assertions above hold either way.
    if load.transport_errors == 0:
        warnings.warn("the kill broke no request in flight this time: " + summary, stacklevel=1)

    # (e) the shared database: one row per user, with its key, and nothing else.
    rows = cluster_database.rows()
    per_user = Counter(user for user, _ in rows)
    assert set(per_user) == set(ledger) and set(per_user.values()) == {1}, (
        f"{len(rows)} rows for {USERS} users"
    )
    assert all(has_key for _, has_key in rows)
