"""`keyconnector downgrade-records`: moving back to upstream, proven with upstream's own algorithm.

What upstream reads is checked by a reader written here from docs/compatibility.md section 3 and nothing else:
``ApplicationDatas`` unwrapped with the PFX's private key (RSA-OAEP, SHA-1), then each record opened
as ``base64(ciphertext || tag || nonce)`` with AES-256-GCM and no associated data. It does not use
the product's crypto or its key ring, so a downgrade that only satisfied our own reader would fail.
Records are made through a real `keyconnector serve` (POST/PUT) or by the product's repository;
the downgrade runs with and without a data-key rotation before it, alongside a live service, and is
SIGKILLed half-way.
"""

from __future__ import annotations

import secrets
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyconnector.cli import main
from keyconnector.core.keyring import RETIRED, start_data_key_version
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.ops import open_side
from keyconnector.runtime.settings import Settings, side_of
from keyconnector.storage.base import UserKeyRecord
from tests.conftest import Pfx, Service
from tests.support.backends import Backend, make_backend
from tests.support.envelopes import b64, upstream_open, upstream_unwrap
from tests.support.processes import kill_midway
from tests.test_rotate import CREATED, Load, check_through_service, deployment, read_state, run

DOWNGRADE = [sys.executable, "-m", "keyconnector", "downgrade-records"]
LEGACY = {"compat__writeLegacyFormat": "true"}
BACKENDS = ["sqlite", "postgresql"]
SETTLE = "1.5"
"""Services reload the ring every 0.5 s (on a 0.2 s tick): 1.5 s of settling is plenty."""


# -- upstream's reader, from docs/compatibility.md section 3 -------------------------------------------------


def upstream_data_key(backend: Backend, pfx: Pfx) -> bytes:
    """The first ``ApplicationDatas`` row, unwrapped as the certificate provider of upstream does."""
    rows = backend.sql('SELECT "SymmetricKey" FROM "ApplicationDatas" ORDER BY "Id"')
    assert rows and isinstance(rows[0][0], str)
    data_key = upstream_unwrap(pfx, rows[0][0])
    assert len(data_key) == 32
    return data_key


def upstream_read_all(backend: Backend, pfx: Pfx) -> dict[uuid.UUID, bytes | None]:
    """Every user's key as upstream would return it (None: no key in the row)."""
    data_key = upstream_data_key(backend, pfx)
    return {
        uuid.UUID(str(user_id)): None if record is None else upstream_open(data_key, record)
        for user_id, record in backend.sql('SELECT "Id", "Key" FROM "UserKeys"')
    }


def application_datas(backend: Backend) -> str:
    return str(backend.sql('SELECT "SymmetricKey" FROM "ApplicationDatas" ORDER BY "Id"')[0][0])


def count_upstream_format(backend: Backend) -> int:
    rows = backend.sql(
        'SELECT COUNT(*) FROM "UserKeys" WHERE "Key" IS NOT NULL AND "Key" NOT LIKE ?', ("kc:%",)
    )
    return int(rows[0][0])


def enrol_through_service(service: Service, issuer: DevIssuer, count: int) -> dict[uuid.UUID, bytes]:
    """``count`` users POST a key, and every third of them PUTs a new one: all through the service."""
    keys: dict[uuid.UUID, bytes] = {}
    with service.client() as client:
        for n in range(count):
            user, key = uuid.uuid4(), secrets.token_bytes(32)
            headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
            assert client.post("/user-keys", headers=headers, json={"key": b64(key)}).status_code == 200
            if n % 3 == 0:
                key = secrets.token_bytes(32)
                assert client.put("/user-keys", headers=headers, json={"key": b64(key)}).status_code == 200
            keys[user] = key
    return keys


async def seed_format2(settings: Settings, count: int) -> dict[uuid.UUID, bytes]:
    """``count`` users with format-2 records under the current data key, written by the product."""
    side = await open_side(side_of(settings))
    try:
        keys = {uuid.uuid4(): secrets.token_bytes(32) for _ in range(count)}
        await side.repository.upsert_records(
            [
                UserKeyRecord(user, side.keys.seal(key, user), CREATED, None, None)
                for user, key in keys.items()
            ]
        )
        return keys
    finally:
        await side.aclose()


# -- tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS)
def test_format2_records_made_by_a_service_are_read_by_upstream_after_the_downgrade(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = make_backend(name, tmp_path, request)
    site = deployment(backend, issuer, pfx, "site")
    legacy = deployment(backend, issuer, pfx, "legacy", **LEGACY)
    service: Service = start_service(site.env)
    keys = enrol_through_service(service, issuer, 12)
    ghost = uuid.uuid4()
    backend.insert_null_key_row(ghost)  # upstream leaves such rows: kept, still without a key
    wrapped_before = application_datas(backend)
    assert all(
        record.startswith("kc:2:1:") for record in run(read_state(site.settings)).records.values() if record
    )

    # --dry-run counts and writes nothing (and works before the setting is in place).
    before = backend.sql('SELECT "Id", "Key" FROM "UserKeys" ORDER BY "Id"')
    capsys.readouterr()
    assert main(["downgrade-records", "--dry-run", "--config", str(site.config)]) == 0
    out = capsys.readouterr().out
    assert "would rewrite 12 record(s) in upstream's format (12 on version 1); 0 already in it" in out
    assert "version 1 is current already" in out and "ApplicationDatas would stay as it is" in out
    assert "writeLegacyFormat=true" in out  # the note about what the real run needs
    assert backend.sql('SELECT "Id", "Key" FROM "UserKeys" ORDER BY "Id"') == before

    assert main(["downgrade-records", "--config", str(legacy.config), "--settle-seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert "rewrote 12 record(s) in upstream's format (12 from version 1)" in out
    assert "12 record(s) verified as upstream reads them" in out

    assert application_datas(backend) == wrapped_before  # the same data key, the same wrap
    assert upstream_read_all(backend, pfx) == {**keys, ghost: None}
    # Our service (still without writeLegacyFormat) reads upstream's format too.
    check_through_service(service, issuer, keys)

    # A re-run has nothing left to do.
    assert main(["downgrade-records", "--config", str(legacy.config), "--settle-seconds", "0"]) == 0
    assert "rewrote 0 record(s)" in capsys.readouterr().out


@pytest.mark.parametrize("name", BACKENDS)
def test_after_a_data_key_rotation_version_1_is_remade_from_the_current_key(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = make_backend(name, tmp_path, request)
    site = deployment(backend, issuer, pfx, "site")
    legacy = deployment(backend, issuer, pfx, "legacy", **LEGACY)
    service: Service = start_service(site.env)
    keys = enrol_through_service(service, issuer, 9)
    wrapped_before = application_datas(backend)
    assert main(["rotate-data-key", "--config", str(site.config), "--settle-seconds", "0"]) == 0
    state = run(read_state(site.settings))
    assert (state.ring.current, state.ring.active, state.ring.versions[1].state) == (2, [2], RETIRED)
    # Upstream cannot read this database now: its key in ApplicationDatas is the retired version 1.
    with pytest.raises(ValueError):
        upstream_read_all(backend, pfx)

    capsys.readouterr()
    assert main(["downgrade-records", "--dry-run", "--config", str(legacy.config)]) == 0
    out = capsys.readouterr().out
    assert "would rewrite 9 record(s) in upstream's format (9 on version 2)" in out
    assert (
        "version 1 would be re-made from version 2's key" in out
        and "ApplicationDatas would be updated" in out
    )
    assert run(read_state(site.settings)).ring.current == 2

    assert main(["downgrade-records", "--config", str(legacy.config), "--settle-seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert "version 1 re-made from version 2's key" in out
    assert "rewrote 9 record(s) in upstream's format (9 from version 2)" in out
    assert "retired version(s) 2" in out and "ApplicationDatas updated" in out

    assert application_datas(backend) != wrapped_before
    assert upstream_read_all(backend, pfx) == keys
    state = run(read_state(site.settings))
    assert (state.ring.current, state.ring.active) == (1, [1])
    assert state.ring.versions[2].state == RETIRED and state.ring.versions[2].wraps == {}
    # The key ring and ApplicationDatas agree: version 1's wrap is the one upstream reads.
    assert list(state.ring.versions[1].wraps.values()) == [application_datas(backend)]
    check_through_service(service, issuer, keys)  # the running service reloaded the ring


def test_an_unfinished_rotation_goes_back_to_the_key_upstream_already_has(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = make_backend("sqlite", tmp_path, request)
    site = deployment(backend, issuer, pfx, "site")
    legacy = deployment(backend, issuer, pfx, "legacy", **LEGACY)
    keys = run(seed_format2(site.settings, 30))  # kc:2:1

    async def start_version_2() -> None:
        side = await open_side(side_of(site.settings))
        try:
            await start_data_key_version(side.repository, side.provider)
        finally:
            await side.aclose()

    run(start_version_2())
    keys |= run(seed_format2(site.settings, 20))  # kc:2:2: versions 1 and 2 both active
    wrapped_before = application_datas(backend)
    assert run(read_state(site.settings)).ring.active == [1, 2]

    capsys.readouterr()
    assert main(["downgrade-records", "--config", str(legacy.config), "--settle-seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert "data-key version 1 made current again" in out
    assert "rewrote 50 record(s) in upstream's format (30 from version 1, 20 from version 2)" in out
    assert "retired version(s) 2" in out and "ApplicationDatas updated" not in out
    assert application_datas(backend) == wrapped_before
    assert upstream_read_all(backend, pfx) == keys


def test_refused_without_write_legacy_format(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = make_backend("sqlite", tmp_path, request)
    site = deployment(backend, issuer, pfx, "site")
    run(seed_format2(site.settings, 5))
    assert main(["rotate-data-key", "--config", str(site.config), "--settle-seconds", "0"]) == 0
    before = (backend.sql('SELECT "Id", "Key" FROM "UserKeys" ORDER BY "Id"'), application_datas(backend))
    ring_before = run(read_state(site.settings)).ring

    capsys.readouterr()
    assert main(["downgrade-records", "--config", str(site.config), "--settle-seconds", "0"]) == 2
    err = capsys.readouterr().err
    assert "keyConnectorSettings__compat__writeLegacyFormat" in err and "every running instance" in err
    assert (
        backend.sql('SELECT "Id", "Key" FROM "UserKeys" ORDER BY "Id"'),
        application_datas(backend),
    ) == before
    assert run(read_state(site.settings)).ring == ring_before

    # The help says so too, before anyone runs it.
    with pytest.raises(SystemExit):
        main(["downgrade-records", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "keyConnectorSettings__compat__writeLegacyFormat=true on EVERY running instance" in help_text


@pytest.mark.parametrize("name", BACKENDS)
def test_downgrade_alongside_a_live_service_killed_and_resumed(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = make_backend(name, tmp_path, request)
    site = deployment(backend, issuer, pfx, "site")
    legacy = deployment(backend, issuer, pfx, "legacy", **LEGACY)
    keys = run(seed_format2(site.settings, 1500))
    assert main(["rotate-data-key", "--config", str(site.config), "--settle-seconds", "0"]) == 0
    users = list(keys)
    readers = {user: keys[user] for user in users[:150]}
    writers = users[150:170]

    # The service runs with writeLegacyFormat, as the command demands: while version 2 is current it
    # writes format 2, after the ring switch upstream's format.
    service: Service = start_service(legacy.env)
    load = Load(service.url, issuer, readers, writers)
    load.start()
    try:
        load.wait_for(20)
        output = kill_midway(
            [*DOWNGRADE, "--settle-seconds", SETTLE, "--batch-size", "100", "--max-rate", "2000"],
            legacy.env,
            lambda: count_upstream_format(backend) >= 300,
            "a fifth of the records were rewritten",
        )
        gets_before_kill = load.gets
        assert "re-made from version 2's key" in output
        killed_at = count_upstream_format(backend)
        assert 300 <= killed_at < len(keys), killed_at
        state = run(read_state(site.settings))
        assert (state.ring.current, state.ring.active) == (1, [1, 2])  # switched, nothing retired yet
        load.wait_for(gets_before_kill + 50)

        capsys.readouterr()
        assert main(["downgrade-records", "--config", str(legacy.config), "--settle-seconds", SETTLE]) == 0
        report = capsys.readouterr().out
        assert "re-made" not in report  # the resumed run carries on from the switched ring
        rewritten = int(report.split("rewrote ", 1)[1].split(" ", 1)[0].replace(",", ""))
        assert 0 < rewritten <= len(keys) - killed_at + len(writers)
        assert f"{len(keys):,} record(s) verified as upstream reads them" in report
        assert "retired version(s) 2" in report
        load.wait_for(load.gets + 20)
    finally:
        load.stop()

    assert load.errors == [], load.errors[:5]
    assert load.gets > gets_before_kill > 20 and load.puts > 0

    expected = dict(keys) | load.written
    assert upstream_read_all(backend, pfx) == expected  # none lost, none doubled, every PUT kept
    check_through_service(service, issuer, {user: expected[user] for user in [*users[:30], *writers]})
    # What the service writes from now on is upstream's format too.
    with httpx.Client(base_url=service.url, timeout=10) as client:
        user, key = writers[0], secrets.token_bytes(32)
        headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
        assert client.put("/user-keys", headers=headers, json={"key": b64(key)}).status_code == 200
    assert upstream_read_all(backend, pfx)[user] == key


def test_records_upstream_could_not_read_are_listed_and_nothing_is_retired(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = make_backend("sqlite", tmp_path, request)
    site = deployment(backend, issuer, pfx, "site")
    legacy = deployment(backend, issuer, pfx, "legacy", **LEGACY)
    keys = run(seed_format2(site.settings, 10))
    assert main(["rotate-data-key", "--config", str(site.config), "--settle-seconds", "0"]) == 0
    damaged = next(iter(keys))
    backend.sql('UPDATE "UserKeys" SET "Key" = ? WHERE "Id" = ?', ("kc:2:2:AAAA", backend.guid(damaged)))

    capsys.readouterr()
    command = ["downgrade-records", "--config", str(legacy.config), "--settle-seconds", "0"]
    assert main(command) == 1
    captured = capsys.readouterr()
    assert "1 record(s) failed" in captured.err and str(damaged) in captured.err
    assert "retired nothing" in captured.out
    assert run(read_state(site.settings)).ring.active == [1, 2]  # version 2 kept for the damaged record

    backend.sql('DELETE FROM "UserKeys" WHERE "Id" = ?', (backend.guid(damaged),))
    assert main(command) == 0
    assert "retired version(s) 2" in capsys.readouterr().out
    assert upstream_read_all(backend, pfx) == {user: key for user, key in keys.items() if user != damaged}
