"""SQL Server: everything that needs no server, and a live run when ``KC_TEST_SQLSERVER`` names one.

No SQL Server can run on this machine. What is tested here without one: the translation of operators'
SqlClient connection strings, the DDL compiled for the ``mssql`` dialect against upstream's types, the
statements the repository sends, and the error classification. With
``KC_TEST_SQLSERVER="Server=tcp:host,1433;Database=master;User Id=sa;Password=...;Encrypt=False"``
the last tests create a scratch database on that server and run the repository against it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import datetime

import pytest
from pydantic import SecretStr
from sqlalchemy.dialects import mssql
from sqlalchemy.schema import CreateTable

from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.storage.backends import sqlserver
from keyconnector.storage.registry import migrate, open_repository
from keyconnector.storage.sql.common import Failure
from keyconnector.storage.sql.schema import (
    application_datas,
    history_row,
    migrations_history,
    user_keys,
)

NOW = datetime(2026, 11, 24, 1, 26, 0, 123456)


def target_of(text: str, pool_size: int = 10) -> sqlserver.ServerTarget:
    settings = DatabaseSettings(
        provider="sqlserver",
        sqlServerConnectionString=SecretStr(text),
        poolSize=pool_size,  # type: ignore[call-arg]
    )
    return sqlserver.parse_target(settings, "database")


def test_the_documented_connection_string() -> None:
    # A password with ';' must be quoted, as for SqlClient.
    target = target_of(
        "Server=tcp:db,1433;Database=kc;User Id=kc;Password='p@ss;w0rd!';Encrypt=True;TrustServerCertificate=True"  # noqa: E501
    )
    assert target.password == "p@ss;w0rd!"
    assert target.ssl_mode == "require"  # encrypted, certificate trusted as the operator asked
    arguments = sqlserver.connect_arguments(target)
    assert arguments["server"] == "db" and arguments["port"] == "1433"
    assert arguments["encryption"] == "require" and arguments["use_datetime2"] is True
    assert arguments["login_timeout"] == 15 and arguments["timeout"] == 30
    assert target.description == "sqlserver kc@db:1433"
    assert "p@ss" not in repr(target)


@pytest.mark.parametrize(
    ("text", "host", "port", "mode"),
    [
        ("Data Source=db.example,14330;Initial Catalog=kc;UID=kc;PWD=x", "db.example", 14330, "verify-full"),
        ("Address=tcp:10.0.0.5;Database=kc;User=kc;Password=x;Encrypt=False", "10.0.0.5", 1433, "prefer"),
        ("server=(local);database=kc;user id=kc;password=x;encrypt=strict", "localhost", 1433, "verify-full"),
        (
            "Server=db\\SQLEXPRESS;Database=kc;User Id=kc;Password=x;Encrypt=Optional",
            "db\\SQLEXPRESS",
            1433,
            "prefer",
        ),
        (
            "Server=db;Port=2000;Database=kc;User Id=kc;Password=x;Encrypt=Mandatory;Trust Server Certificate=yes",  # noqa: E501
            "db",
            2000,
            "require",
        ),
        ("mssql+pymssql://kc:x@db:1444/kc?encrypt=disable", "db", 1444, "disable"),
    ],
)
def test_server_spellings_and_encrypt(text: str, host: str, port: int, mode: str) -> None:
    target = target_of(
        text
        + (
            ";MultipleActiveResultSets=True;Persist Security Info=False;Connect Timeout=5;Max Pool Size=3"
            if "://" not in text
            else ""
        )
    )
    assert target.hosts == ((host, port),)
    assert target.ssl_mode == mode
    arguments = sqlserver.connect_arguments(target)
    if "\\" in host:
        assert "port" not in arguments  # a named instance is found through SQL Browser
    if "://" not in text:
        assert target.max_pool_size == 3 and arguments["login_timeout"] == 5
    assert arguments["encryption"] == {"disable": "off", "prefer": "request"}.get(mode, "require")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Server=db;Database=kc;User Id=kc;Password=hunter2-pw;Integrated Security=SSPI",
            "Integrated Security",
        ),
        ("Server=db;Database=kc;Trusted_Connection=True", "Integrated Security"),
        (
            "Server=db;Database=kc;User Id=kc;Password=hunter2-pw;Authentication=Active Directory Password",
            "Azure AD",
        ),
        ("Server=np:\\\\db\\pipe\\sql\\query;Database=kc;User Id=kc;Password=hunter2-pw", "named-pipe"),
        ("Server=tcp:db,port;Database=kc;User Id=kc;Password=hunter2-pw", "port"),
        ("Server=db;Database=kc;User Id=kc;Password=hunter2-pw;Colour=blue", "'Colour'"),
        ("Server=db;Database=kc;User Id=kc;Password=hunter2-pw;Encrypt=Maybe", "SSL mode"),
        ("Server=db;Database=kc;Password=hunter2-pw", "User Id"),
        ("Server=db;User Id=kc;Password=hunter2-pw", "no database"),
    ],
)
def test_connection_string_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        target_of(text)
    assert caught.value.setting == "database.sqlServerConnectionString"
    assert expected.lower() in caught.value.problem.lower()
    assert "hunter2" not in str(caught.value)


def test_ddl_matches_upstreams_types() -> None:
    dialect = mssql.dialect()  # type: ignore[no-untyped-call]
    users = " ".join(str(CreateTable(user_keys).compile(dialect=dialect)).split())
    assert "[Id] UNIQUEIDENTIFIER NOT NULL" in users
    assert "[Key] NVARCHAR(max) NULL" in users
    assert "[CreationDate] DATETIME2 NOT NULL" in users
    assert "[RevisionDate] DATETIME2 NULL" in users and "[LastAccessDate] DATETIME2 NULL" in users
    assert "CONSTRAINT [PK_UserKeys] PRIMARY KEY ([Id])" in users
    data = " ".join(str(CreateTable(application_datas).compile(dialect=dialect)).split())
    assert "[Id] INTEGER NOT NULL IDENTITY" in data and "[SymmetricKey] NVARCHAR(max) NULL" in data
    assert "CONSTRAINT [PK_ApplicationDatas] PRIMARY KEY ([Id])" in data
    history = " ".join(str(CreateTable(migrations_history).compile(dialect=dialect)).split())
    assert (
        "[MigrationId] NVARCHAR(150) NOT NULL" in history
        and "[ProductVersion] NVARCHAR(32) NOT NULL" in history
    )
    assert history_row("mssql") == {"MigrationId": "20210820154908_InitialCreate", "ProductVersion": "5.0.9"}


def test_statements_as_sent() -> None:
    """pymssql substitutes parameters on the client: check the exact text the server receives."""
    from pymssql import _mssql

    user = uuid.UUID("3f2504e0-4f89-11d3-9a0c-0305e82c3301")

    def sent(statement: str, parameters: tuple[object, ...]) -> str:
        return _mssql.substitute_params(statement, parameters, use_datetime2=True).decode()  # type: ignore[attr-defined,no-any-return]

    assert sent(sqlserver._SELECT_KEY, (str(user),)) == (
        "SELECT [Key] FROM [UserKeys] WHERE [Id] = CAST(N'3f2504e0-4f89-11d3-9a0c-0305e82c3301' AS uniqueidentifier)"  # noqa: E501
    )
    insert = sent(sqlserver._INSERT, (str(user), "rec'ord", NOW))
    assert "CAST('2026-11-24 01:26:00.123456' AS datetime2)" in insert  # microseconds kept
    assert "N'rec''ord'" in insert
    update = sent(sqlserver.record_access_statement(2), (str(user), NOW, str(user), NOW))
    assert update.count("CAST(N'3f2504e0") == 2 and "u.[LastAccessDate] < v.t" in update
    store = sent(sqlserver._STORE_DATA_KEY, ("w", "w", "w"))
    assert (
        "sp_getapplock @Resource = N'keyconnector-data-key'" in store
        and "@LockOwner = 'Transaction'" in store
    )


def test_error_classification() -> None:
    import pymssql

    def error(*args: object) -> BaseException:
        return pymssql.exceptions.OperationalError(*args)

    assert (
        sqlserver.classify(error(18456, b"Login failed for user 'kc'.DB-Lib error message 20018"))
        is Failure.CONFIGURATION
    )
    assert sqlserver.classify(error(1205, b"Transaction was deadlocked")) is Failure.TRANSIENT
    assert (
        sqlserver.classify(error(((20009, b"DB-Lib error message 20009, severity 9: Unable to connect"),)))
        is Failure.TRANSIENT
    )
    assert (
        sqlserver.classify(pymssql.exceptions.ProgrammingError(208, b"Invalid object name 'UserKeys'."))
        is Failure.FATAL
    )
    assert sqlserver.is_duplicate_key(
        pymssql.exceptions.IntegrityError(2627, b"Violation of PRIMARY KEY constraint")
    )
    assert sqlserver.classify(ValueError("not ours")) is None


# -- a live server, only when one is named -------------------------------------------------------------------

LIVE = os.environ.get("KC_TEST_SQLSERVER")
live = pytest.mark.skipif(not LIVE, reason="set KC_TEST_SQLSERVER to a SQL Server connection string to run")


@live
def test_live_server_schema_and_repository() -> None:
    import pymssql

    admin = sqlserver.connect_arguments(target_of(LIVE or ""))
    name = "kc_test_" + uuid.uuid4().hex[:8]
    connection = pymssql.connect(autocommit=True, **admin)
    try:
        connection.cursor().execute(f"CREATE DATABASE [{name}]")
        text = ";".join(
            part
            for part in (LIVE or "").split(";")
            if not part.strip().lower().startswith(("database", "initial catalog"))
        )
        settings = DatabaseSettings(
            provider="sqlserver", sqlServerConnectionString=SecretStr(f"{text};Database={name}")
        )  # type: ignore[call-arg]
        migrate(settings)
        migrate(settings)

        async def body() -> None:
            repository = await open_repository(settings)
            try:
                user = uuid.uuid4()
                assert await repository.get_key(user) is None
                assert await repository.create_key(user, "a", NOW) is True
                assert await repository.create_key(user, "b", NOW) is False
                assert await repository.put_key(user, "c", NOW) is False
                await repository.record_access({user: NOW})
                records = [r for batch in [b async for b in repository.iter_records()] for r in batch]
                assert records[0].last_access_date == NOW and records[0].key == "c"
                assert await repository.store_wrapped_data_key("w1") == "w1"
                assert await repository.store_wrapped_data_key("w2") == "w1"
                await repository.ping()
            finally:
                await repository.aclose()

        asyncio.run(body())
    finally:
        connection.cursor().execute(
            f"ALTER DATABASE [{name}] SET SINGLE_USER WITH ROLLBACK IMMEDIATE; DROP DATABASE [{name}]"
        )
        connection.close()
