"""`keyconnector backup` and `keyconnector restore` on real databases, with a real key pair.

Sources hold a few thousand rows of every kind: upstream's record format (data key version 1),
format 2 (version 2, from a key ring), NULL keys, and dates with microseconds. A backup is restored
into a database of another kind, compared row by row with the source, and read back through a real
`keyconnector serve`. Damaged files are made the two ways that happen: bytes changed or cut off
(age refuses them), and well-encrypted payloads that disagree with their manifest. The SIGKILL test
kills a real `keyconnector restore` process half-way (seen in the target database), then runs it again.

Most commands run in this process through `keyconnector.cli.main` (the same code as the command,
without a second of interpreter start-up each time); settings come from --config files so that
nothing leaks between them through the environment.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyrage
import pytest
from pyrage import x25519

from keyconnector.cli import main
from keyconnector.core.envelope import DataKey, generate_data_key
from keyconnector.core.keyring import ACTIVE, KeyRing, RingVersion, load_ring, now_text, save_ring
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.keypairs.generate import self_signed_pfx
from keyconnector.ops import open_side
from keyconnector.ops.backup import MAC_PURPOSE, PASSPHRASE_ENV
from keyconnector.runtime.settings import load_settings, side_of
from keyconnector.storage.base import UserKeyRecord
from keyconnector.storage.registry import inspect, open_repository
from tests.conftest import Pfx, Service, base_env
from tests.support.backends import Backend, make_backend, run

RECORDS = 2000
BASE_TIME = datetime(2025, 3, 4, 5, 6, 7, 891011)


def invoke(*args: str | Path) -> int:
    """`keyconnector ARGS` in this process; the logging set-up it makes is undone after it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return main([str(arg) for arg in args])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    """`keyconnector ARGS` in this process: the exit code and everything it printed or logged."""
    code = invoke(*args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def write_config(path: Path, backend: Backend, pfx: Pfx) -> Path:
    section = {
        "database": backend.plain,
        "rsaKey": {"provider": "certificate"},
        "certificate": {
            "provider": "filesystem",
            "filesystemPath": str(pfx.path),
            "filesystemPassword": pfx.password,
        },
    }
    path.write_text(json.dumps({"keyConnectorSettings": section}))
    return path


@dataclass
class Source:
    """A populated database and what its users' keys really are (None: a row with a NULL key)."""

    backend: Backend
    config: Path
    keys: dict[uuid.UUID, str | None]
    legacy: list[uuid.UUID]
    format2: list[uuid.UUID]


async def _populate(
    config: Path, count: int
) -> tuple[dict[uuid.UUID, str | None], list[uuid.UUID], list[uuid.UUID]]:
    """Data key version 1 as upstream makes it, a key ring with version 2 current, and rows sealed by both."""
    side = await open_side(side_of(load_settings({}, config).settings))
    try:
        repository, provider = side.repository, side.provider
        raw = generate_data_key()
        ring = side.ring
        wrapped_v1 = await repository.get_wrapped_data_key()
        assert wrapped_v1 is not None
        ring.versions[1].wraps[provider.fingerprint] = wrapped_v1
        wrapped_v2 = base64.b64encode(await provider.wrap(raw)).decode()
        ring.versions[2] = RingVersion(2, ACTIVE, now_text(), {provider.fingerprint: wrapped_v2})
        ring.seal_versions({2: DataKey(raw, 2)})
        ring.current = 2
        ring.accept_legacy = (
            True  # the rows below include upstream-format ones, as a deployment that upgraded
        )
        await save_ring(repository, ring)
        v1, v2 = side.keys.keys[1], DataKey(raw, 2)

        keys: dict[uuid.UUID, str | None] = {}
        legacy: list[uuid.UUID] = []
        format2: list[uuid.UUID] = []
        records: list[UserKeyRecord] = []
        for i in range(count):
            user = uuid.uuid4()
            created = BASE_TIME + timedelta(days=i % 400, microseconds=i)
            stored: str | None = None
            keys[user] = None
            if i % 10:
                key = os.urandom(32)
                keys[user] = base64.b64encode(key).decode()
                if i % 2:
                    stored = v1.seal_legacy(key)
                    legacy.append(user)
                else:
                    stored = v2.seal(key, user)
                    format2.append(user)
            records.append(
                UserKeyRecord(
                    user,
                    stored,
                    created,
                    None if i % 3 else created + timedelta(hours=1, microseconds=17),
                    None if i % 4 == 1 else created + timedelta(days=2, microseconds=3),
                )
            )
        for start in range(0, count, 1000):
            await repository.upsert_records(records[start : start + 1000])
        return keys, legacy, format2
    finally:
        await side.aclose()


def populate(backend: Backend, pfx: Pfx, count: int = RECORDS) -> Source:
    config = write_config(backend.folder / "source.json", backend, pfx)
    keys, legacy, format2 = run(_populate(config, count))
    return Source(backend, config, keys, legacy, format2)


def ring_content(document: str | None) -> str | None:
    """What a restore keeps of a key ring: all but its revision and MAC (it writes the ring for the
    target's next revision, MACed again under the same authentication key)."""
    if document is None:
        return None
    body = json.loads(document)
    body.pop("revision", None)
    body.pop("mac", None)
    return json.dumps(body, sort_keys=True)


@dataclass(frozen=True)
class Snapshot:
    data_key: str | None
    key_ring: str | None
    """The ring's content (``ring_content``): equal after a restore."""
    rows: dict[uuid.UUID, UserKeyRecord]
    ring_document: str | None = field(default=None, compare=False)
    """The ring exactly as stored: unchanged where nothing may be written."""


def snapshot(backend: Backend) -> Snapshot:
    async def read() -> Snapshot:
        repository = await open_repository(backend.settings)
        try:
            ring = await repository.get_key_ring()
            rows = {r.user_id: r async for batch in repository.iter_records(1000) for r in batch}
            document = None if ring is None else ring.document
            return Snapshot(await repository.get_wrapped_data_key(), ring_content(document), rows, document)
        finally:
            await repository.aclose()

    return run(read())


def authenticated_ring(config: Path) -> KeyRing:
    """The deployment's key ring, authenticated with its key pair (``auth_key`` set)."""

    async def read() -> KeyRing:
        side = await open_side(side_of(load_settings({}, config).settings), create=False)
        try:
            return side.ring
        finally:
            await side.aclose()

    return run(read())


def printed_anchor(output: str) -> str:
    """The anchor `keyconnector backup` prints for the operator to keep."""
    match = re.search(r"key ring anchor ([0-9a-f]{20})", output)
    assert match, output
    return match.group(1)


def new_backend(name: str, folder: Path, request: pytest.FixtureRequest) -> Backend:
    folder.mkdir(parents=True, exist_ok=True)
    return make_backend(name, folder, request)


def identity_file(path: Path) -> tuple[Path, str]:
    identity = x25519.Identity.generate()
    path.write_text(f"# created by the test\n{identity}\n")
    return path, str(identity.to_public())


def service_env(issuer: DevIssuer, pfx: Pfx, backend: Backend) -> dict[str, str]:
    env = base_env(issuer, pfx, backend.folder / "unused.db")
    for name, value in backend.plain.items():
        env[f"keyConnectorSettings__database__{name}"] = value
    return env


def assert_served(service: Service, issuer: DevIssuer, source: Source) -> None:
    """The real service on the restored database answers every sampled user with the original key."""
    nulls = [user for user, key in source.keys.items() if key is None][:3]
    with service.client() as client:
        for user in [*source.legacy[:15], *source.format2[:15], *nulls]:
            response = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})
            if source.keys[user] is None:
                assert response.status_code == 404
            else:
                assert response.status_code == 200, response.text
                assert response.json() == {"key": source.keys[user]}


# -- round trips between database kinds -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_kind", "target_kind", "mode"),
    [
        ("sqlite", "postgresql", "passphrase"),
        ("postgresql", "json", "recipients"),
        ("mariadb", "sqlite", "recipients"),
    ],
    ids=["sqlite-to-postgresql-passphrase", "postgresql-to-json-recipients", "mariadb-to-sqlite-recipients"],
)
def test_round_trip_into_another_kind_of_database(
    source_kind: str,
    target_kind: str,
    mode: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    pfx: Pfx,
    issuer: DevIssuer,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = populate(new_backend(source_kind, tmp_path / "source", request), pfx)
    target = new_backend(target_kind, tmp_path / "target", request)
    target_config = write_config(tmp_path / "target.json", target, pfx)
    original = snapshot(source.backend)
    assert len(original.rows) == RECORDS and original.key_ring is not None
    anchor = authenticated_ring(source.config).anchor
    backup = tmp_path / "kc.backup"
    outputs: list[str] = []
    passphrase = "correct horse battery staple " + uuid.uuid4().hex

    if mode == "passphrase":
        secret = tmp_path / "passphrase.txt"
        secret.write_text(passphrase + "\n")
        code, out = cli(capsys, "backup", "--config", source.config, backup, "--passphrase-file", secret)
        outputs.append(out)
        assert code == 0, out
        assert printed_anchor(out) == anchor

        monkeypatch.setenv(PASSPHRASE_ENV, "not the passphrase")
        code, out = cli(capsys, "restore", "--config", target_config, backup)
        outputs.append(out)
        assert code == 1 and "wrong passphrase" in out, out
        assert not inspect(target.settings).has_schema  # nothing written, not even the tables

        monkeypatch.setenv(PASSPHRASE_ENV, passphrase)
        code, out = cli(capsys, "restore", "--config", target_config, backup)
        # An empty target, no anchor given: the passphrase authenticates the file; the anchor is shown.
        assert f"key ring anchor {anchor} (not compared" in out, out
    else:
        _, first_public = identity_file(tmp_path / "first.txt")
        second, second_public = identity_file(tmp_path / "second.txt")
        code, out = cli(
            capsys,
            "backup",
            "--config",
            source.config,
            backup,
            "--recipient",
            first_public,
            "--recipient",
            second_public,
        )
        outputs.append(out)
        assert code == 0, out
        assert printed_anchor(out) == anchor
        # An empty target and no anchor: a recipients backup could be anyone's. Refused, nothing written.
        code, out = cli(capsys, "restore", "--config", target_config, backup, "--identity", second)
        assert code == 1 and "no anchor was given" in out and "--expect-anchor" in out, out
        assert not inspect(target.settings).has_schema
        code, out = cli(
            capsys,
            "restore",
            "--config",
            target_config,
            backup,
            "--identity",
            second,
            "--expect-anchor",
            anchor,
        )
        assert f"key ring anchor {anchor} (matches --expect-anchor)" in out, out
    outputs.append(out)
    assert code == 0, out
    assert f"{RECORDS:,} records" in out and "identical to the backup" in out
    assert "restart every running `keyconnector serve`" in out

    # The file: private, and no record, user id or wrapped key in it as plaintext.
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    blob = backup.read_bytes()
    legacy, format2 = original.rows[source.legacy[0]], original.rows[source.format2[0]]
    assert legacy.key is not None and format2.key is not None and original.data_key is not None
    for text in (legacy.key, format2.key.rsplit(":", 1)[1], str(legacy.user_id), original.data_key):
        assert text.encode() not in blob
    assert all(passphrase not in out for out in outputs)
    assert passphrase.encode() not in blob

    restored = snapshot(target)
    assert restored == original  # every row, key and date; the data key; the key ring's content
    assert authenticated_ring(target_config).anchor == anchor  # the same deployment, as the service sees it

    service = start_service(service_env(issuer, pfx, target))
    assert_served(service, issuer, source)


# -- one backup for the remaining tests -------------------------------------------------------------------


@dataclass
class Made:
    source: Source
    original: Snapshot
    backup: Path
    identity: Path
    recipient: str
    anchor: str
    """The source's key ring anchor, as the operator keeps it (restore --expect-anchor)."""
    mac_key: bytes
    """The key of the backup's manifest MAC, to make well-authenticated edits (a buggy writer's)."""


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, pfx: Pfx, request: pytest.FixtureRequest) -> Made:
    folder = tmp_path_factory.mktemp("made")
    source = populate(new_backend("sqlite", folder / "source", request), pfx, 3000)
    identity, recipient = identity_file(folder / "identity.txt")
    backup = folder / "kc.backup"
    assert invoke("backup", "--config", source.config, backup, "--recipient", recipient) == 0
    ring = authenticated_ring(source.config)
    return Made(
        source, snapshot(source.backend), backup, identity, recipient, ring.anchor, ring.derive(MAC_PURPOSE)
    )


def restore(
    capsys: pytest.CaptureFixture[str],
    made: Made,
    config: Path,
    backup: Path,
    *extra: str,
    anchor: bool = True,
) -> tuple[int, str]:
    """`keyconnector restore` of a recipients backup; with ``anchor``, giving the source's anchor as the
    operator of an empty target must."""
    expect = ["--expect-anchor", made.anchor] if anchor else []
    return cli(capsys, "restore", "--config", config, backup, "--identity", made.identity, *expect, *extra)


def sqlite_target(tmp_path: Path, pfx: Pfx, request: pytest.FixtureRequest) -> tuple[Backend, Path]:
    target = new_backend("sqlite", tmp_path / "target", request)
    return target, write_config(tmp_path / "target.json", target, pfx)


def reencrypted(made: Made, path: Path, edit: Any) -> Path:
    """The backup with its payload lines edited by ``edit`` and encrypted again, correctly, to its recipient:
    only the manifest can tell."""
    blob = made.backup.read_bytes()
    magic, protection, encrypted = blob.split(b"\n", 2)
    identity = x25519.Identity.from_str(made.identity.read_text().splitlines()[1])
    lines = pyrage.decrypt(encrypted, [identity]).splitlines(keepends=True)
    payload = b"".join(edit(lines))
    path.write_bytes(
        magic
        + b"\n"
        + protection
        + b"\n"
        + pyrage.encrypt(payload, [x25519.Recipient.from_str(made.recipient)])
    )
    return path


def remac(made: Made, manifest: dict[str, Any]) -> None:
    """Give an edited manifest the MAC the source's key ring makes: only a holder of its data key can."""
    body = {name: value for name, value in manifest.items() if name != "mac"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    manifest["mac"] = hmac.new(made.mac_key, canonical, hashlib.sha256).hexdigest()


def test_damaged_files_are_refused_and_nothing_is_written(
    made: Made, tmp_path: Path, pfx: Pfx, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    target, config = sqlite_target(tmp_path, pfx, request)
    blob = made.backup.read_bytes()
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x01
    cases: dict[str, tuple[bytes | Path, str]] = {
        "altered": (bytes(flipped), "damaged or truncated"),
        "truncated": (blob[: len(blob) // 2], "damaged or truncated"),
        "one byte short": (blob[:-1], "damaged or truncated"),
        "not a backup": (b"SQLite format 3\x00" + blob[16:200], "is not a keyconnector backup"),
        "no manifest": (
            reencrypted(made, tmp_path / "a", lambda lines: lines[:-1]),
            "ends before its manifest",
        ),
        "a record dropped": (
            reencrypted(made, tmp_path / "b", lambda lines: lines[:5] + lines[6:]),
            "its manifest lists 3000 records, the file holds 2999",
        ),
        "a date changed": (
            reencrypted(
                made,
                tmp_path / "c",
                lambda lines: [
                    lines[0],
                    lines[1].replace(b'"creationDate":"2', b'"creationDate":"1'),
                    *lines[2:],
                ],
            ),
            "the SHA-256 of its payload differs from its manifest",
        ),
    }
    for name, (content, message) in cases.items():
        path = content if isinstance(content, Path) else tmp_path / "damaged"
        if not isinstance(content, Path):
            path.write_bytes(content)
        code, out = restore(capsys, made, config, path)
        assert code == 1 and message in out, (name, out)
        assert not (target.folder / "kc.db").exists(), name  # refused before the database was opened

    other, _ = identity_file(tmp_path / "other.txt")
    code, out = cli(capsys, "restore", "--config", config, made.backup, "--identity", other)
    assert code == 1 and "none of the given identities can open" in out
    assert not (target.folder / "kc.db").exists()

    # A key pair that cannot unwrap the backup's data keys: refused before anything is written.
    other_pfx = tmp_path / "other.pfx"
    other_pfx.write_bytes(self_signed_pfx("other", bits=2048))
    other_config = write_config(tmp_path / "other.json", target, Pfx(other_pfx, "other"))
    code, out = restore(capsys, made, other_config, made.backup)
    assert code == 1 and "cannot open the backup's data keys" in out and "nothing was written" in out, out
    assert not (target.folder / "kc.db").exists()

    # Checked without writing: --verify-only says the file is whole but that this pair cannot decrypt it.
    code, out = restore(capsys, made, other_config, made.backup, "--verify-only")
    assert code == 0 and "is intact: 3,000 records" in out and "records not decrypted" in out, out
    assert not (target.folder / "kc.db").exists()


def test_verify_only_decrypts_every_record_and_writes_nothing(
    made: Made, tmp_path: Path, pfx: Pfx, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    target, config = sqlite_target(tmp_path, pfx, request)
    nulls = sum(1 for key in made.source.keys.values() if key is None)
    code, out = restore(capsys, made, config, made.backup, "--verify-only")
    assert code == 0, out
    assert f"{3000 - nulls:,} decrypt with the configured key pair, {nulls:,} have no key, 0 fail" in out
    assert f"its manifest's MAC verifies; key ring anchor {made.anchor} (matches --expect-anchor)" in out, out
    assert not (target.folder / "kc.db").exists()

    # Two format-2 records swapped between their users' rows no longer decrypt (they are bound to their
    # user), even in a file whose manifest agrees (as a buggy writer would make it): both are named.
    swapped: list[str] = []

    def swap(lines: list[bytes]) -> list[bytes]:
        records = [json.loads(line) for line in lines[1:-1]]
        first, second = [i for i, r in enumerate(records) if (r["key"] or "").startswith("kc:2:")][:2]
        records[first]["key"], records[second]["key"] = records[second]["key"], records[first]["key"]
        swapped.extend([records[first]["id"], records[second]["id"]])
        edited = [lines[0], *(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)]
        manifest = json.loads(lines[-1])
        manifest["manifest"]["sha256"] = hashlib.sha256(b"".join(edited)).hexdigest()
        digests = sorted(hashlib.sha256(line).digest() for line in edited[1:])
        manifest["manifest"]["recordsSha256"] = hashlib.sha256(b"".join(digests)).hexdigest()
        remac(made, manifest["manifest"])
        return [*edited, json.dumps(manifest).encode() + b"\n"]

    path = reencrypted(made, tmp_path / "swapped", swap)
    code, out = restore(capsys, made, config, path, "--verify-only")
    assert code == 1 and "2 record(s) failed" in out and all(user in out for user in swapped), out
    assert not (target.folder / "kc.db").exists()

    # A restore of that file refuses it before writing anything, naming the same two users.
    code, out = restore(capsys, made, config, path)
    assert code == 1 and "restore refused, nothing was written" in out and "2 record(s) failed" in out, out
    assert all(user in out for user in swapped), out
    assert not (target.folder / "kc.db").exists()


# -- a database in use ------------------------------------------------------------------------------------


async def _seal_rows(config: Path, rows: dict[uuid.UUID, bytes]) -> None:
    """Write rows as the service would (sealed with the database's current data key), now."""
    side = await open_side(side_of(load_settings({}, config).settings))
    try:
        for user, key in rows.items():
            await side.repository.put_key(user, side.keys.seal(key, user), datetime(2026, 1, 1))
    finally:
        await side.aclose()


def test_a_database_in_use_is_refused_unless_replace(
    made: Made, tmp_path: Path, pfx: Pfx, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    # Another deployment: its own data key and one user. Refused, untouched.
    other, other_config = sqlite_target(tmp_path / "other", pfx, request)
    stranger = uuid.uuid4()
    run(_seal_rows(other_config, {stranger: os.urandom(32)}))
    before = snapshot(other)
    code, out = restore(capsys, made, other_config, made.backup)
    assert code == 1 and "already holds another data key" in out and "nothing was written" in out, out
    assert snapshot(other) == before and snapshot(other).ring_document == before.ring_document

    # --replace alone does not make another deployment's backup acceptable: its key ring's anchor is not
    # this database's (a forged backup looks just like that).
    code, out = restore(capsys, made, other_config, made.backup, "--replace", anchor=False)
    assert code == 1 and f"the backup's key ring has anchor {made.anchor}" in out and "--expect-anchor" in out
    assert snapshot(other) == before and snapshot(other).ring_document == before.ring_document

    # --replace with the backup's anchor named writes the backup; the stranger's row is kept but, under the
    # backup's data key, no longer decrypts: the verification names it and the exit code says so.
    code, out = restore(capsys, made, other_config, made.backup, "--replace")
    assert code == 1 and "1 record(s) failed" in out and str(stranger) in out, out
    after = snapshot(other)
    assert after.data_key == made.original.data_key and after.key_ring == made.original.key_ring
    assert {user: after.rows[user] for user in made.original.rows} == made.original.rows

    # The same deployment, used since the backup: a new user, and a user whose key changed.
    same, same_config = sqlite_target(tmp_path / "same", pfx, request)
    assert restore(capsys, made, same_config, made.backup)[0] == 0
    newcomer, changed = uuid.uuid4(), made.source.legacy[0]
    run(_seal_rows(same_config, {newcomer: os.urandom(32), changed: os.urandom(32)}))
    before = snapshot(same)
    code, out = restore(capsys, made, same_config, made.backup, anchor=False)
    assert code == 1 and "already holds 3,001 rows (2 not from this backup)" in out, out
    assert snapshot(same) == before and snapshot(same).ring_document == before.ring_document

    # The same deployment: its own key ring vouches for the backup, no anchor needed.
    code, out = restore(capsys, made, same_config, made.backup, "--replace", anchor=False)
    assert code == 0 and "1 rows of users not in the backup were kept" in out, out
    assert f"key ring anchor {made.anchor} (matches the key ring of the target database (sqlite" in out, out
    after = snapshot(same)
    assert after.rows[changed] == made.original.rows[changed]
    assert after.rows[newcomer] == before.rows[newcomer]
    assert len(after.rows) == 3001


# -- SIGKILL half-way, then again -------------------------------------------------------------------------


def row_count(backend: Backend) -> int | None:
    """Rows in the target right now, or None while it does not exist yet."""
    try:
        if backend.name == "json":
            return len(json.loads((backend.folder / "data.json").read_text())["userKey"])
        return int(backend.sql('SELECT COUNT(*) FROM "UserKeys"')[0][0])
    except Exception:
        return None


@pytest.mark.parametrize("kind", ["sqlite", "json", "postgresql", "mariadb"])
def test_restore_killed_half_way_completes_when_run_again(
    kind: str,
    made: Made,
    tmp_path: Path,
    pfx: Pfx,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = new_backend(kind, tmp_path / "target", request)
    config = write_config(tmp_path / "target.json", target, pfx)
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("keyconnectorsettings")}
    batch = "50" if kind == "json" else "10"  # many small transactions: a wide window to land in
    command = [sys.executable, "-m", "keyconnector", "restore", "--config", str(config), str(made.backup)]
    process = subprocess.Popen(
        [*command, "--identity", str(made.identity), "--expect-anchor", made.anchor, "--batch-size", batch],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            count = row_count(target)
            if count is not None and 1000 <= count < 3000:
                process.send_signal(signal.SIGSTOP)  # freeze it, then look: the count cannot move now
                break
            time.sleep(0.005)
        frozen = row_count(target)
        process.kill()
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, "the restore ended before it could be killed half-way"
    assert frozen is not None and 1000 <= frozen < 3000

    code, out = restore(capsys, made, config, made.backup)
    assert code == 0 and "an interrupted restore" in out and "3,000 records" in out, out
    assert snapshot(target) == made.original  # nothing lost, nothing doubled, nothing changed
    assert row_count(target) == 3000


def start_backup(source: Source, output: Path, recipient: str) -> subprocess.Popen[bytes]:
    """A real `keyconnector backup` process reading 10 rows per query (slow enough to catch in the act)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("keyconnectorsettings")}
    command = ["backup", "--config", str(source.config), str(output), "--recipient", recipient]
    return subprocess.Popen(
        [sys.executable, "-m", "keyconnector", *command, "--batch-size", "10"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for_partial(process: subprocess.Popen[bytes], folder: Path, size: int) -> Path:
    """The backup's temporary file once it holds ``size`` bytes; the process is frozen (SIGSTOP) then."""
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        for partial in folder.glob(".*.partial"):
            if partial.stat().st_size >= size:
                process.send_signal(signal.SIGSTOP)
                return partial
        time.sleep(0.002)
    raise AssertionError("the backup ended before it could be caught in the act")


def test_backup_killed_or_raced_by_a_rotation_leaves_no_backup(
    tmp_path: Path, pfx: Pfx, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    source = populate(new_backend("sqlite", tmp_path / "source", request), pfx, 3000)
    identity, recipient = identity_file(tmp_path / "identity.txt")
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "kc.backup"

    # Killed half-way (a 64 KiB chunk of ~700 KiB is written): no backup, only its temporary file.
    process = start_backup(source, output, recipient)
    partial = wait_for_partial(process, folder, 64 * 1024)
    process.kill()
    process.wait()
    assert not output.exists() and partial.exists()
    code, out = cli(capsys, "backup", "--config", source.config, output, "--recipient", recipient)
    assert code == 0 and "3,000 records" in out, out
    target = new_backend("sqlite", tmp_path / "target", request)
    config = write_config(tmp_path / "target.json", target, pfx)
    code, out = cli(capsys, "restore", "--config", config, output, "--identity", identity, "--verify-only")
    assert code == 0 and "is intact: 3,000 records" in out, out
    output.unlink()
    partial.unlink()

    # The key ring changes while the backup runs (a rotation starting): the backup is refused, as records
    # read after the change may need a data key it does not hold.
    process = start_backup(source, output, recipient)
    wait_for_partial(process, folder, 0)

    async def rotate() -> None:
        side = await open_side(side_of(load_settings({}, source.config).settings))
        try:
            ring = await load_ring(side.repository, side.provider)
            ring.current = 1
            await save_ring(side.repository, ring)
        finally:
            await side.aclose()

    run(rotate())
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1 and b"changed while the backup ran" in stderr, stderr
    assert not output.exists() and not list(folder.iterdir())


# -- the command line -------------------------------------------------------------------------------------


def test_command_line_mistakes(
    made: Made,
    tmp_path: Path,
    pfx: Pfx,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    config = made.source.config
    existing = tmp_path / "existing.backup"
    existing.write_text("keep me")

    code, out = cli(capsys, "backup", "--config", config, existing, "--recipient", made.recipient)
    assert code == 2 and "exists; give --force" in out and existing.read_text() == "keep me"
    code, out = cli(capsys, "backup", "--config", config, existing, "--recipient", made.recipient, "--force")
    assert code == 0 and stat.S_IMODE(existing.stat().st_mode) == 0o600

    fresh = tmp_path / "fresh.backup"
    code, out = cli(capsys, "backup", "--config", config, fresh)  # no secret given, and no terminal to ask on
    assert code == 2 and f"--passphrase-file or set {PASSPHRASE_ENV}" in out and not fresh.exists()
    secret_key = made.identity.read_text().splitlines()[1]  # a secret key given as a recipient by mistake
    code, out = cli(capsys, "backup", "--config", config, fresh, "--recipient", secret_key)
    assert code == 2 and "is not an age X25519 public key" in out and not fresh.exists()
    assert secret_key not in out and secret_key[15:40] not in out
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, out = cli(capsys, "backup", "--config", config, fresh, "--passphrase-file", empty)
    assert code == 2 and "the passphrase is empty" in out and not fresh.exists()

    target, target_config = sqlite_target(tmp_path, pfx, request)
    code, out = cli(capsys, "restore", "--config", target_config, made.backup, "--passphrase-file", empty)
    assert code == 2 and "encrypted to recipient keys" in out
    code, out = cli(capsys, "restore", "--config", target_config, made.backup, "--identity", empty)
    assert code == 2 and "no AGE-SECRET-KEY-1" in out
    secret_line = tmp_path / "mistyped.txt"
    secret_line.write_text("AGE-SECRET-KEY-1MISTYPEDSECRET\n")
    code, out = cli(capsys, "restore", "--config", target_config, made.backup, "--identity", secret_line)
    assert code == 2 and "line 1 of" in out and "MISTYPEDSECRET" not in out
    assert not (target.folder / "kc.db").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def on_a_terminal(args: list[str], dialogue: list[tuple[bytes, str]]) -> tuple[int, str]:
    """Run `keyconnector ARGS` on a pseudo-terminal; after each prompt appears, type its answer (not
    before: getpass flushes what was typed ahead)."""
    env = {k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.execve(sys.executable, [sys.executable, "-m", "keyconnector", *args], env)
    output = b""
    pending = list(dialogue)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 0.5)[0]:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child has gone
                break
            if not chunk:
                break
            output += chunk
            if pending and output.endswith(pending[0][0]):
                os.write(fd, pending.pop(0)[1].encode() + b"\n")
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_passphrase_asked_twice_on_a_terminal(made: Made, tmp_path: Path) -> None:
    """The prompt path: both answers are read from the terminal (not from stdin, not echoed) and must agree.
    (What a passphrase then does is the same as from a file: see the passphrase round trip.)"""
    config, backup = str(made.source.config), tmp_path / "asked.backup"
    dialogue = [(b"backup passphrase: ", "one phrase"), (b"again: ", "another")]
    code, out = on_a_terminal(["backup", "--config", config, str(backup)], dialogue)
    assert code == 2 and "the two passphrases differ" in out and not backup.exists(), out
    assert "backup passphrase:" in out and "one phrase" not in out and "another" not in out  # not echoed
