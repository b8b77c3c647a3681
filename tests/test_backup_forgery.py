"""Issue 12, backups: a recipients-mode backup forged with public keys alone is refused, nothing written.

The forger here has exactly what is public: the age recipient the backups are encrypted to, the key
pair's certificate, and what the deployment logs (its key ring anchor, its users' ids). With those
they build a complete deployment of their own: a data key wrapped with the certificate's public key,
an authenticated key ring around it (their own authentication key, seals, MAC), records sealed under
their key, and a manifest MACed with the key their ring derives. Every check that looks only at the
file passes, as the positive control shows (the forged file restores when its own anchor is named);
what refuses it is that its ring is not this deployment's: the target's own ring, the pinned
``keyRingAnchor`` or ``--expect-anchor`` says so, and an empty target with none of them is refused
in recipients mode.

Also here: a manifest whose MAC was tampered with (or whose hashes were recomputed without the key),
the normal path into another kind of database read back by a running ``keyconnector serve``, and a
format-1 file (made before backups carried a MAC) restored in passphrase mode with a warning.

The forged and old files are written out here from the file layout in the module docstring of
``keyconnector.ops.backup``, not with its code: a drift in the product's idea of the format would
otherwise go unseen.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyrage
import pytest
from cryptography.hazmat.primitives import serialization
from pyrage import passphrase as age_passphrase
from pyrage import x25519

from keyconnector.core.envelope import DataKey
from keyconnector.core.keyring import ACTIVE, KeyRing, RingVersion
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.ops.backup import PASSPHRASE_ENV
from keyconnector.storage.base import UserKeyRecord
from keyconnector.storage.registry import inspect, migrate, open_repository
from tests.conftest import Pfx
from tests.support.backends import Backend, run
from tests.support.envelopes import upstream_keys, upstream_seal, upstream_wrap
from tests.test_backup import (
    Snapshot,
    Source,
    assert_served,
    authenticated_ring,
    cli,
    identity_file,
    new_backend,
    populate,
    printed_anchor,
    service_env,
    snapshot,
    write_config,
)

USERS = 400
BASE_TIME = datetime(2025, 6, 7, 8, 9, 10, 111213)
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


# -- the file layout, written out --------------------------------------------------------------------------


def record_line(user: uuid.UUID, key: str | None, created: datetime) -> bytes:
    entry = {
        "id": str(user),
        "key": key,
        "creationDate": created.isoformat(timespec="microseconds"),
        "revisionDate": None,
        "lastAccessDate": (created + timedelta(days=1)).isoformat(timespec="microseconds"),
    }
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def payload(
    file_format: int,
    header: dict[str, Any],
    lines: list[bytes],
    mac_key: bytes | None,
) -> bytes:
    """Header, record lines and a manifest: hashes over the bytes before it, MACed when ``mac_key``."""
    head = json.dumps({"format": file_format, **header}, separators=(",", ":")).encode() + b"\n"
    body = head + b"".join(lines)
    digests = sorted(hashlib.sha256(line).digest() for line in lines)
    manifest: dict[str, Any] = {
        "format": file_format,
        "created": header["created"],
        "source": header["source"],
        "records": len(lines),
        "sha256": hashlib.sha256(body).hexdigest(),
        "recordsSha256": hashlib.sha256(b"".join(digests)).hexdigest(),
    }
    if mac_key is not None:
        manifest["mac"] = hmac.new(mac_key, _canonical.encode(manifest).encode(), hashlib.sha256).hexdigest()
    return body + json.dumps({"manifest": manifest}, separators=(",", ":")).encode() + b"\n"


def to_recipient(file_format: int, data: bytes, recipient: str) -> bytes:
    encrypted = pyrage.encrypt(data, [x25519.Recipient.from_str(recipient)])
    return f"keyconnector-backup {file_format}\n".encode() + b"recipients\n" + encrypted


def to_passphrase(file_format: int, data: bytes, passphrase: str) -> bytes:
    identity = x25519.Identity.generate()
    sealed = age_passphrase.encrypt(str(identity).encode(), passphrase)
    line = b"passphrase " + base64.b64encode(sealed) + b"\n"
    return (
        f"keyconnector-backup {file_format}\n".encode() + line + pyrage.encrypt(data, [identity.to_public()])
    )


def public_fingerprint(pfx: Pfx) -> str:
    """The key pair's fingerprint, from its public key alone (``rsa-oaep-sha1:`` + SHA-256 of the SPKI)."""
    public, _ = upstream_keys(pfx)
    der = public.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "rsa-oaep-sha1:" + hashlib.sha256(der).hexdigest()


# -- the forger --------------------------------------------------------------------------------------------


@dataclass
class Forgery:
    path: Path
    anchor: str
    """The forger's own anchor (the fingerprint of their authentication key)."""
    victims: list[uuid.UUID]


def forge(
    folder: Path,
    name: str,
    pfx: Pfx,
    recipient: str,
    users: list[uuid.UUID],
    claimed_anchor: str | None = None,
) -> Forgery:
    """A complete backup of a deployment of the forger's own, from public material only."""
    data_key = os.urandom(32)
    wrapped = upstream_wrap(pfx, data_key)  # the certificate's public key: no private key involved
    ring = KeyRing(
        revision=7,
        current=1,
        versions={1: RingVersion(1, ACTIVE, "2025-01-01T00:00:00Z", {public_fingerprint(pfx): wrapped})},
        accept_legacy=True,
        adopted="the data key in ApplicationDatas, 2025-01-01T00:00:00Z",
    )
    ring.auth_key = os.urandom(32)  # the forger's own authentication key
    ring.seal_versions({1: DataKey(data_key, 1)})
    document = ring.dump(7)
    lines = []
    for i, user in enumerate(users):
        plaintext = os.urandom(32)
        record = upstream_seal(data_key, plaintext) if i % 2 else DataKey(data_key, 1).seal(plaintext, user)
        lines.append(record_line(user, record, BASE_TIME + timedelta(minutes=i)))
    header = {
        "created": "2025-06-07T08:09:10Z",
        "source": "sqlite /var/lib/keyconnector/kc.db",
        "dataKey": wrapped,
        "keyRing": {"revision": 7, "document": document},
        "anchor": claimed_anchor or ring.anchor,
    }
    path = folder / f"{name}.backup"
    path.write_bytes(to_recipient(2, payload(2, header, lines, ring.derive("backup/1")), recipient))
    return Forgery(path, ring.anchor, users)


@dataclass
class Live:
    source: Source
    identity: Path
    recipient: str
    anchor: str


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, pfx: Pfx, request: pytest.FixtureRequest) -> Live:
    """A deployment in use, whose backups are encrypted to one recipient."""
    folder = tmp_path_factory.mktemp("live")
    source = populate(new_backend("sqlite", folder / "source", request), pfx, USERS)
    identity, recipient = identity_file(folder / "identity.txt")
    return Live(source, identity, recipient, authenticated_ring(source.config).anchor)


def restore(
    capsys: pytest.CaptureFixture[str], config: Path, backup: Path, identity: Path, *extra: str
) -> tuple[int, str]:
    return cli(capsys, "restore", "--config", config, backup, "--identity", identity, *extra)


def assert_untouched(backend: Backend, before: Snapshot) -> None:
    after = snapshot(backend)
    assert after == before and after.ring_document == before.ring_document


# -- (a) forged with public keys alone ---------------------------------------------------------------------


def test_a_forged_recipients_backup_is_refused_and_nothing_is_written(
    live: Live, tmp_path: Path, pfx: Pfx, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    victims = list(live.source.keys)[:50] + [uuid.uuid4() for _ in range(50)]
    forgery = forge(tmp_path, "forged", pfx, live.recipient, victims)
    assert forgery.anchor != live.anchor
    identity = live.identity

    # Into the live database: its own authenticated key ring does not vouch for the forger's.
    before = snapshot(live.source.backend)
    for extra in [(), ("--replace",)]:
        code, out = restore(capsys, live.source.config, forgery.path, identity, *extra)
        assert code == 1, (extra, out)
        assert f"the backup's key ring has anchor {forgery.anchor}" in out, out
        assert f"says {live.anchor}" in out and "nothing was written" in out, out
        assert_untouched(live.source.backend, before)
    code, out = restore(capsys, live.source.config, forgery.path, identity, "--verify-only")
    assert code == 1 and f"says {live.anchor}" in out, out

    # Into an empty database (disaster recovery): nothing to compare with, so a recipients backup is
    # refused without an anchor; with the real one (given or pinned) the forger's does not match.
    empty = new_backend("postgresql", tmp_path / "empty", request)
    config = write_config(tmp_path / "empty.json", empty, pfx)
    code, out = restore(capsys, config, forgery.path, identity)
    assert code == 1 and "has no Key Connector tables yet" in out and "and no anchor was given" in out, out
    assert "key ring revision N authenticated (anchor X)" in out and "`keyconnector check`" in out, out
    assert not inspect(empty.settings).has_schema
    code, out = restore(capsys, config, forgery.path, identity, "--expect-anchor", live.anchor)
    assert code == 1 and f"--expect-anchor says {live.anchor}" in out, out
    assert not inspect(empty.settings).has_schema
    pinned = json.loads(config.read_text())
    pinned["keyConnectorSettings"]["keyRingAnchor"] = live.anchor.upper()
    pinned_config = tmp_path / "pinned.json"
    pinned_config.write_text(json.dumps(pinned))
    code, out = restore(capsys, pinned_config, forgery.path, identity)
    assert code == 1 and f"keyConnectorSettings__keyRingAnchor says {live.anchor}" in out, out
    assert not inspect(empty.settings).has_schema

    # A forger who writes the real anchor into the header is caught by the ring itself.
    liar = forge(tmp_path, "liar", pfx, live.recipient, victims, claimed_anchor=live.anchor)
    code, out = restore(capsys, config, liar.path, identity, "--expect-anchor", live.anchor)
    assert code == 1 and "is forged or damaged: its header names key ring anchor" in out, out
    code, out = restore(capsys, live.source.config, liar.path, identity, "--replace")
    assert code == 1 and "is forged or damaged" in out, out
    assert not inspect(empty.settings).has_schema
    assert_untouched(live.source.backend, before)

    # The positive control: the forgery is otherwise complete (ring, MAC and every record verify), so it
    # restores when its own anchor is named. The anchor rule is what refused it above.
    scratch = new_backend("sqlite", tmp_path / "scratch", request)
    scratch_config = write_config(tmp_path / "scratch.json", scratch, pfx)
    code, out = restore(capsys, scratch_config, forgery.path, identity, "--expect-anchor", forgery.anchor)
    assert code == 0 and f"{len(victims)} records" in out and "identical to the backup" in out, out


# -- (b) a tampered manifest -------------------------------------------------------------------------------


def test_a_tampered_manifest_mac_is_refused(
    live: Live, tmp_path: Path, pfx: Pfx, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    genuine = tmp_path / "genuine.backup"
    code, out = cli(capsys, "backup", "--config", live.source.config, genuine, "--recipient", live.recipient)
    assert code == 0, out
    magic, _, encrypted = genuine.read_bytes().split(b"\n", 2)
    assert magic == b"keyconnector-backup 2"
    secret = x25519.Identity.from_str(live.identity.read_text().splitlines()[1])
    lines = pyrage.decrypt(encrypted, [secret]).splitlines(keepends=True)
    manifest = json.loads(lines[-1])["manifest"]
    assert len(manifest["mac"]) == 64

    def rewrite(name: str, new_lines: list[bytes]) -> Path:
        path = tmp_path / name
        path.write_bytes(to_recipient(2, b"".join(new_lines), live.recipient))
        return path

    def with_manifest(edit: Any) -> list[bytes]:
        edited = json.loads(lines[-1])
        edit(edited["manifest"])
        return [*lines[:-1], json.dumps(edited, separators=(",", ":")).encode() + b"\n"]

    def flip(manifest: dict[str, Any]) -> None:
        manifest["mac"] = ("0" if manifest["mac"][0] != "0" else "1") + manifest["mac"][1:]

    # A record replaced and every hash recomputed, as someone without the key can: only the MAC tells.
    record = json.loads(lines[1])
    record["key"] = upstream_seal(os.urandom(32), os.urandom(32))
    edited_lines = [lines[0], json.dumps(record, separators=(",", ":")).encode() + b"\n", *lines[2:-1]]
    body = b"".join(edited_lines)
    digests = sorted(hashlib.sha256(line).digest() for line in edited_lines[1:])

    def rehash(manifest: dict[str, Any]) -> None:
        manifest["sha256"] = hashlib.sha256(body).hexdigest()
        manifest["recordsSha256"] = hashlib.sha256(b"".join(digests)).hexdigest()

    rehashed = [*edited_lines, with_manifest(rehash)[-1]]
    cases = {
        "mac flipped": (rewrite("flipped", with_manifest(flip)), "does not authenticate: its manifest's MAC"),
        "mac removed": (
            rewrite("removed", with_manifest(lambda m: m.pop("mac"))),
            "is damaged: its manifest carries no MAC",
        ),
        "creation time edited": (
            rewrite("count", with_manifest(lambda m: m.update(created="2000-01-01T00:00:00Z"))),
            "does not authenticate: its manifest's MAC",
        ),
        "record replaced, hashes recomputed": (
            rewrite("rehashed", rehashed),
            "does not authenticate: its manifest's MAC",
        ),
    }
    target = new_backend("sqlite", tmp_path / "target", request)
    config = write_config(tmp_path / "target.json", target, pfx)
    before = snapshot(live.source.backend)
    for name, (path, message) in cases.items():
        code, out = restore(capsys, config, path, live.identity, "--expect-anchor", live.anchor)
        assert code == 1 and message in out, (name, out)
        assert not (target.folder / "kc.db").exists(), name
        code, out = restore(capsys, live.source.config, path, live.identity)
        assert code == 1 and message in out, (name, out)
        assert_untouched(live.source.backend, before)
        code, out = restore(capsys, config, path, live.identity, "--verify-only")
        assert code == 1 and message in out, (name, out)

    # The untouched file, rewritten the same way, restores: the cases above failed on their edit alone.
    code, out = restore(capsys, config, rewrite("same", lines), live.identity, "--expect-anchor", live.anchor)
    assert code == 0 and f"{USERS} records" in out, out


# -- (c) the normal path -----------------------------------------------------------------------------------


def test_backup_restore_into_postgresql_served_with_the_same_anchor(
    tmp_path: Path,
    pfx: Pfx,
    issuer: DevIssuer,
    start_service: Any,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = populate(new_backend("sqlite", tmp_path / "source", request), pfx, 1500)
    identity, recipient = identity_file(tmp_path / "identity.txt")
    backup = tmp_path / "kc.backup"
    code, out = cli(capsys, "backup", "--config", source.config, backup, "--recipient", recipient)
    assert code == 0, out
    anchor = printed_anchor(out)
    assert anchor == authenticated_ring(source.config).anchor

    target = new_backend("postgresql", tmp_path / "target", request)
    config = write_config(tmp_path / "target.json", target, pfx)
    wrong = "0123456789abcdef0123" if anchor != "0123456789abcdef0123" else "fedcba9876543210fedc"
    code, out = restore(capsys, config, backup, identity, "--expect-anchor", wrong)
    assert code == 1 and f"the backup's key ring has anchor {anchor}, but --expect-anchor says {wrong}" in out
    assert not inspect(target.settings).has_schema
    with pytest.raises(SystemExit) as exited:  # argparse's own refusal of a malformed anchor
        cli(capsys, "restore", "--config", config, backup, "--identity", identity, "--expect-anchor", "xyz")
    assert exited.value.code == 2 and "20 hex digits" in capsys.readouterr().err

    code, out = restore(capsys, config, backup, identity, "--expect-anchor", anchor.upper())
    assert code == 0 and "1,500 records" in out and f"anchor {anchor} (matches --expect-anchor)" in out, out
    assert "restart every running `keyconnector serve`" in out
    assert snapshot(target) == snapshot(source.backend)

    # Restored again over itself: the target's own ring vouches, nothing changes.
    before = snapshot(target)
    code, out = restore(capsys, config, backup, identity)
    assert code == 0 and f"anchor {anchor} (matches the key ring of the target database (postgresql" in out, (
        out
    )
    assert_untouched(target, before)

    service = start_service(service_env(issuer, pfx, target))
    assert_served(service, issuer, source)
    assert f"authenticated (anchor {anchor})" in service.logs()


# -- (d) a format-1 file -----------------------------------------------------------------------------------


def old_backup(
    pfx: Pfx, fingerprint: str
) -> tuple[bytes, dict[uuid.UUID, str | None], list[uuid.UUID], list[uuid.UUID]]:
    """The payload of a format-1 backup, as the command wrote it before backups carried a MAC: data key
    version 1 in ApplicationDatas, a key ring of the unauthenticated format with version 2 current."""
    version1, version2 = os.urandom(32), os.urandom(32)
    wrapped1 = upstream_wrap(pfx, version1)
    ring = {
        "format": 1,
        "current": 2,
        "versions": {
            "1": {"state": "active", "wraps": {fingerprint: wrapped1}},
            "2": {"state": "active", "wraps": {fingerprint: upstream_wrap(pfx, version2)}},
        },
    }
    keys: dict[uuid.UUID, str | None] = {}
    legacy: list[uuid.UUID] = []
    format2: list[uuid.UUID] = []
    lines = []
    for i in range(300):
        user = uuid.uuid4()
        plaintext = os.urandom(32)
        record: str | None
        if i % 10 == 0:
            record, keys[user] = None, None
        elif i % 2:
            record = upstream_seal(version1, plaintext)
            legacy.append(user)
        else:
            record = DataKey(version2, 2).seal(plaintext, user)
            format2.append(user)
        if record is not None:
            keys[user] = base64.b64encode(plaintext).decode()
        lines.append(record_line(user, record, BASE_TIME + timedelta(seconds=i)))
    header = {
        "created": "2024-12-01T00:00:00Z",
        "source": "sqlite /old/kc.db",
        "dataKey": wrapped1,
        "keyRing": {"revision": 3, "document": json.dumps(ring)},
    }
    return payload(1, header, lines, None), keys, legacy, format2


def test_an_old_format_backup_restores_in_passphrase_mode_with_a_warning(
    tmp_path: Path,
    pfx: Pfx,
    issuer: DevIssuer,
    start_service: Any,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, keys, legacy, format2 = old_backup(pfx, public_fingerprint(pfx))
    passphrase = "an old passphrase " + uuid.uuid4().hex
    old = tmp_path / "old-passphrase.backup"
    old.write_bytes(to_passphrase(1, data, passphrase))
    monkeypatch.setenv(PASSPHRASE_ENV, passphrase)

    target = new_backend("postgresql", tmp_path / "target", request)
    config = write_config(tmp_path / "target.json", target, pfx)
    code, out = cli(capsys, "restore", "--config", config, old, "--verify-only")
    assert code == 0 and "is intact: 300 records" in out and "not authenticated" in out, out
    code, out = cli(capsys, "restore", "--config", config, old)
    assert code == 0 and "300 records" in out and "identical to the backup" in out, out
    assert "is a format-1 backup (made before backups carried a MAC)" in out, out
    assert "`keyconnector serve` adopts it at its next start" in out, out

    # The same payload to a recipient: refused unless the operator vouches for the file.
    identity, recipient = identity_file(tmp_path / "identity.txt")
    to_recipients = tmp_path / "old-recipients.backup"
    to_recipients.write_bytes(to_recipient(1, data, recipient))
    other = new_backend("sqlite", tmp_path / "other", request)
    other_config = write_config(tmp_path / "other.json", other, pfx)
    code, out = restore(capsys, other_config, to_recipients, identity)
    assert code == 1 and "--allow-unauthenticated" in out and "carries no MAC" in out, out
    assert not (other.folder / "kc.db").exists()
    code, out = restore(capsys, other_config, to_recipients, identity, "--allow-unauthenticated")
    assert code == 0 and "restored on --allow-unauthenticated" in out, out

    # serve adopts the restored ring at start and serves every user of the old backup.
    source = Source(target, config, keys, legacy, format2)
    service = start_service(service_env(issuer, pfx, target))
    assert_served(service, issuer, source)
    assert "adopted the key ring of an earlier keyconnector" in service.logs()
    restored = authenticated_ring(config)
    assert restored.current == 2 and restored.anchor


# -- a deployment upstream left, backed up before keyconnector ever served it --------------------------------


def test_backup_of_a_deployment_never_started_adopts_it_first(
    tmp_path: Path, pfx: Pfx, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    """The takeover guide's step 2: a backup of upstream's database, while upstream still serves. The
    backup adopts the data key as `serve` would (keyconnector's own table only), so that the file is
    authenticated; the ring accepts upstream-format records, which upstream goes on writing."""
    source = new_backend("sqlite", tmp_path / "source", request)
    config = write_config(tmp_path / "source.json", source, pfx)
    data_key = os.urandom(32)
    keys = {uuid.uuid4(): os.urandom(32) for _ in range(50)}

    async def as_upstream_left_it() -> None:
        migrate(source.settings)
        repository = await open_repository(source.settings)
        try:
            await repository.store_wrapped_data_key(upstream_wrap(pfx, data_key))
            await repository.upsert_records(
                [
                    UserKeyRecord(
                        user, upstream_seal(data_key, key), BASE_TIME + timedelta(seconds=i), None, None
                    )
                    for i, (user, key) in enumerate(keys.items())
                ]
            )
        finally:
            await repository.aclose()

    run(as_upstream_left_it())
    assert source.sql("SELECT COUNT(*) FROM keyconnector_key_ring")[0][0] == 0
    identity, recipient = identity_file(tmp_path / "identity.txt")
    backup = tmp_path / "kc.backup"
    code, out = cli(capsys, "backup", "--config", config, backup, "--recipient", recipient)
    assert code == 0 and "50 records" in out, out
    assert "adopted the data key in ApplicationDatas as the root of the authenticated key ring" in out, out
    ring = authenticated_ring(config)
    assert printed_anchor(out) == ring.anchor and ring.accept_legacy

    target = new_backend("json", tmp_path / "target", request)
    target_config = write_config(tmp_path / "target.json", target, pfx)
    code, out = restore(capsys, target_config, backup, identity, "--expect-anchor", ring.anchor)
    assert code == 0 and "50 records" in out and "50 decrypt" in out, out
