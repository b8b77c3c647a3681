"""``keyconnector backup`` and ``keyconnector restore``: the whole deployment in one encrypted file.

A backup holds every ``UserKeys`` row exactly as stored (still sealed under the data key: it never
decrypts a user's key), the wrapped data key of ``ApplicationDatas`` and the key ring. Whoever holds
the file and the key pair can read every user's key, so the file is encrypted again as a whole, with
age (https://age-encryption.org, through ``pyrage``), either to one or more X25519 recipient keys
(``age1...``) or to a passphrase.

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

Why the manifest carries a MAC, and what restore trusts
    age encryption to a recipient is public-key encryption: anyone holding the recipient's public
    key can make a file that decrypts, and with the key pair's (public) certificate they can wrap a
    data key of their own, seal records under it and build a whole fake deployment. Restoring it
    would hand them every user's key enrolled afterwards. So a format-2 backup is authenticated by
    the deployment's key ring (``keyconnector.core.keyring``), which only a holder of a real data key
    can make:

    - ``backup`` opens the authenticated ring with the configured key pair and writes the manifest's
      ``mac``: HMAC-SHA256, keyed with ``ring.derive("backup/1")`` (HKDF of the ring's
      authentication key), over the manifest without ``mac`` as canonical JSON (sorted keys, no
      spaces, ASCII). The manifest's ``sha256`` covers the header (the ring and its anchor) and
      every record, so the MAC covers the whole payload. The command prints the ring's anchor.
    - ``restore`` authenticates the backup's ring with the configured key pair, decrypts every
      record with the keys of that ring (format-2 records are bound to their user), checks the MAC,
      and only then writes anything.
    - A forger can do all of that with a ring of their own, so restore also requires the ring to be
      *this deployment's*: its anchor must equal ``--expect-anchor`` when given, the pinned
      ``keyRingAnchor`` when set (both, when both are), else the anchor of the target database's
      own authenticated ring. ``--expect-anchor`` wins over the target's ring on purpose: it is how
      an operator knowingly replaces another deployment's database (with ``--replace``).
    - With none of the three (an empty target: disaster recovery), a backup encrypted to recipient
      keys is refused unless ``--expect-anchor`` names the anchor (from the backup command's
      output, the service's start-up log line "key ring revision N authenticated (anchor X)",
      ``keyconnector check`` or ``stats``). A passphrase backup proceeds: a forger does not know
      the passphrase the operator types, so the passphrase authenticates the file; the anchor is
      printed to be pinned.
    - Format-1 files (made before this) carry no MAC: refused in recipients mode unless
      ``--allow-unauthenticated``; restored with a warning in passphrase mode. Their ring, when it
      is of the earlier unauthenticated format (or absent), is written as it is and adopted by
      ``serve`` at its next start, under a new anchor.

    The restored ring is written for the target's revision (the next one, with a new MAC): a ring
    copied in with the backup's own revision would be refused as edited. Running services refuse a
    ring replaced under them, so they are to be restarted after a restore.

``restore`` reads the file twice: once to check all of it (nothing is written unless the whole file
is intact, authenticated and every record opens), once to write it in batches of upserts. A re-run
after a crash finds its own partial restore (the backup's data key, its ring's content, and only
rows identical to the backup's) and completes it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import copy
import getpass
import hashlib
import hmac
import io
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from uuid import UUID

from keyconnector.core.envelope import DataKey, DataKeys
from keyconnector.core.keyring import FORMAT as RING_FORMAT
from keyconnector.core.keyring import (
    UNADOPTED_RING,
    KeyRing,
    KeyRingConflict,
    NotAdopted,
    RingRefused,
    RingTrust,
    authenticate,
    load_key_set,
    now_text,
    open_ring,
    save_ring,
    wrap_for,
)
from keyconnector.errors import IntegrityFailure, KeyConnectorError, StorageError, UsageError
from keyconnector.keypairs import KeyProvider, open_key_provider
from keyconnector.ops import OperationFailed, Subcommands, add_settings_arguments, load_settings_from
from keyconnector.ops.progress import Progress
from keyconnector.runtime import logs
from keyconnector.runtime.settings import Settings
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import Repository, StoredKeyRing, UserKeyRecord
from keyconnector.storage.registry import inspect, migrate, open_repository

if TYPE_CHECKING:
    from pyrage import x25519

log = logging.getLogger("keyconnector.backup")

FORMAT = 2
"""Format 2: the manifest carries a MAC under the key ring and the header the ring's anchor."""
MAGICS = {b"keyconnector-backup 1\n": 1, b"keyconnector-backup 2\n": 2}
MAGIC = b"keyconnector-backup %d\n" % FORMAT
RECIPIENTS_LINE = b"recipients\n"
PASSPHRASE_PREFIX = b"passphrase "
PASSPHRASE_ENV = "KEYCONNECTOR_BACKUP_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret
BATCH_SIZE = 1000
MAC_PURPOSE = "backup/1"
"""What ``KeyRing.derive`` is given for the manifest's MAC key: a key of its own, so that no other MAC
made with the ring's authentication key (the ring's, the audit trail's) verifies as a backup's."""
RESTART_NOTE = (
    "restore: restart every running `keyconnector serve` on this database: a running service refuses a "
    "key ring replaced under it"
)
_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class BackupError(KeyConnectorError):
    """The backup could not be written or read; the message says what was (not) written."""


# -- commands -------------------------------------------------------------------------------------------


def add_commands(commands: Subcommands) -> None:
    backup = commands.add_parser(
        "backup",
        help="write every record, the wrapped data key and the key ring to one encrypted file",
        description="Records stay sealed under the data key; the file is encrypted again with age, to "
        f"recipient keys or to a passphrase (--passphrase-file, ${PASSPHRASE_ENV}, or asked on a terminal). "
        "Its manifest is authenticated by the deployment's key ring (the configured key pair opens it); "
        "the ring's anchor is printed: keep it, `restore --expect-anchor` checks a backup against it.",
    )
    add_settings_arguments(backup)
    backup.add_argument("output", metavar="OUTPUT", help="the backup file to write (mode 0600)")
    secret = backup.add_mutually_exclusive_group()
    secret.add_argument(
        "--passphrase-file", metavar="FILE", help="encrypt to the passphrase on its first line"
    )
    secret.add_argument(
        "--recipient",
        action="append",
        metavar="AGE_PUBLIC_KEY",
        help="encrypt to this age X25519 public key (age1...); repeat for several",
    )
    backup.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    backup.add_argument("--batch-size", type=_positive, default=BATCH_SIZE, help="rows read per query")
    backup.set_defaults(func=cmd_backup)

    restore = commands.add_parser(
        "restore",
        help="check a backup file and write it into the configured database, then verify it there",
        description="Refuses a database that holds rows or another data key unless --replace (a re-run "
        "after an interrupted restore of the same file continues by itself). The backup's key ring must "
        "be this deployment's: its anchor must match --expect-anchor, keyRingAnchor, or the target "
        "database's own key ring.",
    )
    add_settings_arguments(restore)
    restore.add_argument("input", metavar="INPUT", help="the backup file")
    secret = restore.add_mutually_exclusive_group()
    secret.add_argument("--passphrase-file", metavar="FILE", help="the passphrase on its first line")
    secret.add_argument(
        "--identity",
        action="append",
        metavar="AGE_IDENTITY_FILE",
        help="an age identity file (AGE-SECRET-KEY-1... lines, as age-keygen writes); repeatable",
    )
    restore.add_argument(
        "--verify-only",
        action="store_true",
        help="check the file and decrypt every record with the configured key pair; write nothing",
    )
    restore.add_argument(
        "--replace",
        action="store_true",
        help="write even though the database holds rows or another data key (the backup's rows and keys "
        "win; rows of users not in the backup are kept and reported)",
    )
    restore.add_argument(
        "--expect-anchor",
        type=_anchor,
        metavar="ANCHOR",
        help="the key ring anchor the backup must carry (printed by `backup`, logged by `serve` at start, "
        "shown by `check` and `stats`); needed to restore a recipients backup into an empty database",
    )
    restore.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="restore a format-1 backup encrypted to recipient keys (made before backups carried a MAC): "
        "only for a file you know you made and kept safe",
    )
    restore.add_argument("--batch-size", type=_positive, default=BATCH_SIZE, help="rows per transaction")
    restore.set_defaults(func=cmd_restore)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _anchor(text: str) -> str:
    """An anchor as ``keyRingAnchor`` takes it: 20 hex digits, any case."""
    value = text.strip().lower()
    if len(value) != 20 or any(c not in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError("must be the 20 hex digits of a key ring anchor")
    return value


@dataclass(frozen=True)
class _RestoreOptions:
    replace: bool = False
    expect_anchor: str | None = None
    allow_unauthenticated: bool = False
    batch_size: int = BATCH_SIZE


def cmd_backup(args: argparse.Namespace) -> int:
    settings = load_settings_from(args).settings
    logs.configure(settings.logging)
    output = Path(args.output).absolute()
    if output.exists() and not args.force:
        raise UsageError("OUTPUT", f"{output} exists; give --force to overwrite it")
    if not output.parent.is_dir():
        raise UsageError("OUTPUT", f"the folder {output.parent} does not exist")
    if args.recipient:
        recipients = [_parse_recipient(text) for text in args.recipient]
        protection, how = RECIPIENTS_LINE, f"encrypted to {len(recipients)} recipient key(s)"
    else:
        recipients, protection = _passphrase_protection(_passphrase(args.passphrase_file, confirm=True))
        how = "encrypted to a passphrase"
    what, anchor = asyncio.run(_backup(settings, output, protection, recipients, args.force, args.batch_size))
    print(f"backup: {what} written to {output} ({output.stat().st_size:,} bytes), {how}")
    print(
        f"backup: key ring anchor {anchor}: keep it apart from the backup; `keyconnector restore "
        f"--expect-anchor {anchor}` checks that a backup is this deployment's"
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    settings = load_settings_from(args).settings
    logs.configure(settings.logging)
    path = Path(args.input)
    try:
        source = path.open("rb")
    except OSError as exc:
        raise UsageError("INPUT", f"cannot read {path}: {exc.strerror}") from None
    options = _RestoreOptions(args.replace, args.expect_anchor, args.allow_unauthenticated, args.batch_size)
    with source:
        backup = _read_preamble(source, path, args)
        if args.verify_only:
            print(asyncio.run(_verify_only(settings, backup, options)))
        else:
            print(asyncio.run(_restore(settings, backup, options)))
    return 0


# -- secrets: passphrase, recipients, identities -----------------------------------------------------------


def _passphrase(passphrase_file: str | None, *, confirm: bool) -> str:
    """From a file, the environment, or a prompt: never from the command line, where `ps` shows it."""
    if passphrase_file:
        text = _read_secret_file(passphrase_file, "--passphrase-file")
        passphrase = text.splitlines()[0] if text else ""
        where = "--passphrase-file"
    elif os.environ.get(PASSPHRASE_ENV) is not None:
        passphrase, where = os.environ[PASSPHRASE_ENV], PASSPHRASE_ENV
    elif sys.stdin.isatty():
        passphrase, where = getpass.getpass("backup passphrase: "), "the prompt"
        if confirm and getpass.getpass("again: ") != passphrase:
            raise UsageError("passphrase", "the two passphrases differ")
    else:
        raise UsageError(
            "passphrase",
            f"give --passphrase-file or set {PASSPHRASE_ENV} (or run on a terminal to be asked)"
            + (", or encrypt to --recipient keys" if confirm else ""),
        )
    if not passphrase:
        raise UsageError(where, "the passphrase is empty")
    return passphrase


def _read_secret_file(name: str, option: str) -> str:
    """A file holding a secret; errors name the file, never a byte of its content."""
    try:
        return Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(option, f"cannot read {name}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(option, f"{name} is not UTF-8 text") from None


def _passphrase_protection(passphrase: str) -> tuple[list[x25519.Recipient], bytes]:
    """A fresh identity for this backup, and the preamble line holding it sealed by the passphrase."""
    from pyrage import passphrase as age_passphrase
    from pyrage import x25519

    identity = x25519.Identity.generate()
    sealed = age_passphrase.encrypt(str(identity).encode("ascii"), passphrase)
    return [identity.to_public()], PASSPHRASE_PREFIX + base64.b64encode(sealed) + b"\n"


def _parse_recipient(text: str) -> x25519.Recipient:
    from pyrage import RecipientError, x25519

    try:
        return x25519.Recipient.from_str(text.strip())
    except RecipientError:
        # Not echoed: it might be a secret key given by mistake (and now in the shell history).
        raise UsageError("--recipient", "a value is not an age X25519 public key (age1...)") from None


def _load_identities(files: list[str]) -> list[x25519.Identity]:
    from pyrage import IdentityError, x25519

    identities = []
    for name in files:
        lines = _read_secret_file(name, "--identity").splitlines()
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                identities.append(x25519.Identity.from_str(line))
            except IdentityError:
                # Never echo the line: it may be a (mistyped) secret key.
                raise UsageError("--identity", f"line {number} of {name} is not an age identity") from None
    if not identities:
        raise UsageError("--identity", f"no AGE-SECRET-KEY-1... line in {', '.join(files)}")
    return identities


def _read_preamble(source: BinaryIO, path: Path, args: argparse.Namespace) -> _BackupFile:
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
        return _BackupFile(source, source.tell(), _load_identities(args.identity), path, file_format, False)
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
    phrase = _passphrase(args.passphrase_file, confirm=False)
    try:
        identity = x25519.Identity.from_str(age_passphrase.decrypt(sealed, phrase).decode("ascii"))
    except DecryptError:
        raise BackupError(f"wrong passphrase for {path} (or its passphrase line is damaged)") from None
    except (IdentityError, UnicodeDecodeError):
        raise BackupError(f"{path} is damaged: its passphrase line holds no age identity") from None
    return _BackupFile(source, source.tell(), [identity], path, file_format, True)


# -- age streams on a worker thread ------------------------------------------------------------------------


class _CheckedSink(io.BufferedIOBase):
    """The output file as pyrage writes it: pyrage drops the error of its final flush, so keep it here."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__()
        self._out = out
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self._out.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self._out.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


class _Encryptor:
    """Bytes written here are encrypted into ``out`` by pyrage, which pulls them from a pipe on its own
    thread: the payload streams through and is never in memory as a whole."""

    def __init__(self, out: BinaryIO, recipients: list[x25519.Recipient]) -> None:
        import pyrage

        read_fd, write_fd = os.pipe()
        self._pipe_out = open(read_fd, "rb")  # noqa: SIM115 - closed by the thread
        self._pipe_in = open(write_fd, "wb")  # noqa: SIM115 - closed in finish/abort
        self._sink = _CheckedSink(out)
        self._error: BaseException | None = None

        def run() -> None:
            try:
                pyrage.encrypt_io(self._pipe_out, self._sink, recipients)
            except BaseException as exc:
                self._error = exc
            finally:
                self._pipe_out.close()

        self._thread = threading.Thread(target=run, name="age-encrypt", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        try:
            self._pipe_in.write(data)
        except BrokenPipeError:
            self._thread.join()
            raise BackupError(
                f"could not encrypt the backup: {self._error or 'the encryptor stopped'}"
            ) from None

    def finish(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._pipe_in.close()
        self._thread.join()
        error = self._error or self._sink.error
        if error is not None:
            raise BackupError(f"could not write the backup: {error}")

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe_in.close()
        self._thread.join()


@contextlib.contextmanager
def _decrypted_lines(
    source: BinaryIO, identities: list[x25519.Identity], path: Path
) -> Iterator[Iterator[bytes]]:
    """The payload's lines, decrypted by pyrage on its own thread and read from a pipe. Lines come before
    age has authenticated the end of the file: the iterator raises at the end if the file is damaged."""
    import pyrage

    read_fd, write_fd = os.pipe()
    pipe_out = open(read_fd, "rb")  # noqa: SIM115 - closed below
    pipe_in = open(write_fd, "wb")  # noqa: SIM115 - closed by the thread
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pyrage.decrypt_io(source, pipe_in, identities)  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                pipe_in.close()

    def finished() -> None:
        thread.join()
        if errors:
            raise _decrypt_error(errors[0], path)

    def lines() -> Iterator[bytes]:
        for line in pipe_out:
            if not line.endswith(b"\n"):
                finished()  # a cut line: the end of a damaged file, as a rule
            yield line
        finished()

    thread = threading.Thread(target=run, name="age-decrypt", daemon=True)
    thread.start()
    try:
        yield lines()
    finally:
        pipe_out.close()
        thread.join()


def _decrypt_error(error: BaseException, path: Path) -> BackupError:
    if "No matching keys" in str(error):
        return BackupError(f"none of the given identities can open {path}: it was encrypted to other keys")
    return BackupError(f"{path} is damaged or truncated: it does not decrypt to the end (age: {error})")


# -- the payload ---------------------------------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="microseconds")


def _record_line(record: UserKeyRecord) -> bytes:
    """One row as one canonical line: the same row gives the same bytes from any database."""
    entry = {
        "id": str(record.user_id),
        "key": record.key,
        "creationDate": _time(record.creation_date),
        "revisionDate": _time(record.revision_date),
        "lastAccessDate": _time(record.last_access_date),
    }
    return json.dumps(entry, separators=(",", ":")).encode("utf-8") + b"\n"


def _records_sha256(digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()


def manifest_mac(key: bytes, manifest: dict[str, Any]) -> str:
    """The manifest's MAC (hex): HMAC-SHA256 over the manifest without ``mac``, as canonical JSON."""
    body = {name: value for name, value in manifest.items() if name != "mac"}
    return hmac.new(key, _encoder.encode(body).encode("ascii"), hashlib.sha256).hexdigest()


class _PayloadWriter:
    def __init__(self, sink: _Encryptor) -> None:
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
        lines = [_record_line(record) for record in batch]
        self._digests.extend(hashlib.sha256(line).digest() for line in lines)
        self._write(b"".join(lines))

    def manifest(self, header: dict[str, Any], mac_key: bytes) -> None:
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "created": header["created"],
            "source": header["source"],
            "records": self.count,
            "sha256": self._hash.hexdigest(),
            "recordsSha256": _records_sha256(self._digests),
        }
        manifest["mac"] = manifest_mac(mac_key, manifest)
        self._sink.write(json.dumps({"manifest": manifest}, separators=(",", ":")).encode("utf-8") + b"\n")


@dataclass
class _Header:
    created: str
    source: str
    data_key: str | None
    key_ring: StoredKeyRing | None
    anchor: str | None = None
    """The anchor the header claims (format 2): compared with the one the ring authenticates as."""


@dataclass
class _Contents:
    """What a full read of the file established."""

    header: _Header
    records: int = 0
    sha256: str = ""
    digests: dict[int, bytes] = field(default_factory=dict)
    """User id (as an int) -> SHA-256 of its record line."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The manifest as read (its MAC is checked once the ring is authenticated)."""


class _PayloadReader:
    """Parses the decrypted lines and checks them against the manifest: any doubt is a damaged file."""

    def __init__(self, lines: Iterator[bytes], path: Path, file_format: int) -> None:
        self._lines = lines
        self._path = path
        self._format = file_format
        self._hash = hashlib.sha256()
        self.contents = _Contents(self._read_header())

    def _damaged(self, problem: str) -> BackupError:
        return BackupError(f"{self._path} is damaged: {problem}")

    def _next(self) -> bytes | None:
        return next(self._lines, None)

    def _read_header(self) -> _Header:
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
            return _Header(
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
        if records_sha256 != _records_sha256(list(contents.digests.values())):
            raise self._damaged("the SHA-256 of its records differs from its manifest")
        contents.records, contents.sha256, contents.manifest = count, sha256, manifest


def _parse_time(text: Any) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


@dataclass
class _BackupFile:
    """An open backup whose preamble was read: each ``read`` decrypts its age part from the start."""

    source: BinaryIO
    age_offset: int
    identities: list[x25519.Identity]
    path: Path
    format: int
    passphrase: bool
    """Protected by a passphrase (which a forger lacks), not by recipient keys (which are public)."""

    @contextlib.contextmanager
    def read(self) -> Iterator[_PayloadReader]:
        self.source.seek(self.age_offset)
        with _decrypted_lines(self.source, self.identities, self.path) as lines:
            yield _PayloadReader(lines, self.path, self.format)

    def header(self) -> _Header:
        """The header alone (age has not authenticated the rest of the file yet)."""
        with self.read() as reader:
            return reader.contents.header

    def check(
        self, batch_size: int, keys: DataKeys | None, *, decrypt: bool
    ) -> tuple[_Contents, _Decryption]:
        """Read the whole file and return what it holds; with ``decrypt``, open every record with ``keys``
        (None: the backup holds no data key, so every record that has a key fails)."""
        decryption = _Decryption()
        with self.read() as reader, Progress(f"checking {self.path.name}", None) as progress:
            for batch in reader.batches(batch_size):
                if decrypt:
                    decryption.add(batch, keys)
                progress.advance(len(batch))
        return reader.contents, decryption


@dataclass
class _Decryption:
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


# -- backup --------------------------------------------------------------------------------------------------


async def _backup(
    settings: Settings,
    output: Path,
    protection: bytes,
    recipients: list[x25519.Recipient],
    force: bool,
    batch_size: int,
) -> tuple[str, str]:
    """Write the backup; return what it holds, for the operator, and the key ring's anchor."""
    state = inspect(settings.database, "database", trust=Trust.from_settings(settings))
    if not state.has_schema:
        raise BackupError(f"{state.description} has no Key Connector tables: there is nothing to back up")
    provider = await open_key_provider(settings)
    try:
        await provider.check()
        repository = await open_repository(settings.database, "database", trust=Trust.from_settings(settings))
        try:
            ring = await _authenticated_ring(settings, repository, provider)
            return await _write_backup(repository, ring, output, protection, recipients, force, batch_size)
        finally:
            await repository.aclose()
    finally:
        await provider.aclose()


async def _authenticated_ring(settings: Settings, repository: Repository, provider: KeyProvider) -> KeyRing:
    """The database's authenticated key ring: its key MACs the manifest, its anchor names the deployment.

    A deployment no keyconnector of this version has started yet is adopted first, as ``serve`` would
    at its next start (the one write a backup may make, to keyconnector's own table): without an
    authenticated ring there is no key a restore could check the backup with. Such a backup is often
    taken during a takeover, while upstream still serves and writes upstream-format records, so a
    ring adopted here for a database without records accepts them (``serve`` would decide by
    ``compat.writeLegacyFormat``); ``upgrade-records`` tightens that later."""
    trust = RingTrust(anchor=settings.key_ring_anchor)
    try:
        opened = await open_ring(repository, provider, trust=trust, adopt=False)
        if not opened.adopted:
            return opened.ring
        _, ring = await load_key_set(repository, provider, trust, accept_legacy_when_new=True)
        return ring
    except NotAdopted:
        raise BackupError(
            f"{repository.description} has no data key yet: there is nothing to back up"
        ) from None
    except RingRefused as exc:
        raise BackupError(
            f"the key ring of {repository.description} does not authenticate ({exc}); no backup was written: "
            "it could not be restored. Restore the ring from an earlier backup"
        ) from None


async def _write_backup(
    repository: Repository,
    ring: KeyRing,
    output: Path,
    protection: bytes,
    recipients: list[x25519.Recipient],
    force: bool,
    batch_size: int,
) -> tuple[str, str]:
    data_key = await repository.get_wrapped_data_key()
    stored = await repository.get_key_ring()
    if stored is None or stored.revision != ring.revision:
        raise _changed_meanwhile()
    total = await repository.count_records()
    header: dict[str, Any] = {
        "format": FORMAT,
        "created": now_text(),
        "source": repository.description,
        "dataKey": data_key,
        "keyRing": {"revision": stored.revision, "document": stored.document},
        "anchor": ring.anchor,
    }
    fd, temp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
    temp = Path(temp_name)  # mkstemp makes it 0600, before any byte is in it
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(MAGIC + protection)
            out.flush()
            encryptor = _Encryptor(out, recipients)
            try:
                payload = _PayloadWriter(encryptor)
                payload.header(header)
                with Progress(f"backup of {repository.description}", total) as progress:
                    async for batch in repository.iter_records(batch_size):
                        payload.records(batch)
                        progress.advance(len(batch))
                await _check_unchanged(repository, data_key, stored)
                payload.manifest(header, ring.derive(MAC_PURPOSE))
            except BaseException:
                encryptor.abort()
                raise
            encryptor.finish()
            out.flush()
            os.fsync(out.fileno())
        _publish(temp, output, force)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    keys = ("the data key" if data_key else "no data key") + " and the key ring"
    return f"{payload.count:,} records and {keys} of {repository.description}", ring.anchor


def _changed_meanwhile() -> BackupError:
    return BackupError(
        "the data key or the key ring changed while the backup ran (a rotation?); no backup was "
        "written: run it again"
    )


async def _check_unchanged(repository: Repository, data_key: str | None, ring: StoredKeyRing | None) -> None:
    """A rotation that ran meanwhile may have made records need keys this backup does not hold."""
    if await repository.get_wrapped_data_key() != data_key or await repository.get_key_ring() != ring:
        raise _changed_meanwhile()


def _publish(temp: Path, output: Path, force: bool) -> None:
    """Give the finished file its name: atomically, and without replacing a file unless ``force``."""
    if force:
        os.replace(temp, output)
    else:
        try:
            os.link(temp, output)
        except FileExistsError:
            raise UsageError("OUTPUT", f"{output} appeared while the backup ran; give --force") from None
        temp.unlink()
    with contextlib.suppress(OSError):
        folder = os.open(output.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


# -- restore: what the backup's keys are, and whether they are this deployment's ---------------------------


@dataclass
class _BackupKeys:
    """The backup's data keys as the configured key pair unwraps them."""

    keys: DataKeys | None
    """None when the backup holds no data key at all."""
    ring: KeyRing | None
    """The backup's key ring, authenticated (``auth_key`` set); None for a ring of the earlier,
    unauthenticated format or none (``serve`` adopts what is restored)."""


async def _open_backup_keys(header: _Header, provider: KeyProvider, backup: _BackupFile) -> _BackupKeys:
    """Authenticate the backup's ring (or, for an earlier format, unwrap its keys) in memory: proves
    the key pair fits before anything is written. Raises ``RingRefused`` when the ring does not
    authenticate, another ``KeyConnectorError`` when this key pair cannot open its keys."""
    if header.key_ring is not None:
        try:
            ring = KeyRing.parse(header.key_ring)
        except StorageError:
            raise BackupError(f"{backup.path} is damaged: its key ring is not readable") from None
        if ring.format >= RING_FORMAT:
            keys = await authenticate(ring, provider, RingTrust(), header.data_key)
            if backup.format >= 2 and not hmac.compare_digest(header.anchor or "", ring.anchor):
                raise BackupError(
                    f"{backup.path} is forged or damaged: its header names key ring anchor {header.anchor}, "
                    f"but its key ring authenticates as {ring.anchor}; nothing was written"
                )
            return _BackupKeys(DataKeys(keys, ring.current, accept_legacy=ring.accept_legacy), ring)
    if backup.format >= 2:
        raise BackupError(f"{backup.path} is damaged: it holds no authenticated key ring")
    return _BackupKeys(await _backup_keys(header, provider), None)


async def _backup_keys(header: _Header, provider: KeyProvider) -> DataKeys | None:
    """The data keys of a backup whose ring is of the earlier format (or absent): ``datakeys.wrap_for``,
    with the backup's ``ApplicationDatas`` wrap. None when it holds no data key."""
    if header.data_key is None and header.key_ring is None:
        return None
    ring = KeyRing.implicit() if header.key_ring is None else KeyRing.parse(header.key_ring)
    keys = {}
    for number in ring.active:
        try:
            wrapped = wrap_for(ring, number, provider, header.data_key)
        except IntegrityFailure as exc:
            raise IntegrityFailure(f"in the backup: {exc}") from None
        try:
            blob = base64.b64decode(wrapped, validate=True)
        except (binascii.Error, ValueError):
            raise BackupError(f"the backup's wrap of data key version {number} is not base64") from None
        keys[number] = DataKey(await provider.unwrap(blob), number)
    return DataKeys(keys, ring.current)


def _check_file_format(backup: _BackupFile, options: _RestoreOptions) -> str | None:
    """A format-1 file carries no MAC: refused in recipients mode unless the operator vouches for it."""
    if backup.format >= 2:
        return None
    if backup.passphrase:
        note = (
            f"{backup.path} is a format-1 backup (made before backups carried a MAC): only its passphrase "
            "authenticates it"
        )
        log.warning("%s", note)
        return note
    if not options.allow_unauthenticated:
        raise BackupError(
            f"{backup.path} is a format-1 backup encrypted to recipient keys: it carries no MAC, and anyone "
            "holding a recipient's public key can make such a file. Nothing was written. If you made this "
            "file yourself and kept it safe, give --allow-unauthenticated"
        )
    note = f"{backup.path} is a format-1 backup (no MAC), restored on --allow-unauthenticated"
    log.warning("%s", note)
    return note


def _check_mac(contents: _Contents, opened: _BackupKeys, backup: _BackupFile) -> None:
    """The manifest's MAC under the backup's own ring: proves the file is what its ring's holder wrote."""
    if backup.format < 2:
        return
    assert opened.ring is not None  # format 2 always holds an authenticated ring (_open_backup_keys)
    expected = manifest_mac(opened.ring.derive(MAC_PURPOSE), contents.manifest)
    if not hmac.compare_digest(str(contents.manifest.get("mac", "")), expected):
        raise BackupError(
            f"{backup.path} does not authenticate: its manifest's MAC does not verify under its own key ring "
            "(the file was edited after it was made, or forged); nothing was written"
        )


async def _target_anchor(settings: Settings, provider: KeyProvider) -> tuple[str | None, str]:
    """The anchor of the target database's own authenticated ring, or None and why there is none.
    Reads only: a database without tables is not created."""
    state = inspect(settings.database, "database", trust=Trust.from_settings(settings))
    if not state.has_schema:
        return None, f"the target database has no Key Connector tables yet ({state.description})"
    repository = await open_repository(settings.database, "database", trust=Trust.from_settings(settings))
    try:
        opened = await open_ring(repository, provider, adopt=False)
    except NotAdopted:
        return None, f"the target database ({repository.description}) has no data key"
    except KeyConnectorError as exc:
        log.warning(
            "the key ring of %s does not authenticate, so it cannot vouch for the backup: %s",
            repository.description,
            exc,
        )
        return None, f"the key ring of the target database ({repository.description}) does not authenticate"
    finally:
        await repository.aclose()
    if opened.adopted:
        return (
            None,
            f"the key ring of the target database ({repository.description}) is not authenticated yet",
        )
    return opened.ring.anchor, f"the key ring of the target database ({repository.description})"


async def _check_anchor(
    settings: Settings,
    provider: KeyProvider,
    ring: KeyRing,
    backup: _BackupFile,
    options: _RestoreOptions,
    *,
    verify_only: bool = False,
) -> str:
    """Refuse a backup whose ring is not this deployment's (see the module docstring for the rule);
    return what its anchor was checked against, for the operator."""
    anchor = ring.anchor
    references: list[tuple[str, str]] = []
    if options.expect_anchor:
        references.append((options.expect_anchor, "--expect-anchor"))
    if settings.key_ring_anchor:
        references.append((settings.key_ring_anchor, "keyConnectorSettings__keyRingAnchor"))
    why_none = ""
    if not references:
        target, where = await _target_anchor(settings, provider)
        if target is None:
            why_none = where
        else:
            references.append((target, where))
    for expected, where in references:
        if not hmac.compare_digest(expected, anchor):
            raise BackupError(
                f"the backup's key ring has anchor {anchor}, but {where} says {expected}: the backup was "
                "made by another deployment, or forged by someone holding only public keys; nothing was "
                "written. To replace this deployment with the other one knowingly, check the backup's anchor "
                "against that deployment's and give it as --expect-anchor"
            )
    if references:
        return f"key ring anchor {anchor} (matches {' and '.join(where for _, where in references)})"
    vouched = options.allow_unauthenticated and backup.format < 2  # the operator vouches for the file
    if backup.passphrase or vouched or verify_only:
        pin = f"pin it with keyConnectorSettings__keyRingAnchor={anchor}"
        if verify_only and not backup.passphrase:
            return (
                f"key ring anchor {anchor} (not compared: {why_none}; a restore there needs --expect-anchor)"
            )
        return f"key ring anchor {anchor} (not compared: {why_none}, and no anchor was given; {pin})"
    raise BackupError(
        f"{why_none} and no anchor was given to check the backup against: a backup encrypted to recipient "
        "keys can be forged by anyone holding a recipient's public key and the key pair's certificate. "
        "Nothing was written. Give --expect-anchor with your deployment's anchor, from a record kept apart "
        "from the backup (not read from the file): `keyconnector backup` printed it, `serve` logs it at "
        "start as 'key ring revision N authenticated (anchor X)', `keyconnector check` and `stats` show it"
    )


def _same_content(stored: KeyRing, backup: KeyRing) -> bool:
    """The same ring apart from its revision and MAC (a restore writes it for the target's revision)."""
    return (
        stored.anchor == backup.anchor
        and stored.current == backup.current
        and stored.versions == backup.versions
        and stored.accept_legacy == backup.accept_legacy
        and stored.adopted == backup.adopted
    )


async def _holds_backup_ring(
    repository: Repository, stored: StoredKeyRing, header: _Header, opened: _BackupKeys, provider: KeyProvider
) -> bool:
    """Whether the database's ring is the backup's: for an authenticated one, its content under the
    backup's authentication key (a ring with the same content but no valid MAC is not)."""
    if opened.ring is None:
        return header.key_ring is not None and stored.document == header.key_ring.document
    try:
        ring = KeyRing.parse(stored)
        trust = RingTrust(auth_key=opened.ring.auth_key)
        await authenticate(ring, provider, trust, await repository.get_wrapped_data_key())
    except KeyConnectorError:
        return False
    return _same_content(ring, opened.ring)


# -- restore -------------------------------------------------------------------------------------------------


async def _verify_only(settings: Settings, backup: _BackupFile, options: _RestoreOptions) -> str:
    """Check the file; with a key pair that fits, authenticate it and decrypt every record. Writes nothing."""
    provider: KeyProvider | None = None
    note = ""
    opened: _BackupKeys | None = None
    try:
        provider = await open_key_provider(settings)
        await provider.check()
    except KeyConnectorError as exc:
        note = f"; records not decrypted: the configured key pair is not usable ({exc})"
    try:
        if provider is not None:
            try:
                opened = await _open_backup_keys(backup.header(), provider, backup)
            except RingRefused as exc:
                raise BackupError(f"the backup's key ring does not authenticate: {exc}") from None
            except BackupError:
                raise
            except KeyConnectorError as exc:
                note = f"; records not decrypted: {exc}"
        keys = None if opened is None else opened.keys
        contents, decryption = backup.check(options.batch_size, keys, decrypt=opened is not None)
        intact = (
            f"verify: {backup.path} is intact: {contents.records:,} records, made {contents.header.created} "
            f"from {contents.header.source}"
        )
        if opened is None:
            return intact + note
        _check_mac(contents, opened, backup)
        if decryption.failed:
            raise OperationFailed(f"{intact}; but only {decryption.summary()}", decryption.failed)
        parts = [intact, decryption.summary()]
        if opened.ring is not None:
            assert provider is not None
            parts.append("its manifest's MAC verifies" if backup.format >= 2 else "format 1: no MAC")
            parts.append(
                await _check_anchor(settings, provider, opened.ring, backup, options, verify_only=True)
            )
        else:
            parts.append("format 1 with a key ring of the earlier format: not authenticated")
        return "; ".join(parts) + note
    finally:
        if provider is not None:
            await provider.aclose()


async def _restore(settings: Settings, backup: _BackupFile, options: _RestoreOptions) -> str:
    notes = [note for note in [_check_file_format(backup, options)] if note]
    provider = await open_key_provider(settings)
    try:
        await provider.check()
        try:
            opened = await _open_backup_keys(backup.header(), provider, backup)
        except RingRefused as exc:
            raise BackupError(
                f"the backup's key ring does not authenticate with the configured key pair: {exc}; nothing "
                "was written"
            ) from None
        except BackupError:
            raise
        except KeyConnectorError as exc:
            raise BackupError(
                f"the configured key pair cannot open the backup's data keys: {exc}; nothing was written"
            ) from None
        contents, decryption = backup.check(options.batch_size, opened.keys, decrypt=True)
        _check_mac(contents, opened, backup)
        if decryption.failed:
            raise OperationFailed(
                f"restore refused, nothing was written: not every record of the backup opens under its own "
                f"data keys ({decryption.summary()})",
                decryption.failed,
            )
        if opened.ring is not None:
            notes.append(await _check_anchor(settings, provider, opened.ring, backup, options))
        else:
            notes.append(_adoption_note(settings))
        migrate(settings.database, "database", trust=Trust.from_settings(settings))
        repository = await open_repository(settings.database, "database", trust=Trust.from_settings(settings))
        try:
            await _check_target(repository, contents, opened, provider, options.replace)
            await _write(repository, backup, contents, opened, provider, options.batch_size)
            line = await _verify_restore(repository, provider, backup, contents, opened)
        finally:
            await repository.aclose()
    finally:
        await provider.aclose()
    return "\n".join([line, *(f"restore: {note}" for note in notes), RESTART_NOTE])


def _adoption_note(settings: Settings) -> str:
    note = (
        "the backup's key ring is of the earlier, unauthenticated format (or absent): `keyconnector serve` "
        "adopts it at its next start, under a new anchor"
    )
    if settings.key_ring_anchor:
        note += (
            f"; keyConnectorSettings__keyRingAnchor pins {settings.key_ring_anchor}, so serve will refuse it "
            "until that setting is removed (set it again to the anchor serve then logs)"
        )
    return note


async def _check_target(
    repository: Repository, contents: _Contents, opened: _BackupKeys, provider: KeyProvider, replace: bool
) -> None:
    """Refuse to mix the backup into a database in use, but let a re-run finish an interrupted restore
    of the same file (the backup's keys, and only rows identical to the backup's)."""
    if replace:
        return
    header = contents.header
    data_key = await repository.get_wrapped_data_key()
    ring = await repository.get_key_ring()
    if (data_key is not None and data_key != header.data_key) or (
        ring is not None and not await _holds_backup_ring(repository, ring, header, opened, provider)
    ):
        raise BackupError(
            f"{repository.description} already holds another data key or key ring; nothing was written. "
            "Restore into an empty database, or give --replace to overwrite them (its records would no "
            "longer decrypt)"
        )
    rows = await repository.count_records()
    if rows == 0:
        return
    foreign = 0
    async for batch in repository.iter_records(BATCH_SIZE):
        for record in batch:
            if contents.digests.get(record.user_id.int) != hashlib.sha256(_record_line(record)).digest():
                foreign += 1
    if foreign or data_key is None:
        raise BackupError(
            f"{repository.description} already holds {rows:,} rows ({foreign:,} not from this backup); "
            "nothing was written. Restore into an empty database, or give --replace to overwrite the rows "
            "of the users in the backup"
        )
    log.info(
        "the database holds %d of the backup's %d rows, identical (an interrupted restore): continuing",
        rows,
        contents.records,
    )


async def _write(
    repository: Repository,
    backup: _BackupFile,
    contents: _Contents,
    opened: _BackupKeys,
    provider: KeyProvider,
    batch_size: int,
) -> None:
    """Keys first, then the rows: a restore interrupted anywhere is recognised and finished by a re-run."""
    header = contents.header
    if header.data_key is not None and await repository.get_wrapped_data_key() != header.data_key:
        await repository.set_wrapped_data_key(header.data_key)
    await _restore_ring(repository, header, opened, provider)
    with backup.read() as reader, Progress(f"restore into {repository.description}", contents.records) as bar:
        for batch in reader.batches(batch_size):
            await repository.upsert_records(batch)
            bar.advance(len(batch))
    if reader.contents.sha256 != contents.sha256:
        raise BackupError(f"{backup.path} changed while it was being restored; run the restore again")


async def _restore_ring(
    repository: Repository, header: _Header, opened: _BackupKeys, provider: KeyProvider
) -> None:
    """Write the backup's ring. An authenticated one is written for the target's next revision (MACed
    again with the same authentication key): one copied with the backup's revision would be refused."""
    stored = await repository.get_key_ring()
    if opened.ring is not None:
        if stored is not None and await _holds_backup_ring(repository, stored, header, opened, provider):
            return
        ring = copy.deepcopy(opened.ring)
        ring.revision = 0 if stored is None else stored.revision
        try:
            await save_ring(repository, ring)
        except KeyRingConflict:
            raise BackupError(
                "the key ring was changed by another process meanwhile; run the restore again"
            ) from None
        return
    if header.key_ring is not None:
        wanted = header.key_ring.document
    elif stored is not None:
        # The target rotated, the backup did not: version 1 only, adopted again at the next start.
        wanted = UNADOPTED_RING
    else:
        return
    if stored is not None and stored.document == wanted:
        return
    if not await repository.put_key_ring(wanted, 0 if stored is None else stored.revision):
        raise BackupError("the key ring was changed by another process meanwhile; run the restore again")


async def _restored_keys(
    repository: Repository, provider: KeyProvider, header: _Header, opened: _BackupKeys
) -> DataKeys | None:
    """The keys the database now gives, proving its ring is the backup's (by content, for an
    authenticated ring: the revision and MAC are the target's)."""
    if opened.ring is not None:
        try:
            now = await open_ring(
                repository, provider, trust=RingTrust(anchor=opened.ring.anchor), adopt=False
            )
        except KeyConnectorError as exc:
            raise BackupError(
                f"after the restore, the database's key ring does not authenticate: {exc}"
            ) from None
        if now.adopted or not _same_content(now.ring, opened.ring):
            raise BackupError("after the restore, the database holds another key ring than the backup")
        return now.key_set()
    stored = await repository.get_key_ring()
    if header.key_ring is not None and (stored is None or stored.document != header.key_ring.document):
        raise BackupError("after the restore, the database holds another key ring than the backup")
    try:
        # An earlier-format ring: what serve will adopt (nothing is written here).
        return (await open_ring(repository, provider, adopt=False)).key_set()
    except NotAdopted:
        return None


async def _verify_restore(
    repository: Repository,
    provider: KeyProvider,
    backup: _BackupFile,
    contents: _Contents,
    opened: _BackupKeys,
) -> str:
    """Prove the result from the database itself: the backup's rows are all there, identical, and every
    row decrypts with the configured key pair."""
    header = contents.header
    if header.data_key is not None and await repository.get_wrapped_data_key() != header.data_key:
        raise BackupError("after the restore, the database holds another data key than the backup")
    keys = await _restored_keys(repository, provider, header, opened)
    decryption = _Decryption()
    identical: list[bytes] = []
    changed: list[UUID] = []
    others = 0
    total = await repository.count_records()
    with Progress(f"verifying {repository.description}", total) as progress:
        async for batch in repository.iter_records(BATCH_SIZE):
            for record in batch:
                expected = contents.digests.get(record.user_id.int)
                digest = hashlib.sha256(_record_line(record)).digest()
                if expected == digest:
                    identical.append(digest)
                elif expected is None:
                    others += 1
                else:
                    changed.append(record.user_id)
            decryption.add(batch, keys)
            progress.advance(len(batch))
    if changed:
        raise OperationFailed("restore: rows differ from the backup after writing them", changed)
    if len(identical) != contents.records or _records_sha256(identical) != _records_sha256(
        list(contents.digests.values())
    ):
        raise BackupError(
            f"restore: {len(identical):,} of the backup's {contents.records:,} rows are in the database"
        )
    if decryption.failed:
        summary = decryption.summary()
        raise OperationFailed(
            f"restore: written and identical to the backup, but {summary}", decryption.failed
        )
    extra = f"; {others:,} rows of users not in the backup were kept" if others else ""
    return (
        f"restore: {contents.records:,} records from {backup.path} (made {header.created} from "
        f"{header.source}) are in {repository.description}, identical to the backup (count and "
        f"SHA-256); {decryption.summary()}{extra}"
    )
