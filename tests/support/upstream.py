"""Databases shaped exactly as upstream leaves them, built with plain SQL and plain JSON.

Deliberately independent of ``keyconnector.storage``: if the product's idea of the schema drifted,
tests built on the product's own code would drift with it and still pass.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SQLITE_MIGRATION_ID = "20210820155938_InitialCreate"
PRODUCT_VERSION = "5.0.9"

# What Entity Framework's SQLite provider writes for upstream's first migration
# (docs/compatibility.md section 3.3).
SQLITE_DDL: dict[str, str] = {
    "__EFMigrationsHistory": (
        'CREATE TABLE "__EFMigrationsHistory" (\n'
        '    "MigrationId" TEXT NOT NULL CONSTRAINT "PK___EFMigrationsHistory" PRIMARY KEY,\n'
        '    "ProductVersion" TEXT NOT NULL\n'
        ")"
    ),
    "ApplicationDatas": (
        'CREATE TABLE "ApplicationDatas" (\n'
        '    "Id" INTEGER NOT NULL CONSTRAINT "PK_ApplicationDatas" PRIMARY KEY AUTOINCREMENT,\n'
        '    "SymmetricKey" TEXT NULL\n'
        ")"
    ),
    "UserKeys": (
        'CREATE TABLE "UserKeys" (\n'
        '    "Id" TEXT NOT NULL CONSTRAINT "PK_UserKeys" PRIMARY KEY,\n'
        '    "Key" TEXT NULL,\n'
        '    "CreationDate" TEXT NOT NULL,\n'
        '    "RevisionDate" TEXT NULL,\n'
        '    "LastAccessDate" TEXT NULL\n'
        ")"
    ),
}

# PRAGMA table_info rows as (name, declared type, not null, primary-key position).
SQLITE_COLUMNS: dict[str, list[tuple[str, str, int, int]]] = {
    "__EFMigrationsHistory": [("MigrationId", "TEXT", 1, 1), ("ProductVersion", "TEXT", 1, 0)],
    "ApplicationDatas": [("Id", "INTEGER", 1, 1), ("SymmetricKey", "TEXT", 0, 0)],
    "UserKeys": [
        ("Id", "TEXT", 1, 1),
        ("Key", "TEXT", 0, 0),
        ("CreationDate", "TEXT", 1, 0),
        ("RevisionDate", "TEXT", 0, 0),
        ("LastAccessDate", "TEXT", 0, 0),
    ],
}


@dataclass(frozen=True)
class Row:
    """A ``UserKeys`` row exactly as text in the file."""

    id: str
    key: str | None
    creation: str
    revision: str | None = None
    last_access: str | None = None


def build_sqlite(path: Path, rows: Iterable[Row], wrapped_data_key: str | None) -> None:
    """An upstream SQLite database: schema, history row, data key row, user rows."""
    connection = sqlite3.connect(path)
    try:
        for ddl in SQLITE_DDL.values():
            connection.execute(ddl)
        connection.execute(
            'INSERT INTO "__EFMigrationsHistory" ("MigrationId", "ProductVersion") VALUES (?, ?)',
            (SQLITE_MIGRATION_ID, PRODUCT_VERSION),
        )
        if wrapped_data_key is not None:
            connection.execute(
                'INSERT INTO "ApplicationDatas" ("SymmetricKey") VALUES (?)', (wrapped_data_key,)
            )
        connection.executemany(
            'INSERT INTO "UserKeys" ("Id", "Key", "CreationDate", "RevisionDate", "LastAccessDate") '
            "VALUES (?, ?, ?, ?, ?)",
            [(r.id, r.key, r.creation, r.revision, r.last_access) for r in rows],
        )
        connection.commit()
    finally:
        connection.close()


def sqlite_dump(path: Path) -> dict[str, Any]:
    """Everything a takeover must leave alone: the three tables' DDL and every row."""
    connection = sqlite3.connect(path)
    try:
        ddl = dict(
            connection.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name IN (?, ?, ?)",
                tuple(SQLITE_DDL),
            ).fetchall()
        )
        return {
            "ddl": ddl,
            "history": connection.execute('SELECT * FROM "__EFMigrationsHistory"').fetchall(),
            "data": connection.execute('SELECT * FROM "ApplicationDatas" ORDER BY "Id"').fetchall(),
            "users": connection.execute('SELECT * FROM "UserKeys" ORDER BY "Id"').fetchall(),
        }
    finally:
        connection.close()


def table_info(path: Path, table: str) -> list[tuple[str, str, int, int]]:
    connection = sqlite3.connect(path)
    try:
        return [
            (name, declared, notnull, pk)
            for _cid, name, declared, notnull, _default, pk in connection.execute(
                f'PRAGMA table_info("{table}")'
            )
        ]
    finally:
        connection.close()


def build_json(
    path: Path, symmetric_key: str | None, entries: Sequence[dict[str, Any]], **extra: Any
) -> None:
    """An upstream JSON database; ``extra`` adds top-level properties upstream (or an operator) put there."""
    document: dict[str, Any] = {"symmetricKey": symmetric_key, "userKey": list(entries), **extra}
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
