"""Benchmark of ``keyconnector transfer``: 100,000 user keys from SQLite to PostgreSQL, records per second.

Everything is real: a SQLite database of records sealed in upstream's format under a real data key
(wrapped by a real PFX), a private PostgreSQL server (tests/support/databases.py), and the
product's own transfer code, run in this process (``--cli`` also times the ``keyconnector transfer``
command as an operator runs it, interpreter start-up included). Each round copies into a fresh
PostgreSQL database; the copy and the verification pass are timed separately, and every record is
verified (the figures are not valid otherwise).

Run with ``.venv/bin/python bench/transfer.py`` (as root or as a user who can run PostgreSQL).
Target: at least 20,000 records/s for the copy.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.databases import PostgresServer, running

from keyconnector.core.envelope import DataKey
from keyconnector.keypairs import open_key_provider
from keyconnector.keypairs.generate import self_signed_pfx
from keyconnector.ops.transfer import TransferResult, transfer
from keyconnector.runtime.settings import Settings, load_settings, side_of
from keyconnector.storage.base import UserKeyRecord
from keyconnector.storage.registry import migrate, open_repository

TARGET = 20_000
SETTINGS = "keyConnectorSettings__"
PFX_PASSWORD = "bench-pfx-password"


def source_env(database: Path, pfx: Path) -> dict[str, str]:
    return {
        f"{SETTINGS}database__provider": "sqlite",
        f"{SETTINGS}database__sqliteConnectionString": f"Data Source={database}",
        f"{SETTINGS}rsaKey__provider": "certificate",
        f"{SETTINGS}certificate__provider": "filesystem",
        f"{SETTINGS}certificate__filesystemPath": str(pfx),
        f"{SETTINGS}certificate__filesystemPassword": PFX_PASSWORD,
    }


def target_env(server: PostgresServer, database: str, pfx: Path) -> dict[str, str]:
    return {
        f"{SETTINGS}transferTo__database__provider": "postgresql",
        f"{SETTINGS}transferTo__database__postgreSqlConnectionString": server.connection_string(database),
        f"{SETTINGS}transferTo__rsaKey__provider": "certificate",
        f"{SETTINGS}transferTo__certificate__provider": "filesystem",
        f"{SETTINGS}transferTo__certificate__filesystemPath": str(pfx),
        f"{SETTINGS}transferTo__certificate__filesystemPassword": PFX_PASSWORD,
    }


async def make_source(settings: Settings, records: int) -> float:
    """``records`` upstream-format records under a new data key; returns the seconds it took."""
    started = time.monotonic()
    migrate(settings.database)
    repository = await open_repository(settings.database)
    provider = await open_key_provider(side_of(settings))
    try:
        data_key = secrets.token_bytes(32)
        wrapped = await provider.wrap(data_key)
        await repository.store_wrapped_data_key(base64.b64encode(wrapped).decode())
        sealer = DataKey(data_key, 1)
        base = datetime(2023, 1, 1)
        batch: list[UserKeyRecord] = []
        for i in range(records):
            created = base + timedelta(seconds=i)
            batch.append(
                UserKeyRecord(
                    uuid.uuid4(), sealer.seal_legacy(secrets.token_bytes(32)), created, None, created
                )
            )
            if len(batch) == 10_000:
                await repository.upsert_records(batch)
                batch = []
        await repository.upsert_records(batch)
    finally:
        await provider.aclose()
        await repository.aclose()
    return time.monotonic() - started


def run_in_process(env: dict[str, str], batch_size: int) -> TransferResult:
    settings = load_settings(env).settings
    return asyncio.run(transfer(settings, batch_size=batch_size))


def run_cli(env: dict[str, str], batch_size: int) -> float:
    clean = {k: v for k, v in os.environ.items() if not k.lower().startswith("keyconnectorsettings")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "keyconnector", "transfer", "--batch-size", str(batch_size)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"keyconnector transfer failed ({result.returncode}):\n{result.stderr}")
    return elapsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3, help="transfers into fresh databases (default 3)")
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--cli", action="store_true", help="also time `keyconnector transfer` as a process")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="kc-bench-transfer-"))
    try:
        pfx = folder / "key.pfx"
        pfx.write_bytes(self_signed_pfx(PFX_PASSWORD, bits=2048))
        source = source_env(folder / "source.db", pfx)
        made = asyncio.run(make_source(load_settings(source).settings, args.records))
        print(f"source: {args.records:,} records in SQLite, written in {made:.1f} s", flush=True)
        copies: list[float] = []
        verifications: list[float] = []
        with running(PostgresServer) as server:
            assert isinstance(server, PostgresServer)
            print(f"target: private PostgreSQL on 127.0.0.1:{server.port}; batch size {args.batch_size:,}")
            print(f"{'round':>5} {'copy rec/s':>12} {'copy s':>8} {'verify rec/s':>13} {'verify s':>9}")
            for round_number in range(1, args.rounds + 1):
                env = {**source, **target_env(server, server.create_database(), pfx)}
                result = run_in_process(env, args.batch_size)
                if result.verified != args.records or result.failed:
                    print(f"ERRORS: verified {result.verified:,} of {args.records:,} - figures not valid")
                    return 1
                copy_rate = result.records / result.copy_seconds
                verify_rate = result.verified / result.verify_seconds
                copies.append(copy_rate)
                verifications.append(verify_rate)
                print(
                    f"{round_number:>5} {copy_rate:>12,.0f} {result.copy_seconds:>8.2f} "
                    f"{verify_rate:>13,.0f} {result.verify_seconds:>9.2f}",
                    flush=True,
                )
            if args.cli:
                env = {**source, **target_env(server, server.create_database(), pfx)}
                elapsed = run_cli(env, args.batch_size)
                print(
                    f"keyconnector transfer (a process: start-up, copy, verification): {elapsed:.1f} s, "
                    f"{args.records / elapsed:,.0f} records/s overall"
                )
        copy_median, verify_median = statistics.median(copies), statistics.median(verifications)
        verdict = "PASS" if copy_median >= TARGET else "FAIL"
        print(f"median: copy {copy_median:,.0f} records/s, verification {verify_median:,.0f} records/s")
        print(f"[{verdict}] copy SQLite -> PostgreSQL {copy_median:,.0f} records/s (target >= {TARGET:,})")
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
