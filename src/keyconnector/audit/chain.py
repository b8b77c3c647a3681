"""The keyed chain of the audit trail: sealing entries as they are written, and the checkpoints that
anchor a chain's head outside its sink. Verification is in :mod:`keyconnector.audit.verify`.

One chain per worker process and sink. Several workers append to the same file at once; one shared
chain would need a lock held across every append (and, to be meaningful, across the read of the
previous entry from disk), so a login storm would serialise on it. Instead each process starts its
own chain, named by a ``chain`` id unique to the process (host, pid and a random part, so a restarted
process with a recycled pid starts a new chain), with its own ``seq`` from 1. Entries of different
chains interleave freely in the file; the verifier follows each chain separately. What this gives up:
the relative order of two entries from different workers is not protected (only their times say it);
the order, presence and content of every entry within one worker's history is.

Why a MAC and not a hash
    A plain hash chain (format 1, written before this version: ``hash`` = SHA-256 of the entry) proves
    nothing against someone who can edit the file or the table: they recompute every hash after their
    edit. Format 2 entries carry ``"v": 2`` and ``mac`` = HMAC-SHA256 under the *audit key* over the
    canonical JSON (sorted keys, no spaces, ASCII) of the entry without ``mac`` but with ``prev``, the
    previous entry's MAC (``GENESIS`` for seq 1). The audit key is derived from the key ring's
    authentication key (``KeyRing.derive(KEY_PURPOSE)``), which only a holder of a real data key can
    open: the file or the table alone does not give it, and neither does the public certificate.

Why checkpoints
    A MAC cannot show that the newest entries of a chain, a whole chain, or the whole trail were
    removed: what is left still verifies. So the head of each chain (sink, chain, seq, MAC) is sealed
    as a ``Checkpoint`` on a schedule and at a clean stop, written into every *other* sink and logged
    as an anchor token (``kc-audit-anchor:1:...``); a trail that ends before a checkpoint the verifier
    can see has lost entries. The token carries a tag under the audit key, so a token made up by
    someone else is refused rather than trusted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64
FORMAT = 2
"""The ``v`` of keyed entries; entries without ``v`` are format 1 (hash-chained, unkeyed)."""
KEY_PURPOSE = "audit/1"
"""``KeyRing.derive`` purpose of the audit key: the service and ``audit verify`` must agree on it."""
ADOPTED = "adopted"
"""``outcome`` of the entry that adopts the unkeyed entries found in a sink (see ``keyconnector.audit``)."""
CHECKPOINT = "checkpoint"
"""``outcome`` of an entry holding another sink's checkpoint."""
ANCHOR_PREFIX = "kc-audit-anchor:1:"
_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode


_second: list[Any] = [-1, ""]


def utc_now() -> str:
    """ISO 8601 UTC with microseconds; the part up to the second is formatted once per second
    (strftime on every entry was a third of the cost of recording)."""
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second[0], _second[1] = whole, f"{datetime.fromtimestamp(whole, UTC):%Y-%m-%dT%H:%M:%S}"
    return f"{_second[1]}.{int((now - whole) * 1e6):06d}Z"


def canonical(entry: dict[str, Any]) -> bytes:
    """The exact bytes hashed or MACed: the verifier re-creates them from a parsed line."""
    return _dumps(entry).encode()


def new_chain_id() -> str:
    """Unique per process start: host, pid and 32 random bits."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{os.urandom(4).hex()}"


def legacy_hash(entry: dict[str, Any]) -> str:
    """Format 1: SHA-256 of the entry without ``hash``. Only read now (adopted trails), never written."""
    return hashlib.sha256(canonical(entry)).hexdigest()


class Mac:
    """HMAC-SHA256 under the audit key, with the keyed state computed once (copied per entry)."""

    __slots__ = ("_base",)

    def __init__(self, key: bytes) -> None:
        self._base = hmac.new(key, digestmod=hashlib.sha256)

    def of(self, data: bytes) -> str:
        mac = self._base.copy()
        mac.update(data)
        return mac.hexdigest()

    def entry(self, entry: dict[str, Any]) -> str:
        """The MAC of an entry given without its ``mac``."""
        return self.of(canonical(entry))

    def matches(self, data: bytes, expected: str) -> bool:
        return hmac.compare_digest(self.of(data), expected)


class Chain:
    """The state of one keyed chain in one sink: the next ``seq`` and the previous entry's MAC.

    ``seal`` does not advance the chain: the sink calls ``advance`` only once the entry is really
    written (or queued), so an entry that could not be recorded leaves no gap behind it.
    """

    __slots__ = ("id", "mac", "prev", "seq")

    def __init__(self, chain_id: str, mac: Mac) -> None:
        self.id = chain_id
        self.mac = mac
        self.seq = 1
        self.prev = GENESIS

    def seal(self, fields: dict[str, Any]) -> tuple[dict[str, Any], bytes, str]:
        """The entry (with ``mac``), its JSON line (newline included) and its MAC."""
        entry = dict(fields)
        entry["chain"] = self.id
        entry["seq"] = self.seq
        entry["prev"] = self.prev
        entry["v"] = FORMAT
        body = canonical(entry)
        digest = self.mac.of(body)
        entry["mac"] = digest
        return entry, body[:-1] + b',"mac":"' + digest.encode() + b'"}\n', digest

    def advance(self, digest: str) -> None:
        self.seq += 1
        self.prev = digest


@dataclass(frozen=True)
class Checkpoint:
    """A chain's head as its process saw it: in the other sinks and, as a token, in the service log."""

    sink: str
    chain: str
    seq: int
    mac: str
    tag: str
    time: str = ""
    host: str = ""

    @staticmethod
    def tag_of(mac: Mac, sink: str, chain: str, seq: int, entry_mac: str) -> str:
        """Binds the token's fields to the audit key (the time and host are notes, not covered)."""
        return mac.of(f"{ANCHOR_PREFIX}{sink}:{chain}:{seq}:{entry_mac}".encode())[:32]

    @classmethod
    def make(
        cls, mac: Mac, sink: str, chain: str, seq: int, entry_mac: str, time: str, host: str
    ) -> Checkpoint:
        return cls(sink, chain, seq, entry_mac, cls.tag_of(mac, sink, chain, seq, entry_mac), time, host)

    def authentic(self, mac: Mac) -> bool:
        return hmac.compare_digest(self.tag_of(mac, self.sink, self.chain, self.seq, self.mac), self.tag)

    @property
    def token(self) -> str:
        """What an operator copies from the log into ``audit verify --anchor``."""
        return f"{ANCHOR_PREFIX}{self.sink}:{self.chain}:{self.seq}:{self.mac}:{self.tag}"

    def fields(self) -> dict[str, Any]:
        """The ``checkpoint`` field of the entry that carries it in another sink."""
        return {
            "sink": self.sink,
            "chain": self.chain,
            "seq": self.seq,
            "mac": self.mac,
            "tag": self.tag,
            "time": self.time,
            "host": self.host,
        }

    @classmethod
    def from_fields(cls, fields: Any) -> Checkpoint:
        """The checkpoint an entry carries; ValueError when it is not one (never shown: counted)."""
        try:
            checkpoint = cls(
                str(fields["sink"]),
                str(fields["chain"]),
                fields["seq"],
                str(fields["mac"]),
                str(fields["tag"]),
                str(fields.get("time", "")),
                str(fields.get("host", "")),
            )
        except (KeyError, TypeError, AttributeError):
            raise ValueError from None
        if type(checkpoint.seq) is not int or checkpoint.seq < 1:
            raise ValueError
        return checkpoint

    @classmethod
    def parse(cls, token: str) -> Checkpoint:
        """An anchor token; ValueError saying what is wrong with it."""
        token = token.strip()
        if not token.startswith(ANCHOR_PREFIX):
            raise ValueError(f"does not start with {ANCHOR_PREFIX}")
        head, _, rest = token[len(ANCHOR_PREFIX) :].partition(":")
        parts = rest.rsplit(":", 3)
        if not head or len(parts) != 4 or not parts[0]:
            raise ValueError("expected kc-audit-anchor:1:SINK:CHAIN:SEQ:MAC:TAG")
        chain, seq, entry_mac, tag = parts
        if not seq.isdigit() or int(seq) < 1:
            raise ValueError(f"its seq {seq!r} is not a positive number")
        return cls(head, chain, int(seq), entry_mac, tag)
