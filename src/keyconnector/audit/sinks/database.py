"""The database sink (``audit.database``): our append-only table ``keyconnector_audit``.

Entries are sealed and queued on the event loop (microseconds) and inserted in the background, one
transaction per batch every second, like the access times: never a database write per request.
The insert runs on SQLAlchemy Core over a small synchronous engine (the backend's own migration
engine for PostgreSQL, MySQL/MariaDB and SQL Server; pysqlite for SQLite) in a worker thread. One
thread hand-off per batch is cheap, Core compiles one ``executemany`` for every dialect, and the
async drivers the request path uses stay untouched (a slow audit insert never holds a connection
the next login needs).

"Can record" for ``failClosed``: the last flush succeeded and the queue is below ``bound``. A failed
batch stays queued and is retried; when the queue is full, new entries are refused (and counted)
without being chained, so the table never shows a gap for an entry that was never accepted. A
checkpoint names the newest *inserted* entry, never a queued one: a verifier reading the table a
moment later must find it there.

When the sink is keyed, ``survey`` looks at the newest row, and only when it is unkeyed (the first
start of this version, or rows added since by something without the key) at the rest of the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from keyconnector.audit.chain import CHECKPOINT, FORMAT, Chain
from keyconnector.audit.sink import KeyedSink, Survey
from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.storage.registry import backend
from keyconnector.storage.sql.schema import audit

log = logging.getLogger("keyconnector.audit")

FLUSH_SECONDS = 1.0
BOUND = 10_000
_KEYED_MARK = f'%"v":{FORMAT},"mac":"%'
"""How a keyed entry's text looks from SQL: ``v`` is the last key before the appended ``mac``."""


def audit_engine(settings: DatabaseSettings, prefix: str = "database") -> Engine:
    """A synchronous engine on the service's database, or a ConfigurationError naming audit.database."""
    make_engine = backend(settings, prefix).sync_engine
    if make_engine is None:  # the JSON file: no table to write
        raise ConfigurationError(
            "audit.database",
            "the audit table needs a SQL database, and database.provider is 'json'; "
            "use audit.file or audit.stdout instead",
        )
    return make_engine(settings, prefix)


def _keyed(text: str) -> bool:
    try:
        entry = json.loads(text)
    except ValueError:
        return False
    return isinstance(entry, dict) and "v" in entry


def survey_table(connection: Connection) -> Survey:
    """The unkeyed chains' heads in the table, unless it already holds a keyed entry."""
    newest = connection.execute(select(audit.c.entry).order_by(audit.c.id.desc()).limit(1)).scalar()
    if newest is None:
        return Survey(keyed=False)
    if (
        _keyed(newest)
        or connection.execute(select(audit.c.id).where(audit.c.entry.like(_KEYED_MARK)).limit(1)).first()
    ):
        return Survey(keyed=True)
    last = select(func.max(audit.c.id)).group_by(audit.c.chain)
    rows = connection.execute(
        select(audit.c.chain, audit.c.seq, audit.c.hash).where(audit.c.id.in_(last)).order_by(audit.c.id)
    ).all()
    count = connection.execute(select(func.count()).select_from(audit)).scalar_one()
    return Survey(False, [(str(chain), int(seq), str(digest)) for chain, seq, digest in rows], int(count))


class DatabaseSink(KeyedSink):
    name = "database"

    def __init__(
        self,
        make_engine: Callable[[], Engine],
        chain_id: str,
        *,
        interval: float = FLUSH_SECONDS,
        bound: int = BOUND,
    ) -> None:
        super().__init__(chain_id)
        self.flushed = 0
        self._make_engine = make_engine
        self._engine: Engine | None = None
        self._interval = interval
        self._bound = bound
        self._queue: list[dict[str, Any]] = []
        self._ok = False
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def _can_record(self) -> bool:
        return self._ok and len(self._queue) < self._bound

    def _write(self, chain: Chain, fields: dict[str, Any]) -> bool:
        """Queue one entry; True when the trail can be trusted to get it (see the module docstring)."""
        if len(self._queue) >= self._bound:
            self._failed(f"{len(self._queue)} entries waiting: the audit table is not being written")
            return False
        entry, line, digest = chain.seal(fields)
        self._queue.append(
            {
                "chain": entry["chain"],
                "seq": entry["seq"],
                "time": entry["time"],
                "user_id": entry.get("user"),
                "outcome": entry["outcome"],
                "status": entry["status"],
                "entry": line[:-1].decode(),
                "hash": digest,
            }
        )
        chain.advance(digest)
        return self._ok

    def survey(self) -> Survey:
        try:
            with self._engine_now().connect() as connection:
                return survey_table(connection)
        except Exception as exc:
            raise RuntimeError(_safe(exc)) from None  # without the statement SQLAlchemy appends

    def _engine_now(self) -> Engine:
        if self._engine is None:
            self._engine = self._make_engine()
        return self._engine

    def _probe(self) -> None:
        with self._engine_now().connect() as connection:
            connection.execute(select(audit.c.id).limit(1)).all()

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        with self._engine_now().begin() as connection:
            connection.execute(audit.insert(), rows)

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._probe)
            self._ok = True
        except Exception as exc:
            self._failed(f"the table {audit.name} cannot be read: {_safe(exc)}")
        self._task = asyncio.create_task(self._loop(), name="audit-database-flush")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            if not self._queue:
                if not self._ok:
                    try:
                        await asyncio.to_thread(self._probe)
                        self._ok = True
                    except Exception as exc:
                        self._failed(f"the table {audit.name} cannot be read: {_safe(exc)}")
                return
            batch = self._queue[:500]
            try:
                await asyncio.to_thread(self._insert, batch)
            except Exception as exc:
                self._ok = False
                self._failed(f"could not insert {len(batch)} entries, will retry: {_safe(exc)}")
                return
            del self._queue[: len(batch)]
            self.flushed += len(batch)
            self._ok = True
            content = [row["seq"] for row in batch if row["outcome"] != CHECKPOINT]
            self._recorded(batch[-1]["seq"], batch[-1]["hash"], content[-1] if content else None)

    async def settle(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout=5)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            for _ in range(10):
                if not self._queue:
                    break
                await asyncio.wait_for(self.flush(), timeout=5)
                if not self._ok:
                    break
        except TimeoutError:
            pass
        if self._queue:
            log.error(
                "audit database sink: %d entries could not be written before shutdown", len(self._queue)
            )
        if self._engine is not None:
            self._engine.dispose()


def _safe(exc: BaseException) -> str:
    """The first line of a driver error: SQLAlchemy appends the statement and its parameters."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
