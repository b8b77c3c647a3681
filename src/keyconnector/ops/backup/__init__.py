"""``keyconnector backup`` and ``keyconnector restore``: the whole deployment in one encrypted file.

A backup holds every ``UserKeys`` row exactly as stored (still sealed under the data key: it never
decrypts a user's key), the wrapped data key of ``ApplicationDatas`` and the key ring. Whoever holds
the file and the key pair can read every user's key, so the file is encrypted again as a whole, with
age (https://age-encryption.org, through ``pyrage``), either to one or more X25519 recipient keys
(``age1...``) or to a passphrase.

The package, one module per concern:

- ``format``: the bytes of a file (preamble, payload lines, manifest and its MAC);
- ``stream``: age encryption and decryption on a worker thread;
- ``protection``: passphrases, recipient keys and identities;
- ``file``: an open backup, read and checked;
- ``write``: making a backup;
- ``authenticity``: whether a backup is this deployment's (the MAC and the anchor rule);
- ``verify`` and ``restore``: ``restore --verify-only`` and ``restore``;
- ``outcome``: what ``backup`` and ``restore`` report, as lines or as ``--json`` documents;
- ``commands``: the two sub-commands.
"""

from __future__ import annotations

from keyconnector.ops.backup.commands import add_commands, cmd_backup, cmd_restore
from keyconnector.ops.backup.format import FORMAT, MAC_PURPOSE, BackupError, manifest_mac
from keyconnector.ops.backup.protection import PASSPHRASE_ENV

__all__ = [
    "FORMAT",
    "MAC_PURPOSE",
    "PASSPHRASE_ENV",
    "BackupError",
    "add_commands",
    "cmd_backup",
    "cmd_restore",
    "manifest_mac",
]
