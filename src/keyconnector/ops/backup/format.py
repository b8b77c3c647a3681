"""The bytes of a backup: the file's preamble, the payload's lines, the manifest and its MAC.

File layout, format 2 (format 1, without the MAC and the anchor, is still read)::

    keyconnector-backup 2\\n
    recipients\\n                      or    passphrase <base64 of an age scrypt file>\\n
    <an age file, encrypted to X25519 recipients, holding the payload>

pyrage can stream only to X25519 recipients (its passphrase functions take and return whole byte
strings), so a passphrase protects, with age's own scrypt recipient, a fresh X25519 identity made
for this one backup, and the payload is streamed to that identity: the same construction as age's
passphrase-protected identity files. Without keyconnector::

    sed -n 2p FILE | cut -d' ' -f2 | base64 -d > identity.age   # passphrase mode only
    tail -n +3 FILE | age -d -i identity.age    (or -i your-key.txt)  > payload.jsonl

The payload is JSON lines: a header (creation time, source database, wrapped data key, key ring and
its anchor), one line per row (the upstream JSON file's property names), and last a manifest with the
record count, the SHA-256 of every payload byte before it and ``recordsSha256``, the SHA-256 of the
sorted SHA-256 digests of the record lines: independent of order, so it is recomputed from any
database after a restore. age authenticates every 64 KiB chunk and marks the last one, so an altered
or truncated file fails to decrypt; the manifest also catches a payload cut at a line boundary.

Both directions live here, so that what ``backup`` writes and what ``restore`` checks are one
definition: a record line is canonical (the same row gives the same bytes from any database), and the
MAC is over canonical JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from keyconnector.errors import KeyConnectorError
from keyconnector.storage.base import StoredKeyRing, UserKeyRecord

if TYPE_CHECKING:
    from keyconnector.ops.backup.stream import Encryptor


FORMAT = 2
"""Format 2: the manifest carries a MAC under the key ring and the header the ring's anchor."""
MAGICS = {b"keyconnector-backup 1\n": 1, b"keyconnector-backup 2\n": 2}
MAGIC = b"keyconnector-backup %d\n" % FORMAT
RECIPIENTS_LINE = b"recipients\n"
PASSPHRASE_PREFIX = b"passphrase "
BATCH_SIZE = 1000
MAC_PURPOSE = "backup/1"
"""What ``KeyRing.derive`` is given for the manifest's MAC key: a key of its own, so that no other MAC
made with the ring's authentication key (the ring's, the audit trail's) verifies as a backup's."""
_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class BackupError(KeyConnectorError):
    """The backup could not be written or read; the message says what was (not) written."""


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="microseconds")


def record_line(record: UserKeyRecord) -> bytes:
    """One row as one canonical line: the same row gives the same bytes from any database."""
    entry = {
        "id": str(record.user_id),
        "key": record.key,
        "creationDate": _time(record.creation_date),
        "revisionDate": _time(record.revision_date),
        "lastAccessDate": _time(record.last_access_date),
    }
    return json.dumps(entry, separators=(",", ":")).encode("utf-8") + b"\n"


def sha256_of_records(digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()


def manifest_mac(key: bytes, manifest: dict[str, Any]) -> str:
    """The manifest's MAC (hex): HMAC-SHA256 over the manifest without ``mac``, as canonical JSON."""
    body = {name: value for name, value in manifest.items() if name != "mac"}
    return hmac.new(key, _encoder.encode(body).encode("ascii"), hashlib.sha256).hexdigest()


class PayloadWriter:
    def __init__(self, sink: Encryptor) -> None:
        self._sink = sink
        self._hash = hashlib.sha256()
        self._digests: list[bytes] = []

    @property
    def count(self) -> int:
        return len(self._digests)

    def _write(self, data: bytes) -> None:
        self._hash.update(data)
        self._sink.write(data)

    def header(self, header: dict[str, Any]) -> None:
        self._write(json.dumps(header, separators=(",", ":")).encode("utf-8") + b"\n")

    def records(self, batch: list[UserKeyRecord]) -> None:
        lines = [record_line(record) for record in batch]
        self._digests.extend(hashlib.sha256(line).digest() for line in lines)
        self._write(b"".join(lines))

    def manifest(self, header: dict[str, Any], mac_key: bytes) -> None:
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "created": header["created"],
            "source": header["source"],
            "records": self.count,
            "sha256": self._hash.hexdigest(),
            "recordsSha256": sha256_of_records(self._digests),
        }
        manifest["mac"] = manifest_mac(mac_key, manifest)
        self._sink.write(json.dumps({"manifest": manifest}, separators=(",", ":")).encode("utf-8") + b"\n")


@dataclass
class Header:
    created: str
    source: str
    data_key: str | None
    key_ring: StoredKeyRing | None
    anchor: str | None = None
    """The anchor the header claims (format 2): compared with the one the ring authenticates as."""


@dataclass
class Contents:
    """What a full read of the file established."""

    header: Header
    records: int = 0
    sha256: str = ""
    digests: dict[int, bytes] = field(default_factory=dict)
    """User id (as an int) -> SHA-256 of its record line."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The manifest as read (its MAC is checked once the ring is authenticated)."""


class PayloadReader:
    """Parses the decrypted lines and checks them against the manifest: any doubt is a damaged file."""

    def __init__(self, lines: Iterator[bytes], path: Path, file_format: int) -> None:
        self._lines = lines
        self._path = path
        self._format = file_format
        self._hash = hashlib.sha256()
        self.contents = Contents(self._read_header())

    def _damaged(self, problem: str) -> BackupError:
        return BackupError(f"{self._path} is damaged: {problem}")

    def _next(self) -> bytes | None:
        return next(self._lines, None)

    def _read_header(self) -> Header:
        line = self._next()
        if line is None:
            raise self._damaged("the payload is empty")
        self._hash.update(line)
        try:
            header = json.loads(line)
            if header.get("format") != self._format:
                raise self._damaged(f"its payload is in format {header.get('format')!r}, not {self._format}")
            ring = header["keyRing"]
            anchor = header.get("anchor")
            return Header(
                str(header["created"]),
                str(header["source"]),
                None if header["dataKey"] is None else str(header["dataKey"]),
                None if ring is None else StoredKeyRing(int(ring["revision"]), str(ring["document"])),
                None if anchor is None else str(anchor),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise self._damaged("its header is not readable") from None

    def batches(self, batch_size: int) -> Iterator[list[UserKeyRecord]]:
        """Every record, in batches; the manifest is checked when the last one has been read."""
        digests = self.contents.digests
        batch: list[UserKeyRecord] = []
        while (line := self._next()) is not None:
            if line.startswith(b'{"manifest"'):
                if batch:
                    yield batch
                self._check_manifest(line)
                return
            self._hash.update(line)
            record = self._parse_record(line)
            if record.user_id.int in digests:
                raise self._damaged(f"user {record.user_id} appears twice")
            digests[record.user_id.int] = hashlib.sha256(line).digest()
            batch.append(record)
            if len(batch) >= batch_size:
                yield batch
                batch = []
        raise self._damaged("it ends before its manifest (truncated)")

    def _parse_record(self, line: bytes) -> UserKeyRecord:
        try:
            entry = json.loads(line)
            key = entry["key"]
            if key is not None and not isinstance(key, str):
                raise TypeError("key")
            return UserKeyRecord(
                UUID(entry["id"]),
                key,
                datetime.fromisoformat(entry["creationDate"]),
                _parse_time(entry["revisionDate"]),
                _parse_time(entry["lastAccessDate"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise self._damaged(f"record {len(self.contents.digests) + 1} is not readable") from None

    def _check_manifest(self, line: bytes) -> None:
        if self._next() is not None:
            raise self._damaged("there is data after its manifest")
        try:
            manifest = json.loads(line)["manifest"]
            version, records = manifest["format"], manifest["records"]
            sha256, records_sha256 = manifest["sha256"], manifest["recordsSha256"]
        except (ValueError, KeyError, TypeError):
            raise self._damaged("its manifest is not readable") from None
        if version != self._format:
            raise self._damaged(f"its manifest is in format {version!r}, not {self._format}")
        if self._format >= 2 and not isinstance(manifest.get("mac"), str):
            raise self._damaged("its manifest carries no MAC")
        contents = self.contents
        count = len(contents.digests)
        if records != count:
            raise self._damaged(f"its manifest lists {records} records, the file holds {count}")
        if sha256 != self._hash.hexdigest():
            raise self._damaged("the SHA-256 of its payload differs from its manifest")
        if records_sha256 != sha256_of_records(list(contents.digests.values())):
            raise self._damaged("the SHA-256 of its records differs from its manifest")
        contents.records, contents.sha256, contents.manifest = count, sha256, manifest


def _parse_time(text: Any) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
