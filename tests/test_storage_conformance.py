"""One conformance suite for every backend: SQLite, the JSON file, PostgreSQL and MariaDB.

PostgreSQL and MariaDB are real, private servers (tests/support/databases.py). MySQL proper is not
tested: its server cannot be installed from this machine's package sources, and MariaDB speaks the same
protocol and SQL for everything the backend does. Upstream-shaped databases are written here with plain
SQL in upstream's exact types, never with the product's schema code.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from keyconnector.devtools import free_port
from keyconnector.errors import ConfigurationError, UnavailableError
from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.storage.base import Repository, UserKeyRecord
from keyconnector.storage.registry import inspect as inspect_database
from keyconnector.storage.registry import migrate
from tests.support.backends import NOW, Backend, collect, make_backend, records, with_repository
from tests.support.databases import MariaDbServer, PostgresServer, ado_quote
from tests.support.race import race

# -- CRUD semantics -----------------------------------------------------------------------------------------


def test_crud_semantics(backend: Backend) -> None:
    migrate(backend.settings)
    ghost, ghost_for_put = uuid.uuid4(), uuid.uuid4()
    backend.insert_null_key_row(ghost)
    backend.insert_null_key_row(ghost_for_put)

    async def body(repository: Repository) -> None:
        alice, bob = uuid.uuid4(), uuid.uuid4()
        assert await repository.get_key(alice) is None
        assert await repository.create_key(alice, "alice-1", NOW) is True
        assert await repository.create_key(alice, "alice-2", NOW + timedelta(seconds=1)) is False
        assert await repository.get_key(alice) == "alice-1"

        later = NOW + timedelta(hours=1)
        assert await repository.put_key(bob, "bob-1", NOW) is True
        assert await repository.put_key(bob, "bob-2", later) is False
        assert await repository.get_key(bob) == "bob-2"

        # A row whose key is NULL is no key: GET misses it, POST and PUT fill it in as a creation.
        assert await repository.get_key(ghost) is None
        assert await repository.create_key(ghost, "ghost-1", later) is True
        assert await repository.create_key(ghost, "ghost-2", later) is False
        assert await repository.put_key(ghost_for_put, "ghost-put", later) is True

        found = await records(repository)
        assert found[alice] == UserKeyRecord(alice, "alice-1", NOW, None, None)
        assert found[bob] == UserKeyRecord(bob, "bob-2", NOW, later, None)
        assert found[ghost] == UserKeyRecord(ghost, "ghost-1", later, None, None)
        assert found[ghost_for_put] == UserKeyRecord(ghost_for_put, "ghost-put", later, None, None)

        await repository.record_access({alice: later, bob: later + timedelta(microseconds=1)})
        await repository.record_access({alice: NOW})  # a late, older batch does not move time back
        await repository.record_access({})
        await repository.record_access({uuid.uuid4(): later})  # unknown users are ignored
        found = await records(repository)
        assert found[alice].last_access_date == later
        assert found[bob].last_access_date == later + timedelta(microseconds=1)

        assert await repository.get_wrapped_data_key() is None
        assert await repository.store_wrapped_data_key("first") == "first"
        assert await repository.store_wrapped_data_key("second") == "first"
        assert await repository.get_wrapped_data_key() == "first"
        await repository.ping()

        users = sorted(uuid.uuid4() for _ in range(11))
        for user in users:
            await repository.create_key(user, f"k-{user}", NOW)
        batches = await collect(repository, batch_size=5)
        assert [len(b) for b in batches] == [5, 5, 5]
        assert sorted(r.user_id for b in batches for r in b) == sorted(
            [*users, alice, bob, ghost, ghost_for_put]
        )

    with_repository(backend.settings, body)


def test_description_names_the_database_and_never_the_password(server_backend: Backend) -> None:
    migrate(server_backend.settings)
    server = server_backend.server
    assert server is not None

    async def body(repository: Repository) -> str:
        return repository.description

    description = with_repository(server_backend.settings, body)
    provider = "postgresql" if server_backend.name == "postgresql" else "mysql"
    assert description == f"{provider} {server_backend.database}@127.0.0.1:{server.port}"
    state = inspect_database(server_backend.settings)
    assert state.has_schema and server.password not in state.description


# -- several processes ------------------------------------------------------------------------------------------  # noqa: E501


def test_processes_bootstrapping_an_empty_database_agree_on_one_data_key(backend: Backend) -> None:
    results = race(
        backend.folder,
        [{"op": "bootstrap", "settings": backend.plain, "wrapped": f"key-{i}"} for i in range(3)],
    )
    stored = {r["stored"] for r in results} | {r["read"] for r in results}
    assert len(stored) == 1, results
    if backend.name != "json":
        assert backend.sql('SELECT "SymmetricKey" FROM "ApplicationDatas"') == [(stored.pop(),)]
        assert len(backend.sql('SELECT * FROM "__EFMigrationsHistory"')) == 1


def test_parallel_post_and_put_for_one_user(backend: Backend) -> None:
    migrate(backend.settings)
    user = str(uuid.uuid4())
    results = race(
        backend.folder,
        [
            {"op": "post_same", "settings": backend.plain, "user": user, "record": f"post-{i}"}
            for i in range(4)
        ],
    )
    winners = [i for i, r in enumerate(results) if r["created"]]
    assert len(winners) == 1, results

    async def check_post(repository: Repository) -> None:
        assert await repository.get_key(uuid.UUID(user)) == f"post-{winners[0]}"

    with_repository(backend.settings, check_post)

    other = str(uuid.uuid4())
    results = race(
        backend.folder,
        [
            {"op": "put_same", "settings": backend.plain, "user": other, "record": f"put-{i}"}
            for i in range(3)
        ],
    )

    async def check_put(repository: Repository) -> None:
        # Last writer wins, and it is one of the writers' final values or an intermediate one: never a
        # mixture, never lost. Exactly one row exists.
        key = await repository.get_key(uuid.UUID(other))
        assert key is not None and key.startswith("put-")
        assert next(r for r in (await records(repository)).values() if str(r.user_id) == other).key == key

    with_repository(backend.settings, check_put)


def test_parallel_writers_for_different_users_lose_nothing(backend: Backend) -> None:
    migrate(backend.settings)
    per_process = 24
    groups = [[str(uuid.uuid4()) for _ in range(per_process)] for _ in range(3)]
    results = race(backend.folder, [{"op": "many", "settings": backend.plain, "users": g} for g in groups])
    assert all(all(r["results"]) for r in results), results

    async def check(repository: Repository) -> None:
        found = {str(user): record for user, record in (await records(repository)).items()}
        assert len(found) == 3 * per_process
        for group in groups:
            for i, user in enumerate(group):
                assert found[user].key == ("put-" if i % 2 else "create-") + user
                assert found[user].last_access_date == datetime(2026, 1, 1)

    with_repository(backend.settings, check)


# -- restarts --------------------------------------------------------------------------------------------------  # noqa: E501


def test_data_persists_across_restarts(backend: Backend) -> None:
    migrate(backend.settings)
    users = [uuid.uuid4() for _ in range(5)]

    async def write(repository: Repository) -> None:
        for user in users:
            await repository.create_key(user, f"k-{user}", NOW)
        await repository.store_wrapped_data_key("wrapped")

    with_repository(backend.settings, write)
    if backend.server is not None:
        backend.server.restart()
    migrate(backend.settings)  # the next start migrates again: a no-op

    async def read(repository: Repository) -> None:
        for user in users:
            assert await repository.get_key(user) == f"k-{user}"
        assert await repository.get_wrapped_data_key() == "wrapped"

    with_repository(backend.settings, read)


def test_server_restart_under_write_load_loses_no_acknowledged_write(server_backend: Backend) -> None:
    """Writers keep going while the server is killed and restarted: every write either is acknowledged
    and then present, or fails with UnavailableError, promptly; the same repository (same pool) works
    again afterwards without being reopened."""
    migrate(server_backend.settings)
    server = server_backend.server
    assert server is not None
    acknowledged: list[uuid.UUID] = []
    unavailable = 0
    slowest = 0.0
    after_restart = 0
    restarted = threading.Event()

    def bounce() -> None:
        time.sleep(1.0)
        server.restart(down_seconds=2.0, kill=True)
        restarted.set()

    async def writer(repository: Repository, stop_at: float) -> None:
        nonlocal unavailable, slowest, after_restart
        while time.monotonic() < stop_at:
            user = uuid.uuid4()
            started = time.monotonic()
            try:
                assert await repository.create_key(user, f"k-{user}", NOW) is True
                acknowledged.append(user)
                if restarted.is_set():
                    after_restart += 1
            except UnavailableError as exc:
                assert exc.retry_after >= 1
                unavailable += 1
                await asyncio.sleep(0.05)
            slowest = max(slowest, time.monotonic() - started)

    async def body(repository: Repository) -> None:
        thread = threading.Thread(target=bounce)
        thread.start()
        try:
            stop_at = time.monotonic() + 5.0
            await asyncio.gather(*(writer(repository, stop_at) for _ in range(4)))
        finally:
            await asyncio.to_thread(thread.join)
        for user in acknowledged:
            assert await repository.get_key(user) == f"k-{user}"

    with_repository(server_backend.settings, body)
    assert restarted.is_set()
    assert unavailable > 0, "the outage was never noticed"
    assert after_restart > 0, "writes did not resume after the restart"
    assert slowest < 10, f"a write took {slowest:.1f}s"

    async def count(repository: Repository) -> int:
        return len(await records(repository))

    # More rows than acknowledgements is fine (a write can commit and lose its answer with the
    # connection); fewer would be a lost write.
    assert with_repository(server_backend.settings, count) >= len(acknowledged)


def test_a_down_server_is_unavailable_then_recovers(server_backend: Backend) -> None:
    migrate(server_backend.settings)
    server = server_backend.server
    assert server is not None
    user = uuid.uuid4()

    async def body(repository: Repository) -> None:
        assert await repository.create_key(user, "k", NOW) is True
        await asyncio.to_thread(server.stop)
        try:
            for call in (repository.ping(), repository.get_key(user), repository.put_key(user, "x", NOW)):
                started = time.monotonic()
                with pytest.raises(UnavailableError) as caught:
                    await call
                assert time.monotonic() - started < 8
                assert server.password not in str(caught.value)
        finally:
            await asyncio.to_thread(server.start)
        await repository.ping()
        assert await repository.get_key(user) == "k"

    with_repository(server_backend.settings, body)


def test_migrate_and_open_while_the_server_is_down(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    port = free_port()  # nothing listens there
    for provider, key, text in (
        (
            "postgresql",
            "postgreSqlConnectionString",
            f"Host=127.0.0.1;Port={port};Database=kc;Username=u;Password=secret-pw",
        ),
        ("mysql", "mySqlConnectionString", f"Server=127.0.0.1;Port={port};Database=kc;Uid=u;Pwd=secret-pw"),
    ):
        settings = DatabaseSettings(provider=provider, **{key: SecretStr(text)})  # type: ignore[arg-type]
        with pytest.raises(UnavailableError) as caught:
            migrate(settings)
        assert "secret-pw" not in str(caught.value)

        async def body(repository: Repository) -> None:
            with pytest.raises(UnavailableError):
                await repository.get_key(uuid.uuid4())

        with_repository(settings, body)  # opening does not need the server


def test_failed_access_time_writes_never_fail_reads(server_backend: Backend) -> None:
    """The service batches LastAccessDate; when the database refuses that write, GET still answers."""
    from keyconnector.core.service import KeyService

    migrate(server_backend.settings)
    if server_backend.name == "postgresql":
        server_backend.sql(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'no access times today'; END $$"
        )
        server_backend.sql(
            'CREATE TRIGGER refuse BEFORE UPDATE OF "LastAccessDate" ON "UserKeys" '
            "FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    else:
        server_backend.sql(
            "CREATE TRIGGER refuse BEFORE UPDATE ON UserKeys FOR EACH ROW "
            "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'no access times today'"
        )

    class Provider:
        description = "test"

    async def body(repository: Repository) -> None:
        from keyconnector.core.envelope import DataKey, generate_data_key

        service = KeyService(repository, Provider(), flush_interval=3600)  # type: ignore[arg-type]
        service.trusted.loaded = DataKey(generate_data_key())  # type: ignore[assignment]
        user = uuid.uuid4()
        assert await service.create(user, b"k" * 32) is True
        for _ in range(3):
            assert await service.get(user) == b"k" * 32
            await service.flush_access()
        assert service.access_write_failures == 3
        assert user.int in service.access.pending  # kept for the next try

    with_repository(server_backend.settings, body)


# -- upstream databases ----------------------------------------------------------------------------------------  # noqa: E501

UPSTREAM_USERS = [
    uuid.UUID("3f2504e0-4f89-11d3-9a0c-0305e82c3301"),
    uuid.UUID("0b5a2f3c-1111-4e8e-9d7c-6b1f0c2d3e4f"),
    uuid.UUID("ffffffff-2222-4e8e-9d7c-6b1f0c2d3e4f"),
]

POSTGRES_UPSTREAM_DDL = [
    'CREATE TABLE "__EFMigrationsHistory" ("MigrationId" character varying(150) NOT NULL, '
    '"ProductVersion" character varying(32) NOT NULL, '
    'CONSTRAINT "PK___EFMigrationsHistory" PRIMARY KEY ("MigrationId"))',
    'CREATE TABLE "ApplicationDatas" ("Id" integer GENERATED BY DEFAULT AS IDENTITY, "SymmetricKey" text NULL, '  # noqa: E501
    'CONSTRAINT "PK_ApplicationDatas" PRIMARY KEY ("Id"))',
    'CREATE TABLE "UserKeys" ("Id" uuid NOT NULL, "Key" text NULL, '
    '"CreationDate" timestamp without time zone NOT NULL, "RevisionDate" timestamp without time zone NULL, '
    '"LastAccessDate" timestamp without time zone NULL, CONSTRAINT "PK_UserKeys" PRIMARY KEY ("Id"))',
]
MYSQL_UPSTREAM_DDL = [
    "CREATE TABLE `__EFMigrationsHistory` (`MigrationId` varchar(150) CHARACTER SET utf8mb4 NOT NULL, "
    "`ProductVersion` varchar(32) CHARACTER SET utf8mb4 NOT NULL, "
    "CONSTRAINT `PK___EFMigrationsHistory` PRIMARY KEY (`MigrationId`)) CHARACTER SET=utf8mb4",
    "CREATE TABLE `ApplicationDatas` (`Id` int NOT NULL AUTO_INCREMENT, `SymmetricKey` longtext CHARACTER SET utf8mb4 NULL, "  # noqa: E501
    "CONSTRAINT `PK_ApplicationDatas` PRIMARY KEY (`Id`)) CHARACTER SET=utf8mb4",
    "CREATE TABLE `UserKeys` (`Id` char(36) COLLATE ascii_general_ci NOT NULL, `Key` longtext CHARACTER SET utf8mb4 NULL, "  # noqa: E501
    "`CreationDate` datetime(6) NOT NULL, `RevisionDate` datetime(6) NULL, `LastAccessDate` datetime(6) NULL, "  # noqa: E501
    "CONSTRAINT `PK_UserKeys` PRIMARY KEY (`Id`)) CHARACTER SET=utf8mb4",
]
MIGRATION_IDS = {"postgresql": "20210820160016_InitialCreate", "mariadb": "20210820155954_InitialCreate"}


def columns(backend: Backend) -> list[tuple[Any, ...]]:
    """Every column of upstream's three tables as the server describes it (types, nullability,
    collation), in a stable order."""
    if backend.name == "postgresql":
        return backend.sql(
            "SELECT table_name, column_name, data_type, character_maximum_length, is_nullable, is_identity "
            "FROM information_schema.columns WHERE table_schema = 'public' AND table_name IN "
            "('UserKeys', 'ApplicationDatas', '__EFMigrationsHistory') ORDER BY table_name, ordinal_position"
        )
    return backend.sql(
        "SELECT table_name, column_name, column_type, is_nullable, character_set_name, collation_name, extra "
        "FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name IN "
        "('UserKeys', 'ApplicationDatas', '__EFMigrationsHistory') ORDER BY table_name, ordinal_position"
    )


def constraints(backend: Backend) -> list[tuple[Any, ...]]:
    schema = "'public'" if backend.name == "postgresql" else "DATABASE()"
    return backend.sql(
        "SELECT table_name, constraint_name, constraint_type FROM information_schema.table_constraints "
        f"WHERE table_schema = {schema} AND constraint_type = 'PRIMARY KEY' "
        "AND table_name IN ('UserKeys', 'ApplicationDatas', '__EFMigrationsHistory') ORDER BY table_name"
    )


def build_upstream(backend: Backend) -> None:
    """Upstream's schema, history row, data key and rows, as upstream's provider writes them."""
    for ddl in POSTGRES_UPSTREAM_DDL if backend.name == "postgresql" else MYSQL_UPSTREAM_DDL:
        backend.sql(ddl)
    backend.sql(
        'INSERT INTO "__EFMigrationsHistory" ("MigrationId", "ProductVersion") VALUES (?, ?)',
        (MIGRATION_IDS[backend.name], "5.0.9"),
    )
    backend.sql('INSERT INTO "ApplicationDatas" ("SymmetricKey") VALUES (?)', ("wrapped-data-key",))
    rows = [
        (
            UPSTREAM_USERS[0],
            "key-0",
            datetime(2021, 8, 20, 15, 59, 38, 123456),
            None,
            datetime(2024, 2, 29, 23, 59, 59, 999999),
        ),
        (UPSTREAM_USERS[1], "key-1", datetime(2022, 1, 1), datetime(2023, 5, 6, 7, 8, 9, 500000), None),
        (UPSTREAM_USERS[2], None, datetime(2022, 2, 2, 2, 2, 2, 20000), None, None),
    ]
    for user, *rest in rows:
        backend.sql(
            'INSERT INTO "UserKeys" ("Id", "Key", "CreationDate", "RevisionDate", "LastAccessDate") VALUES (?, ?, ?, ?, ?)',  # noqa: E501
            (backend.guid(user), *rest),
        )


def test_an_upstream_database_is_taken_over_in_place(server_backend: Backend) -> None:
    build_upstream(server_backend)
    before_columns, before_constraints = columns(server_backend), constraints(server_backend)
    assert len(before_columns) == 9
    if server_backend.name == "mariadb":
        (user_id,) = [c for c in before_columns if c[0] == "UserKeys" and c[1] == "Id"]
        assert user_id[2:6] == ("char(36)", "NO", "ascii", "ascii_general_ci")

    migrate(server_backend.settings)
    migrate(server_backend.settings)  # a second start changes nothing either

    # Our migrations left upstream's tables exactly as they were: upstream can take them back.
    assert columns(server_backend) == before_columns
    assert constraints(server_backend) == before_constraints
    assert server_backend.sql('SELECT "MigrationId", "ProductVersion" FROM "__EFMigrationsHistory"') == [
        (MIGRATION_IDS[server_backend.name], "5.0.9")
    ]
    assert server_backend.sql("SELECT version_num FROM keyconnector_schema_version") == [("0003",)]

    new_user = uuid.UUID("ABCDEF01-2345-4678-9ABC-DEF012345678")

    async def body(repository: Repository) -> None:
        assert await repository.get_key(UPSTREAM_USERS[0]) == "key-0"
        assert await repository.get_key(UPSTREAM_USERS[1]) == "key-1"
        assert await repository.get_key(UPSTREAM_USERS[2]) is None
        assert await repository.get_wrapped_data_key() == "wrapped-data-key"
        assert await repository.store_wrapped_data_key("another") == "wrapped-data-key"
        found = await records(repository)
        assert found[UPSTREAM_USERS[0]] == UserKeyRecord(
            UPSTREAM_USERS[0],
            "key-0",
            datetime(2021, 8, 20, 15, 59, 38, 123456),
            None,
            datetime(2024, 2, 29, 23, 59, 59, 999999),
        )
        assert found[UPSTREAM_USERS[1]].revision_date == datetime(2023, 5, 6, 7, 8, 9, 500000)
        assert await repository.put_key(UPSTREAM_USERS[1], "key-1b", NOW) is False
        assert await repository.create_key(new_user, "key-new", NOW) is True
        await repository.record_access({UPSTREAM_USERS[0]: NOW})

    with_repository(server_backend.settings, body)
    # What we wrote is in upstream's shape: the GUID text lower-case on MariaDB, full microseconds.
    rows = server_backend.sql(
        'SELECT "Id", "Key", "CreationDate", "RevisionDate" FROM "UserKeys" WHERE "Key" IN (?, ?) ORDER BY "Key"',  # noqa: E501
        ("key-1b", "key-new"),
    )
    assert rows == [
        (server_backend.guid(UPSTREAM_USERS[1]), "key-1b", datetime(2022, 1, 1), NOW),
        (server_backend.guid(new_user), "key-new", NOW, None),
    ]
    if server_backend.name == "mariadb":
        assert rows[1][0] == "abcdef01-2345-4678-9abc-def012345678"
    assert server_backend.sql('SELECT "LastAccessDate" FROM "UserKeys" WHERE "Key" = ?', ("key-0",)) == [
        (NOW,)
    ]


def test_a_new_database_gets_upstreams_exact_schema(
    server_backend: Backend, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    migrate(server_backend.settings)
    reference = make_backend(server_backend.name, tmp_path, request)
    build_upstream(reference)
    assert columns(server_backend) == columns(reference)
    assert constraints(server_backend) == constraints(reference)
    assert server_backend.sql('SELECT "MigrationId", "ProductVersion" FROM "__EFMigrationsHistory"') == [
        (MIGRATION_IDS[server_backend.name], "5.0.9")
    ]


def test_a_postgresql_guid_written_upper_case_by_hand_is_found(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    backend = make_backend("mariadb", tmp_path, request)
    migrate(backend.settings)
    user = uuid.uuid4()
    # ascii_general_ci compares case-insensitively: a row someone wrote in upper case still matches.
    backend.sql(
        'INSERT INTO "UserKeys" ("Id", "Key", "CreationDate") VALUES (?, ?, ?)', (str(user).upper(), "k", NOW)
    )

    async def body(repository: Repository) -> None:
        assert await repository.get_key(user) == "k"
        assert await repository.create_key(user, "other", NOW) is False

    with_repository(backend.settings, body)


# -- connection strings and credentials ------------------------------------------------------------------------  # noqa: E501


def test_bad_credentials_and_unknown_databases_name_the_setting(server_backend: Backend) -> None:
    server = server_backend.server
    assert server is not None
    key = "postgreSqlConnectionString" if server_backend.name == "postgresql" else "mySqlConnectionString"
    provider = server_backend.plain["provider"]
    wrong = server.connection_string(server_backend.database).replace(
        ado_quote(server.password), ado_quote("Wrong-Pa55word")
    )
    for text in (wrong, server.connection_string("no_such_database")):
        settings = DatabaseSettings(provider=provider, **{key: SecretStr(text)})  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError) as caught:
            migrate(settings, "transferTo.database")
        assert caught.value.setting == f"transferTo.database.{key}"
        assert "Wrong-Pa55word" not in str(caught.value) and server.password not in str(caught.value)


@pytest.mark.parametrize(
    ("provider", "key", "text"),
    [
        (
            "postgresql",
            "postgreSqlConnectionString",
            "HOST={host};port={port};Initial Catalog={db};User Id={user};PWD={pw};SSL Mode=Disable;Timeout=5;Command Timeout=20;Pooling=true;Maximum Pool Size=7;Minimum Pool Size=1;Application Name=kc-test",  # noqa: E501
        ),
        (
            "postgresql",
            "postgreSqlConnectionString",
            "Server={host}:{port};Database={db};Username={user};Password={pw};SslMode=Prefer;Trust Server Certificate=true",  # noqa: E501
        ),
        (
            "postgresql",
            "postgreSqlConnectionString",
            "postgresql://{user}:{url_pw}@{host}:{port}/{db}?sslmode=disable&application_name=x",
        ),
        (
            "mysql",
            "mySqlConnectionString",
            "Data Source={host};Port={port};Initial Catalog={db};User ID={user};Password={pw};SslMode=None;Connection Timeout=5;Default Command Timeout=20;Max Pool Size=7;AllowPublicKeyRetrieval=true;CharSet=utf8mb4",  # noqa: E501
        ),
        (
            "mysql",
            "mySqlConnectionString",
            "host={host};PORT={port};database={db};username={user};pwd={pw};SSL Mode=Preferred;GuidFormat=Char36",  # noqa: E501
        ),
        (
            "mysql",
            "mySqlConnectionString",
            "mysql+pymysql://{user}:{url_pw}@{host}:{port}/{db}?connect_timeout=5",
        ),
    ],
)
def test_connection_string_spellings(
    request: pytest.FixtureRequest, provider: str, key: str, text: str
) -> None:
    from urllib.parse import quote

    server: PostgresServer | MariaDbServer = request.getfixturevalue(
        "running_postgresql" if provider == "postgresql" else "running_mariadb"
    )
    database = server.create_database()
    filled = text.format(
        host="127.0.0.1",
        port=server.port,
        db=database,
        user=server.user,
        pw=ado_quote(server.password),
        url_pw=quote(server.password, safe=""),
    )
    settings = DatabaseSettings(provider=provider, **{key: SecretStr(filled)})  # type: ignore[arg-type]
    migrate(settings)

    async def body(repository: Repository) -> None:
        await repository.ping()
        assert await repository.create_key(uuid.uuid4(), "k", NOW) is True

    with_repository(settings, body)


@pytest.mark.parametrize(
    ("provider", "key", "text", "expected"),
    [
        (
            "postgresql",
            "postgreSqlConnectionString",
            "Host=db;Database=kc;Username=u;Password=hunter2-pw;Colour=blue",
            "'Colour'",
        ),
        ("postgresql", "postgreSqlConnectionString", "Host=db;Username=u;Password=hunter2-pw", "no database"),
        ("postgresql", "postgreSqlConnectionString", "Database=kc;Password=hunter2-pw", "no server"),
        (
            "postgresql",
            "postgreSqlConnectionString",
            "Host=db;Port=eighty;Database=kc;Password=hunter2-pw",
            "port",
        ),
        (
            "postgresql",
            "postgreSqlConnectionString",
            "Host=db;Database=kc;Password=hunter2-pw;SSL Mode=Sometimes",
            "SSL mode",
        ),
        (
            "postgresql",
            "postgreSqlConnectionString",
            "Host=db;Database=kc;Password=hunter2-pw;Integrated Security=true",
            "Kerberos",
        ),
        ("postgresql", "postgreSqlConnectionString", "Host=db;Database=kc;Password='hunter2-pw", "closing"),
        (
            "postgresql",
            "postgreSqlConnectionString",
            "Host=db;Database=kc;Password=hunter2-pw;Timeout=soon",
            "connect timeout",
        ),
        ("postgresql", "postgreSqlConnectionString", "postgresql://u:hunter2-pw@db/kc?sslfoo=1", "'sslfoo'"),
        ("postgresql", "postgreSqlConnectionString", "", "not set"),
        (
            "mysql",
            "mySqlConnectionString",
            "Server=db;Database=kc;Uid=u;Pwd=hunter2-pw;Flavour=mint",
            "'Flavour'",
        ),
        (
            "mysql",
            "mySqlConnectionString",
            "Server=db;Database=kc;Uid=u;Pwd=hunter2-pw;GuidFormat=Binary16",
            "Char36",
        ),
        (
            "mysql",
            "mySqlConnectionString",
            "Server=db;Database=kc;Uid=u;Pwd=hunter2-pw;Maximum Pool Size=2;Minimum Pool Size=5",
            "Minimum Pool Size",
        ),
        (
            "mysql",
            "mySqlConnectionString",
            "Server=a,b;Database=kc;Uid=u;Pwd=hunter2-pw;Load Balance=Sideways",
            "Load Balance must be one of",
        ),
        ("mysql", "mySqlConnectionString", "mysql://u:hunter2-pw@db:99999/kc", "URL"),
    ],
)
def test_connection_string_errors_name_the_key_never_the_password(
    provider: str, key: str, text: str, expected: str
) -> None:
    settings = DatabaseSettings(provider=provider, **{key: SecretStr(text)})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError) as caught:
        migrate(settings)
    assert caught.value.setting == f"database.{key}"
    assert expected.lower() in caught.value.problem.lower()
    assert "hunter2" not in str(caught.value)


def test_pool_size_comes_from_the_connection_string_or_the_setting() -> None:
    from keyconnector.storage.backends import mysql, postgresql

    text = "Host=db;Database=kc;Username=u;Password=p"
    settings = DatabaseSettings(provider="postgresql", postgreSqlConnectionString=SecretStr(text), poolSize=4)  # type: ignore[call-arg]
    target = postgresql.parse_target(settings, "database")
    assert target.max_pool_size == 4 and target.host == "db" and target.port == 5432
    assert target.ssl_mode == "prefer" and target.connect_timeout == 15 and target.command_timeout == 30
    assert "p" not in repr(target).replace("postgresql", "").split("password")[0][-3:]
    assert "password=" not in repr(target).lower() or "Password=p" not in repr(target)
    settings = DatabaseSettings(
        provider="postgresql",
        postgreSqlConnectionString=SecretStr(text + ";Maximum Pool Size=25;Host=db1,db2:5433"),
        poolSize=4,  # type: ignore[call-arg]
    )
    target = postgresql.parse_target(settings, "database")
    assert target.max_pool_size == 25
    assert target.hosts == (("db1", 5432), ("db2", 5433))
    assert target.description == "postgresql kc@db1:5432,db2:5433"
    settings = DatabaseSettings(
        provider="mysql", mySqlConnectionString=SecretStr("Server=db;Database=kc;Uid=u;Pwd=secret-value")
    )
    target = mysql.parse_target(settings, "database")
    assert target.max_pool_size == 10 and target.port == 3306 and target.description == "mysql kc@db:3306"
    assert "secret-value" not in repr(target)
