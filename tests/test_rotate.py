"""`keyconnector rotate-data-key` and `keyconnector rotate-key-pair` against real databases and services.

Every rotation here runs while a real `keyconnector serve` answers a stream of GETs (and some PUTs)
from a thread: each GET must be 200 with the right key, and each PUT's value must survive. The data
rotation is SIGKILLed half-way (a real process, killed when the database shows part of the records
re-encrypted) and run again. Records start in upstream's format, sealed here by the data key that
the product itself made in ``ApplicationDatas``; the end state is checked in the database, by
decrypting every record, and through the service.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import pkcs12

from keyconnector.cli import main
from keyconnector.core.envelope import NONCE_SIZE, DataKey, DataKeys
from keyconnector.core.keyring import RETIRED, KeyRing, read_ring
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.keypairs import open_key_provider
from keyconnector.keypairs.base import OAEP_SHA1
from keyconnector.keypairs.generate import self_signed_pfx
from keyconnector.ops import open_side
from keyconnector.runtime.settings import Settings, load_settings, side_of
from keyconnector.storage.base import UserKeyRecord
from keyconnector.storage.registry import migrate, open_repository
from tests.conftest import Pfx, Service, base_env
from tests.support.backends import Backend, make_backend
from tests.support.envelopes import b64
from tests.support.processes import kill_midway

ALL = ["sqlite", "json", "postgresql", "mariadb"]
ROTATE = [sys.executable, "-m", "keyconnector", "rotate-data-key"]
CREATED = datetime(2021, 8, 20, 15, 59, 38)
SETTLE = "1.5"
"""Services reload the ring every 0.5 s (on a 0.2 s tick): 1.5 s of settling is plenty."""


@pytest.fixture(scope="module")
def new_pfx(tmp_path_factory: pytest.TempPathFactory) -> Pfx:
    path = tmp_path_factory.mktemp("new-pfx") / "new.pfx"
    path.write_bytes(self_signed_pfx("new-pfx-password", bits=2048))
    return Pfx(path, "new-pfx-password")


# -- a deployment: its settings as a process environment and as an appsettings file ----------------------


@dataclass
class Deployment:
    backend: Backend
    env: dict[str, str]
    """For `keyconnector` child processes (a service, a rotation to be killed)."""
    config: Path
    """The same settings as an appsettings file, for commands run in this process."""

    @property
    def settings(self) -> Settings:
        return load_settings({}, self.config).settings


def deployment(backend: Backend, issuer: DevIssuer, pfx: Pfx, name: str, **extra: str) -> Deployment:
    env = base_env(issuer, pfx, backend.folder / "kc.db")
    for key in [k for k in env if k.startswith("keyConnectorSettings__database__")]:
        del env[key]
    for key, value in backend.plain.items():
        env[f"keyConnectorSettings__database__{key}"] = value
    env["keyConnectorSettings__keyRingRefreshSeconds"] = "0.5"
    env.update({f"keyConnectorSettings__{key}": value for key, value in extra.items()})
    tree: dict[str, Any] = {}
    for key, value in env.items():
        if key.startswith("keyConnectorSettings__"):
            *path, leaf = key.split("__")[1:]
            node = tree
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = value
    config = backend.folder / f"{name}.json"
    config.write_text(json.dumps({"keyConnectorSettings": tree}))
    return Deployment(backend, env, config)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def seed(settings: Settings, count: int) -> dict[uuid.UUID, bytes]:
    """An upstream deployment: a data key in ApplicationDatas wrapped by the key pair, and ``count``
    users with records in upstream's format under it; no key ring (keyconnector adopts it)."""
    migrate(settings.database)
    repository = await open_repository(settings.database)
    provider = await open_key_provider(side_of(settings))
    try:
        raw = secrets.token_bytes(32)
        assert await repository.get_wrapped_data_key() is None
        await repository.store_wrapped_data_key(base64.b64encode(await provider.wrap(raw)).decode())
        legacy = DataKey(raw, 1)
        keys = {uuid.uuid4(): secrets.token_bytes(32) for _ in range(count)}
        await repository.upsert_records(
            [UserKeyRecord(user, legacy.seal_legacy(key), CREATED, None, None) for user, key in keys.items()]
        )
        return keys
    finally:
        await provider.aclose()
        await repository.aclose()


@dataclass
class State:
    records: dict[uuid.UUID, str | None]
    rows: int
    ring: KeyRing
    keys: DataKeys
    application_datas: str | None


async def read_state(settings: Settings) -> State:
    side = await open_side(side_of(settings), create=False)
    try:
        records = {r.user_id: r.key async for batch in side.repository.iter_records() for r in batch}
        wrapped = await side.repository.get_wrapped_data_key()
        rows = await side.repository.count_records()
        return State(records, rows, await read_ring(side.repository), side.keys, wrapped)
    finally:
        await side.aclose()


def fingerprint(settings: Settings) -> str:
    async def body() -> str:
        side = await open_side(side_of(settings), create=False)
        try:
            return side.provider.fingerprint
        finally:
            await side.aclose()

    return str(run(body()))


def count_version(backend: Backend, version: int) -> int:
    """Records sealed by ``version`` (format 2), read with the plain driver or straight from the file."""
    prefix = f"kc:2:{version}:"
    if backend.name == "json":
        try:
            document = json.loads((backend.folder / "data.json").read_text())
        except (OSError, ValueError):
            return -1
        return sum(1 for entry in document["userKey"] if str(entry.get("key") or "").startswith(prefix))
    rows = backend.sql('SELECT COUNT(*) FROM "UserKeys" WHERE "Key" LIKE ?', (prefix + "%",))
    return int(rows[0][0])


# -- clients during a rotation -----------------------------------------------------------------------------


class Load(threading.Thread):
    """GETs known users' keys in a loop through a running service, and PUTs new keys for a few
    others; counts every answer that is not 200 with the right key."""

    def __init__(
        self, url: str, issuer: DevIssuer, readers: dict[uuid.UUID, bytes], writers: list[uuid.UUID]
    ):
        super().__init__(daemon=True)
        self.url = url
        self.readers = list(readers.items())
        self.writers = writers
        self.tokens = {user: issuer.mint(user) for user in [*readers, *writers]}
        self.written: dict[uuid.UUID, bytes] = {}
        self.gets = 0
        self.puts = 0
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def _headers(self, user: uuid.UUID) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            turn = 0
            while not self._stop_event.is_set():
                user, key = self.readers[turn % len(self.readers)]
                turn += 1
                try:
                    response = client.get("/user-keys", headers=self._headers(user))
                    if response.status_code != 200 or response.json() != {"key": b64(key)}:
                        self.errors.append(f"GET {user}: {response.status_code} {response.text[:300]}")
                    self.gets += 1
                    if turn % 10 == 0:
                        writer = self.writers[(turn // 10) % len(self.writers)]
                        new = secrets.token_bytes(32)
                        response = client.put(
                            "/user-keys", json={"key": b64(new)}, headers=self._headers(writer)
                        )
                        if response.status_code == 200:
                            self.written[writer] = new
                            self.puts += 1
                        else:
                            self.errors.append(f"PUT {writer}: {response.status_code} {response.text[:300]}")
                except httpx.HTTPError as exc:
                    self.errors.append(f"{user}: {exc!r}")
                time.sleep(0.004)  # a steady stream, not a benchmark: leave the CPU to the rotation

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def wait_for(self, gets: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.gets < gets and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.gets >= gets, f"the load made only {self.gets} GETs: {self.errors[:3]}"


def check_through_service(service: Service, issuer: DevIssuer, expected: dict[uuid.UUID, bytes]) -> None:
    with service.client() as client:
        for user, key in expected.items():
            response = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})
            assert response.status_code == 200, response.text
            assert response.json() == {"key": b64(key)}


# -- rotate-data-key ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_data_key_rotation_under_load_killed_and_resumed(
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
    keys = run(seed(site.settings, 2000))
    ghost = uuid.uuid4()
    backend.insert_null_key_row(ghost)  # a row with no key: left alone, still one row
    users = list(keys)
    readers = {user: keys[user] for user in users[:200]}
    writers = users[200:220]

    service: Service = start_service(site.env)
    load = Load(service.url, issuer, readers, writers)
    load.start()
    try:
        load.wait_for(20)
        output = kill_midway(
            [*ROTATE, "--settle-seconds", SETTLE, "--batch-size", "100", "--max-rate", "2000"],
            site.env,
            lambda: count_version(backend, 2) >= 400,
            "a fifth of the records were done",
        )
        gets_before_kill = load.gets
        assert "made data-key version 2" in output
        killed_at = count_version(backend, 2)
        assert 400 <= killed_at < 2000, killed_at

        # Half-rotated: version 2 current, version 1 still active; reads go on over both.
        state = run(read_state(site.settings))
        assert (state.ring.current, state.ring.active) == (2, [1, 2])
        load.wait_for(gets_before_kill + 50)

        capsys.readouterr()
        assert main(["rotate-data-key", "--config", str(site.config), "--settle-seconds", SETTLE]) == 0
        report = capsys.readouterr().out
        assert "finishing the unfinished rotation to version 2" in report
        assert "made data-key version" not in report
        assert "version 2 is current" in report and "retired version(s) 1" in report
        assert "records/s" in report
        load.wait_for(load.gets + 20)
    finally:
        load.stop()

    assert load.errors == [], load.errors[:5]
    assert load.gets > gets_before_kill > 20 and load.puts > 0

    expected = dict(keys) | load.written
    state = run(read_state(site.settings))
    assert set(state.records) == set(keys) | {ghost} and state.rows == len(keys) + 1  # none lost or doubled
    assert state.records[ghost] is None
    assert state.ring.current == 2 and state.ring.active == [2]
    assert state.ring.versions[1].state == RETIRED and state.ring.versions[1].wraps == {}
    assert list(state.ring.versions[2].wraps) == [fingerprint(site.settings)]
    for user, key in expected.items():
        record = state.records[user]
        assert record is not None and record.startswith("kc:2:2:")
        assert state.keys.open(record, user) == key
    assert count_version(backend, 2) == len(keys)

    check_through_service(service, issuer, {user: expected[user] for user in [*users[:50], *writers]})


def test_second_rotation_and_records_that_do_not_decrypt(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    issuer: DevIssuer,
    pfx: Pfx,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = make_backend("sqlite", tmp_path, request)
    site = deployment(backend, issuer, pfx, "site")
    keys = run(seed(site.settings, 500))
    config = ["--config", str(site.config), "--settle-seconds", "0", "--batch-size", "64"]
    assert main(["rotate-data-key", *config]) == 0

    # A record another user's row was copied into, and one the database mangled: both fail, are left
    # as they are, and keep their version (3 made now; 2 stays active for the damaged records).
    alice, bob, carol = list(keys)[:3]
    records = run(read_state(site.settings)).records
    backend.sql('UPDATE "UserKeys" SET "Key" = ? WHERE "Id" = ?', (records[alice], backend.guid(bob)))
    backend.sql('UPDATE "UserKeys" SET "Key" = ? WHERE "Id" = ?', ("kc:2:2:AAAA", backend.guid(carol)))
    capsys.readouterr()
    assert main(["rotate-data-key", *config]) == 1
    captured = capsys.readouterr()
    assert "made data-key version 3" in captured.out
    assert "2 record(s) failed" in captured.err and str(bob) in captured.err and str(carol) in captured.err
    assert "retired nothing" in captured.out
    state = run(read_state(site.settings))
    assert state.ring.current == 3 and state.ring.active == [2, 3]
    assert state.records[bob] == records[alice] and state.records[carol] == "kc:2:2:AAAA"
    healthy = {user: key for user, key in keys.items() if user not in (bob, carol)}
    assert all(state.keys.open(state.records[u] or "", u) == k for u, k in healthy.items())
    assert all((state.records[u] or "").startswith("kc:2:3:") for u in healthy)

    # The rotation stays unfinished (no version 4) until the damaged records are dealt with.
    capsys.readouterr()
    assert main(["rotate-data-key", *config]) == 1
    assert "finishing the unfinished rotation to version 3" in capsys.readouterr().out
    backend.sql('DELETE FROM "UserKeys" WHERE "Id" IN (?, ?)', (backend.guid(bob), backend.guid(carol)))
    assert main(["rotate-data-key", *config]) == 0
    state = run(read_state(site.settings))
    assert state.ring.active == [3] and state.ring.versions[2].state == RETIRED
    assert main(["rotate-data-key", *config]) == 0  # finished: the next run makes version 4
    assert run(read_state(site.settings)).ring.active == [4]


# -- rotate-key-pair ---------------------------------------------------------------------------------------


def new_pair_settings(pfx: Pfx) -> dict[str, str]:
    return {
        "rsaKey__provider": "certificate",
        "certificate__provider": "filesystem",
        "certificate__filesystemPath": str(pfx.path),
        "certificate__filesystemPassword": pfx.password,
    }


@pytest.mark.parametrize("name", ALL)
def test_key_pair_rotation_online(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    new_pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = make_backend(name, tmp_path, request)
    new_pair = new_pair_settings(new_pfx)
    # The old deployment names the new pair in its transferTo settings (postgresql) or the new
    # settings file is given as --target-config (sqlite).
    transfer = (
        {f"transferTo__{key}": value for key, value in new_pair.items()} if name == "postgresql" else {}
    )
    old = deployment(backend, issuer, pfx, "old", **transfer)
    new = deployment(backend, issuer, new_pfx, "new", **new_pair)
    target = [] if transfer else ["--target-config", str(new.config)]
    keys = run(seed(old.settings, 1000))
    users = list(keys)
    before = run(read_state(old.settings))
    old_fp = fingerprint(old.settings)

    old_service: Service = start_service(old.env)
    load = Load(old_service.url, issuer, {u: keys[u] for u in users[:100]}, users[100:110])
    load.start()
    try:
        load.wait_for(20)
        capsys.readouterr()
        assert main(["rotate-key-pair", "--config", str(old.config), *target]) == 0
        assert "version(s) 1 now also wrapped by" in capsys.readouterr().out
        rotated = run(read_state(old.settings))
        new_fp = next(fp for fp in rotated.ring.versions[1].wraps if fp != old_fp)
        assert set(rotated.ring.versions[1].wraps) == {old_fp, new_fp}
        assert rotated.ring.versions[1].wraps[old_fp] == before.application_datas
        assert rotated.application_datas == before.application_datas  # upstream's row: untouched

        # Idempotent: nothing new, the ring not even rewritten.
        assert main(["rotate-key-pair", "--config", str(old.config), *target]) == 0
        assert "nothing to do" in capsys.readouterr().out
        assert run(read_state(old.settings)).ring.revision == rotated.ring.revision

        # An instance with the new settings serves the same keys, next to the old one.
        new_service: Service = start_service(new.env)
        load.wait_for(load.gets + 20)
        check_through_service(new_service, issuer, {u: keys[u] for u in users[:20]})

        # No data-key rotation while two key pairs are in use.
        assert main(["rotate-data-key", "--config", str(old.config), "--settle-seconds", "0"]) == 1
        assert "Finish the key-pair rotation first" in capsys.readouterr().err

        load.wait_for(load.gets + 20)
    finally:
        load.stop()
    assert load.errors == [], load.errors[:5]
    assert load.puts > 0

    # Every instance runs with the new settings now (the old one is stopped): retire the old pair.
    old_service.stop()
    assert main(["rotate-key-pair", "--config", str(new.config), "--retire-old"]) == 0
    assert f"removed the wraps of {old_fp}" in capsys.readouterr().out
    retired = run(read_state(new.settings))
    assert retired.ring.versions[1].wraps == {new_fp: retired.application_datas}
    assert main(["rotate-key-pair", "--config", str(new.config), "--retire-old"]) == 0
    assert "no other key pair's wraps to remove" in capsys.readouterr().out

    # Upstream pointed at the new PFX reads ApplicationDatas and the records in its format.
    private_key = pkcs12.load_key_and_certificates(new_pfx.path.read_bytes(), new_pfx.password.encode())[0]
    assert isinstance(private_key, rsa.RSAPrivateKey)
    data_key = private_key.decrypt(base64.b64decode(retired.application_datas or ""), OAEP_SHA1)
    expected = dict(keys) | load.written
    for user in users[:50]:
        blob = base64.b64decode(retired.records[user] or "")
        assert AESGCM(data_key).decrypt(blob[-NONCE_SIZE:], blob[:-NONCE_SIZE], None) == expected[user]
    check_through_service(new_service, issuer, {u: expected[u] for u in [*users[-20:], *load.written]})

    # The old settings now fail, saying why (the same loading of the data keys as `serve` at start-up):
    # a key pair the database's data key does not open is a setting to fix, exit 2.
    assert main(["rotate-data-key", "--config", str(old.config)]) == 2
    failed = capsys.readouterr().err
    assert "does not unwrap with this key pair" in failed
    assert pfx.password not in failed and new_pfx.password not in failed

    # With one key pair again, the data key can rotate; the new version is wrapped by the new pair only.
    assert main(["rotate-data-key", "--config", str(new.config), "--settle-seconds", "0"]) == 0
    final = run(read_state(new.settings))
    assert final.ring.active == [2] and list(final.ring.versions[2].wraps) == [new_fp]
    assert all(final.keys.open(final.records[u] or "", u) == expected[u] for u in users)


def test_wrong_new_key_pair_fails_before_anything_is_written(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    issuer: DevIssuer,
    pfx: Pfx,
    new_pfx: Pfx,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = make_backend("sqlite", tmp_path, request)
    site = deployment(backend, issuer, pfx, "site")
    database = backend.folder / "kc.db"
    wrong_password = deployment(
        backend, issuer, new_pfx, "wrong", **{"certificate__filesystemPassword": "nope"}
    )
    missing = deployment(
        backend, issuer, new_pfx, "missing", **{"certificate__filesystemPath": str(tmp_path / "no.pfx")}
    )

    # A deployment that has nothing yet: not even the database file gets made.
    for target in (wrong_password, missing):
        assert (
            main(["rotate-key-pair", "--config", str(site.config), "--target-config", str(target.config)])
            == 2
        )
        assert "keyConnectorSettings__certificate__filesystem" in capsys.readouterr().err
        assert not database.exists()
    assert main(["rotate-key-pair", "--config", str(site.config)]) == 2
    assert "keyConnectorSettings__transferTo__rsaKey__provider" in capsys.readouterr().err
    assert not database.exists()

    run(seed(site.settings, 10))
    before = run(read_state(site.settings))
    assert (
        main(["rotate-key-pair", "--config", str(site.config), "--target-config", str(wrong_password.config)])
        == 2
    )
    err = capsys.readouterr().err
    assert "nope" not in err and new_pfx.password not in err
    after = run(read_state(site.settings))
    assert (after.ring.revision, after.application_datas, after.records) == (
        0,
        before.application_datas,
        before.records,
    )

    # Retiring before rotating is refused, and writes nothing either.
    new = deployment(backend, issuer, new_pfx, "new")
    assert main(["rotate-key-pair", "--config", str(new.config), "--retire-old"]) == 1
    assert "refusing to retire the other key pairs" in capsys.readouterr().err
    assert run(read_state(site.settings)).ring.revision == 0
    assert (after.application_datas, after.records) == (before.application_datas, before.records)
    # The same key pair as "new": nothing to do.
    assert main(["rotate-key-pair", "--config", str(site.config), "--target-config", str(site.config)]) == 0
    assert "nothing to do" in capsys.readouterr().out
