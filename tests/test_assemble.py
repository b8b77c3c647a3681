"""``assemble.open_core``, the one assembly of database, key pair and data keys, on a real SQLite file.

What its options promise: the key pair is checked before the database is touched (a wrong key pair
creates nothing), ``read_only`` writes nothing (no schema, no data key, no adoption of the ring),
``create`` prepares the database as ``serve`` does, and ``tolerate_outage`` opens without loading
the data keys (the worker's KeyService loads them, again until the provider answers).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from keyconnector.errors import ConfigurationError, StorageError
from keyconnector.runtime.assemble import Core, Side, open_core
from keyconnector.runtime.settings import Settings, load_settings, side_of
from tests.conftest import Pfx


def settings_for(database: Path, pfx: Pfx, password: str | None = None) -> Settings:
    env = {
        "keyConnectorSettings__database__provider": "sqlite",
        "keyConnectorSettings__database__sqliteConnectionString": f"Data Source={database}",
        "keyConnectorSettings__rsaKey__provider": "certificate",
        "keyConnectorSettings__certificate__provider": "filesystem",
        "keyConnectorSettings__certificate__filesystemPath": str(pfx.path),
        "keyConnectorSettings__certificate__filesystemPassword": password or pfx.password,
    }
    return load_settings(env).settings


def ring_rows(database: Path) -> int:
    with sqlite3.connect(database) as connection:
        return int(connection.execute("SELECT COUNT(*) FROM keyconnector_key_ring").fetchone()[0])


def test_a_wrong_key_pair_fails_before_the_database_is_touched(tmp_path: Path, pfx: Pfx) -> None:
    database = tmp_path / "kc.db"
    with pytest.raises(ConfigurationError):
        asyncio.run(open_core(side_of(settings_for(database, pfx, "wrong-password")), create=True))
    assert not database.exists()


def test_read_only_writes_nothing_and_create_prepares(tmp_path: Path, pfx: Pfx) -> None:
    database = tmp_path / "kc.db"
    settings = settings_for(database, pfx)

    async def body() -> None:
        # create and read_only contradict each other: a programming error, refused at once.
        with pytest.raises(TypeError):
            await open_core(side_of(settings), create=True, read_only=True)

        created = await open_core(side_of(settings), create=True)
        try:
            assert isinstance(created, Side) and created.adopted is None
            assert sorted(created.keys.keys) == [1] and created.ring.revision == 1
        finally:
            await created.aclose()

        opened = await open_core(side_of(settings), read_only=True)
        try:
            assert sorted(opened.keys.keys) == [1] and opened.ring.revision == 1
        finally:
            await opened.aclose()

        worker = await open_core(side_of(settings), tolerate_outage=True)
        try:
            assert type(worker) is Core  # no data keys: the worker's KeyService loads them
        finally:
            await worker.aclose()

    asyncio.run(body())
    assert ring_rows(database) == 1


def test_read_only_on_a_database_without_a_data_key(tmp_path: Path, pfx: Pfx) -> None:
    database = tmp_path / "kc.db"
    settings = settings_for(database, pfx)

    async def body() -> None:
        prepared = await open_core(side_of(settings), create=True)
        await prepared.aclose()

    asyncio.run(body())
    with sqlite3.connect(database) as connection:
        connection.execute("DELETE FROM keyconnector_key_ring")
        connection.execute('DELETE FROM "ApplicationDatas"')
    with pytest.raises(StorageError, match="the target database has no data key yet"):
        asyncio.run(open_core(side_of(settings), read_only=True, name="target"))
    assert ring_rows(database) == 0
