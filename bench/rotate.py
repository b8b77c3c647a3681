"""Benchmark of ``keyconnector rotate-data-key``: 100,000 records on a private PostgreSQL, records per second.

Everything is real: a private PostgreSQL server (tests/support/databases.py), a PFX key pair, the
records written in upstream's format under the data key the product made, and the command's own
code path (``keyconnector.ops.rotate.rotate_data_key``) with the settle time set to 0 (nothing else
is running). Each round is one whole rotation: the first turns upstream's records into format 2
(version 1 -> 2), the next ones re-encrypt format 2 into the next version. The time covers the
re-encryption passes, the last of which reads and opens every record again (the verification).

Run with ``.venv/bin/python bench/rotate.py`` (as root or as a user who can run the server).
Target: at least 20,000 records/s.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.databases import PostgresServer, running

from keyconnector.keypairs.generate import self_signed_pfx
from keyconnector.ops import open_side
from keyconnector.ops.rotate import rotate_data_key
from keyconnector.runtime.settings import Settings, load_settings, side_of
from keyconnector.storage.base import UserKeyRecord

TARGET = 20_000


async def seed(settings: Settings, count: int, batch: int = 10_000) -> float:
    """``count`` records in upstream's format; returns the seconds it took."""
    started = time.monotonic()
    side = await open_side(side_of(settings))
    try:
        legacy = side.keys.keys[1]
        created = datetime(2021, 8, 20, 15, 59, 38)
        for offset in range(0, count, batch):
            await side.repository.upsert_records(
                [
                    UserKeyRecord(
                        uuid.uuid4(), legacy.seal_legacy(secrets.token_bytes(32)), created, None, None
                    )
                    for _ in range(min(batch, count - offset))
                ]
            )
    finally:
        await side.aclose()
    return time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=2000, help="records per transaction")
    parser.add_argument("--rounds", type=int, default=2, help="rotations, one after the other")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="kc-bench-rotate-"))
    rates: list[float] = []
    try:
        pfx = folder / "key.pfx"
        pfx.write_bytes(self_signed_pfx("bench", bits=2048))
        with running(PostgresServer) as server:
            assert isinstance(server, PostgresServer)
            database = server.create_database()
            settings = load_settings(
                {
                    "keyConnectorSettings__database__provider": "postgresql",
                    "keyConnectorSettings__database__postgreSqlConnectionString": server.connection_string(
                        database
                    ),
                    "keyConnectorSettings__rsaKey__provider": "certificate",
                    "keyConnectorSettings__certificate__provider": "filesystem",
                    "keyConnectorSettings__certificate__filesystemPath": str(pfx),
                    "keyConnectorSettings__certificate__filesystemPassword": "bench",
                }
            ).settings
            seconds = asyncio.run(seed(settings, args.records))
            print(f"seeded {args.records:,} records in upstream's format in {seconds:.1f} s", flush=True)
            for round_number in range(1, args.rounds + 1):
                report = io.StringIO()
                result = asyncio.run(
                    rotate_data_key(settings, batch_size=args.batch_size, settle_seconds=0, out=report)
                )
                assert result.rewritten == args.records and not result.failed, report.getvalue()
                source = ", ".join(f"version {v}" for v in sorted(result.from_versions))
                print(
                    f"round {round_number}: {source} -> version {result.current}: "
                    f"{result.rewritten:,} records re-encrypted and verified in {result.seconds:.2f} s, "
                    f"{result.rate:,.0f} records/s "
                    f"({result.passes} passes, batches of {args.batch_size:,}); retired {result.retired}",
                    flush=True,
                )
                rates.append(result.rate)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    worst = min(rates)
    verdict = "PASS" if worst >= TARGET else "FAIL"
    print(
        f"[{verdict}] rotate-data-key on PostgreSQL: {worst:,.0f} records/s at worst (target >= {TARGET:,})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
