"""The read coalescer: one query for the reads that queue up behind the running one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping

import pytest

from keyconnector.storage.coalesce import ReadCoalescer


class FakeTable:
    """A table answering after a real await, recording each query's ids."""

    def __init__(self, rows: dict[uuid.UUID, str]) -> None:
        self.rows = rows
        self.queries: list[list[uuid.UUID]] = []
        self.fail_with: Exception | None = None

    async def fetch_many(self, ids: list[uuid.UUID]) -> Mapping[uuid.UUID, str | None]:
        self.queries.append(ids)
        await asyncio.sleep(0.01)
        if self.fail_with is not None:
            raise self.fail_with
        return {i: self.rows[i] for i in ids if i in self.rows}


def test_concurrent_reads_share_queries_and_each_gets_its_own_row() -> None:
    users = [uuid.uuid4() for _ in range(200)]
    table = FakeTable({u: f"key-{u}" for u in users[:150]})

    async def main() -> list[str | None]:
        reads = ReadCoalescer(table.fetch_many, max_in_flight=2)
        return await asyncio.gather(*(reads.get(u) for u in users))

    results = asyncio.run(main())
    assert results == [f"key-{u}" if i < 150 else None for i, u in enumerate(users)]
    assert len(table.queries) <= 4  # 200 reads, at most 2 in flight: a few queries, not 200
    assert sorted(u for q in table.queries for u in q) == sorted(users)


def test_a_lone_read_goes_out_at_once() -> None:
    user = uuid.uuid4()
    table = FakeTable({user: "k"})

    async def main() -> str | None:
        reads = ReadCoalescer(table.fetch_many)
        return await reads.get(user)

    assert asyncio.run(main()) == "k"
    assert table.queries == [[user]]


def test_duplicate_reads_in_one_batch_all_get_the_answer() -> None:
    user = uuid.uuid4()
    table = FakeTable({user: "k"})

    async def main() -> list[str | None]:
        reads = ReadCoalescer(table.fetch_many, max_in_flight=1)
        return await asyncio.gather(*(reads.get(user) for _ in range(10)))

    assert asyncio.run(main()) == ["k"] * 10
    assert all(len(q) == 1 for q in table.queries)


def test_a_failed_query_fails_every_read_it_carried_and_the_next_batch_still_runs() -> None:
    users = [uuid.uuid4() for _ in range(20)]
    table = FakeTable({u: "k" for u in users})

    async def main() -> None:
        reads = ReadCoalescer(table.fetch_many, max_in_flight=1)
        table.fail_with = RuntimeError("database gone")
        results = await asyncio.gather(*(reads.get(u) for u in users), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        table.fail_with = None
        assert await reads.get(users[0]) == "k"

    asyncio.run(main())


def test_a_cancelled_reader_does_not_break_the_others() -> None:
    users = [uuid.uuid4() for _ in range(5)]
    table = FakeTable({u: "k" for u in users})

    async def main() -> None:
        reads = ReadCoalescer(table.fetch_many, max_in_flight=1)
        first = asyncio.ensure_future(reads.get(users[0]))
        others = [asyncio.ensure_future(reads.get(u)) for u in users[1:]]
        await asyncio.sleep(0)
        others[0].cancel()
        assert await first == "k"
        with pytest.raises(asyncio.CancelledError):
            await others[0]
        assert await asyncio.gather(*others[1:]) == ["k"] * 3

    asyncio.run(main())
