"""The secrets that protect a backup file: a passphrase, or age X25519 recipients and their identities.

A passphrase comes from a file, ``KEYCONNECTOR_BACKUP_PASSPHRASE`` or a prompt, never from the command
line (``ps`` would show it); errors name the file or option, never a byte of a secret.
"""

from __future__ import annotations

import base64
import getpass
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from keyconnector.errors import UsageError
from keyconnector.ops.backup.format import PASSPHRASE_PREFIX

if TYPE_CHECKING:
    from pyrage import x25519


PASSPHRASE_ENV = "KEYCONNECTOR_BACKUP_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret


def read_passphrase(passphrase_file: str | None, *, confirm: bool) -> str:
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


def passphrase_protection(passphrase: str) -> tuple[list[x25519.Recipient], bytes]:
    """A fresh identity for this backup, and the preamble line holding it sealed by the passphrase."""
    from pyrage import passphrase as age_passphrase
    from pyrage import x25519

    identity = x25519.Identity.generate()
    sealed = age_passphrase.encrypt(str(identity).encode("ascii"), passphrase)
    return [identity.to_public()], PASSPHRASE_PREFIX + base64.b64encode(sealed) + b"\n"


def parse_recipient(text: str) -> x25519.Recipient:
    from pyrage import RecipientError, x25519

    try:
        return x25519.Recipient.from_str(text.strip())
    except RecipientError:
        # Not echoed: it might be a secret key given by mistake (and now in the shell history).
        raise UsageError("--recipient", "a value is not an age X25519 public key (age1...)") from None


def load_identities(files: list[str]) -> list[x25519.Identity]:
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
