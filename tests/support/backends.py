"""One fresh database of each kind, with plain-SQL access for assertions: shared by the storage suites.

``backend`` is parametrised over SQLite, the JSON file, PostgreSQL and MariaDB (real, private servers
from tests/support/databases.py); ``server_backend`` over the two servers (registered as a plugin in
tests/conftest.py). Test modules also import its helpers, so it may be imported before pytest could
rewrite its asserts: PYTEST_DONT_REWRITE says that is intended.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.storage.base import Repository, UserKeyRecord
from keyconnector.storage.registry import open_repository
from tests.support.databases import MariaDbServer, PostgresServer

T = TypeVar("T")

NOW = datetime(2026, 11, 24, 1, 26, 0, 123456)
ALL = ["sqlite", "json", "postgresql", "mariadb"]
SERVERS = ["postgresql", "mariadb"]


def run(coroutine: Awaitable[T]) -> T:
    async def main() -> T:
        return await coroutine

    return asyncio.run(main())


@dataclass
class Backend:
    """One fresh, empty database of one kind, and plain-SQL access to it for the assertions."""

    name: str
    plain: dict[str, str]
    folder: Path
    server: PostgresServer | MariaDbServer | None = None
    database: str = ""

    @property
    def settings(self) -> DatabaseSettings:
        return DatabaseSettings(**self.plain)  # type: ignore[arg-type]

    def sql(self, statement: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement with the plain driver and return its rows (none for DML/DDL)."""
        if self.name == "sqlite":
            with sqlite3.connect(self.folder / "kc.db") as connection:
                return connection.execute(statement, parameters).fetchall()
        if isinstance(self.server, PostgresServer):
            with self.server.connect(self.database) as connection:
                cursor = connection.execute(statement.replace("?", "%s"), parameters)
                return cursor.fetchall() if cursor.description else []
        assert isinstance(self.server, MariaDbServer)
        connection = self.server.connect(self.database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement.replace("?", "%s").replace('"', "`"), parameters)
                return list(cursor.fetchall()) if cursor.description else []
        finally:
            connection.close()

    def guid(self, user: uuid.UUID) -> Any:
        """A user id as this database stores it."""
        if self.name == "sqlite":
            return str(user).upper()
        if self.name == "postgresql":
            return user
        return str(user)

    def insert_null_key_row(self, user: uuid.UUID) -> None:
        """A row upstream can leave behind: the user's id with no key (counts as no key)."""
        if self.name == "json":
            path = self.folder / "data.json"
            document = json.loads(path.read_text())
            document["userKey"].append({"id": str(user), "key": None, "creationDate": "2020-01-01T00:00:00Z"})
            path.write_text(json.dumps(document))
            return
        stamp: Any = "2020-01-01 00:00:00" if self.name == "sqlite" else datetime(2020, 1, 1)
        self.sql(
            'INSERT INTO "UserKeys" ("Id", "Key", "CreationDate") VALUES (?, NULL, ?)',
            (self.guid(user), stamp),
        )


def make_backend(name: str, folder: Path, request: pytest.FixtureRequest) -> Backend:
    if name == "sqlite":
        return Backend(
            name, {"provider": "sqlite", "sqliteConnectionString": f"Data Source={folder / 'kc.db'}"}, folder
        )
    if name == "json":
        return Backend(name, {"provider": "json", "jsonFilePath": str(folder / "data.json")}, folder)
    if name == "postgresql":
        pg: PostgresServer = request.getfixturevalue("running_postgresql")
        database = pg.create_database()
        plain = {"provider": "postgresql", "postgreSqlConnectionString": pg.connection_string(database)}
        return Backend(name, plain, folder, pg, database)
    maria: MariaDbServer = request.getfixturevalue("running_mariadb")
    database = maria.create_database()
    plain = {"provider": "mysql", "mySqlConnectionString": maria.connection_string(database)}
    return Backend(name, plain, folder, maria, database)


@pytest.fixture(params=ALL)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend(request.param, tmp_path, request)


@pytest.fixture(params=SERVERS)
def server_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend(request.param, tmp_path, request)


def with_repository(settings: DatabaseSettings, body: Callable[[Repository], Awaitable[T]]) -> T:
    async def main() -> T:
        repository = await open_repository(settings)
        try:
            assert isinstance(repository, Repository)
            return await body(repository)
        finally:
            await repository.aclose()

    return asyncio.run(main())


async def collect(repository: Repository, batch_size: int = 1000) -> list[list[UserKeyRecord]]:
    iterator: AsyncIterator[list[UserKeyRecord]] = repository.iter_records(batch_size)
    return [batch async for batch in iterator]


async def records(repository: Repository) -> dict[uuid.UUID, UserKeyRecord]:
    return {r.user_id: r for batch in await collect(repository) for r in batch}
