"""`keyconnector transfer` and serve's start-up transfer, between real databases and real key pairs.

Sources hold records written with upstream's algorithm (tests/test_compat.py: AES-GCM written out
by hand, data key wrapped with the PFX's public key by hand) and format-2 records of a second
data-key version, plus rows without a key. Every target is checked record by record through the
repository, decrypting with upstream's algorithm under the target's own key pair (a fresh target
seals in upstream's format), and a sample through a real `keyconnector serve` on the target.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keyconnector.core.envelope import DataKey
from keyconnector.core.keyring import KeyRing, RingVersion, save_ring
from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.errors import ConfigurationError
from keyconnector.keypairs import open_key_provider
from keyconnector.keypairs.generate import self_signed_pfx
from keyconnector.ops import open_side
from keyconnector.ops.transfer import TransferResult, run_startup_transfer, transfer, verify_copy
from keyconnector.runtime.settings import load_settings, side_of
from keyconnector.storage.base import Repository, UserKeyRecord
from keyconnector.storage.registry import migrate, open_repository
from tests.conftest import Pfx, base_env
from tests.support.backends import Backend, make_backend, run, with_repository
from tests.support.envelopes import format2_open, upstream_open, upstream_seal, upstream_unwrap, upstream_wrap

SETTINGS = "keyConnectorSettings__"


# -- deployments -------------------------------------------------------------------------------------


@dataclass
class Deployment:
    """A database and the key pair its data key is wrapped with."""

    backend: Backend
    pfx: Pfx

    def env(self, prefix: str = "") -> dict[str, str]:
        """Its settings as upstream env names, under ``prefix`` (``transferTo__`` for a target)."""
        env = {f"{SETTINGS}{prefix}database__{name}": value for name, value in self.backend.plain.items()}
        env.update(
            {
                f"{SETTINGS}{prefix}rsaKey__provider": "certificate",
                f"{SETTINGS}{prefix}certificate__provider": "filesystem",
                f"{SETTINGS}{prefix}certificate__filesystemPath": str(self.pfx.path),
                f"{SETTINGS}{prefix}certificate__filesystemPassword": self.pfx.password,
            }
        )
        return env

    def service_env(self, issuer: DevIssuer) -> dict[str, str]:
        """A `serve` environment on this deployment."""
        env = base_env(issuer, self.pfx, self.backend.folder / "unused.db")
        env = {k: v for k, v in env.items() if "__database__" not in k}
        env.update(self.env())
        return env


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("keyconnectorsettings")}
    env.pop("ASPNETCORE_URLS", None)
    return env


def command_env(source: Deployment, target: Deployment | None = None) -> dict[str, str]:
    """The source as the configured deployment; the target (if given) as its transferTo settings."""
    env = clean_env()
    env.update(source.env())
    if target is not None:
        env.update(target.env("transferTo__"))
    return env


def keyconnector(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def other_pfx(tmp_path_factory: pytest.TempPathFactory) -> Pfx:
    """A second key pair, for targets wrapped by another key than the source."""
    path = tmp_path_factory.mktemp("other-pfx") / "other.pfx"
    path.write_bytes(self_signed_pfx("other-pfx-password", bits=2048))
    return Pfx(path, "other-pfx-password")


def deployment(kind: str, pfx: Pfx, folder: Path, request: pytest.FixtureRequest) -> Deployment:
    folder.mkdir(parents=True, exist_ok=True)
    return Deployment(make_backend(kind, folder, request), pfx)


# -- source data ---------------------------------------------------------------------------------------


@dataclass
class Expected:
    """What the source holds: each user's plaintext (None: a row without a key) and row."""

    plaintexts: dict[uuid.UUID, bytes | None]
    rows: dict[uuid.UUID, UserKeyRecord]


def _dates(i: int) -> tuple[datetime, datetime | None, datetime | None]:
    created = datetime(2022, 3, 4, 5, 6, 7) + timedelta(minutes=i, microseconds=(i * 7919) % 1_000_000)
    revised = created + timedelta(days=3, microseconds=1) if i % 3 == 0 else None
    accessed = created + timedelta(days=30, microseconds=999_999) if i % 2 == 0 else None
    return created, revised, accessed


def populate(
    source: Deployment, *, upstream: int = 1200, format2: int = 600, without_key: int = 20
) -> Expected:
    """A deployment that has rotated its data key once: ``upstream`` records sealed by upstream's
    algorithm under version 1 (the key in ApplicationDatas), ``format2`` records of version 2."""
    settings = load_settings(source.env()).settings
    migrate(settings.database)

    async def body() -> Expected:
        repository = await open_repository(settings.database)
        provider = await open_key_provider(side_of(settings))
        try:
            version1, version2 = secrets.token_bytes(32), secrets.token_bytes(32)
            wrapped1 = upstream_wrap(source.pfx, version1)
            assert await repository.store_wrapped_data_key(wrapped1) == wrapped1
            fingerprint = provider.fingerprint
            ring = KeyRing(
                revision=0,
                current=2,
                versions={
                    1: RingVersion(1, wraps={fingerprint: wrapped1}),
                    2: RingVersion(2, wraps={fingerprint: upstream_wrap(source.pfx, version2)}),
                },
            )
            ring.auth_key = secrets.token_bytes(32)  # as keyconnector authenticates its rings
            ring.seal_versions({1: DataKey(version1, 1), 2: DataKey(version2, 2)})
            await save_ring(repository, ring)
            sealer = DataKey(version2, 2)
            expected = Expected({}, {})
            for i in range(upstream + format2 + without_key):
                user, plaintext = uuid.uuid4(), secrets.token_bytes(32)
                if i < upstream:
                    record: str | None = upstream_seal(version1, plaintext)
                elif i < upstream + format2:
                    record = sealer.seal(plaintext, user)
                else:
                    record, plaintext = None, None  # type: ignore[assignment]
                expected.plaintexts[user] = plaintext
                expected.rows[user] = UserKeyRecord(user, record, *_dates(i))
            await repository.upsert_records(list(expected.rows.values()))
            return expected
        finally:
            await provider.aclose()
            await repository.aclose()

    return run(body())


async def all_records(repository: Repository) -> list[UserKeyRecord]:
    return [record async for batch in repository.iter_records(500) for record in batch]


def read_records(target: Deployment) -> list[UserKeyRecord]:
    return with_repository(target.backend.settings, all_records)


def stored_data_key(target: Deployment) -> str | None:
    return with_repository(target.backend.settings, lambda repository: repository.get_wrapped_data_key())


def assert_exactly_once(target: Deployment) -> None:
    """No user twice: by the primary key in SQL, by the file's array for the JSON backend."""
    if target.backend.name == "json":
        document = json.loads((target.backend.folder / "data.json").read_text())
        ids = [entry["id"].lower() for entry in document["userKey"]]
        assert len(ids) == len(set(ids))
        return
    count, distinct = target.backend.sql('SELECT COUNT(*), COUNT(DISTINCT "Id") FROM "UserKeys"')[0]
    assert count == distinct


def assert_target_holds(
    target: Deployment, expected: Expected, *, missing: Collection[uuid.UUID] = ()
) -> None:
    """Every expected user exactly once, decrypting (upstream's algorithm, the TARGET's key pair) to
    the source's plaintext, with the source's dates; ``missing`` users absent."""
    assert_exactly_once(target)
    wrapped = stored_data_key(target)
    assert wrapped is not None
    data_key = upstream_unwrap(target.pfx, wrapped)
    found = {record.user_id: record for record in read_records(target)}
    assert set(found) == set(expected.plaintexts) - set(missing)
    for user, record in found.items():
        source = expected.rows[user]
        assert (record.creation_date, record.revision_date, record.last_access_date) == (
            source.creation_date,
            source.revision_date,
            source.last_access_date,
        ), user
        plaintext = expected.plaintexts[user]
        if plaintext is None:
            assert record.key is None
        else:
            assert record.key is not None, user
            # Format 2 (bound to the user) by default; upstream's format with writeLegacyFormat.
            if record.key.startswith("kc:2:1:"):
                assert format2_open(data_key, user, record.key) == plaintext, user
            else:
                assert upstream_open(data_key, record.key) == plaintext, user


def assert_served(target: Deployment, expected: Expected, issuer: DevIssuer, start_service: Any) -> None:
    """A sample read back by a real service running on the target."""
    service = start_service(target.service_env(issuer))
    with_key = [user for user, plaintext in expected.plaintexts.items() if plaintext is not None]
    without_key = [user for user, plaintext in expected.plaintexts.items() if plaintext is None]
    with service.client() as client:
        for user in with_key[:5] + with_key[-5:]:
            response = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})
            assert response.status_code == 200, response.text
            assert base64.b64decode(response.json()["key"]) == expected.plaintexts[user]
        response = client.get(
            "/user-keys", headers={"Authorization": f"Bearer {issuer.mint(without_key[0])}"}
        )
        assert response.status_code == 404
    service.stop()


# -- transfers between backends ------------------------------------------------------------------------------

PAIRS = [
    # source, target, how the target is given (the transferTo settings are used in this process; the
    # other ways through the command), whether the target has a key pair of its own, and whether a
    # real service on the target reads a sample back
    ("sqlite", "postgresql", "transferTo", True, True),
    ("postgresql", "mariadb", "target-env-file", False, True),
    ("json", "sqlite", "target-config", True, True),
    ("mariadb", "json", "transferTo", False, True),
    ("sqlite", "sqlite", "transferTo", True, False),
]


@pytest.mark.parametrize(("source_kind", "target_kind", "how", "own_key_pair", "serve"), PAIRS)
def test_every_record_is_copied_reencrypted_and_verified(
    source_kind: str,
    target_kind: str,
    how: str,
    own_key_pair: bool,
    serve: bool,
    pfx: Pfx,
    other_pfx: Pfx,
    issuer: DevIssuer,
    start_service: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    source = deployment(source_kind, pfx, tmp_path / "source", request)
    target = deployment(target_kind, other_pfx if own_key_pair else pfx, tmp_path / "target", request)
    expected = populate(source)
    if how == "transferTo":
        result = run(transfer(load_settings(command_env(source, target)).settings, batch_size=500))
        assert (result.records, result.copied, result.without_key, result.failed) == (1820, 1800, 20, [])
        assert result.verified == 1820
    else:
        if how == "target-env-file":
            env_file = tmp_path / "target.env"
            env_file.write_text("".join(f"{name}={value}\n" for name, value in target.env().items()))
            extra = ["--target-env-file", str(env_file)]
        else:
            config = tmp_path / "target.json"
            section: dict[str, Any] = {}
            for name, value in target.env().items():
                path = name.removeprefix(SETTINGS).split("__")
                section.setdefault(path[0], {})[path[1]] = value
            config.write_text(json.dumps({"keyConnectorSettings": section}))
            extra = ["--target-config", str(config)]
        command = keyconnector("transfer", *extra, "--batch-size", "500", env=command_env(source))
        assert command.returncode == 0, command.stderr
        assert "copied 1,820 record(s) (20 of them without a key), 0 failed" in command.stdout
        assert "verified 1,820" in command.stdout
        assert pfx.password not in command.stderr + command.stdout
        assert other_pfx.password not in command.stderr + command.stdout
    assert_target_holds(target, expected)
    if serve:
        assert_served(target, expected, issuer, start_service)


# -- failures ------------------------------------------------------------------------------------------------


def test_a_record_that_does_not_decrypt_fails_alone_and_is_named(
    pfx: Pfx, other_pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    target = deployment("sqlite", other_pfx, tmp_path / "target", request)
    expected = populate(source, upstream=600, format2=300, without_key=5)
    users = list(expected.plaintexts)
    tampered, moved_from, moved_to = users[10], users[700], users[800]
    # An upstream record with one ciphertext byte flipped (still valid base64, wrong tag), and a
    # format-2 record copied into another user's row (bound to its user: does not open there).
    blob = bytearray(base64.b64decode(expected.rows[tampered].key or ""))
    blob[3] ^= 0x01
    source.backend.sql(
        'UPDATE "UserKeys" SET "Key" = ? WHERE "Id" = ?',
        (base64.b64encode(bytes(blob)).decode(), source.backend.guid(tampered)),
    )
    source.backend.sql(
        'UPDATE "UserKeys" SET "Key" = ? WHERE "Id" = ?',
        (expected.rows[moved_from].key, source.backend.guid(moved_to)),
    )

    result = keyconnector("transfer", env=command_env(source, target))
    assert result.returncode == 1, result.stderr
    assert "2 record(s) failed" in result.stderr
    assert str(tampered) in result.stderr and str(moved_to) in result.stderr
    assert str(moved_from) not in result.stderr.replace(f"user {moved_to}", "")
    assert_target_holds(target, expected, missing={tampered, moved_to})


def test_verification_catches_target_records_that_differ_and_a_rerun_repairs_them(
    pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two upstream-format records swapped in the target both decrypt (they are not bound to their
    user): only the comparison with the source finds them."""
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    target = deployment("postgresql", pfx, tmp_path / "target", request)
    expected = populate(source, upstream=300, format2=100, without_key=3)
    settings = load_settings(command_env(source, target)).settings
    first = run(transfer(settings))
    assert first.verified == 403 and not first.failed
    one, two = list(expected.plaintexts)[:2]
    rows = dict(target.backend.sql('SELECT "Id", "Key" FROM "UserKeys" WHERE "Id" IN (?, ?)', (one, two)))
    for user, other in ((one, two), (two, one)):
        target.backend.sql('UPDATE "UserKeys" SET "Key" = ? WHERE "Id" = ?', (rows[other], user))
    deleted = list(expected.plaintexts)[2]
    target.backend.sql('DELETE FROM "UserKeys" WHERE "Id" = ?', (deleted,))

    async def verify_again() -> TransferResult:
        source_side = await open_side(side_of(settings), name="source", create=False)
        target_side = await open_side(side_of(settings, transfer=True), name="target", create=False)
        try:
            result = TransferResult("source", "target", records=403)
            await verify_copy(source_side, target_side, result, 50)
            return result
        finally:
            await source_side.aclose()
            await target_side.aclose()

    checked = run(verify_again())
    assert sorted(checked.failed) == sorted([one, two, deleted])
    assert checked.verified == 400

    again = run(transfer(settings))
    assert again.verified == 403 and not again.failed
    assert_target_holds(target, expected)


def test_dry_run_writes_nothing(
    pfx: Pfx, other_pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    populate(source, upstream=200, format2=100, without_key=2)

    # A target that does not exist yet stays so.
    fresh = deployment("sqlite", other_pfx, tmp_path / "fresh", request)
    result = keyconnector("transfer", "--dry-run", env=command_env(source, fresh))
    assert result.returncode == 0, result.stderr
    assert "would copy 302 record(s) (2 of them without a key), 0 failed" in result.stdout
    assert "no data key yet" in result.stderr
    assert not (fresh.backend.folder / "kc.db").exists()

    # A target with data already keeps exactly what it had.
    existing = deployment("postgresql", other_pfx, tmp_path / "existing", request)
    populate(existing, upstream=50, format2=0, without_key=0)
    before = existing.backend.sql('SELECT * FROM "UserKeys" ORDER BY "Id"')
    data_before = existing.backend.sql('SELECT * FROM "ApplicationDatas"')
    dry = run(transfer(load_settings(command_env(source, existing)).settings, dry_run=True))
    assert (dry.copied, dry.without_key, dry.failed) == (300, 2, [])
    assert existing.backend.sql('SELECT * FROM "UserKeys" ORDER BY "Id"') == before
    assert existing.backend.sql('SELECT * FROM "ApplicationDatas"') == data_before


def test_a_wrong_target_key_pair_fails_before_anything_is_written(
    pfx: Pfx, other_pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    populate(source, upstream=100, format2=50, without_key=1)

    # A wrong PFX password: nothing is created at all.
    fresh = deployment("sqlite", Pfx(other_pfx.path, "not-the-password"), tmp_path / "fresh", request)
    result = keyconnector("transfer", env=command_env(source, fresh))
    assert result.returncode != 0
    assert "transferTo__certificate" in result.stderr
    assert "not-the-password" not in result.stderr
    assert not (fresh.backend.folder / "kc.db").exists()

    # A PFX that is not the one the target's data key is wrapped with: no row is written.
    existing = deployment("postgresql", pfx, tmp_path / "existing", request)
    populate(existing, upstream=20, format2=0, without_key=0)
    before = existing.backend.sql('SELECT * FROM "UserKeys" ORDER BY "Id"')
    wrong = Deployment(existing.backend, other_pfx)
    result = keyconnector("transfer", env=command_env(source, wrong))
    # The takeover guard's refusal: a setting to fix (exit 2), named as the target's.
    assert result.returncode == 2, result.stderr
    assert (
        "transferTo__certificate__filesystemPath" in result.stderr  # the setting that picks the key pair
        and "does not open with this key pair" in result.stderr
    )
    assert existing.backend.sql('SELECT * FROM "UserKeys" ORDER BY "Id"') == before


# -- interrupted and re-run -------------------------------------------------------------------------------


def _count(target: Deployment) -> int:
    if target.backend.name == "json":
        path = target.backend.folder / "data.json"
        try:
            return len(json.loads(path.read_text())["userKey"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return 0
    if target.backend.name == "sqlite" and not (target.backend.folder / "kc.db").exists():
        return 0
    try:
        return int(target.backend.sql('SELECT COUNT(*) FROM "UserKeys"')[0][0])
    except Exception:  # the schema is not there yet
        return 0


@pytest.mark.parametrize("target_kind", ["postgresql", "mariadb", "json", "sqlite"])
def test_sigkill_in_the_middle_then_a_rerun_completes_the_copy(
    target_kind: str, pfx: Pfx, other_pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    target = deployment(target_kind, other_pfx, tmp_path / "target", request)
    expected = populate(source, upstream=2000, format2=1000, without_key=10)
    total = len(expected.plaintexts)
    env = command_env(source, target)
    process = subprocess.Popen(
        [sys.executable, "-m", "keyconnector", "transfer", "--batch-size", "10"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while _count(target) < total // 10 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        _, errors = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, errors.decode(errors="replace")
    copied = _count(target)
    assert 0 < copied < total, f"killed at {copied} of {total}: not in the middle"

    # The re-run (in this process: the same code, without another interpreter start-up).
    result = run(transfer(load_settings(env).settings))
    assert (result.verified, result.failed) == (total, [])
    assert_target_holds(target, expected)


# -- serve's start-up transfer ----------------------------------------------------------------------


def startup_env(source: Deployment, target: Deployment, issuer: DevIssuer, lock: Path) -> dict[str, str]:
    env = source.service_env(issuer)
    env.update(target.env("transferTo__"))
    env[f"{SETTINGS}transferTo__lockfilePath"] = str(lock)
    return env


def test_serve_transfers_at_start_up_once_and_writes_the_lock_file_after_verifying(
    pfx: Pfx,
    other_pfx: Pfx,
    issuer: DevIssuer,
    start_service: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    target = deployment("postgresql", other_pfx, tmp_path / "target", request)
    expected = populate(source, upstream=400, format2=200, without_key=4)
    lock = tmp_path / "transfer.lock"
    env = startup_env(source, target, issuer, lock)

    service = start_service(env)
    assert "transferred and verified 604 record(s) (4 of them without a key)" in lock.read_text()
    assert_target_holds(target, expected)
    user = next(iter(expected.plaintexts))
    with service.client() as client:  # it serves the configured (source) database
        response = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})
        assert base64.b64decode(response.json()["key"]) == expected.plaintexts[user]
        newcomer = uuid.uuid4()
        response = client.post(
            "/user-keys",
            json={"key": base64.b64encode(secrets.token_bytes(32)).decode()},
            headers={"Authorization": f"Bearer {issuer.mint(newcomer)}"},
        )
        assert response.status_code == 200
    service.stop()

    # The lock file exists: the next start does not transfer again (the newcomer stays behind). What
    # serve runs at start, called here directly: the first start above proved serve calls it.
    stamp = lock.read_text()
    with caplog.at_level(logging.INFO, logger="keyconnector.transfer"):
        run_startup_transfer(load_settings(env).settings)
    assert "not transferring again" in caplog.text
    assert lock.read_text() == stamp
    assert newcomer not in {record.user_id for record in read_records(target)}


def test_a_failed_start_up_transfer_writes_no_lock_file_and_serve_exits_non_zero(
    pfx: Pfx, other_pfx: Pfx, issuer: DevIssuer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    target = deployment("sqlite", other_pfx, tmp_path / "target", request)
    expected = populate(source, upstream=100, format2=50, without_key=1)
    broken = list(expected.plaintexts)[120]
    source.backend.sql(
        'UPDATE "UserKeys" SET "Key" = ? WHERE "Id" = ?', ("kc:2:2:AAAA", source.backend.guid(broken))
    )
    lock = tmp_path / "transfer.lock"
    result = subprocess.run(
        [sys.executable, "-m", "keyconnector", "serve", "--port", str(free_port())],
        env=startup_env(source, target, issuer, lock),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert f"1 record(s) failed: {broken}" in result.stderr
    assert not lock.exists()
    assert_target_holds(target, expected, missing={broken})
    # Nothing listened: the failure stopped serve before it served.
    assert "listening on" not in result.stderr


def test_the_lock_folder_must_exist(
    pfx: Pfx, other_pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    target = deployment("sqlite", other_pfx, tmp_path / "target", request)
    populate(source, upstream=5, format2=0, without_key=0)
    env = command_env(source, target)
    env[f"{SETTINGS}transferTo__lockfilePath"] = str(tmp_path / "missing-folder" / "transfer.lock")
    with pytest.raises(ConfigurationError) as failure:
        run_startup_transfer(load_settings(env).settings)
    assert failure.value.setting == "transferTo.lockfilePath"
    assert not (target.backend.folder / "kc.db").exists()
