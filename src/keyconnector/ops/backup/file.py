"""An open backup file: its preamble read, its payload decrypted and checked on demand.

``restore`` reads the payload more than once (the header alone, then a full check, then the write),
so a ``BackupFile`` decrypts its age part from the start at each ``read``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from uuid import UUID

from keyconnector.core.envelope import DataKeys
from keyconnector.errors import KeyConnectorError, UsageError
from keyconnector.ops.backup.format import (
    FORMAT,
    MAGICS,
    PASSPHRASE_PREFIX,
    RECIPIENTS_LINE,
    BackupError,
    Contents,
    Header,
    PayloadReader,
)
from keyconnector.ops.backup.protection import load_identities, read_passphrase
from keyconnector.ops.backup.stream import decrypted_lines
from keyconnector.ops.progress import Progress
from keyconnector.storage.base import UserKeyRecord

if TYPE_CHECKING:
    from pyrage import x25519


def read_preamble(source: BinaryIO, path: Path, args: argparse.Namespace) -> BackupFile:
    """Check the preamble: the file's format, how it is protected, and the identities that open it."""
    file_format = MAGICS.get(source.readline(64))
    if file_format is None:
        raise BackupError(f"{path} is not a keyconnector backup (format 1 or {FORMAT})")
    protection = source.readline(64 * 1024)
    if protection == RECIPIENTS_LINE:
        if not args.identity:
            raise UsageError(
                "--identity", "this backup is encrypted to recipient keys: give their identity file"
            )
        return BackupFile(source, source.tell(), load_identities(args.identity), path, file_format, False)
    if not protection.startswith(PASSPHRASE_PREFIX) or not protection.endswith(b"\n"):
        raise BackupError(f"{path} is damaged: its second line is neither 'recipients' nor 'passphrase ...'")
    if args.identity:
        raise UsageError("--identity", "this backup is encrypted to a passphrase, not to recipient keys")
    from pyrage import DecryptError, IdentityError, x25519
    from pyrage import passphrase as age_passphrase

    try:
        sealed = base64.b64decode(protection[len(PASSPHRASE_PREFIX) : -1], validate=True)
    except (binascii.Error, ValueError):
        raise BackupError(f"{path} is damaged: its passphrase line is not base64") from None
    phrase = read_passphrase(args.passphrase_file, confirm=False)
    try:
        identity = x25519.Identity.from_str(age_passphrase.decrypt(sealed, phrase).decode("ascii"))
    except DecryptError:
        raise BackupError(f"wrong passphrase for {path} (or its passphrase line is damaged)") from None
    except (IdentityError, UnicodeDecodeError):
        raise BackupError(f"{path} is damaged: its passphrase line holds no age identity") from None
    return BackupFile(source, source.tell(), [identity], path, file_format, True)


@dataclass
class BackupFile:
    """An open backup whose preamble was read: each ``read`` decrypts its age part from the start."""

    source: BinaryIO
    age_offset: int
    identities: list[x25519.Identity]
    path: Path
    format: int
    passphrase: bool
    """Protected by a passphrase (which a forger lacks), not by recipient keys (which are public)."""

    @contextlib.contextmanager
    def read(self) -> Iterator[PayloadReader]:
        self.source.seek(self.age_offset)
        with decrypted_lines(self.source, self.identities, self.path) as lines:
            yield PayloadReader(lines, self.path, self.format)

    def header(self) -> Header:
        """The header alone (age has not authenticated the rest of the file yet)."""
        with self.read() as reader:
            return reader.contents.header

    def check(self, batch_size: int, keys: DataKeys | None, *, decrypt: bool) -> tuple[Contents, Decryption]:
        """Read the whole file and return what it holds; with ``decrypt``, open every record with ``keys``
        (None: the backup holds no data key, so every record that has a key fails)."""
        decryption = Decryption()
        with self.read() as reader, Progress(f"checking {self.path.name}", None) as progress:
            for batch in reader.batches(batch_size):
                if decrypt:
                    decryption.add(batch, keys)
                progress.advance(len(batch))
        return reader.contents, decryption


@dataclass
class Decryption:
    """How many records decrypt with a key set: the proof that a backup or a restore is usable."""

    decrypted: int = 0
    without_key: int = 0
    failed: list[UUID] = field(default_factory=list)

    def add(self, records: list[UserKeyRecord], keys: DataKeys | None) -> None:
        for record in records:
            if record.key is None:
                self.without_key += 1
                continue
            if keys is None:
                self.failed.append(record.user_id)
                continue
            try:
                keys.open(record.key, record.user_id)
            except KeyConnectorError:
                self.failed.append(record.user_id)
            else:
                self.decrypted += 1

    def summary(self) -> str:
        return (
            f"{self.decrypted:,} decrypt with the configured key pair, {self.without_key:,} have no key, "
            f"{len(self.failed):,} fail"
        )
