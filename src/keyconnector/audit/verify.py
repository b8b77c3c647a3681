"""Verifying an audit trail (``keyconnector audit verify``): its MACs, its chains, and the checkpoints
the verifier can see.

What one run checks, given the entries of one sink (a file or the table) and the audit key:

- every keyed entry's MAC (an edited entry, a chain recomputed with plain SHA-256 or with a guessed
  key, a forged extra chain: none of them verifies), and each chain's links: ``seq`` from 1 without
  a gap, ``prev`` equal to the previous entry's MAC; a break is told apart as removed (the missing
  seq is nowhere) or reordered (it is elsewhere), with where it is;
- unkeyed (format 1) entries only as far as an adoption record covers them: their hashes and links,
  and each adopted chain's head exactly as the record names it. Any other unkeyed entry is what
  someone without the key can write, and fails;
- the checkpoints of this sink that the caller found (in the other sink, or ``--anchor`` tokens from
  the service log): a checkpointed chain must be there and reach the checkpoint's seq with the same
  MAC; an empty trail with a checkpoint fails;
- ``--expect-seq`` (``Expectation``): at least N keyed entries in all, or chain C up to seq N.

What it cannot see is in the README: entries removed after the newest checkpoint it was given, and
anything done by someone who also holds the key pair (and so can derive the audit key).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from keyconnector.audit.chain import (
    ADOPTED,
    CHECKPOINT,
    FORMAT,
    GENESIS,
    Checkpoint,
    Mac,
    canonical,
    legacy_hash,
)


@dataclass(frozen=True)
class Expectation:
    """``--expect-seq``: ``chain`` None for "at least ``seq`` keyed entries in the whole trail"."""

    chain: str | None
    seq: int

    @classmethod
    def parse(cls, text: str) -> Expectation:
        chain, _, number = text.rpartition(":")
        if not number.isdigit() or int(number) < 1:
            raise ValueError("expected N or CHAIN:N, N a positive number")
        return cls(chain or None, int(number))

    def describe(self) -> str:
        return f"--expect-seq {self.chain + ':' if self.chain else ''}{self.seq}"


@dataclass
class Report:
    """What ``verify`` found: counts, the newest checkpoint seen, and the first problem (None when
    everything verifies)."""

    entries: int = 0
    chains: int = 0
    keyed: int = 0
    adopted: int = 0
    """Unkeyed entries, covered by an adoption record (when the report has no problem)."""
    checkpoints: int = 0
    """Chains checked against a checkpoint."""
    newest: tuple[str, Checkpoint] | None = None
    """The newest checkpoint of this sink seen, and where it was found."""
    problem: str | None = None
    problems: int = 0


@dataclass
class _Chain:
    entries: list[tuple[str, int, str, str]] = field(default_factory=list)
    """(location, seq, prev, MAC or hash) in the order found."""

    def by_seq(self) -> dict[int, tuple[str, str]]:
        return {seq: (location, link) for location, seq, _, link in self.entries}


@dataclass
class _Claim:
    digest: str
    location: str
    index: int


def _parse(text: str) -> tuple[dict[str, Any], Any, str, str, int, str]:
    """(entry without its MAC or hash, format, MAC or hash, chain, seq, prev); ValueError otherwise."""
    try:
        entry = json.loads(text)
        if not isinstance(entry, dict):
            raise ValueError
        version = entry.get("v")
        link = entry.pop("hash" if version is None else "mac")
        chain_id, seq, prev = entry["chain"], entry["seq"], entry["prev"]
    except (ValueError, KeyError, TypeError):
        raise ValueError from None
    if not (
        isinstance(chain_id, str) and type(seq) is int and isinstance(prev, str) and isinstance(link, str)
    ):
        raise ValueError
    return entry, version, link, chain_id, seq, prev


def checkpoints_in(items: Iterable[tuple[str, str]], mac: Mac) -> tuple[list[Checkpoint], int]:
    """The checkpoints another sink holds whose entry and tag verify, and how many others it holds
    (shown to the operator: they are ignored, never trusted)."""
    found: list[Checkpoint] = []
    refused = 0
    for _, text in items:
        if f'"outcome":"{CHECKPOINT}"' not in text:
            continue
        try:
            entry, version, link, *_ = _parse(text)
            checkpoint = Checkpoint.from_fields(entry["checkpoint"])
        except (ValueError, KeyError):
            refused += 1
            continue
        if version == FORMAT and mac.matches(canonical(entry), link) and checkpoint.authentic(mac):
            found.append(checkpoint)
        else:
            refused += 1
    return found, refused


def verify(
    items: Iterable[tuple[str, str]],
    mac: Mac,
    *,
    sink: str,
    checkpoints: Iterable[tuple[str, Checkpoint]] = (),
    expect: Iterable[Expectation] = (),
) -> Report:
    """Check the trail in ``items`` (location such as ``line 7``, and the entry's JSON text), one sink
    named ``sink``, against ``checkpoints`` (where each was found, and the checkpoint; those of other
    sinks are skipped) and ``expect``.

    Reports the first problem in the order found (problems of the trail as a whole, found against a
    checkpoint or an expectation, after those of single entries).
    """
    report = Report()
    keyed: dict[str, _Chain] = {}
    unkeyed: dict[str, _Chain] = {}
    claims: dict[str, dict[int, _Claim]] = {}
    order: dict[str, int] = {}
    problems: list[tuple[int, str]] = []
    for index, (location, text) in enumerate(items):
        order[location] = index
        report.entries += 1
        try:
            entry, version, link, chain_id, seq, prev = _parse(text)
        except ValueError:
            problems.append((index, f"{location}: not an audit entry (changed, truncated or not JSON)"))
            continue
        name = f"{location} (chain {chain_id}, seq {seq})"
        if version is None:
            if legacy_hash(entry) != link:
                problems.append((index, f"{name}: changed: its hash does not match its content"))
            unkeyed.setdefault(chain_id, _Chain()).entries.append((location, seq, prev, link))
            continue
        if version != FORMAT:
            problems.append(
                (index, f"{name}: audit entry format {version!r} is not known to this keyconnector")
            )
            continue
        keyed.setdefault(chain_id, _Chain()).entries.append((location, seq, prev, link))
        report.keyed += 1
        if not mac.matches(canonical(entry), link):
            problems.append(
                (
                    index,
                    f"{name}: its MAC does not verify: changed, or written by someone without the audit key "
                    "(an edited or forged entry, or a chain recomputed without the key)",
                )
            )
        elif entry.get("outcome") == ADOPTED:
            for claim in _claims(entry):
                claims.setdefault(claim[0], {})[claim[1]] = _Claim(claim[2], location, index)
    report.chains = len(keyed.keys() | unkeyed.keys())
    for chains in (keyed, unkeyed):
        for chain_id, state in chains.items():
            problem = _check_chain(chain_id, state)
            if problem is not None:
                problems.append((order[problem[0]], problem[1]))
    problems.extend(_coverage(unkeyed, claims, order, has_keyed=bool(keyed)))
    report.adopted = sum(len(state.entries) for state in unkeyed.values())
    late = len(order)
    for problem_text in _against_checkpoints(report, keyed, [c for c in checkpoints if c[1].sink == sink]):
        problems.append((late, problem_text))
    for expectation in expect:
        unmet = _against_expectation(report, keyed, expectation)
        if unmet is not None:
            problems.append((late, unmet))
    problems.sort(key=lambda item: item[0])
    report.problems = len(problems)
    if problems:
        report.problem = problems[0][1]
    return report


def _claims(entry: dict[str, Any]) -> list[tuple[str, int, str]]:
    """The (chain, seq, hash) heads an adoption record names (a MAC-checked entry: ours)."""
    adopted = entry.get("adopted")
    chains = adopted.get("chains") if isinstance(adopted, dict) else None
    heads: list[tuple[str, int, str]] = []
    for head in chains if isinstance(chains, list) else []:
        if isinstance(head, dict) and type(head.get("seq")) is int:
            heads.append((str(head.get("chain")), head["seq"], str(head.get("hash"))))
    return heads


def _coverage(
    unkeyed: dict[str, _Chain],
    claims: dict[str, dict[int, _Claim]],
    order: dict[str, int],
    *,
    has_keyed: bool,
) -> list[tuple[int, str]]:
    """Unkeyed entries that no adoption record covers, and adopted heads that are not what was adopted."""
    problems: list[tuple[int, str]] = []
    for chain_id, state in unkeyed.items():
        claimed = claims.get(chain_id)
        if not claimed:
            location, seq, _, _ = state.entries[0]
            why = (
                "it was added after this trail was keyed, by someone without the audit key (or by an "
                "instance of an older keyconnector still writing to it)"
                if has_keyed
                else "the trail holds no keyed entry yet: the service adopts these entries when it first "
                "starts with this version"
            )
            problems.append(
                (
                    order[location],
                    f"{location} (chain {chain_id}, seq {seq}): an unkeyed entry (hash-chained, without "
                    f"the audit key) that no adoption record covers: {why}",
                )
            )
            continue
        top = max(claimed)
        for location, seq, _, _ in state.entries:
            if seq > top:
                problems.append(
                    (
                        order[location],
                        f"{location} (chain {chain_id}, seq {seq}): an unkeyed entry beyond seq {top}, where "
                        f"the adoption record at {claimed[top].location} says this chain ended: added "
                        "after the adoption, without the audit key",
                    )
                )
                break
    for chain_id, claimed in claims.items():
        found = unkeyed[chain_id].by_seq() if chain_id in unkeyed else {}
        for seq, claim in sorted(claimed.items()):
            entry = found.get(seq)
            if entry is None:
                problems.append(
                    (
                        claim.index,
                        f"{claim.location}: this adoption record says unkeyed chain {chain_id} reached seq "
                        f"{seq}, but that entry is missing: adopted entries were removed",
                    )
                )
            elif entry[1] != claim.digest:
                problems.append(
                    (
                        order[entry[0]],
                        f"{entry[0]} (chain {chain_id}, seq {seq}): not the entry that was adopted (its "
                        f"hash differs from the adoption record at {claim.location}): adopted entries were "
                        "rewritten",
                    )
                )
    return problems


def _against_checkpoints(
    report: Report, keyed: dict[str, _Chain], checkpoints: list[tuple[str, Checkpoint]]
) -> list[str]:
    newest: dict[str, tuple[str, Checkpoint]] = {}
    for source, checkpoint in checkpoints:
        known = newest.get(checkpoint.chain)
        if known is None or checkpoint.seq > known[1].seq:
            newest[checkpoint.chain] = (source, checkpoint)
        if report.newest is None or (checkpoint.time, checkpoint.seq) > (
            report.newest[1].time,
            report.newest[1].seq,
        ):
            report.newest = (source, checkpoint)
    report.checkpoints = len(newest)
    problems: list[str] = []
    for chain_id, (source, checkpoint) in newest.items():
        said = f"a checkpoint ({source}) says chain {chain_id} reached seq {checkpoint.seq}"
        state = keyed.get(chain_id)
        if state is None:
            if report.entries == 0:
                problems.append(f"the trail is empty, but {said}: it was emptied or replaced")
            else:
                problems.append(
                    f"chain {chain_id} is missing from the trail, but {said}: its entries were removed"
                )
            continue
        by_seq = state.by_seq()
        last = max(by_seq)
        if last < checkpoint.seq:
            problems.append(
                f"{by_seq[last][0]} (chain {chain_id}, seq {last}): the chain ends here, but {said}: its "
                f"newest entries (seq {last + 1} to {checkpoint.seq} at least) were removed"
            )
        elif checkpoint.seq in by_seq and by_seq[checkpoint.seq][1] != checkpoint.mac:
            problems.append(
                f"{by_seq[checkpoint.seq][0]} (chain {chain_id}, seq {checkpoint.seq}): its MAC is not the "
                f"one in the checkpoint ({source}): the entry was replaced"
            )
    return problems


def _against_expectation(report: Report, keyed: dict[str, _Chain], expectation: Expectation) -> str | None:
    if expectation.chain is None:
        if report.keyed < expectation.seq:
            return (
                f"the trail holds {report.keyed} keyed entries, fewer than {expectation.describe()}: "
                "entries were removed (or the expectation is wrong)"
            )
        return None
    state = keyed.get(expectation.chain)
    if state is None:
        return (
            f"chain {expectation.chain} is not in the trail ({expectation.describe()}): its entries were "
            "removed"
        )
    last = max(seq for _, seq, _, _ in state.entries)
    if last < expectation.seq:
        return (
            f"chain {expectation.chain} ends at seq {last}, before {expectation.describe()}: its newest "
            "entries were removed"
        )
    return None


def _check_chain(chain_id: str, state: _Chain) -> tuple[str, str] | None:
    """The first break in one chain: (location, message)."""
    where = {seq: location for location, seq, _, _ in state.entries}
    expected, previous_link, previous_location = 1, GENESIS, None
    for location, seq, prev, link in state.entries:
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
        if prev != previous_link:
            return location, f"{name}: its prev does not match the entry before it: that entry was replaced"
        expected, previous_link, previous_location = seq + 1, link, location
    return None
