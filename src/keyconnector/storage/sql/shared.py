"""The user-key writes, the key ring's compare-and-swap and the record pagination, written once for the
server databases (PostgreSQL, MySQL/MariaDB, SQL Server) over a small :class:`Dialect`.

The three drivers could hardly differ more (asyncpg's pool, asyncmy's cursors, blocking pymssql on a
thread), so the shared code is written *sans I/O*: each operation is a generator that yields the
statements it wants run (:class:`Execute`, :class:`FetchOne`, :class:`FetchAll`) and receives their
results, or the driver's exception thrown back in. Each backend drives it with its own connection,
asynchronously (:func:`drive`) or on its worker thread (:func:`drive_sync`), inside its own retry
policy. The semantics therefore live here, once:

- ``create_key``: exactly one of concurrent creators of a user wins, and a row whose key is NULL
  counts as absent and is filled in. Either one atomic upsert statement (PostgreSQL's ``ON
  CONFLICT ... WHERE Key IS NULL``), or an ``INSERT`` that succeeds or hits the primary key followed
  by an ``UPDATE ... WHERE Key IS NULL`` (each statement atomic on its own, no transaction held).
- ``put_key``: one upsert statement, or "replace the key where there is one, else create", retried
  while a concurrent creator slips in between.
- the key ring: a single-row table whose revision only moves by compare-and-swap.
- ``iter_records``: keyset pagination on the primary key (short queries, no snapshot held).

A write retried after a dropped connection may find its own earlier, committed try: the record and
the ring document carry random nonces, so finding exactly ours means "done", and the answer is the
same as the first try's would have been.

The request path's read (``get_key``) is not here: each backend keeps its own tuned statement and
driver call (docs/performance.md section 1).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from keyconnector.errors import StorageError
from keyconnector.storage.base import StoredKeyRing, UserKeyRecord
from keyconnector.storage.sql.schema import naive_utc

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Execute:
    """Run a statement; the result sent back is the number of rows it matched."""

    sql: str
    parameters: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class FetchOne:
    """Run a query; the result sent back is its first row, or None."""

    sql: str
    parameters: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class FetchAll:
    """Run a query; the result sent back is the list of its rows."""

    sql: str
    parameters: tuple[Any, ...] = ()


Step = Execute | FetchOne | FetchAll
Plan = Generator[Step, Any, T]
"""An operation as the statements it runs: see the module docstring."""


@dataclass(frozen=True, slots=True)
class Upserts:
    """User-key writes as one atomic statement each (PostgreSQL's ``INSERT ... ON CONFLICT``)."""

    create: str
    """Create or fill a key-less row (``guid, record, stamp``); returns a row only when it took effect."""
    put: str
    """Create or replace (``guid, record, stamp``); returns one row whose first column is true when it
    created."""


@dataclass(frozen=True, slots=True)
class InsertThenFill:
    """User-key writes as single statements that are each atomic, no transaction held (MySQL, SQL
    Server): of concurrent ``INSERT`` s one wins, the others hit the primary key."""

    insert: str
    """Insert a new row (``guid, record, stamp``); raises a duplicate-key error when the user has one."""
    fill: str
    """Fill a key-less row (``record, stamp, guid``): ``CreationDate = stamp``, ``RevisionDate`` NULL."""
    replace: str
    """Replace an existing key (``record, stamp, guid``), setting ``RevisionDate = stamp``."""


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the server databases for the shared operations.

    Statements take their parameters positionally, in the order each field gives; the database's
    placeholder style, quoting and casts are written into them.
    """

    guid: Callable[[UUID], Any]
    """A user id as the driver binds it (asyncpg: the UUID; text elsewhere)."""
    select_key: str
    """The user's key (``guid``)."""
    writes: Upserts | InsertThenFill
    select_ring: str
    insert_ring: str
    """The first ring (``document``) with revision 1: raises a duplicate-key error, or matches no row,
    when there is one already."""
    update_ring: str
    """The next ring (``document, expected_revision``) where the revision is still the expected one."""
    first_page: Callable[[int], tuple[str, tuple[Any, ...]]]
    """The first ``size`` rows in primary-key order, as (statement, parameters)."""
    next_page: Callable[[Any, int], tuple[str, tuple[Any, ...]]]
    """The ``size`` rows after the key given (as :attr:`page_key` returned it)."""
    page_key: Callable[[Any], Any]
    """The key of a listed row, as :attr:`next_page` binds it."""
    is_duplicate: Callable[[BaseException], bool]
    """Whether a driver error is a primary-key violation."""
    is_missing_table: Callable[[BaseException], bool]
    """Whether a driver error says the table does not exist (the ring table before migration)."""


# -- the operations ----------------------------------------------------------------------------------------


def create_key(dialect: Dialect, user_id: UUID, record: str, now: datetime, retried: bool) -> Plan[bool]:
    """``Repository.create_key``; ``retried``: an earlier try of this very call may have committed."""
    guid, stamp, writes = dialect.guid(user_id), naive_utc(now), dialect.writes
    if isinstance(writes, Upserts):
        if (yield FetchOne(writes.create, (guid, record, stamp))) is not None:
            return True
    else:
        try:
            yield Execute(writes.insert, (guid, record, stamp))
            return True
        except Exception as exc:
            if not dialect.is_duplicate(exc):
                raise
        if (yield Execute(writes.fill, (record, stamp, guid))) == 1:
            return True
    if not retried:
        return False
    # A retry after a dropped connection may find its own earlier, committed insert: the record (a
    # random nonce inside) identifies it, and the answer must still be "created".
    row = yield FetchOne(dialect.select_key, (guid,))
    return row is not None and row[0] == record


def put_key(dialect: Dialect, user_id: UUID, record: str, now: datetime, description: str) -> Plan[bool]:
    """``Repository.put_key``: True when it created the row."""
    guid, stamp, writes = dialect.guid(user_id), naive_utc(now), dialect.writes
    if isinstance(writes, Upserts):
        row = yield FetchOne(writes.put, (guid, record, stamp))
        return row is not None and bool(row[0])
    # Replace an existing key; else create (or fill a key-less row). A concurrent creator can slip in
    # between the two; then the replace is tried again and the last writer wins, as for an upsert.
    for _ in range(3):
        if (yield Execute(writes.replace, (record, stamp, guid))) == 1:
            return False
        if (yield from create_key(dialect, user_id, record, now, retried=True)):
            return True
    raise StorageError(f"{description}: the key of one user kept changing under PUT")


def get_key_ring(dialect: Dialect) -> Plan[StoredKeyRing | None]:
    """``Repository.get_key_ring``: None when none was stored, or the table is not there yet."""
    try:
        row = yield FetchOne(dialect.select_ring)
    except Exception as exc:
        if dialect.is_missing_table(exc):  # never migrated, so never rotated
            return None
        raise
    return None if row is None else StoredKeyRing(revision=int(row[0]), document=str(row[1]))


def put_key_ring(dialect: Dialect, document: str, expected_revision: int, retried: bool) -> Plan[bool]:
    """``Repository.put_key_ring``: compare-and-swap on the revision."""
    if expected_revision == 0:
        try:
            changed = yield Execute(dialect.insert_ring, (document,))
        except Exception as exc:
            if not dialect.is_duplicate(exc):
                raise
            changed = 0
    else:
        changed = yield Execute(dialect.update_ring, (document, expected_revision))
    if changed == 1:
        return True
    if not retried:
        return False
    # Our earlier try may have committed before its connection dropped.
    row = yield FetchOne(dialect.select_ring)
    return row is not None and row[0] == expected_revision + 1 and row[1] == document


def page(dialect: Dialect, after: Any, size: int) -> Plan[list[Any]]:
    """One page of ``UserKeys`` rows after ``after`` (None: from the start)."""
    sql, parameters = dialect.first_page(size) if after is None else dialect.next_page(after, size)
    rows: list[Any] = yield FetchAll(sql, parameters)
    return rows


async def iter_records(
    dialect: Dialect,
    read_page: Callable[[Any], Awaitable[list[Any]]],
    batch_size: int,
    to_record: Callable[[Any], UserKeyRecord],
) -> AsyncIterator[list[UserKeyRecord]]:
    """``Repository.iter_records``: ``read_page(after)`` runs :func:`page` (each page retried alone)."""
    after: Any = None
    while True:
        rows = await read_page(after)
        if not rows:
            return
        yield [to_record(row) for row in rows]
        if len(rows) < batch_size:
            return
        after = dialect.page_key(rows[-1])


# -- driving a plan ----------------------------------------------------------------------------------------


async def drive(plan: Plan[T], run: Callable[[Step], Awaitable[Any]]) -> T:
    """Run ``plan`` with ``run`` (one statement at a time, on one connection); its result."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = plan.send(result) if error is None else plan.throw(error)
        except StopIteration as done:
            value: T = done.value
            return value
        result, error = None, None
        try:
            result = await run(step)
        except Exception as exc:
            error = exc


def drive_sync(plan: Plan[T], run: Callable[[Step], Any]) -> T:
    """:func:`drive` for a blocking driver, on the thread that holds the connection."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = plan.send(result) if error is None else plan.throw(error)
        except StopIteration as done:
            value: T = done.value
            return value
        result, error = None, None
        try:
            result = run(step)
        except Exception as exc:
            error = exc
