"""What ``backup`` and ``restore`` report: the lines an operator reads, and the same facts as the
``--json`` documents of docs/cli.md (``## backup``, ``## restore``), so that a script never parses
a sentence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keyconnector.ops.backup.file import Decryption


@dataclass
class Made:
    """A backup written by ``make_backup``."""

    records: int
    data_key: bool
    """Whether ApplicationDatas held a wrapped data key (the backup then holds it too)."""
    source: str
    """The database's description (never a password)."""
    anchor: str
    """The key ring anchor that authenticates the backup: the operator keeps it apart from the file."""

    def what(self) -> str:
        keys = ("the data key" if self.data_key else "no data key") + " and the key ring"
        return f"{self.records:,} records and {keys} of {self.source}"


@dataclass
class Restored:
    """What ``restore`` (or ``restore --verify-only``) found and did."""

    input: str
    verify_only: bool
    records: int
    made: str
    source: str
    target: str | None = None
    """The database written (None with ``--verify-only``)."""
    decryption: Decryption | None = None
    """None when the records were not decrypted (no usable key pair, with ``--verify-only``)."""
    rows_kept: int = 0
    """Rows of users not in the backup, kept in the target (with ``--replace``)."""
    anchor: str | None = None
    """The backup's key ring anchor, when its ring is of the authenticated format."""
    notes: list[str] = field(default_factory=list)
    text: str = ""
    """The lines printed without ``--json``."""

    def document(self) -> dict[str, Any]:
        decryption = self.decryption
        return {
            "ok": True,
            "input": self.input,
            "verify_only": self.verify_only,
            "records": self.records,
            "made": self.made,
            "source": self.source,
            "target": self.target,
            "decrypted": None if decryption is None else decryption.decrypted,
            "without_key": None if decryption is None else decryption.without_key,
            "failed": None if decryption is None else len(decryption.failed),
            "rows_kept": self.rows_kept,
            "key_ring_anchor": self.anchor,
            "notes": self.notes,
        }
