"""The hash chain of the audit trail: sealing entries as they are written, and verifying them later.

One chain per worker process and sink. Several workers append to the same file at once; one shared
chain would need a lock held across every append (and, to be meaningful, across the read of the
previous hash from disk), so a login storm would serialise on it. Instead each process starts its
own chain, named by a ``chain`` id unique to the process (host, pid and a random part, so a restarted
process with a recycled pid starts a new chain), with its own ``seq`` from 1. Entries of different
chains interleave freely in the file; the verifier follows each chain separately. What this gives up:
the relative order of two entries from different workers is not protected (only their times say it);
the order, presence and content of every entry within one worker's history is.

An entry's ``hash`` is SHA-256 over the canonical JSON (sorted keys, no spaces, ASCII) of the entry
without ``hash`` but with ``prev``, the hash of the chain's previous entry (``GENESIS`` for seq 1).
Removing the newest entries of a chain cannot be seen from the entries alone: the service logs each
chain's last seq and hash when it stops, as an anchor outside the trail.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

GENESIS = "0" * 64
_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode


def canonical(entry: dict[str, Any]) -> bytes:
    """The exact bytes hashed: the verifier re-creates them from a parsed line."""
    return _dumps(entry).encode()


def new_chain_id() -> str:
    """Unique per process start: host, pid and 32 random bits."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{os.urandom(4).hex()}"


class Chain:
    """The state of one chain in one sink: the next ``seq`` and the previous entry's hash.

    ``seal`` does not advance the chain: the sink calls ``advance`` only once the entry is really
    written (or queued), so an entry that could not be recorded leaves no gap behind it.
    """

    __slots__ = ("id", "prev", "seq")

    def __init__(self, chain_id: str) -> None:
        self.id = chain_id
        self.seq = 1
        self.prev = GENESIS

    def seal(self, fields: dict[str, Any]) -> tuple[dict[str, Any], bytes, str]:
        """The entry (with ``hash``), its JSON line (newline included) and its hash."""
        entry = dict(fields)
        entry["chain"] = self.id
        entry["seq"] = self.seq
        entry["prev"] = self.prev
        body = canonical(entry)
        digest = hashlib.sha256(body).hexdigest()
        entry["hash"] = digest
        return entry, body[:-1] + b',"hash":"' + digest.encode() + b'"}\n', digest

    def advance(self, digest: str) -> None:
        self.seq += 1
        self.prev = digest


# -- verification ------------------------------------------------------------------------------------


@dataclass
class _ChainState:
    entries: list[tuple[str, int, str, str]] = field(default_factory=list)
    """(location, seq, prev, hash) in the order found."""


@dataclass
class Report:
    """What ``verify`` found: counts, and the first problem (None when everything verifies)."""

    entries: int = 0
    chains: int = 0
    problem: str | None = None
    problems: int = 0


def verify(items: Iterable[tuple[str, str]]) -> Report:
    """Check every chain in ``items`` (location such as ``line 7``, and the entry's JSON text).

    Reports the first problem in the order found: an unreadable or changed entry (its hash does not
    match its content), or a break in a chain, told apart as removed (the missing seq is nowhere) or
    reordered (it is elsewhere), with where it is.
    """
    report = Report()
    chains: dict[str, _ChainState] = {}
    order: dict[str, int] = {}
    problems: list[tuple[int, str]] = []
    for index, (location, text) in enumerate(items):
        order[location] = index
        report.entries += 1
        try:
            entry = json.loads(text)
            if not isinstance(entry, dict):
                raise ValueError
            chain_id, seq, prev, digest = entry["chain"], entry["seq"], entry["prev"], entry.pop("hash")
            if not (isinstance(chain_id, str) and type(seq) is int and isinstance(prev, str)):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            problems.append((index, f"{location}: not an audit entry (changed, truncated or not JSON)"))
            continue
        if hashlib.sha256(canonical(entry)).hexdigest() != digest:
            problems.append(
                (
                    index,
                    f"{location} (chain {chain_id}, seq {seq}): changed: its hash does not match its content",
                )
            )
        chains.setdefault(chain_id, _ChainState()).entries.append((location, seq, prev, str(digest)))
    report.chains = len(chains)
    for chain_id, state in chains.items():
        problem = _check_chain(chain_id, state)
        if problem is not None:
            problems.append((order[problem[0]], problem[1]))
    problems.sort(key=lambda item: item[0])
    report.problems = len(problems)
    if problems:
        report.problem = problems[0][1]
    return report


def _check_chain(chain_id: str, state: _ChainState) -> tuple[str, str] | None:
    """The first break in one chain: (location, message)."""
    where = {seq: location for location, seq, _, _ in state.entries}
    expected, previous_hash, previous_location = 1, GENESIS, None
    for location, seq, prev, digest in state.entries:
        name = f"{location} (chain {chain_id}, seq {seq})"
        if seq != expected:
            after = f"after seq {expected - 1} at {previous_location}" if previous_location else "first"
            if expected in where and where[expected] != location:
                return location, (
                    f"{name}: reordered: it comes {after}, but seq {expected} is at {where[expected]}"
                )
            if seq < expected:
                return location, f"{name}: duplicated or reordered: it comes {after}"
            missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected} to {seq - 1}"
            if previous_location is None:
                return location, f"{name}: {missing} of this chain removed before it (the chain starts here)"
            return location, f"{name}: {missing} removed between {previous_location} and here"
        if prev != previous_hash:
            return location, f"{name}: its prev does not match the entry before it: that entry was replaced"
        expected, previous_hash, previous_location = seq + 1, digest, location
    return None
