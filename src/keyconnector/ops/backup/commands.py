"""The ``backup`` and ``restore`` sub-commands: their options, and what they print (lines for people,
or with ``--json`` one document each, docs/cli.md). Progress and logs go to stderr."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
from pathlib import Path

from keyconnector.errors import UsageError
from keyconnector.ops import Subcommands, add_settings_arguments, load_settings_from
from keyconnector.ops.backup.authenticity import RestoreOptions
from keyconnector.ops.backup.file import read_preamble
from keyconnector.ops.backup.format import BATCH_SIZE, RECIPIENTS_LINE
from keyconnector.ops.backup.protection import (
    PASSPHRASE_ENV,
    parse_recipient,
    passphrase_protection,
    read_passphrase,
)
from keyconnector.ops.backup.restore import restore_backup
from keyconnector.ops.backup.verify import verify_backup
from keyconnector.ops.backup.write import make_backup, unwritable
from keyconnector.ops.report import add_json_option, emit_json, wants_json
from keyconnector.runtime import logs


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
    add_json_option(backup, "what was written")
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
    add_json_option(restore, "what was checked and written")
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


def cmd_backup(args: argparse.Namespace) -> int:
    settings = load_settings_from(args).settings
    logs.configure(settings.logging)
    output = Path(args.output).absolute()
    if output.exists() and not args.force:
        raise UsageError("OUTPUT", f"{output} exists; give --force to overwrite it")
    if not output.parent.is_dir():
        raise UsageError("OUTPUT", f"the folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK | os.X_OK):  # before a passphrase is asked for nothing
        raise unwritable(output, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
    if args.recipient:
        recipients = [parse_recipient(text) for text in args.recipient]
        protection, how = RECIPIENTS_LINE, f"encrypted to {len(recipients)} recipient key(s)"
    else:
        recipients, protection = passphrase_protection(read_passphrase(args.passphrase_file, confirm=True))
        how = "encrypted to a passphrase"
    made = asyncio.run(make_backup(settings, output, protection, recipients, args.force, args.batch_size))
    size = output.stat().st_size
    if wants_json(args):
        emit_json(
            {
                "ok": True,
                "output": str(output),
                "bytes": size,
                "records": made.records,
                "data_key": made.data_key,
                "source": made.source,
                "protection": "recipients" if args.recipient else "passphrase",
                "recipients": len(recipients) if args.recipient else 0,
                "key_ring_anchor": made.anchor,
            }
        )
        return 0
    print(f"backup: {made.what()} written to {output} ({size:,} bytes), {how}")
    print(
        f"backup: key ring anchor {made.anchor}: keep it apart from the backup; `keyconnector restore "
        f"--expect-anchor {made.anchor}` checks that a backup is this deployment's"
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
    options = RestoreOptions(args.replace, args.expect_anchor, args.allow_unauthenticated, args.batch_size)
    with source:
        backup = read_preamble(source, path, args)
        if args.verify_only:
            outcome = asyncio.run(verify_backup(settings, backup, options))
        else:
            outcome = asyncio.run(restore_backup(settings, backup, options))
    if wants_json(args):
        emit_json(outcome.document())
    else:
        print(outcome.text)
    return 0
