"""Benchmark of ``GET /user-keys`` on SQLite, PostgreSQL and MariaDB, with 1 and 2 workers, in one run.

Everything is real: private PostgreSQL and MariaDB servers (tests/support/databases.py), a
``keyconnector serve`` process per case, a DevIssuer whose tokens the service verifies, and wrk. Each
of 2,000 enrolled users has one token, reused round and round (the "reused" case of
bench/user_keys.py), so the figures show the database's share of a login on a warm token cache.

Run with ``.venv/bin/python bench/databases.py`` (as root or as a user who can run the servers).
The target: PostgreSQL with 2 workers reaches 70% of SQLite's req/s with 2 workers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import (
    LUA,
    Service,
    TokenMinter,
    WrkResult,
    require_tools,
    run_wrk,
    service_env,
    signing_material,
    write_slices,
)
from tests.support.databases import MariaDbServer, PostgresServer

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.keypairs.generate import self_signed_pfx

TARGET_SHARE = 0.70


async def _enrol(url: str, tokens: Sequence[str], concurrency: int = 32) -> Counter[int]:
    statuses: Counter[int] = Counter()
    queue = list(tokens)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            token = queue.pop()
            response = await client.post(
                "/user-keys",
                json={"key": base64.b64encode(secrets.token_bytes(32)).decode()},
                headers={"Authorization": f"Bearer {token}"},
            )
            statuses[response.status_code] += 1

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per case")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    wrk, _taskset = require_tools()
    folder = Path(tempfile.mkdtemp(prefix="kc-bench-db-"))
    pfx = folder / "key.pfx"
    pfx.write_bytes(self_signed_pfx("bench", bits=2048))
    script = folder / "bench.lua"
    script.write_text(LUA)
    postgres, mariadb = PostgresServer(), MariaDbServer()
    results: dict[tuple[str, int], WrkResult] = {}
    try:
        postgres.start()
        mariadb.start()
        with DevIssuer() as issuer, TokenMinter(signing_material(issuer)) as minter:
            users = [uuid.uuid4() for _ in range(args.users)]
            enrol_tokens = minter.mint(users)
            read_tokens = minter.mint(users)
            prefix = write_slices(folder, "tokens", read_tokens, args.threads)
            for backend in ("sqlite", "postgresql", "mariadb"):
                env = service_env(issuer.url, pfx, "bench", folder / f"{backend}.db")
                if backend == "postgresql":
                    database = postgres.create_database()
                    env["keyConnectorSettings__database__provider"] = "postgresql"
                    env["keyConnectorSettings__database__postgreSqlConnectionString"] = (
                        postgres.connection_string(database)
                    )
                elif backend == "mariadb":
                    database = mariadb.create_database()
                    env["keyConnectorSettings__database__provider"] = "mysql"
                    env["keyConnectorSettings__database__mySqlConnectionString"] = mariadb.connection_string(
                        database
                    )
                for workers in (1, 2):
                    service = Service(env, folder / f"{backend}-{workers}.log", workers=workers, cpus=None)
                    service.start()
                    try:
                        if workers == 1:
                            statuses = asyncio.run(_enrol(service.url, enrol_tokens))
                            if set(statuses) != {200}:
                                print(f"{backend}: enrolment failed: {dict(statuses)}\n{service.tail()}")
                                return 1
                        common = {
                            "prefix": prefix,
                            "mode": "cycle",
                            "threads": args.threads,
                            "connections": args.connections,
                            "cpus": None,
                        }
                        run_wrk(wrk, script, service.url + "/user-keys", duration=2, **common)  # warm-up
                        result = run_wrk(
                            wrk, script, service.url + "/user-keys", duration=args.duration, **common
                        )
                        results[(backend, workers)] = result
                        errors = result.status_errors + result.socket_errors
                        print(
                            f"{backend:<10} {workers} worker(s): {result.rps:>8,.0f} req/s  "
                            f"p50 {result.p50_us / 1000:6.2f} ms  p99 {result.p99_us / 1000:6.2f} ms  "
                            f"errors {errors}",
                            flush=True,
                        )
                    finally:
                        service.stop()
    finally:
        postgres.destroy()
        mariadb.destroy()
        shutil.rmtree(folder, ignore_errors=True)

    print()
    print(
        f"GET /user-keys, {args.users:,} users, one token each reused, {args.connections} connections, "
        f"{args.duration:g} s per case, {os.cpu_count()} CPUs shared by wrk, service and database"
    )
    print("| backend | workers | req/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    for (backend, workers), result in results.items():
        print(
            f"| {backend} | {workers} | {result.rps:,.0f} | {result.p50_us / 1000:.2f} | {result.p99_us / 1000:.2f} |"  # noqa: E501
        )
    sqlite, postgresql = results.get(("sqlite", 2)), results.get(("postgresql", 2))
    if sqlite and postgresql and sqlite.rps:
        share = postgresql.rps / sqlite.rps
        verdict = "meets" if share >= TARGET_SHARE else "misses"
        print(f"\nPostgreSQL / SQLite with 2 workers: {share:.0%} ({verdict} the {TARGET_SHARE:.0%} target)")
    mariadb_2 = results.get(("mariadb", 2))
    if sqlite and mariadb_2 and sqlite.rps:
        print(f"MariaDB / SQLite with 2 workers: {mariadb_2.rps / sqlite.rps:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
