"""Benchmark of the Repository's bulk operations: ``upsert_records`` and ``replace_records``.

They carry ``transfer``, ``restore`` and ``rotate-data-key``, whose target is 20,000 records/s on
this machine; the database's share of that must be well above it. Each case runs through the real
repository code (``open_repository``) against a real database: a fresh SQLite file, and a private
PostgreSQL server from tests/support/databases.py, as bench/databases.py starts them. ``--backends``
adds MariaDB and the JSON file (which rewrites the whole file for every batch: it is for small
deployments, and has no target).

Per backend: insert 100,000 new rows in batches, upsert the same rows again (every row replaced),
then re-encrypt every row with ``replace_records`` (compare-and-swap per row), each batch one
transaction, one batch at a time as the commands do.

Run with ``.venv/bin/python bench/storage_operations.py [--rows 100000] [--batch 2000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.databases import MariaDbServer, PostgresServer

from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.storage.base import RecordUpdate, Repository, UserKeyRecord
from keyconnector.storage.registry import migrate, open_repository

T = TypeVar("T")

TARGET_ROWS_PER_SECOND = 20_000
BACKENDS = ("sqlite", "postgresql", "mariadb", "json")


def make_records(count: int) -> list[UserKeyRecord]:
    """Rows shaped like real ones: a ~100-character record, microsecond times, some NULL dates."""
    base = datetime(2024, 1, 1, 12, 0, 0, 123456)
    return [
        UserKeyRecord(
            user_id=uuid.uuid4(),
            key=f"kc:2:1:{i:012d}" + "A" * 88,
            creation_date=base + timedelta(seconds=i),
            revision_date=None if i % 2 else base + timedelta(days=1, seconds=i),
            last_access_date=base + timedelta(days=2, microseconds=i),
        )
        for i in range(count)
    ]


async def timed(
    label: str, items: Sequence[T], batch: int, operation: Callable[[Sequence[T]], Awaitable[Any]]
) -> float:
    started = time.perf_counter()
    for start in range(0, len(items), batch):
        await operation(items[start : start + batch])
    rate = len(items) / (time.perf_counter() - started)
    verdict = "ok" if rate >= TARGET_ROWS_PER_SECOND else "below the target"
    print(f"  {label:<36} {rate:>10,.0f} rows/s  {verdict}", flush=True)
    return rate


async def measure(settings: DatabaseSettings, rows: int, batch: int) -> dict[str, float]:
    migrate(settings)
    repository: Repository = await open_repository(settings)
    try:
        records = make_records(rows)
        results = {
            "upsert (insert)": await timed(
                "upsert_records, new rows", records, batch, repository.upsert_records
            ),
            "upsert (replace)": await timed(
                "upsert_records, existing rows", records, batch, repository.upsert_records
            ),
        }
        updates = [RecordUpdate(r.user_id, r.key or "", "kc:2:2:" + (r.key or "")[7:]) for r in records]

        async def replace(chunk: Sequence[RecordUpdate]) -> None:
            changed = await repository.replace_records(chunk)
            if changed != len(chunk):
                raise SystemExit(f"replace_records changed {changed} of {len(chunk)} rows")

        results["replace"] = await timed("replace_records (compare-and-swap)", updates, batch, replace)
        count = await repository.count_records()
        if count != rows:
            raise SystemExit(f"count_records says {count}, expected {rows}")
        return results
    finally:
        await repository.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000, help="rows per call (one transaction)")
    parser.add_argument(
        "--backends", default="sqlite,postgresql", help=f"comma-separated, of: {', '.join(BACKENDS)}"
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = set(chosen) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")

    folder = Path(tempfile.mkdtemp(prefix="kc-bench-ops-"))
    servers: dict[str, PostgresServer | MariaDbServer] = {}
    table: dict[str, dict[str, float]] = {}
    try:
        for name in chosen:
            if name == "sqlite":
                plain = {"provider": "sqlite", "sqliteConnectionString": f"Data Source={folder / 'kc.db'}"}
            elif name == "json":
                plain = {"provider": "json", "jsonFilePath": str(folder / "data.json")}
            else:
                server: PostgresServer | MariaDbServer = (
                    PostgresServer() if name == "postgresql" else MariaDbServer()
                )
                servers[name] = server
                server.start()
                text = server.connection_string(server.create_database())
                if name == "postgresql":
                    plain = {"provider": "postgresql", "postgreSqlConnectionString": text}
                else:
                    plain = {"provider": "mysql", "mySqlConnectionString": text}
            print(f"{name}: {args.rows:,} rows in batches of {args.batch:,}", flush=True)
            settings = DatabaseSettings(**plain)  # type: ignore[arg-type]
            table[name] = asyncio.run(measure(settings, args.rows, args.batch))
    finally:
        for running in servers.values():
            running.destroy()
        shutil.rmtree(folder, ignore_errors=True)

    print()
    print(
        f"{args.rows:,} rows, batches of {args.batch:,}, {os.cpu_count()} CPUs shared by the benchmark "
        f"and the database server; target {TARGET_ROWS_PER_SECOND:,} rows/s"
    )
    print("| backend | upsert, new rows | upsert, existing rows | replace_records |")
    print("| --- | --- | --- | --- |")
    for name, results in table.items():
        cells = " | ".join(
            f"{results[key]:,.0f}/s" for key in ("upsert (insert)", "upsert (replace)", "replace")
        )
        print(f"| {name} | {cells} |")
    slow = [
        name
        for name, results in table.items()
        if name != "json" and min(results.values()) < TARGET_ROWS_PER_SECOND
    ]
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
