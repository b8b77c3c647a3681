"""Coalescing concurrent point reads into one query per database round trip.

In a login storm a worker has dozens of ``GET /user-keys`` in flight. Against a database server,
one query per request costs a round trip and a server-side execution each; PostgreSQL then spends
as much CPU as the worker. Here the first read goes out at once (no added latency when idle);
reads that arrive while ``max_in_flight`` queries are already running wait for the next one, which
fetches all of them with a single ``WHERE "Id" = ANY(...)``. Under load the batches grow by
themselves, and latency stays bounded by one round trip of queueing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from uuid import UUID

FetchMany = Callable[[list[UUID]], Awaitable[Mapping[UUID, str | None]]]


class ReadCoalescer:
    def __init__(self, fetch_many: FetchMany, *, max_in_flight: int = 2, max_batch: int = 500) -> None:
        self._fetch_many = fetch_many
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._waiting: dict[UUID, list[asyncio.Future[str | None]]] = {}
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, user_id: UUID) -> str | None:
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        waiters = self._waiting.get(user_id)
        if waiters is None:
            self._waiting[user_id] = [future]
        else:
            waiters.append(future)
        if self._in_flight < self._max_in_flight:
            self._dispatch()
        return await future

    def _dispatch(self) -> None:
        if len(self._waiting) <= self._max_batch:
            batch, self._waiting = self._waiting, {}
        else:
            ids = list(self._waiting)[: self._max_batch]
            batch = {user_id: self._waiting.pop(user_id) for user_id in ids}
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: dict[UUID, list[asyncio.Future[str | None]]]) -> None:
        try:
            found = await self._fetch_many(list(batch))
        except BaseException as exc:
            for waiters in batch.values():
                for future in waiters:
                    if not future.done():
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for user_id, waiters in batch.items():
                value = found.get(user_id)
                for future in waiters:
                    if not future.done():
                        future.set_result(value)
        finally:
            self._in_flight -= 1
            if self._waiting and self._in_flight < self._max_in_flight:
                self._dispatch()
