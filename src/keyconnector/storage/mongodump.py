"""A MongoDB deployment of upstream's release, read from what ``mongodump`` or ``mongoexport`` wrote.

Upstream's 2025.11.0 release still stores keys in MongoDB (``database__provider=mongo``); we do
not, and no MongoDB server runs next to us to read it. What an operator can always produce is a
dump of the two collections upstream used:

- ``ApplicationData``: one document, ``{_id: ObjectId, SymmetricKey: <the data key, RSA-wrapped>}``;
- ``UserKey``: ``{_id: <user GUID>, Key, CreationDate, RevisionDate, LastAccessDate}``.

This module reads either form (``mongodump``'s BSON files, optionally ``--gzip``ped, or
``mongoexport``'s extended JSON, canonical or relaxed, one document per line or ``--jsonArray``)
into a :class:`MongoDump`: a read-only repository that ``keyconnector transfer --from-mongo-dump``
uses as its source, so the copy and the verification are the transfer's own.

The whole dump is read and checked when it is opened, before anything is written anywhere: a
truncated file, a document of the wrong shape or a GUID of doubtful byte order stops the transfer
with the file and the document named, never half-way through a copy. Nothing secret (``Key``,
``SymmetricKey``) ever goes into a message.

GUIDs: upstream's .NET driver wrote ``_id`` as BSON binary subtype 3 in the C# legacy byte order
(the first three groups little-endian) unless it was configured for the standard representation,
subtype 4. Both are read here, as are ``$uuid`` and string forms from extended JSON.
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any
from uuid import RFC_4122, UUID

from keyconnector._optional import require
from keyconnector.errors import MissingDependencyError, StorageError, UsageError
from keyconnector.storage.base import RecordUpdate, StoredKeyRing, UserKeyRecord

OPTION = "--from-mongo-dump"
"""The command-line option that names the dump: what every message about finding it names."""

COLLECTIONS = ("ApplicationData", "UserKey")
"""Upstream's collection names (its Mongo repositories), which both tools use as file names."""

SUFFIXES = {".bson": "mongodump", ".bson.gz": "mongodump --gzip", ".json": "mongoexport"}
"""What each file name ending means: which tool wrote it."""


@dataclass(frozen=True)
class DumpFiles:
    """The two files of one database's dump, found in the folder the operator named."""

    folder: Path
    application_data: Path
    user_key: Path

    def describe(self) -> str:
        return f"MongoDB dump {self.folder} ({self.application_data.name}, {self.user_key.name})"


def _collection_files(folder: Path) -> dict[str, list[Path]]:
    """Each collection's files directly in ``folder`` (any of the known endings)."""
    found: dict[str, list[Path]] = {name: [] for name in COLLECTIONS}
    for name in COLLECTIONS:
        for suffix in SUFFIXES:
            path = folder / f"{name}{suffix}"
            if path.is_file():
                found[name].append(path)
    return found


def find_dump_files(directory: Path) -> DumpFiles:
    """The dump's two files: in ``directory`` itself (``mongodump --out`` of one database, or the
    folder of the ``mongoexport`` files), or in its one sub-folder holding them (``mongodump``'s
    ``dump/<database>/``). Anything else is refused, saying what was found and what is missing."""
    if not directory.exists():
        raise UsageError(OPTION, f"{directory} does not exist")
    if not directory.is_dir():
        raise UsageError(
            OPTION,
            f"{directory} is a file, not a folder: give the folder mongodump wrote (a mongodump "
            "--archive file is not read: dump again without --archive) or the folder holding the "
            "mongoexport files ApplicationData.json and UserKey.json",
        )
    candidates = [directory, *sorted(path for path in directory.iterdir() if path.is_dir())]
    holding = [(folder, files) for folder in candidates if any((files := _collection_files(folder)).values())]
    if not holding:
        present = sorted(path.name for path in directory.iterdir())
        listing = ", ".join(present[:10]) + (f" and {len(present) - 10} more" if len(present) > 10 else "")
        raise UsageError(
            OPTION,
            f"{directory} holds no dump of upstream's collections: expected ApplicationData and UserKey "
            f"as .bson (mongodump), .bson.gz (mongodump --gzip) or .json (mongoexport) files, there or "
            f"in a sub-folder named after the database; found {listing or 'nothing'}",
        )
    if len(holding) > 1:
        folders = ", ".join(str(folder) for folder, _ in holding)
        raise UsageError(
            OPTION,
            f"{directory} holds dumps of several databases ({folders}): give the folder of the one "
            "upstream used (its database__mongoDatabaseName setting)",
        )
    folder, files = holding[0]
    chosen: dict[str, Path] = {}
    for name in COLLECTIONS:
        paths = files[name]
        if not paths:
            present_names = ", ".join(path.name for paths in files.values() for path in paths)
            raise UsageError(
                OPTION,
                f"{folder} has {present_names} but no {name} (.bson, .bson.gz or .json): dump or export "
                "both collections, ApplicationData and UserKey, of upstream's database",
            )
        if len(paths) > 1:
            raise UsageError(
                OPTION,
                f"{folder} has {name} twice ({', '.join(path.name for path in paths)}): keep only the "
                "one from the dump to transfer",
            )
        chosen[name] = paths[0]
    return DumpFiles(folder, chosen["ApplicationData"], chosen["UserKey"])


# -- reading the documents -----------------------------------------------------------------------------


def _bson() -> ModuleType:
    """pymongo's ``bson``, or a message naming the extra to install.

    Gated on ``pymongo`` rather than ``bson``: a stray ``bson`` package from PyPI (another project
    with the same import name) would import and then misread the files; pymongo's is the one
    ``keyconnector[mongo]`` installs."""
    try:
        require("pymongo", extra="mongo", setting=OPTION, provider="mongo")
    except MissingDependencyError:
        raise UsageError(
            OPTION,
            "reading a MongoDB dump needs the Python package 'pymongo', which is not installed; install "
            "it with: pip install 'keyconnector[mongo]'",
        ) from None
    return require("bson", extra="mongo", setting=OPTION, provider="mongo")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StorageError(f"{path} cannot be read: {exc.strerror or type(exc).__name__}") from None


def _documents(path: Path, bson: ModuleType) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Each document of the file, with where it is for messages (``document 3``, ``line 3``)."""
    if path.name.endswith(".json"):
        yield from _json_documents(path, bson)
        return
    raw = _read(path)
    number = 0
    try:
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        for number, document in enumerate(bson.decode_iter(raw), 1):
            yield f"document {number}", document
    except (bson.errors.InvalidBSON, OSError, EOFError, zlib.error) as exc:
        raise StorageError(
            f"{path}: not a whole mongodump BSON file after document {number} ({type(exc).__name__}: "
            f"{exc}); dump the collection again"
        ) from None


def _json_documents(path: Path, bson: ModuleType) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """mongoexport's output: one extended-JSON document per line, or one array (``--jsonArray``).

    UTF-16 is read too: that is what a Windows shell makes of ``mongoexport > file.json``."""
    json_util = bson.json_util
    raw = _read(path)
    utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    try:
        text = raw.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError:
        raise StorageError(
            f"{path}: not UTF-8 text, as mongoexport writes it; export again with mongoexport --out"
        ) from None
    if text.lstrip().startswith("["):
        try:
            documents = json_util.loads(text)
        except ValueError as exc:
            raise StorageError(f"{path}: not mongoexport's extended JSON ({_json_problem(exc)})") from None
        for number, document in enumerate(documents, 1):
            yield f"element {number}", _mapping(document, path, f"element {number}")
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            document = json_util.loads(line)
        except ValueError as exc:
            raise StorageError(
                f"{path}, line {number}: not mongoexport's extended JSON ({_json_problem(exc)})"
            ) from None
        yield f"line {number}", _mapping(document, path, f"line {number}")


def _json_problem(exc: ValueError) -> str:
    """The parser's complaint without the text it quotes (which may be a key)."""
    return exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__


def _mapping(document: object, path: Path, where: str) -> Mapping[str, Any]:
    if not isinstance(document, Mapping):
        raise StorageError(f"{path}, {where}: a {type(document).__name__}, not a document")
    return document


def _user_id(value: object, bson: ModuleType) -> UUID:
    """``_id`` as upstream's .NET driver wrote it (see the module's docstring); ValueError otherwise."""
    binary = bson.binary
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        return UUID(value)
    if isinstance(value, binary.Binary):
        if len(value) != 16:
            raise ValueError(f"_id is {len(value)} bytes of binary, not a GUID")
        if value.subtype == binary.UUID_SUBTYPE:
            return UUID(bytes=bytes(value))
        if value.subtype == binary.OLD_UUID_SUBTYPE:
            legacy: UUID = value.as_uuid(binary.UuidRepresentation.CSHARP_LEGACY)
            standard = UUID(bytes=bytes(value))
            # Bitwarden's user ids are version-4 GUIDs. One that is version 4 only when read in the
            # standard order was written by something else (a Python or Java driver's legacy
            # order): reading it as .NET's would file every key under a wrong user, silently.
            if legacy.version != 4 and standard.version == 4 and standard.variant == RFC_4122:
                raise ValueError(
                    "_id is binary subtype 3 but not in .NET's legacy byte order, which upstream's driver "
                    f"wrote (read in the standard order it is {standard}): the dump was not made from "
                    "upstream's database as it wrote it; convert the ids to subtype 4 and dump again"
                )
            return legacy
        raise ValueError(f"_id is binary subtype {value.subtype}, not a GUID (subtype 3 or 4)")
    raise ValueError(f"_id is a {type(value).__name__}, not a GUID")


def _date(document: Mapping[str, Any], name: str, *, required: bool) -> datetime | None:
    """A BSON datetime (``$date`` in JSON) as naive UTC, as the other backends hold times."""
    value = document.get(name)
    if value is None:
        if required:
            raise ValueError(f"{name} is missing")
        return None
    if not isinstance(value, datetime):
        raise ValueError(f"{name} is a {type(value).__name__}, not a date")
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value


def _record(document: Mapping[str, Any], bson: ModuleType) -> UserKeyRecord:
    key = document.get("Key")
    if key is not None and not isinstance(key, str):
        raise ValueError(f"Key is a {type(key).__name__}, not a string")
    created = _date(document, "CreationDate", required=True)
    assert created is not None
    return UserKeyRecord(
        user_id=_user_id(document.get("_id"), bson),
        key=key,
        creation_date=created,
        revision_date=_date(document, "RevisionDate", required=False),
        last_access_date=_date(document, "LastAccessDate", required=False),
    )


def _data_key(path: Path, bson: ModuleType) -> str | None:
    """``SymmetricKey`` of the ApplicationData document; None when the collection is empty."""
    found: list[str] = []
    for where, document in _documents(path, bson):
        value = document.get("SymmetricKey")
        if value is None:
            continue
        if not isinstance(value, str):
            raise StorageError(f"{path}, {where}: SymmetricKey is a {type(value).__name__}, not a string")
        if value not in found:
            found.append(value)
    if len(found) > 1:
        # Upstream only ever upserts one document; two keys mean the collection was edited by hand.
        raise StorageError(
            f"{path}: ApplicationData holds {len(found)} different SymmetricKey values, and upstream only "
            "ever writes one; find out which one the deployment used before transferring"
        )
    return found[0] if found else None


def read_mongo_dump(directory: Path) -> MongoDump:
    """The dump in ``directory`` (see :func:`find_dump_files`), read and checked whole."""
    files = find_dump_files(directory)
    bson = _bson()
    wrapped = _data_key(files.application_data, bson)
    records: dict[UUID, UserKeyRecord] = {}
    for where, document in _documents(files.user_key, bson):
        try:
            record = _record(document, bson)
        except ValueError as exc:
            raise StorageError(f"{files.user_key}, {where}: {exc}") from None
        if record.user_id in records:
            raise StorageError(
                f"{files.user_key}, {where}: user {record.user_id} appears twice (as a subtype 3 and a "
                "subtype 4 GUID?): the dump mixes two copies of the collection"
            )
        records[record.user_id] = record
    return MongoDump(files, wrapped, records)


# -- the read-only repository ----------------------------------------------------------------------------


class MongoDump:
    """The dump as a :class:`~keyconnector.storage.base.Repository` a transfer reads from.

    Reading only: every write raises, so a source can never be changed by mistake (and a dump is
    not a database anyone should write into). Records are listed in GUID order, as the other
    backends list theirs, so the transfer's verification walks both sides in step.
    """

    def __init__(self, files: DumpFiles, wrapped: str | None, records: Mapping[UUID, UserKeyRecord]) -> None:
        self.files = files
        self._wrapped = wrapped
        self._records = dict(records)
        self._order = sorted(self._records, key=str)

    @property
    def description(self) -> str:
        return self.files.describe()

    async def get_key(self, user_id: UUID) -> str | None:
        record = self._records.get(user_id)
        return None if record is None else record.key

    async def get_wrapped_data_key(self) -> str | None:
        return self._wrapped

    async def iter_records(self, batch_size: int = 1000) -> AsyncIterator[list[UserKeyRecord]]:
        for start in range(0, len(self._order), batch_size):
            yield [self._records[user] for user in self._order[start : start + batch_size]]

    async def count_records(self) -> int:
        return len(self._records)

    async def get_key_ring(self) -> StoredKeyRing | None:
        return None  # upstream never had one: the dump's data key is ring version 1

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    # -- writes: refused -------------------------------------------------------------------------------

    def _read_only(self) -> StorageError:
        return StorageError(f"{self.description} is read-only: a dump is only ever a transfer's source")

    async def create_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        raise self._read_only()

    async def put_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        raise self._read_only()

    async def record_access(self, accesses: Mapping[UUID, datetime]) -> None:
        raise self._read_only()

    async def store_wrapped_data_key(self, wrapped: str) -> str:
        raise self._read_only()

    async def upsert_records(self, records: Sequence[UserKeyRecord]) -> None:
        raise self._read_only()

    async def replace_records(self, updates: Sequence[RecordUpdate]) -> int:
        raise self._read_only()

    async def put_key_ring(self, document: str, expected_revision: int) -> bool:
        raise self._read_only()

    async def set_wrapped_data_key(self, wrapped: str) -> None:
        raise self._read_only()
