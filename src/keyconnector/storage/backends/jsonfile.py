"""JSON file backend: upstream's ``data.json``, shared by several worker processes.

The file is one JSON object: ``symmetricKey`` (the wrapped data key) and ``userKey``, an array of
``{"id", "key", "creationDate", "revisionDate", "lastAccessDate"}`` objects. Upstream (a .NET JSON
store) matches property names and GUIDs case-insensitively and may have written properties we do not
know, so this module reads names case-insensitively, keeps the spelling it found when it writes back,
and carries every unknown property through a rewrite untouched.

Concurrency: every change is read-modify-write of the whole file. It happens under an exclusive
``flock`` on a sidecar ``<file>.lock`` (the data file itself cannot carry the lock, because it is
replaced on every write), re-reads the file under that lock so that another process's write is never
lost, and replaces the file atomically (temporary file in the same directory, fsync, rename, fsync of
the directory), so a reader or a crash only ever sees a complete file.

Reads on the request path cost one ``os.stat``: the parsed index is kept in memory and reloaded only
when the file's identity (inode, size, times) changes.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

from keyconnector.errors import ConfigurationError, StorageError, UnavailableError, setting_name
from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import DatabaseState, RecordUpdate, StoredKeyRing, UserKeyRecord
from keyconnector.storage.registry import Backend

T = TypeVar("T")

log = logging.getLogger(__name__)

NEW_FILE_MODE = 0o600
"""Mode of a file we create: it holds the wrapped data key and every user's encrypted key."""

_ISO_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?\s*(Z|[+-]\d{2}:?\d{2})?",
    re.ASCII | re.IGNORECASE,
)

Signature = tuple[int, int, int, int, int]

KEY_RING_PROPERTY = "keyconnectorKeyRing"
"""Our key ring (see ``keyconnector.core.keyring``), a top-level property of the file:
``{"revision": n, "document": "..."}``. Upstream's store reads the properties it knows and ignores
this one, and our rewrites carry upstream's unknown properties through the same way."""


def parse_iso_time(text: str) -> datetime:
    """Read an ISO 8601 time as the .NET serializers write it, as naive UTC.

    With or without ``Z`` or an offset (a time without one is taken as UTC, which is what upstream
    stores), with 0 to 7 (or more) fractional digits; digits past the microsecond are truncated.
    """
    match = _ISO_TIME.fullmatch(text.strip())
    if match is None:
        raise ValueError("not an ISO 8601 time")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    value = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0), micro)
    if zone and zone.upper() != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        value -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return value


def format_iso_time(value: datetime) -> str:
    """``2021-08-20T15:59:38.1234567Z`` shape: UTC, trailing zeros of the fraction dropped, as the .NET
    serializers write a UTC ``DateTime`` (we hold microseconds, so at most 6 digits)."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    text = (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T"
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    )
    if value.microsecond:
        text += "." + f"{value.microsecond:06d}".rstrip("0")
    return text + "Z"


def _find(obj: Mapping[str, Any], name: str) -> str | None:
    """The property of ``obj`` spelled ``name`` in any case (exact spelling preferred)."""
    if name in obj:
        return name
    lowered = name.lower()
    for key in obj:
        if key.lower() == lowered:
            return key
    return None


def _get(obj: Mapping[str, Any], name: str) -> Any:
    key = _find(obj, name)
    return obj[key] if key is not None else None


def _set(obj: dict[str, Any], name: str, value: Any) -> None:
    """Set a property under the spelling already in the file, so no case-twin property appears."""
    obj[_find(obj, name) or name] = value


class _Document:
    """The parsed file plus an index of it; the raw objects are kept so a rewrite loses nothing."""

    def __init__(self, raw: dict[str, Any], where: str) -> None:
        self.raw = raw
        entries_key = _find(raw, "userKey")
        entries = raw[entries_key] if entries_key is not None else None
        if entries is None:
            entries = []
            raw[entries_key or "userKey"] = entries
        if not isinstance(entries, list):
            raise StorageError(f"{where}: 'userKey' is not an array")
        self.entries: list[Any] = entries
        symmetric = _get(raw, "symmetricKey")
        if symmetric is not None and not isinstance(symmetric, str):
            raise StorageError(f"{where}: 'symmetricKey' is not a string")
        self.symmetric_key: str | None = symmetric
        self.key_ring = _parse_key_ring(raw.get(KEY_RING_PROPERTY), where)
        # First entry wins for a user listed twice, as a first-match lookup upstream would.
        self.by_user: dict[UUID, dict[str, Any]] = {}
        self.keys: dict[UUID, str | None] = {}
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise StorageError(f"{where}: entry {index} of 'userKey' is not an object")
            raw_id = _get(entry, "id")
            try:
                user_id = UUID(raw_id) if isinstance(raw_id, str) else None
            except ValueError:
                user_id = None
            if user_id is None:
                raise StorageError(f"{where}: entry {index} of 'userKey' has no valid GUID 'id'")
            key = _get(entry, "key")
            if key is not None and not isinstance(key, str):
                raise StorageError(f"{where}: entry {index} of 'userKey' has a 'key' that is not a string")
            if user_id not in self.by_user:
                self.by_user[user_id] = entry
                self.keys[user_id] = key

    def set_symmetric_key(self, wrapped: str) -> None:
        _set(self.raw, "symmetricKey", wrapped)
        self.symmetric_key = wrapped

    def add(self, user_id: UUID, key: str | None, now: datetime) -> None:
        entry: dict[str, Any] = {
            "id": str(user_id),
            "key": key,
            "creationDate": format_iso_time(now),
            "revisionDate": None,
            "lastAccessDate": None,
        }
        self.entries.append(entry)
        self.by_user[user_id] = entry
        self.keys[user_id] = key

    def put_record(self, record: UserKeyRecord) -> None:
        """Insert or wholly replace the user's entry, every date exactly as given."""
        if record.user_id not in self.by_user:
            self.add(record.user_id, record.key, record.creation_date)
        self.update(
            record.user_id,
            key=record.key,
            creationDate=record.creation_date,
            revisionDate=record.revision_date,
            lastAccessDate=record.last_access_date,
        )

    def set_key_ring(self, ring: StoredKeyRing) -> None:
        self.raw[KEY_RING_PROPERTY] = {"revision": ring.revision, "document": ring.document}
        self.key_ring = ring

    def update(self, user_id: UUID, **changes: Any) -> None:
        entry = self.by_user[user_id]
        for name, value in changes.items():
            _set(entry, name, format_iso_time(value) if isinstance(value, datetime) else value)
        if "key" in changes:
            self.keys[user_id] = changes["key"]


def _parse_key_ring(value: Any, where: str) -> StoredKeyRing | None:
    if value is None:
        return None
    revision = value.get("revision") if isinstance(value, dict) else None
    document = value.get("document") if isinstance(value, dict) else None
    if type(revision) is not int or revision < 1 or not isinstance(document, str):
        raise StorageError(
            f"{where}: '{KEY_RING_PROPERTY}' is not an object with a positive 'revision' "
            "and a 'document' string"
        )
    return StoredKeyRing(revision=revision, document=document)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    signature: Signature
    document: _Document


def _signature(stat: os.stat_result) -> Signature:
    # Inode changes on every atomic replace; size and times catch an in-place edit by another tool.
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class JsonFileRepository:
    """The :class:`~keyconnector.storage.base.Repository` over upstream's JSON file."""

    def __init__(self, path: str, prefix: str) -> None:
        self._path = path
        self._setting = f"{prefix}.jsonFilePath"
        self._snapshot: _Snapshot | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keyconnector-json")
        self._closed = False

    @property
    def description(self) -> str:
        return f"json {self._path}"

    # -- reading -------------------------------------------------------------------------------------

    def _load(self) -> _Snapshot | None:
        """Parse the file as it is now; None when it does not exist."""
        try:
            with builtins.open(self._path, "rb") as handle:
                # The signature comes from the open file, so it describes exactly the bytes read even
                # when another process replaces the file at this very moment.
                signature = _signature(os.fstat(handle.fileno()))
                data = handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UnavailableError("database", f"{self._path} cannot be read: {exc.strerror}") from None
        return _Snapshot(signature, self._parse(data))

    def _parse(self, data: bytes) -> _Document:
        try:
            raw = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise StorageError(f"{self._path} is not UTF-8 text (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            # Position and reason only: the contents are user keys.
            raise StorageError(
                f"{self._path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
            ) from None
        if not isinstance(raw, dict):
            raise StorageError(f"{self._path} does not hold a JSON object")
        return _Document(raw, self._path)

    def _current(self) -> _Document:
        """The document, reloaded only if the file changed since we last read it."""
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            # After migrate the file always exists: a missing one means a lost volume, and answering
            # "no key" would invite clients to enrol new keys over the lost ones.
            raise UnavailableError(
                "database", f"{self._path} does not exist (was it removed, or its volume not mounted?)"
            ) from None
        except OSError as exc:
            raise UnavailableError("database", f"{self._path} cannot be read: {exc.strerror}") from None
        snapshot = self._snapshot
        if snapshot is None or snapshot.signature != _signature(stat):
            loaded = self._load()
            if loaded is None:
                raise UnavailableError("database", f"{self._path} does not exist")
            self._snapshot = snapshot = loaded
        return snapshot.document

    async def get_key(self, user_id: UUID) -> str | None:
        return self._current().keys.get(user_id)

    async def get_wrapped_data_key(self) -> str | None:
        return self._current().symmetric_key

    async def iter_records(self, batch_size: int = 1000) -> AsyncIterator[list[UserKeyRecord]]:
        """In GUID order, from one consistent version of the file."""
        document = self._current()
        users = sorted(document.by_user, key=str)
        for start in range(0, len(users), batch_size):
            yield [self._record(user, document.by_user[user]) for user in users[start : start + batch_size]]

    def _record(self, user_id: UUID, entry: Mapping[str, Any]) -> UserKeyRecord:
        def when(name: str) -> datetime | None:
            value = _get(entry, name)
            if value is None:
                return None
            if not isinstance(value, str):
                raise ValueError(f"'{name}' is not a string")
            return parse_iso_time(value)

        try:
            created = when("creationDate")
            if created is None:
                raise ValueError("'creationDate' is missing")
            return UserKeyRecord(
                user_id=user_id,
                key=_get(entry, "key"),
                creation_date=created,
                revision_date=when("revisionDate"),
                last_access_date=when("lastAccessDate"),
            )
        except ValueError as exc:
            raise StorageError(f"{self._path}: the entry of user {user_id} is malformed ({exc})") from None

    async def ping(self) -> None:
        self._current()

    # -- writing -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the cross-process write lock (blocking this thread, never the event loop)."""
        try:
            fd = os.open(self._path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, NEW_FILE_MODE)
        except FileNotFoundError:
            raise ConfigurationError(
                self._setting, f"the directory of {self._path} does not exist; create it first"
            ) from None
        except OSError as exc:
            raise ConfigurationError(
                self._setting, f"cannot create the lock file {self._path}.lock: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _write_file(self, document: _Document) -> Signature:
        """Replace the file atomically with ``document``; return the new file's signature."""
        directory = os.path.dirname(self._path) or "."
        try:
            previous: os.stat_result | None = os.stat(self._path)
        except FileNotFoundError:
            previous = None
        data = json.dumps(document.raw, indent=2, ensure_ascii=False).encode("utf-8")
        fd, temporary = tempfile.mkstemp(prefix=".keyconnector-", suffix=".tmp", dir=directory)
        try:
            try:
                os.fchmod(fd, previous.st_mode & 0o7777 if previous is not None else NEW_FILE_MODE)
                if previous is not None:
                    with contextlib.suppress(PermissionError):
                        os.fchown(fd, previous.st_uid, previous.st_gid)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self._path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
        # Still under the lock: nobody else can have replaced the file since.
        return _signature(os.stat(self._path))

    def _change(self, edit: Callable[[_Document], tuple[T, bool]]) -> tuple[T, _Snapshot]:
        """Read-modify-write under the lock; ``edit`` returns its result and whether it changed anything.

        Runs on the writer thread only.
        """
        try:
            with self._locked():
                loaded = self._load()
                document = loaded.document if loaded is not None else _Document({"userKey": []}, self._path)
                result, changed = edit(document)
                if changed or loaded is None:
                    signature = self._write_file(document)
                    return result, _Snapshot(signature, document)
                return result, loaded
        except OSError as exc:
            raise UnavailableError("database", f"cannot write {self._path}: {exc.strerror}") from None

    async def _run(self, edit: Callable[[_Document], tuple[T, bool]]) -> T:
        if self._closed:
            raise StorageError(f"the repository for {self._path} is closed")
        loop = asyncio.get_running_loop()
        result, snapshot = await loop.run_in_executor(self._executor, self._change, edit)
        # Installed here, on the loop, so the request path never sees a half-updated index. If another
        # process wrote after us, the signature no longer matches and the next read reloads.
        self._snapshot = snapshot
        return result

    async def create_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        def edit(document: _Document) -> tuple[bool, bool]:
            if user_id not in document.by_user:
                document.add(user_id, record, now)
                return True, True
            if document.keys[user_id] is not None:
                return False, False
            document.update(user_id, key=record, creationDate=now, revisionDate=None)
            return True, True

        return await self._run(edit)

    async def put_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        def edit(document: _Document) -> tuple[bool, bool]:
            if user_id not in document.by_user:
                document.add(user_id, record, now)
                return True, True
            if document.keys[user_id] is None:
                document.update(user_id, key=record, creationDate=now, revisionDate=None)
                return True, True
            document.update(user_id, key=record, revisionDate=now)
            return False, True

        return await self._run(edit)

    async def record_access(self, accesses: Mapping[UUID, datetime]) -> None:
        if not accesses:
            return

        def edit(document: _Document) -> tuple[None, bool]:
            changed = False
            for user_id, when in accesses.items():
                entry = document.by_user.get(user_id)
                if entry is None:
                    continue
                # Never move the time backwards when another worker's older batch lands later.
                current = _get(entry, "lastAccessDate")
                try:
                    if isinstance(current, str) and parse_iso_time(current) >= _naive(when):
                        continue
                except ValueError:
                    pass
                document.update(user_id, lastAccessDate=when)
                changed = True
            return None, changed

        await self._run(edit)

    async def store_wrapped_data_key(self, wrapped: str) -> str:
        def edit(document: _Document) -> tuple[str, bool]:
            # Under the lock and on the freshly re-read file: the first key stored wins everywhere.
            if document.symmetric_key is not None:
                return document.symmetric_key, False
            document.set_symmetric_key(wrapped)
            return wrapped, True

        return await self._run(edit)

    async def set_wrapped_data_key(self, wrapped: str) -> None:
        def edit(document: _Document) -> tuple[None, bool]:
            document.set_symmetric_key(wrapped)
            return None, True

        await self._run(edit)

    # -- operations: transfer, rotation, backup -------------------------------------------------------

    async def count_records(self) -> int:
        return len(self._current().by_user)

    async def upsert_records(self, records: Sequence[UserKeyRecord]) -> None:
        """One rewrite of the file for the whole batch: all of it lands, or (a crash before the rename)
        none of it."""
        if not records:
            return

        def edit(document: _Document) -> tuple[None, bool]:
            for record in records:
                document.put_record(record)
            return None, True

        await self._run(edit)

    async def replace_records(self, updates: Sequence[RecordUpdate]) -> int:
        if not updates:
            return 0

        def edit(document: _Document) -> tuple[int, bool]:
            # Compared on the file as re-read under the lock: a client's PUT since the caller read the
            # record wins. A row already holding the new value counts, as on the server backends.
            matched = written = 0
            for update in updates:
                current = document.keys.get(update.user_id)
                if current is None or current not in (update.expected, update.new):
                    continue
                matched += 1
                if current != update.new:
                    document.update(update.user_id, key=update.new)
                    written += 1
            return matched, written > 0

        return await self._run(edit)

    async def get_key_ring(self) -> StoredKeyRing | None:
        return self._current().key_ring

    async def put_key_ring(self, document: str, expected_revision: int) -> bool:
        def edit(current: _Document) -> tuple[bool, bool]:
            stored = current.key_ring.revision if current.key_ring is not None else 0
            if stored != expected_revision:
                return False, False
            current.set_key_ring(StoredKeyRing(revision=expected_revision + 1, document=document))
            return True, True

        return await self._run(edit)

    async def aclose(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True)

    # -- set-up --------------------------------------------------------------------------------------

    def _initialize(self) -> None:
        """Create an empty, valid file if there is none; refuse a corrupt one (migrate's work)."""
        self._change(lambda document: (None, False))


def _naive(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value


def _path(settings: DatabaseSettings, prefix: str) -> str:
    setting = f"{prefix}.jsonFilePath"
    raw = (settings.json_file_path or "").strip()
    if not raw:
        raise ConfigurationError(setting, "is empty; for example: /etc/bitwarden/data.json")
    path = os.path.abspath(os.path.expanduser(raw))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ConfigurationError(setting, f"the directory {directory} does not exist; create it first")
    if os.path.isdir(path):
        raise ConfigurationError(setting, f"{path} is a directory, not a file")
    return path


def migrate(settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> None:
    """Make sure the file exists and parses; a JSON file has no schema to migrate.

    Creating it here, under the write lock, means every worker later finds a file, so a missing file
    at run time can be reported as the fault it is.
    """
    path = _path(settings, prefix)
    if not os.path.exists(path):
        log.warning(
            "%s does not exist: creating a new, empty database there (%s). If this deployment already "
            "has data, stop now: the setting points at the wrong file",
            path,
            setting_name(f"{prefix}.jsonFilePath"),
        )
    repository = JsonFileRepository(path, prefix)
    try:
        repository._initialize()
    finally:
        repository._executor.shutdown(wait=False)


def inspect(settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> DatabaseState:
    """What ``keyconnector check`` reports; reads the file, never creates it."""
    path = _path(settings, prefix)
    if not os.path.exists(path):
        return DatabaseState(
            f"json {path}: no file yet; `serve` would create a new, empty database there", False
        )
    repository = JsonFileRepository(path, prefix)
    try:
        count = len(repository._current().by_user)
    finally:
        repository._executor.shutdown(wait=False)
    return DatabaseState(f"json {path}: readable; {count} user keys", True)


async def open(settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> JsonFileRepository:
    """Open the repository; reading the file now makes a corrupt or missing one a start-up error."""
    repository = JsonFileRepository(_path(settings, prefix), prefix)
    try:
        repository._current()
    except BaseException:
        await repository.aclose()
        raise
    return repository


def _secret_files(settings: DatabaseSettings, prefix: str) -> list[tuple[str, str]]:
    return [(f"{prefix}.jsonFilePath", settings.json_file_path)]


BACKEND = Backend(name="json", migrate=migrate, open=open, inspect=inspect, secret_files=_secret_files)
"""No SQL: no server target, no engine for the audit table, no schema."""

__all__ = [
    "BACKEND",
    "JsonFileRepository",
    "format_iso_time",
    "inspect",
    "migrate",
    "open",
    "parse_iso_time",
]
