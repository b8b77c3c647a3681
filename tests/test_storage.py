"""Storage backends against real files: upstream compatibility, semantics, and several processes at once.

Upstream-shaped databases are built by ``tests.support.upstream`` with plain SQL and plain JSON, never
with the product's storage code.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import pytest
from pydantic import SecretStr

from keyconnector.errors import ConfigurationError, StorageError, UnavailableError
from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.storage.backends.jsonfile import format_iso_time, parse_iso_time
from keyconnector.storage.base import Repository, UserKeyRecord
from keyconnector.storage.connstr import parse_connection_string, resolve
from keyconnector.storage.registry import migrate, open_repository
from keyconnector.storage.sql.schema import format_sqlite_time, parse_sqlite_time
from tests.support import upstream
from tests.support.race import race

T = TypeVar("T")

NOW = datetime(2026, 11, 24, 1, 26, 0, 123400)


def run(coroutine: Awaitable[T]) -> T:
    async def main() -> T:
        return await coroutine

    return asyncio.run(main())


def sqlite_settings(path: Path, extra: str = "") -> DatabaseSettings:
    return DatabaseSettings(provider="sqlite", sqliteConnectionString=SecretStr(f"Data Source={path}{extra}"))


def json_settings(path: Path) -> DatabaseSettings:
    return DatabaseSettings(provider="json", jsonFilePath=str(path))


def settings_for(backend: str, folder: Path) -> DatabaseSettings:
    return sqlite_settings(folder / "kc.db") if backend == "sqlite" else json_settings(folder / "data.json")


async def collect(repository: Repository, batch_size: int = 1000) -> list[list[UserKeyRecord]]:
    iterator: AsyncIterator[list[UserKeyRecord]] = repository.iter_records(batch_size)
    return [batch async for batch in iterator]


# -- connection strings ----------------------------------------------------------------------------


def test_connection_string_quoting_rules() -> None:
    parsed = parse_connection_string(
        ' Data Source = \'/srv/a;b.db\' ; Password="p;a""ss" ;;Odd==Key=1; cache=Shared;Cache=Private;', "x"
    )
    assert parsed.values == {
        "data source": "/srv/a;b.db",
        "password": 'p;a"ss',
        "odd=key": "1",
        "cache": "Private",
    }
    assert parsed.spelling["cache"] == "Cache"
    assert parse_connection_string("A='it''s'", "x").values == {"a": "it's"}
    assert parse_connection_string("A=  spaced value  ", "x").values == {"a": "spaced value"}
    assert parse_connection_string("", "x").values == {}
    assert parsed.get("DataSource", "Data  Source") == "/srv/a;b.db"


@pytest.mark.parametrize(
    "text",
    [
        "Data Source=/x.db;Password='hunter2-secret",
        "Data Source=/x.db;hunter2-secret",
        "Pwd='hunter2-secret' x",
    ],
)
def test_connection_string_syntax_errors_never_echo_values(text: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_connection_string(text, "database.sqliteConnectionString")
    assert caught.value.setting == "database.sqliteConnectionString"
    assert "hunter2" not in str(caught.value)


def test_connection_string_resolve_names_unknown_keys() -> None:
    parsed = parse_connection_string("Server=db;Colour=blue;Flavour=mint;Pooling=true", "s")
    with pytest.raises(ConfigurationError) as caught:
        resolve(parsed, "s", synonyms={"Server": "host"}, ignored=["Pooling"])
    assert "'Colour'" in caught.value.problem and "'Flavour'" in caught.value.problem
    assert "blue" not in str(caught.value)
    assert resolve(
        parse_connection_string("server=db;POOLING=no", "s"),
        "s",
        synonyms={"Server": "host"},
        ignored=["Pooling"],
    ) == {"host": "db"}


@pytest.mark.parametrize("key", ["Data Source", "DataSource", "Filename", "data source", "FILENAME"])
def test_sqlite_connection_string_synonyms(tmp_path: Path, key: str) -> None:
    settings = DatabaseSettings(
        provider="sqlite",
        sqliteConnectionString=SecretStr(
            f"{key}={tmp_path / 'kc.db'};Cache=Shared;Mode=ReadWriteCreate;Pooling=True;"
            "Foreign Keys=False;Default Timeout=5"
        ),
    )
    migrate(settings)
    assert (tmp_path / "kc.db").exists()


def test_sqlite_connection_string_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        migrate(DatabaseSettings(provider="sqlite"))
    assert caught.value.setting == "database.sqliteConnectionString"
    assert "not set" in caught.value.problem

    with pytest.raises(ConfigurationError) as caught:
        migrate(sqlite_settings(tmp_path / "kc.db", ";Journal Mode=Wal;Colour=blue"), "transferTo.database")
    assert caught.value.setting == "transferTo.database.sqliteConnectionString"
    assert "'Journal Mode'" in caught.value.problem and "'Colour'" in caught.value.problem
    assert "keyConnectorSettings__transferTo__database__sqliteConnectionString" in str(caught.value)

    with pytest.raises(ConfigurationError) as caught:
        migrate(sqlite_settings(tmp_path / "kc.db", ";Password=s3cr3t-value"))
    assert "SQLCipher" in caught.value.problem
    assert "s3cr3t" not in str(caught.value)

    with pytest.raises(ConfigurationError) as caught:
        migrate(sqlite_settings(tmp_path / "missing" / "kc.db"))
    assert caught.value.setting == "database.sqliteConnectionString"
    assert str(tmp_path / "missing") in caught.value.problem
    assert not (tmp_path / "missing").exists()

    with pytest.raises(ConfigurationError):
        migrate(sqlite_settings(tmp_path / "kc.db", ";Mode=ReadOnly"))
    with pytest.raises(ConfigurationError):
        migrate(sqlite_settings(tmp_path / "absent.db", ";Mode=ReadWrite"))
    with pytest.raises(ConfigurationError):
        migrate(DatabaseSettings(provider="sqlite", sqliteConnectionString=SecretStr("Data Source=:memory:")))


# -- time and GUID text ------------------------------------------------------------------------------


def test_sqlite_time_text() -> None:
    assert format_sqlite_time(datetime(2021, 8, 20, 15, 59, 38, 123450)) == "2021-08-20 15:59:38.12345"
    assert format_sqlite_time(datetime(2021, 8, 20, 15, 59, 38)) == "2021-08-20 15:59:38"
    assert format_sqlite_time(datetime(2021, 8, 20, 17, 59, 38, tzinfo=timezone(timedelta(hours=2)))) == (
        "2021-08-20 15:59:38"
    )
    assert parse_sqlite_time("2021-08-20 15:59:38.1234567") == datetime(2021, 8, 20, 15, 59, 38, 123456)
    assert parse_sqlite_time("2021-08-20 15:59:38.5") == datetime(2021, 8, 20, 15, 59, 38, 500000)
    assert parse_sqlite_time("2021-08-20 15:59:38") == datetime(2021, 8, 20, 15, 59, 38)
    with pytest.raises(ValueError):
        parse_sqlite_time("yesterday")


def test_json_time_text() -> None:
    assert format_iso_time(datetime(2021, 8, 20, 15, 59, 38, 123400)) == "2021-08-20T15:59:38.1234Z"
    assert format_iso_time(datetime(2021, 8, 20, 15, 59, 38)) == "2021-08-20T15:59:38Z"
    assert parse_iso_time("2021-08-20T15:59:38.1234567Z") == datetime(2021, 8, 20, 15, 59, 38, 123456)
    assert parse_iso_time("2021-08-20T15:59:38.1234567") == datetime(2021, 8, 20, 15, 59, 38, 123456)
    assert parse_iso_time("2021-08-20T15:59:38") == datetime(2021, 8, 20, 15, 59, 38)
    assert parse_iso_time("2021-08-20T17:59:38.5+02:00") == datetime(2021, 8, 20, 15, 59, 38, 500000)
    assert parse_iso_time("2021-08-20T15:59:38.1Z") == datetime(2021, 8, 20, 15, 59, 38, 100000)


# -- SQLite: upstream databases -----------------------------------------------------------------------

UPSTREAM_USERS = [
    uuid.UUID(u)
    for u in (
        "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        "0b5a2f3c-1111-4e8e-9d7c-6b1f0c2d3e4f",
        "ffffffff-2222-4e8e-9d7c-6b1f0c2d3e4f",
        "8a0c1d2e-3333-4e8e-9d7c-6b1f0c2d3e4f",
    )
]
UPSTREAM_ROWS = [
    upstream.Row(
        str(UPSTREAM_USERS[0]).upper(),
        "key-0",
        "2021-08-20 15:59:38.1234567",
        None,
        "2024-02-29 23:59:59.9999999",
    ),
    upstream.Row(
        str(UPSTREAM_USERS[1]).upper(), "key-1", "2022-01-01 00:00:00", "2023-05-06 07:08:09.5", None
    ),
    upstream.Row(str(UPSTREAM_USERS[2]).upper(), None, "2022-02-02 02:02:02.02"),
    upstream.Row(
        str(UPSTREAM_USERS[3]).upper(), "key-3", "2025-12-31 23:59:59.0000001", None, "2025-12-31 00:00:00"
    ),
]


def test_upstream_sqlite_database_is_adopted_in_place(tmp_path: Path) -> None:
    path = tmp_path / "kc.db"
    upstream.build_sqlite(path, UPSTREAM_ROWS, "wrapped-data-key")
    before = upstream.sqlite_dump(path)

    settings = sqlite_settings(path)
    migrate(settings)
    migrate(settings)  # a second start changes nothing either

    assert upstream.sqlite_dump(path) == before
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT version_num FROM keyconnector_schema_version").fetchall() == [
            ("0003",)
        ]
        tables = {
            name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    assert tables == {
        "__EFMigrationsHistory",
        "ApplicationDatas",
        "UserKeys",
        "sqlite_sequence",
        "keyconnector_schema_version",
        "keyconnector_key_ring",
        "keyconnector_audit",
    }

    async def check() -> None:
        repository = await open_repository(settings)
        try:
            assert repository.description == f"sqlite {path}"
            assert await repository.get_key(UPSTREAM_USERS[0]) == "key-0"
            assert await repository.get_key(UPSTREAM_USERS[1]) == "key-1"
            assert await repository.get_key(UPSTREAM_USERS[2]) is None  # NULL key: no key
            assert await repository.get_key(uuid.uuid4()) is None
            assert await repository.get_wrapped_data_key() == "wrapped-data-key"
            assert await repository.store_wrapped_data_key("another") == "wrapped-data-key"
            batches = await collect(repository, batch_size=3)
            assert [len(batch) for batch in batches] == [3, 1]
            records = {record.user_id: record for batch in batches for record in batch}
            assert [record.user_id for batch in batches for record in batch] == sorted(
                UPSTREAM_USERS, key=lambda u: str(u).upper()
            )
            assert records[UPSTREAM_USERS[0]] == UserKeyRecord(
                UPSTREAM_USERS[0],
                "key-0",
                datetime(2021, 8, 20, 15, 59, 38, 123456),
                None,
                datetime(2024, 2, 29, 23, 59, 59, 999999),
            )
            assert records[UPSTREAM_USERS[1]] == UserKeyRecord(
                UPSTREAM_USERS[1], "key-1", datetime(2022, 1, 1), datetime(2023, 5, 6, 7, 8, 9, 500000), None
            )
            assert records[UPSTREAM_USERS[2]].key is None
            assert records[UPSTREAM_USERS[3]].creation_date == datetime(2025, 12, 31, 23, 59, 59)
            # Writes land in upstream's text formats.
            assert (
                await repository.put_key(UPSTREAM_USERS[1], "key-1b", datetime(2026, 1, 2, 3, 4, 5, 600000))
                is False
            )
            await repository.ping()
        finally:
            await repository.aclose()

    run(check())
    with sqlite3.connect(path) as connection:
        row = connection.execute(
            'SELECT "Key", "CreationDate", "RevisionDate" FROM "UserKeys" WHERE "Id" = ?',
            (str(UPSTREAM_USERS[1]).upper(),),
        ).fetchone()
    assert row == ("key-1b", "2022-01-01 00:00:00", "2026-01-02 03:04:05.6")


def test_new_sqlite_database_has_exactly_upstreams_schema(tmp_path: Path) -> None:
    path = tmp_path / "kc.db"
    migrate(sqlite_settings(path))
    dump = upstream.sqlite_dump(path)
    assert dump["ddl"] == upstream.SQLITE_DDL
    for table, columns in upstream.SQLITE_COLUMNS.items():
        assert upstream.table_info(path, table) == columns
    assert dump["history"] == [(upstream.SQLITE_MIGRATION_ID, upstream.PRODUCT_VERSION)]
    assert dump["data"] == [] and dump["users"] == []
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("SELECT version_num FROM keyconnector_schema_version").fetchall() == [
            ("0003",)
        ]


def test_a_partial_or_foreign_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kc.db"
    with sqlite3.connect(path) as connection:
        connection.execute(upstream.SQLITE_DDL["UserKeys"])
    with pytest.raises(StorageError, match="ApplicationDatas"):
        migrate(sqlite_settings(path))

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite file at all, but long enough to have a header" * 20)
    with pytest.raises(StorageError):
        migrate(sqlite_settings(garbage))


def test_sqlite_open_requires_migrations(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="migrations"):
        run(open_repository(sqlite_settings(tmp_path / "kc.db")))
    assert not (tmp_path / "kc.db").exists()


def test_sqlite_ping_notices_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "kc.db"
    settings = sqlite_settings(path)
    migrate(settings)

    async def check() -> None:
        repository = await open_repository(settings)
        try:
            await repository.ping()
            os.replace(path, tmp_path / "moved.db")
            with pytest.raises(UnavailableError):
                await repository.ping()
        finally:
            await repository.aclose()

    run(check())


# -- JSON: upstream files ---------------------------------------------------------------------------


def test_upstream_json_file_is_read_and_unknown_properties_survive(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    entries = [
        {
            "id": str(UPSTREAM_USERS[0]),
            "key": "key-0",
            "creationDate": "2021-08-20T15:59:38.1234567Z",
            "revisionDate": None,
            "lastAccessDate": "2024-02-29T23:59:59.9999999Z",
            "note": {"kept": [1, 2, 3]},
        },
        {
            # Another writer's spelling: upper-case GUID and PascalCase names, no zone, no fraction.
            "Id": str(UPSTREAM_USERS[1]).upper(),
            "Key": "key-1",
            "CreationDate": "2022-01-01T00:00:00",
            "RevisionDate": "2023-05-06T07:08:09.5Z",
            "LastAccessDate": None,
        },
        {"id": str(UPSTREAM_USERS[2]), "key": None, "creationDate": "2022-02-02T02:02:02.02Z"},
    ]
    upstream.build_json(path, "wrapped-data-key", entries, extraTopLevel={"a": 1})
    os.chmod(path, 0o640)
    settings = json_settings(path)
    migrate(settings)

    async def check() -> None:
        repository = await open_repository(settings)
        try:
            assert repository.description == f"json {path}"
            assert await repository.get_key(UPSTREAM_USERS[0]) == "key-0"
            assert await repository.get_key(UPSTREAM_USERS[1]) == "key-1"
            assert await repository.get_key(UPSTREAM_USERS[2]) is None
            assert await repository.get_wrapped_data_key() == "wrapped-data-key"
            records = {r.user_id: r for batch in await collect(repository) for r in batch}
            assert records[UPSTREAM_USERS[0]] == UserKeyRecord(
                UPSTREAM_USERS[0],
                "key-0",
                datetime(2021, 8, 20, 15, 59, 38, 123456),
                None,
                datetime(2024, 2, 29, 23, 59, 59, 999999),
            )
            assert records[UPSTREAM_USERS[1]] == UserKeyRecord(
                UPSTREAM_USERS[1], "key-1", datetime(2022, 1, 1), datetime(2023, 5, 6, 7, 8, 9, 500000), None
            )
            new_user = uuid.UUID("ABCDEF01-2345-4678-9ABC-DEF012345678")
            assert await repository.create_key(new_user, "key-new", NOW) is True
            assert await repository.put_key(UPSTREAM_USERS[1], "key-1b", NOW) is False
            await repository.record_access({UPSTREAM_USERS[0]: datetime(2025, 1, 1)})
        finally:
            await repository.aclose()

    run(check())
    document = json.loads(path.read_text())
    assert document["extraTopLevel"] == {"a": 1}
    assert document["symmetricKey"] == "wrapped-data-key"
    first, second, third, added = document["userKey"]
    assert first["note"] == {"kept": [1, 2, 3]}
    assert first["lastAccessDate"] == "2025-01-01T00:00:00Z"
    # The writer kept the spelling it found rather than adding camelCase twins.
    assert second == {
        "Id": str(UPSTREAM_USERS[1]).upper(),
        "Key": "key-1b",
        "CreationDate": "2022-01-01T00:00:00",
        "RevisionDate": "2026-11-24T01:26:00.1234Z",
        "LastAccessDate": None,
    }
    assert third == entries[2]
    assert added == {
        "id": "abcdef01-2345-4678-9abc-def012345678",
        "key": "key-new",
        "creationDate": "2026-11-24T01:26:00.1234Z",
        "revisionDate": None,
        "lastAccessDate": None,
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_json_migrate_creates_an_empty_file_and_checks_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    migrate(json_settings(path))
    assert json.loads(path.read_text()) == {"userKey": []}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    with pytest.raises(ConfigurationError) as caught:
        migrate(json_settings(tmp_path / "nowhere" / "data.json"), "transferTo.database")
    assert caught.value.setting == "transferTo.database.jsonFilePath"
    assert not (tmp_path / "nowhere").exists()


def test_corrupt_json_file_is_reported_with_position_not_contents(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('{\n  "symmetricKey": "VERY-SECRET-WRAPPED",\n  "userKey": [ {"id": } ]\n}')
    with pytest.raises(StorageError) as caught:
        migrate(json_settings(path))
    message = str(caught.value)
    assert str(path) in message and "line 3" in message and "column" in message
    assert "VERY-SECRET" not in message

    path.write_text('{"userKey": [{"id": "not-a-guid", "key": "k"}]}')
    with pytest.raises(StorageError, match="entry 0"):
        run(open_repository(json_settings(path)))


def test_json_missing_file_at_run_time_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    settings = json_settings(path)
    migrate(settings)

    async def check() -> None:
        repository = await open_repository(settings)
        try:
            await repository.ping()
            path.unlink()
            with pytest.raises(UnavailableError):
                await repository.get_key(uuid.uuid4())
            with pytest.raises(UnavailableError):
                await repository.ping()
            # A write re-creates it.
            assert await repository.create_key(uuid.uuid4(), "k", NOW) is True
            await repository.ping()
        finally:
            await repository.aclose()

    run(check())


def test_json_reads_see_another_writers_changes(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    settings = json_settings(path)
    migrate(settings)
    user = uuid.uuid4()

    async def check() -> None:
        reader = await open_repository(settings)
        writer = await open_repository(settings)
        try:
            assert await reader.get_key(user) is None
            await writer.create_key(user, "from-writer", NOW)
            assert await reader.get_key(user) == "from-writer"
            await writer.put_key(user, "again", NOW)
            assert await reader.get_key(user) == "again"
        finally:
            await reader.aclose()
            await writer.aclose()

    run(check())


# -- semantics, both backends -------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "json"])
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> DatabaseSettings:
    settings = settings_for(request.param, tmp_path)
    migrate(settings)
    return settings


def with_repository(settings: DatabaseSettings, body: Callable[[Repository], Awaitable[None]]) -> None:
    async def main() -> None:
        repository = await open_repository(settings)
        try:
            assert isinstance(repository, Repository)
            await body(repository)
        finally:
            await repository.aclose()

    asyncio.run(main())


def test_sqlite_null_key_row_counts_as_absent(tmp_path: Path) -> None:
    path = tmp_path / "kc.db"
    user, other = uuid.uuid4(), uuid.uuid4()
    upstream.build_sqlite(
        path,
        [
            upstream.Row(str(user).upper(), None, "2020-01-01 00:00:00"),
            upstream.Row(str(other).upper(), None, "2020-01-01 00:00:00"),
        ],
        None,
    )
    with sqlite3.connect(path) as connection:
        connection.execute('INSERT INTO "ApplicationDatas" ("SymmetricKey") VALUES (NULL)')
    settings = sqlite_settings(path)
    migrate(settings)

    async def body(repository: Repository) -> None:
        assert await repository.get_key(user) is None
        assert await repository.create_key(user, "filled", NOW) is True
        assert await repository.create_key(user, "again", NOW) is False
        assert await repository.put_key(other, "filled-by-put", NOW) is True
        assert await repository.get_wrapped_data_key() is None
        assert await repository.store_wrapped_data_key("w") == "w"

    with_repository(settings, body)
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            'SELECT "Id", "Key", "CreationDate", "RevisionDate" FROM "UserKeys" ORDER BY "Id"'
        ).fetchall()
        data = connection.execute('SELECT "Id", "SymmetricKey" FROM "ApplicationDatas"').fetchall()
    assert sorted(rows) == sorted(
        [
            (str(user).upper(), "filled", "2026-11-24 01:26:00.1234", None),
            (str(other).upper(), "filled-by-put", "2026-11-24 01:26:00.1234", None),
        ]
    )
    assert data == [(1, "w")]  # the existing empty row was filled, not a second row added


def test_json_null_key_entry_counts_as_absent(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    user = uuid.uuid4()
    upstream.build_json(path, None, [{"id": str(user), "key": None, "creationDate": "2020-01-01T00:00:00Z"}])
    settings = json_settings(path)

    async def body(repository: Repository) -> None:
        assert await repository.get_key(user) is None
        assert await repository.create_key(user, "filled", NOW) is True
        assert await repository.create_key(user, "again", NOW) is False

    with_repository(settings, body)
    (entry,) = json.loads(path.read_text())["userKey"]
    assert entry["key"] == "filled" and entry["creationDate"] == "2026-11-24T01:26:00.1234Z"


def test_aware_times_are_stored_as_utc(backend_settings: DatabaseSettings) -> None:
    async def body(repository: Repository) -> None:
        user = uuid.uuid4()
        await repository.create_key(
            user, "k", datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
        )
        (record,) = [r for b in await collect(repository) for r in b]
        assert record.creation_date == datetime(2026, 1, 1, 10, 0)
        assert record.creation_date.tzinfo is None

    with_repository(backend_settings, body)


def test_sqlite_get_key_never_leaves_the_event_loop(tmp_path: Path) -> None:
    """The hot path reads on the loop: the coroutine finishes without suspending once.

    A thread hop (run_in_executor) or an async driver would suspend it; speed itself is measured in
    bench/, not asserted here.
    """
    settings = sqlite_settings(tmp_path / "kc.db")
    migrate(settings)

    async def body(repository: Repository) -> None:
        user = uuid.uuid4()
        await repository.create_key(user, "k" * 120, NOW)
        for target in (user, uuid.uuid4()):
            coroutine = repository.get_key(target)
            with pytest.raises(StopIteration) as finished:
                coroutine.send(None)
            assert finished.value.value == ("k" * 120 if target == user else None)

    with_repository(settings, body)


# -- several processes -------------------------------------------------------------------------------
# The races themselves run for every backend in test_storage_conformance.py; this is SQLite's own case.


def test_processes_bootstrapping_a_zero_byte_sqlite_file_agree_on_one_data_key(tmp_path: Path) -> None:
    (tmp_path / "kc.db").touch()  # what `touch` before mounting a volume leaves
    settings = {"provider": "sqlite", "sqliteConnectionString": f"Data Source={tmp_path / 'kc.db'}"}
    results = race(
        tmp_path, [{"op": "bootstrap", "settings": settings, "wrapped": f"key-{i}"} for i in range(3)]
    )
    stored = {r["stored"] for r in results} | {r["read"] for r in results}
    assert len(stored) == 1, results
    with sqlite3.connect(tmp_path / "kc.db") as connection:
        assert connection.execute('SELECT "SymmetricKey" FROM "ApplicationDatas"').fetchall() == [
            (stored.pop(),)
        ]
        assert connection.execute('SELECT * FROM "__EFMigrationsHistory"').fetchall() == [
            (upstream.SQLITE_MIGRATION_ID, upstream.PRODUCT_VERSION)
        ]
