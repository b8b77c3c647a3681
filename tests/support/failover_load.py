"""The client side of the failover tests: a POST/GET/PUT/GET load that retries as real clients do,
with a ledger of what the service acknowledged, so that a test can tell afterwards whether an
acknowledged write was lost, whether a request ended in a 5xx, and when the service recovered.

Shared by the PostgreSQL (tests/test_failover.py) and MariaDB (tests/test_failover_mariadb.py) tests.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

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
    load: Load, kill: Callable[[], None], promote: Callable[[], None]
) -> tuple[float, float]:
    """Run the load; once ``KILL_AFTER`` requests completed, ``kill`` the primary (SIGKILL), then,
    ``PROMOTE_AFTER_SECONDS`` later, ``promote`` the standby or replica.

    Returns when the primary was dead and when the promotion completed (monotonic)."""
    times: list[float] = []

    async def fail_over() -> None:
        await load.kill_due.wait()
        await asyncio.to_thread(kill)
        times.append(time.monotonic())
        await asyncio.sleep(PROMOTE_AFTER_SECONDS)
        await asyncio.to_thread(promote)
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


def recover_after_silence(
    url: str,
    tokens: list[str],
    fail_over: Callable[[], None],
    *,
    transport_errors: bool = False,
    deadline: float = 90.0,
) -> tuple[float | None, Counter[int]]:
    """Enrol one key per token, then ``fail_over()`` (the primary goes silent and a standby is
    promoted) and PUT with the first token every half second until one is acknowledged: how many
    seconds that took (None: not within ``deadline``) and the statuses seen, 0 for a transport error
    (tolerated only with ``transport_errors``). Every refusal meanwhile must be a 503 with
    ``Retry-After``."""
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=url, timeout=30) as client:
        for token in tokens:
            response = client.post(
                "/user-keys", json={"key": new_key()}, headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 200
        fail_over()
        vanished = time.monotonic()
        while time.monotonic() - vanished < deadline:
            try:
                response = client.put(
                    "/user-keys", json={"key": new_key()}, headers={"Authorization": f"Bearer {tokens[0]}"}
                )
            except httpx.TransportError:
                if not transport_errors:
                    raise
                statuses[0] += 1
                continue
            statuses[response.status_code] += 1
            if response.status_code == 200:
                return time.monotonic() - vanished, statuses
            assert response.status_code == 503 and "retry-after" in response.headers, response.text
            time.sleep(0.5)
    return None, statuses
