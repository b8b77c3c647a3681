"""Records bound to their users: the row-swap attack through a real service, and `upgrade-records`.

The attack: an attacker with write access to the database (but not to the data key) copies user
A's record into user B's row, then logs in as B. With format 2 (the default), the AES-GCM
associated data names the user, so the record does not open for B and the key is never returned.
Upstream's format has no associated data: the same swap hands A's key to B. `upgrade-records`
rewrites those records in format 2, online, and is SIGKILLed half-way here while a real service
answers GETs.
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
from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service
from tests.support.backends import Backend, make_backend
from tests.support.envelopes import b64, upstream_open, upstream_unwrap
from tests.support.processes import kill_midway
from tests.test_rotate import (
    Load,
    check_through_service,
    count_version,
    deployment,
    read_state,
    run,
    seed,
)

UPGRADE = [sys.executable, "-m", "keyconnector", "upgrade-records"]
INTEGRITY_STATUS = 500
"""What a GET whose record fails its integrity check answers (see routes.py)."""
LEGACY = {"compat__writeLegacyFormat": "true"}


def get(client: httpx.Client, issuer: DevIssuer, user: uuid.UUID) -> httpx.Response:
    return client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})


def enrol(client: httpx.Client, issuer: DevIssuer, user: uuid.UUID, key: bytes) -> None:
    headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
    assert client.post("/user-keys", headers=headers, json={"key": b64(key)}).status_code == 200


def stored(backend: Backend, user: uuid.UUID) -> str:
    rows = backend.sql('SELECT "Key" FROM "UserKeys" WHERE "Id" = ?', (backend.guid(user),))
    assert len(rows) == 1 and isinstance(rows[0][0], str)
    return str(rows[0][0])


def overwrite(backend: Backend, user: uuid.UUID, record: str) -> None:
    """What the attacker does: plain SQL, no key needed."""
    backend.sql('UPDATE "UserKeys" SET "Key" = ? WHERE "Id" = ?', (record, backend.guid(user)))


def data_key(backend: Backend, pfx: Pfx) -> bytes:
    """Data key version 1, unwrapped with upstream's algorithm from ApplicationDatas."""
    (wrapped,) = backend.sql('SELECT "SymmetricKey" FROM "ApplicationDatas"')[0]
    return upstream_unwrap(pfx, str(wrapped))


@pytest.mark.parametrize("name", ["sqlite", "postgresql"])
def test_a_record_copied_into_another_users_row_is_not_returned(
    name: str, request: pytest.FixtureRequest, tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Any
) -> None:
    backend = make_backend(name, tmp_path, request)
    site = deployment(backend, issuer, pfx, "site")
    service: Service = start_service(site.env)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    alice_key, bob_key = secrets.token_bytes(32), secrets.token_bytes(32)
    with service.client() as client:
        enrol(client, issuer, alice, alice_key)
        enrol(client, issuer, bob, bob_key)
        alice_record, bob_record = stored(backend, alice), stored(backend, bob)
        assert alice_record.startswith("kc:2:1:") and bob_record.startswith("kc:2:1:")  # the default

        overwrite(backend, bob, alice_record)
        response = get(client, issuer, bob)
        assert response.status_code == INTEGRITY_STATUS, response.text
        assert b64(alice_key) not in response.text and b64(bob_key) not in response.text
        assert "cannot be decrypted" in response.json()["message"]
        assert get(client, issuer, alice).json() == {"key": b64(alice_key)}

        # An altered record (one ciphertext character changed) fails the same way.
        body = alice_record[len("kc:2:1:") :]
        flipped = "kc:2:1:" + ("B" if body[0] == "A" else "A") + body[1:]
        overwrite(backend, bob, flipped)
        assert get(client, issuer, bob).status_code == INTEGRITY_STATUS

        # Bob's own record, put back, reads again: nothing else was damaged.
        overwrite(backend, bob, bob_record)
        assert get(client, issuer, bob).json() == {"key": b64(bob_key)}

    logs = service.logs()
    assert f"the stored record of user {bob} failed its integrity check" in logs
    for secret in (alice_record, flipped, bob_record, b64(alice_key), b64(bob_key)):
        assert secret not in logs


@pytest.mark.parametrize("name", ["sqlite", "postgresql"])
def test_upstream_format_is_not_bound_and_upgrade_records_closes_it(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = make_backend(name, tmp_path, request)
    legacy = deployment(backend, issuer, pfx, "legacy", **LEGACY)
    site = deployment(backend, issuer, pfx, "site")
    service: Service = start_service(legacy.env)
    alice, bob, carol = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    keys = {user: secrets.token_bytes(32) for user in (alice, bob, carol)}
    with service.client() as client:
        for user, key in keys.items():
            enrol(client, issuer, user, key)
        records = {user: stored(backend, user) for user in keys}
        # writeLegacyFormat: upstream's envelope, which upstream's own algorithm opens.
        for user, key in keys.items():
            assert not records[user].startswith("kc:")
            assert upstream_open(data_key(backend, pfx), records[user]) == key

        # Upstream's weakness (docs/compatibility.md section 5), kept on purpose to document it: the
        # record has no associated data, so a copy in Bob's row decrypts there and Bob gets ALICE's key.
        # `upgrade-records` (below) is what closes it.
        overwrite(backend, bob, records[alice])
        assert get(client, issuer, bob).json() == {"key": b64(keys[alice])}
        overwrite(backend, bob, records[bob])

        # Carol's record is damaged: upgrade-records must list her and leave it alone.
        damaged = ("B" if records[carol][0] == "A" else "A") + records[carol][1:]
        overwrite(backend, carol, damaged)

        capsys.readouterr()
        assert main(["upgrade-records", "--config", str(legacy.config)]) == 2  # it would undo itself
        assert "writeLegacyFormat" in capsys.readouterr().err
        assert stored(backend, alice) == records[alice]

        assert main(["upgrade-records", "--config", str(site.config)]) == 1
        output = capsys.readouterr()
        assert str(carol) in output.err and "do not decrypt" in output.err
        assert "rewrote 2 record(s)" in output.out
        assert stored(backend, carol) == damaged
        upgraded = {user: stored(backend, user) for user in (alice, bob)}
        assert all(record.startswith("kc:2:1:") for record in upgraded.values())

        # Now bound: the same swap no longer gives Bob anything, and both read through the service
        # (which still runs with writeLegacyFormat: it reads either format).
        overwrite(backend, bob, upgraded[alice])
        assert get(client, issuer, bob).status_code == INTEGRITY_STATUS
        assert get(client, issuer, alice).json() == {"key": b64(keys[alice])}
        overwrite(backend, bob, upgraded[bob])
        assert get(client, issuer, bob).json() == {"key": b64(keys[bob])}

        overwrite(backend, carol, records[carol])  # repaired: a re-run finishes
        assert main(["upgrade-records", "--config", str(site.config)]) == 0
        assert "rewrote 1 record(s)" in capsys.readouterr().out
        assert get(client, issuer, carol).json() == {"key": b64(keys[carol])}
        assert main(["upgrade-records", "--config", str(site.config)]) == 0
        assert "rewrote 0 record(s)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["sqlite", "json", "postgresql", "mariadb"])
def test_upgrade_records_under_load_killed_and_resumed(
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
    keys = run(seed(site.settings, 2000))  # upstream's format, under the product's data key
    users = list(keys)
    readers = {user: keys[user] for user in users[:200]}
    writers = users[200:220]

    service: Service = start_service(site.env)
    load = Load(service.url, issuer, readers, writers)
    load.start()
    try:
        load.wait_for(20)
        kill_midway(
            [*UPGRADE, "--batch-size", "100", "--max-rate", "800"],
            site.env,
            lambda: count_version(backend, 1) >= 400,
            "a fifth of the records were done",
        )
        gets_before_kill = load.gets
        killed_at = count_version(backend, 1)
        assert 400 <= killed_at < len(keys), killed_at
        load.wait_for(gets_before_kill + 50)

        capsys.readouterr()
        assert main(["upgrade-records", "--config", str(site.config), "--batch-size", "500"]) == 0
        report = capsys.readouterr().out
        assert "verified" in report
        rewritten = int(report.split("rewrote ", 1)[1].split(" ", 1)[0].replace(",", ""))
        assert 0 < rewritten <= len(keys) - killed_at + len(writers)
        load.wait_for(load.gets + 20)
    finally:
        load.stop()

    assert load.errors == [], load.errors[:5]
    assert load.gets > gets_before_kill > 20 and load.puts > 0

    expected = dict(keys) | load.written
    state = run(read_state(site.settings))
    assert set(state.records) == set(keys) and state.rows == len(keys)  # none lost or doubled
    assert state.ring.current == 1 and state.ring.active == [1]  # same data-key version
    for user, key in expected.items():
        record = state.records[user]
        assert record is not None and record.startswith("kc:2:1:")
        assert state.keys.open(record, user) == key
    assert count_version(backend, 1) == len(keys)

    check_through_service(service, issuer, {user: expected[user] for user in [*users[:50], *writers]})
