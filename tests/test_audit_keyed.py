"""The keyed audit trail against real `keyconnector serve` processes, on SQLite and PostgreSQL.

Each attack is shown twice: what a verifier of the old, plain SHA-256 chain would have said (it
accepts the tampered trail), and what `keyconnector audit verify` says now (it names the problem).
The attacker has the file or the table, never the key pair: recomputing a chain, cutting its tail,
emptying it, forging a chain, or adding unkeyed entries to an adopted trail.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from keyconnector.audit import AuditEntry, AuditTrail
from keyconnector.audit.chain import FORMAT, canonical
from keyconnector.audit.sink import HOLD
from keyconnector.audit.sinks.file import LineSink
from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service, base_env
from tests.support.backends import Backend, make_backend

StartService = Callable[..., Service]
DATABASES = ["sqlite", "postgresql"]
ANCHOR = re.compile(r"kc-audit-anchor:1:\S+")


# -- a deployment, its trail and the command ------------------------------------------------------------


def _env(issuer: DevIssuer, pfx: Pfx, backend: Backend, **audit: str) -> dict[str, str]:
    env = base_env(issuer, pfx, backend.folder / "kc.db")
    for name, value in backend.plain.items():
        env[f"keyConnectorSettings__database__{name}"] = value
    for name, value in audit.items():
        env[f"keyConnectorSettings__audit__{name}"] = value
    return env


def _verify(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", "audit", "verify", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _fails(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "NOT VERIFIED" in result.stdout, out
    for text in expected:
        assert text in result.stdout, f"{text!r} not in:\n{out}"


def _passes(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    for text in expected:
        assert text in result.stdout, f"{text!r} not in:\n{out}"


def _requests(service: Service, issuer: DevIssuer, count: int, *, parallel: int = 1) -> None:
    tokens = [token for _, token in issuer.mint_many(count)]

    def get(token: str) -> int:
        with service.client() as client:  # a connection each, so every worker gets requests
            return client.get("/user-keys", headers={"Authorization": f"Bearer {token}"}).status_code

    with ThreadPoolExecutor(parallel) as pool:
        assert set(pool.map(get, tokens)) == {404}


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def _requests_in(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry.get("method")]


def _rows(backend: Backend) -> list[tuple[int, str]]:
    return [(int(i), str(e)) for i, e in backend.sql("SELECT id, entry FROM keyconnector_audit ORDER BY id")]


def _wait(what: str, condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _settled(trail: Path, backend: Backend, quiet: float = 2.5) -> None:
    """Wait until neither sink has changed for ``quiet`` seconds: every entry inserted, and the
    checkpoints of the last ones written (a checkpoint is due only when a chain moved)."""
    seen: tuple[int, int] = (-1, -1)
    since = time.monotonic()
    deadline = since + 30
    while time.monotonic() < deadline:
        now = (len(_lines(trail)), len(_rows(backend)))
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)
    raise AssertionError("the audit sinks kept changing")


def _checkpoints(texts: list[str], sink: str) -> list[dict[str, Any]]:
    found = []
    for text in texts:
        entry = json.loads(text)
        if entry.get("outcome") == "checkpoint" and entry["checkpoint"]["sink"] == sink:
            found.append(entry["checkpoint"])
    return found


def _anchors(service: Service) -> list[str]:
    return ANCHOR.findall(service.logs())


# -- the old algorithm, and an attacker's tools ---------------------------------------------------------


def _line(entry: dict[str, Any], field: str, link: str) -> str:
    return canonical(entry)[:-1].decode() + f',"{field}":"{link}"}}'


def legacy_line(fields: dict[str, Any], chain: str, seq: int, prev: str) -> tuple[str, str]:
    """An entry as keyconnector wrote it before entries were keyed: SHA-256 over the canonical JSON."""
    entry = {name: value for name, value in fields.items() if name not in ("hash", "mac", "v")}
    entry.update(chain=chain, seq=seq, prev=prev)
    digest = hashlib.sha256(canonical(entry)).hexdigest()
    return _line(entry, "hash", digest), digest


def legacy_chain(chain: str, count: int) -> list[str]:
    lines, prev = [], "0" * 64
    for seq in range(1, count + 1):
        fields = {
            "time": f"2026-01-01T00:00:{seq:02d}.000000Z",
            "user": str(uuid.uuid4()),
            "client": "10.0.0.7",
            "clientName": "web",
            "method": "GET",
            "outcome": "read",
            "status": 200,
            "requestId": uuid.uuid4().hex,
        }
        line, prev = legacy_line(fields, chain, seq, prev)
        lines.append(line)
    return lines


def unkeyed_verifier_accepts(lines: list[str], field: str) -> bool:
    """What the old `audit verify` checked: per chain, seq from 1, ``prev`` links, and each link the
    plain SHA-256 of the entry (the link read from ``field``)."""
    heads: dict[str, tuple[int, str]] = {}
    for line in lines:
        entry = json.loads(line)
        link = entry.pop(field)
        seq, prev = heads.get(entry["chain"], (0, "0" * 64))
        if entry["seq"] != seq + 1 or entry["prev"] != prev:
            return False
        if hashlib.sha256(canonical(entry)).hexdigest() != link:
            return False
        heads[entry["chain"]] = (entry["seq"], link)
    return True


def rechain(lines: list[str], start: int, seal: Callable[[bytes], str], field: str = "mac") -> list[str]:
    """Recompute every chain from line ``start`` on with ``seal`` (what an attacker without the key can
    do), keeping each entry's content; the result is written with its link in ``field``."""
    out: list[str] = []
    heads: dict[str, str] = {}
    for index, line in enumerate(lines):
        entry = json.loads(line)
        link = entry.pop("mac", None) or entry.pop("hash")
        if index >= start:
            entry["prev"] = heads.get(entry["chain"], entry["prev"])
            if field == "hash":
                entry.pop("v", None)
            link = seal(canonical(entry))
            line = _line(entry, field, link)
        heads[entry["chain"]] = link
        out.append(line)
    return out


def sha256_seal(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def guessed_key_seal(pfx: Pfx) -> Callable[[bytes], str]:
    """An HMAC under a key the attacker can compute: from the (public) certificate file."""
    guess = hashlib.sha256(pfx.path.read_bytes()).digest()
    return lambda body: hmac.new(guess, body, hashlib.sha256).hexdigest()


# -- the normal path ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATABASES)
def test_both_sinks_workers_and_a_restart_verify(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_service: StartService,
    issuer: DevIssuer,
    pfx: Pfx,
) -> None:
    backend = make_backend(name, tmp_path, request)
    trail = tmp_path / "audit.jsonl"
    env = _env(issuer, pfx, backend, file=str(trail), database="true", checkpointSeconds="0.5")
    first = start_service(env, workers=2)
    _requests(first, issuer, 40, parallel=8)
    _wait(
        "the table's checkpoints of the file",
        lambda: bool(_checkpoints([e for _, e in _rows(backend)], "file")),
    )
    first.stop()
    second = start_service(env, workers=2)
    _requests(second, issuer, 20, parallel=4)

    entries = [json.loads(line) for line in _lines(trail)]
    assert all(entry["v"] == FORMAT and "mac" in entry and "hash" not in entry for entry in entries)
    assert len(_requests_in(entries)) == 60
    assert (
        len({entry["chain"] for entry in _requests_in(entries)}) >= 3
    )  # two workers, then at least one more

    # While the second service runs: everything verifies, against the other sink's checkpoints.
    _passes(_verify(env, "--file", str(trail)), "newest checkpoint", "in the table keyconnector_audit")
    _wait(
        "the table to hold every request",
        lambda: len(_requests_in([json.loads(e) for _, e in _rows(backend)])) == 60,
    )
    _passes(_verify(env, "--database"), "newest checkpoint", f"in {trail}")

    second.stop()
    # The stop wrote a last checkpoint of each chain into the other sink and logged its anchor.
    anchors = _anchors(first) + _anchors(second)
    assert any(":file:" in token for token in anchors) and any(":database:" in token for token in anchors)
    assert "ends at seq" in second.logs()
    file_anchors = [token for token in anchors if ":file:" in token]
    result = _verify(env, *[arg for token in file_anchors for arg in ("--anchor", token)])
    _passes(result, f"audit trail {trail}: verified", "keyed:")
    _passes(_verify(env, "--database"), "verified")
    table = _rows(backend)
    assert len(_requests_in([json.loads(e) for _, e in table])) == 60


# -- (a) an edited entry, the chain recomputed ----------------------------------------------------------


def test_an_edited_entry_with_a_recomputed_chain_is_found(
    tmp_path: Path, request: pytest.FixtureRequest, start_service: StartService, issuer: DevIssuer, pfx: Pfx
) -> None:
    backend = make_backend("sqlite", tmp_path, request)
    trail = tmp_path / "audit.jsonl"
    env = _env(issuer, pfx, backend, file=str(trail))
    service = start_service(env)
    _requests(service, issuer, 8)
    lines = _lines(trail)
    assert len(lines) == 8
    edited = list(lines)
    edited[2] = (
        edited[2].replace('"outcome":"not_found"', '"outcome":"read"').replace('"status":404', '"status":200')
    )
    copy = tmp_path / "copy.jsonl"

    def check(tampered: list[str], *expected: str) -> None:
        copy.write_text("\n".join(tampered) + "\n")
        _fails(_verify(env, "--file", str(copy)), *expected)

    # Plain SHA-256 in place of the MAC over the whole trail: a consistent hash chain, which the old
    # verifier accepted; and from the edited entry on only.
    plain = rechain(edited, 0, sha256_seal)
    assert unkeyed_verifier_accepts(plain, "mac")
    check(plain, "line 1 (chain", "seq 1)", "MAC does not verify", "(7 more problem(s) after it)")
    check(rechain(edited, 2, sha256_seal), "line 3 (chain", "seq 3)", "MAC does not verify")
    # HMAC under a key the attacker could guess.
    check(rechain(edited, 2, guessed_key_seal(pfx)), "line 3", "MAC does not verify")
    # The whole trail rewritten in the old, unkeyed format: a valid old trail, but not an adopted one.
    old_format = rechain(edited, 0, sha256_seal, field="hash")
    assert unkeyed_verifier_accepts(old_format, "hash")
    check(old_format, "line 1", "no adoption record covers")
    # The service's own trail still verifies.
    _passes(_verify(env, "--file", str(trail)), "verified 8 entries in 1 chain(s)")


@pytest.mark.parametrize("name", DATABASES)
def test_an_edited_row_with_a_recomputed_chain_is_found(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_service: StartService,
    issuer: DevIssuer,
    pfx: Pfx,
) -> None:
    backend = make_backend(name, tmp_path, request)
    env = _env(issuer, pfx, backend, database="true")
    service = start_service(env)
    _requests(service, issuer, 6)
    _wait("six rows", lambda: len(_rows(backend)) == 6)
    rows = _rows(backend)
    texts = [text for _, text in rows]
    texts[1] = texts[1].replace('"outcome":"not_found"', '"outcome":"read"')
    tampered = rechain(texts, 0, sha256_seal)
    assert unkeyed_verifier_accepts(tampered, "mac")
    for (row_id, _), text in zip(rows, tampered, strict=True):
        entry = json.loads(text)
        backend.sql(
            "UPDATE keyconnector_audit SET entry = ?, hash = ?, outcome = ? WHERE id = ?",
            (text, entry["mac"], entry["outcome"], row_id),
        )
    _fails(_verify(env, "--database"), f"row id {rows[0][0]} (chain", "MAC does not verify")


# -- (b) the tail cut after a checkpoint ----------------------------------------------------------------


@pytest.mark.parametrize("name", DATABASES)
def test_a_cut_tail_is_found_by_the_other_sinks_checkpoint(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_service: StartService,
    issuer: DevIssuer,
    pfx: Pfx,
) -> None:
    backend = make_backend(name, tmp_path, request)
    trail = tmp_path / "audit.jsonl"
    env = _env(issuer, pfx, backend, file=str(trail), database="true", checkpointSeconds="0.5")
    service = start_service(env)
    _requests(service, issuer, 10)
    _settled(trail, backend)
    _wait(
        "a checkpoint of the file at seq 10 in the table",
        lambda: any(c["seq"] >= 10 for c in _checkpoints([e for _, e in _rows(backend)], "file")),
    )
    _wait(
        "a checkpoint of the table in the file",
        lambda: any(c["seq"] >= 10 for c in _checkpoints(_lines(trail), "database")),
    )
    requests_only = [line for line in _lines(trail) if '"method":"GET"' in line]
    assert len(requests_only) == 10

    # The file cut after its 6th entry, while the service runs: what is left is a valid prefix.
    whole = _lines(trail)
    trail.write_text("\n".join(whole[:6]) + "\n")
    without_table = dict(env, keyConnectorSettings__audit__database="false")
    _passes(
        _verify(without_table, "--file", str(trail)), "verified 6 entries", "no checkpoint of this trail seen"
    )
    _fails(
        _verify(env, "--file", str(trail)),
        "line 6",
        "the chain ends here",
        "in the table keyconnector_audit",
        "were removed",
    )
    # --host keeps only the checkpoints written on the hosts named (several hosts sharing one table):
    # leaving this one out leaves nothing to compare with.
    _passes(
        _verify(env, "--file", str(trail), "--host", "some-other-host"), "no checkpoint of this trail seen"
    )

    # The table cut instead (the file intact): the file's checkpoint of the table's chain shows it.
    trail.write_text("\n".join(whole) + "\n")
    rows = _rows(backend)
    backend.sql("DELETE FROM keyconnector_audit WHERE id > ?", (rows[4][0],))
    _fails(_verify(env, "--database"), f"row id {rows[4][0]}", "the chain ends here", f"in {trail}")


def test_a_cut_tail_is_found_with_an_anchor_from_the_log(
    tmp_path: Path, request: pytest.FixtureRequest, start_service: StartService, issuer: DevIssuer, pfx: Pfx
) -> None:
    backend = make_backend("sqlite", tmp_path, request)
    trail = tmp_path / "audit.jsonl"
    env = _env(issuer, pfx, backend, file=str(trail), checkpointSeconds="0.5")
    service = start_service(env)
    _requests(service, issuer, 10)
    _wait(
        "an anchor at seq 10 in the service log", lambda: any(":10:" in token for token in _anchors(service))
    )
    (token,) = [token for token in _anchors(service) if ":10:" in token]
    assert token.startswith("kc-audit-anchor:1:file:")

    trail.write_text("\n".join(_lines(trail)[:6]) + "\n")
    _passes(_verify(env), "verified 6 entries", "no checkpoint of this trail seen")
    _fails(_verify(env, "--anchor", token), "line 6", "the chain ends here", "--anchor", "seq 10")

    # A token the attacker made up (or mistyped) is refused, not trusted.
    forged = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
    refused = _verify(env, "--anchor", forged)
    assert (
        refused.returncode == 2 and "--anchor" in refused.stderr and "tag does not verify" in refused.stderr
    )


# -- (c) the file emptied -------------------------------------------------------------------------------


def test_an_emptied_file_is_found(
    tmp_path: Path, request: pytest.FixtureRequest, start_service: StartService, issuer: DevIssuer, pfx: Pfx
) -> None:
    backend = make_backend("sqlite", tmp_path, request)
    trail = tmp_path / "audit.jsonl"
    env = _env(issuer, pfx, backend, file=str(trail), checkpointSeconds="0.5")
    service = start_service(env)
    _requests(service, issuer, 5)
    _wait("an anchor at seq 5", lambda: any(":5:" in token for token in _anchors(service)))
    (token,) = [token for token in _anchors(service) if ":5:" in token]
    chain = json.loads(_lines(trail)[0])["chain"]
    trail.write_text("")

    _passes(_verify(env), "verified 0 entries", "no checkpoint of this trail seen")
    _fails(_verify(env, "--anchor", token), "the trail is empty", f"chain {chain} reached seq 5")
    _fails(_verify(env, "--expect-seq", "5"), "0 keyed entries, fewer than --expect-seq 5")
    _fails(_verify(env, "--expect-seq", f"{chain}:5"), f"chain {chain} is not in the trail")


@pytest.mark.parametrize("name", DATABASES)
def test_an_emptied_file_is_found_by_the_tables_checkpoint(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_service: StartService,
    issuer: DevIssuer,
    pfx: Pfx,
) -> None:
    backend = make_backend(name, tmp_path, request)
    trail = tmp_path / "audit.jsonl"
    env = _env(issuer, pfx, backend, file=str(trail), database="true", checkpointSeconds="0.5")
    service = start_service(env)
    _requests(service, issuer, 5)
    _wait("a checkpoint of the file", lambda: bool(_checkpoints([e for _, e in _rows(backend)], "file")))
    # Emptied while the service runs: its next entry starts the file again, at a seq that shows
    # what is gone.
    trail.write_text("")
    _requests(service, issuer, 1)
    _fails(_verify(env, "--file", str(trail)), "line 1", "removed before it")
    service.stop()
    # Emptied after the stop: the table's checkpoints say what the file held.
    whole = _lines(trail)
    trail.write_text("")
    _fails(_verify(env, "--file", str(trail)), "the trail is empty", "in the table keyconnector_audit")
    # The table emptied instead (the file intact): the file's checkpoint of the table shows it.
    trail.write_text("\n".join(whole) + "\n")
    assert _checkpoints(whole, "database")
    backend.sql("DELETE FROM keyconnector_audit")
    _fails(_verify(env, "--database"), "the trail is empty", f"in {trail}")


# -- (d) a forged extra chain ---------------------------------------------------------------------------


def _forged_chain(seal: Callable[[bytes], str], field: str, count: int = 3) -> list[str]:
    lines = legacy_chain("attacker-1-deadbeef", count)
    return rechain(lines, 0, seal, field=field) if field == "mac" else lines


def _with_version(lines: list[str]) -> list[str]:
    """Entries that claim to be keyed (``"v": 2``), linked under the attacker's own seal."""
    out = []
    for line in lines:
        entry = json.loads(line)
        entry.pop("hash")
        entry["v"] = FORMAT
        out.append(_line(entry, "mac", "0" * 64))
    return out


@pytest.mark.parametrize("name", DATABASES)
def test_a_forged_extra_chain_is_found(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_service: StartService,
    issuer: DevIssuer,
    pfx: Pfx,
) -> None:
    backend = make_backend(name, tmp_path, request)
    trail = tmp_path / "audit.jsonl"
    env = _env(issuer, pfx, backend, file=str(trail), database="true")
    service = start_service(env)
    _requests(service, issuer, 4)
    _wait("four rows", lambda: len(_rows(backend)) == 4)
    keyed_forgery = rechain(_with_version(legacy_chain("attacker-1-deadbeef", 3)), 0, guessed_key_seal(pfx))
    unkeyed_forgery = legacy_chain("attacker-2-feedface", 3)
    assert unkeyed_verifier_accepts(unkeyed_forgery, "hash")
    assert unkeyed_verifier_accepts(rechain(keyed_forgery, 0, sha256_seal), "mac")

    copy = tmp_path / "forged.jsonl"
    copy.write_text("\n".join(_lines(trail) + keyed_forgery) + "\n")
    _fails(
        _verify(env, "--file", str(copy)), "line 5 (chain attacker-1-deadbeef, seq 1)", "MAC does not verify"
    )
    copy.write_text("\n".join(_lines(trail) + unkeyed_forgery) + "\n")
    _fails(
        _verify(env, "--file", str(copy)), "line 5 (chain attacker-2-feedface", "no adoption record covers"
    )

    for text in keyed_forgery:
        entry = json.loads(text)
        backend.sql(
            "INSERT INTO keyconnector_audit (chain, seq, time, user_id, outcome, status, entry, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry["chain"],
                entry["seq"],
                entry["time"],
                entry["user"],
                entry["outcome"],
                200,
                text,
                entry["mac"],
            ),
        )
    first_forged = _rows(backend)[4][0]
    _fails(
        _verify(env, "--database"), f"row id {first_forged} (chain attacker-1-deadbeef", "MAC does not verify"
    )


# -- (e) a trail written before this version ------------------------------------------------------------


@pytest.mark.parametrize("name", DATABASES)
def test_a_pre_change_trail_is_adopted_once(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_service: StartService,
    issuer: DevIssuer,
    pfx: Pfx,
) -> None:
    backend = make_backend(name, tmp_path, request)
    trail = tmp_path / "audit.jsonl"
    # A deployment that ran before audit entries were keyed: its schema and key ring exist, its trail
    # (file and table) holds entries chained with plain SHA-256, by two worker processes.
    start_service(_env(issuer, pfx, backend)).stop()
    old_a, old_b = legacy_chain("oldhost-100-aaaaaaaa", 5), legacy_chain("oldhost-101-bbbbbbbb", 3)
    old = [line for pair in zip(old_a, [*old_b, "", ""], strict=True) for line in pair if line]
    trail.write_text("\n".join(old) + "\n")
    for text in old:
        entry = json.loads(text)
        backend.sql(
            "INSERT INTO keyconnector_audit (chain, seq, time, user_id, outcome, status, entry, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry["chain"],
                entry["seq"],
                entry["time"],
                entry["user"],
                entry["outcome"],
                200,
                text,
                entry["hash"],
            ),
        )
    assert unkeyed_verifier_accepts(old, "hash")

    env = _env(issuer, pfx, backend, file=str(trail), database="true", checkpointSeconds="0.5")
    service = start_service(env, workers=2)
    _requests(service, issuer, 6, parallel=2)
    _wait(
        "the table to hold the new entries",
        lambda: len(_requests_in([json.loads(e) for _, e in _rows(backend)])) == 14,
    )
    assert "adopted 8 unkeyed entries in 2 chain(s)" in service.logs()
    adopted = "adopted: 8 unkeyed entries"
    _passes(_verify(env, "--file", str(trail)), adopted)
    _passes(_verify(env, "--database"), adopted)
    records = [json.loads(line) for line in _lines(trail) if '"outcome":"adopted"' in line]
    assert records and all(
        {(c["chain"], c["seq"]) for c in r["adopted"]["chains"]}
        == {("oldhost-100-aaaaaaaa", 5), ("oldhost-101-bbbbbbbb", 3)}
        for r in records
    )

    # After the adoption, an unkeyed entry is what someone without the key writes: each kind fails.
    copy = tmp_path / "copy.jsonl"
    head = json.loads(old_a[-1])["hash"]
    continued, _ = legacy_line(
        json.loads(old_a[0]) | {"time": "2026-01-02T00:00:00.000000Z"}, "oldhost-100-aaaaaaaa", 6, head
    )
    copy.write_text("\n".join([*_lines(trail), continued]) + "\n")
    _fails(_verify(env, "--file", str(copy)), "seq 6): an unkeyed entry beyond seq 5")
    copy.write_text("\n".join([*_lines(trail), *legacy_chain("oldhost-102-cccccccc", 2)]) + "\n")
    _fails(_verify(env, "--file", str(copy)), "chain oldhost-102-cccccccc", "no adoption record covers")
    # An adopted entry edited and its old chain recomputed: the head no longer is the one adopted.
    lines = _lines(trail)
    where = lines.index(old_a[1])
    lines[where] = lines[where].replace('"outcome":"read"', '"outcome":"not_found"')
    unkeyed_part = rechain([line for line in lines if '"v":' not in line], 0, sha256_seal, field="hash")
    assert unkeyed_verifier_accepts(unkeyed_part, "hash")
    rewritten = iter(unkeyed_part)
    copy.write_text("\n".join(line if '"v":' in line else next(rewritten) for line in lines) + "\n")
    _fails(_verify(env, "--file", str(copy)), "not the entry that was adopted")

    # In the table: an unkeyed row added now fails, and a restart does not adopt it (adoption is once).
    extra, _ = legacy_line(json.loads(old_b[0]), "oldhost-103-dddddddd", 1, "0" * 64)
    entry = json.loads(extra)
    backend.sql(
        "INSERT INTO keyconnector_audit (chain, seq, time, user_id, outcome, status, entry, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (entry["chain"], 1, entry["time"], entry["user"], entry["outcome"], 200, extra, entry["hash"]),
    )
    service.stop()
    again = start_service(env)
    _requests(again, issuer, 2)
    assert "adopted" not in again.logs()
    _fails(_verify(env, "--database"), "chain oldhost-103-dddddddd", "no adoption record covers")
    _passes(_verify(env, "--file", str(trail)), adopted)


# -- entries wait for the key ---------------------------------------------------------------------------


def test_entries_recorded_before_the_key_wait_for_it_in_order(tmp_path: Path) -> None:
    """The data key (and with it the audit key) may load late: entries are held, never written
    unkeyed, and written in order once the key is known; beyond the bound they count as failures."""
    path = tmp_path / "audit.jsonl"

    async def scenario() -> None:
        sink = LineSink("file", "host-1-cafe", path=str(path))
        trail = AuditTrail([sink], checkpoint_seconds=3600)
        await trail.start()
        for number in range(3):
            assert trail.record(
                AuditEntry(
                    user=None,
                    client="10.0.0.1",
                    client_name=None,
                    method="GET",
                    outcome="unavailable",
                    status=503,
                    request_id=str(number),
                )
            )
        assert not trail.can_record() and path.read_text() == ""
        trail.set_key(os.urandom(32))
        for _ in range(100):
            if trail.can_record():
                break
            await asyncio.sleep(0.01)
        assert trail.can_record()
        trail.record(
            AuditEntry(
                user=None,
                client=None,
                client_name=None,
                method="GET",
                outcome="read",
                status=200,
                request_id="3",
            )
        )
        await trail.aclose()

    asyncio.run(scenario())
    entries = [json.loads(line) for line in _lines(path)]
    assert [entry["requestId"] for entry in entries] == ["0", "1", "2", "3"]
    assert [entry["seq"] for entry in entries] == [1, 2, 3, 4]
    assert all(entry["v"] == FORMAT for entry in entries)

    sink = LineSink("file", "host-2-cafe", path=str(tmp_path / "never.jsonl"))
    results = [sink.write({"time": "t", "outcome": "read", "status": 200}) for _ in range(HOLD + 2)]
    assert results.count(False) == 2 and sink.failures == 2
    sink.drop_held()  # the key never came: every held entry is lost, and counted
    assert sink.failures == HOLD + 2
    assert (tmp_path / "never.jsonl").read_text() == ""
