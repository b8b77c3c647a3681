"""The record-changing commands as a script sees them: `transfer`, `rotate-key-pair`, `rotate-data-key`,
`upgrade-records` and `downgrade-records`, run as real `keyconnector` processes on real SQLite databases.

What a script relies on, for each: the exit code (0 done, 1 records failed, 2 a setting, 3 a
dependency unreachable), stdout holding the result and nothing else (one JSON document with
``--json``, whose shape docs/cli.md documents), and ``--dry-run`` writing nothing at all: the
database file is compared byte for byte before and after. A transfer's failures on the target's
side say "target" and name the target's setting, since an operator has two deployments' settings
in front of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx
from tests.support.backends import make_backend
from tests.test_rotate import Deployment as Site
from tests.test_rotate import deployment as site_of
from tests.test_rotate import new_pfx, run, seed
from tests.test_transfer import (
    Deployment,
    command_env,
    deployment,
    keyconnector,
    other_pfx,
    populate,
)

__all__ = ["new_pfx", "other_pfx"]  # fixtures, imported to be found by pytest

USERS = 30


def document(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """stdout as the one JSON document it must be (anything else on stdout fails here)."""
    parsed = json.loads(result.stdout)
    assert isinstance(parsed, dict), result.stdout
    return parsed


def snapshot(folder: Path) -> dict[str, str]:
    """Every file of a SQLite deployment's folder, by content: a dry run must not change one byte,
    nor leave a journal or a new file behind."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix != ".json"
    }


def assert_shape(doc: dict[str, Any], command: str, fields: set[str], *, ok: bool, dry_run: bool) -> None:
    head = {"ok", "exit_code", "command"} | ({"error"} if not ok else set())
    assert set(doc) == head | fields | {"dry_run"}, sorted(doc)
    assert doc["ok"] is ok and doc["exit_code"] == (0 if ok else 1) and doc["command"] == command
    assert doc["dry_run"] is dry_run


def kc(site: Site, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """A command with ``site``'s settings (and ``extra`` ones) in its environment."""
    env = dict(site.env)
    env.update({f"keyConnectorSettings__{key}": value for key, value in extra.items()})
    return keyconnector(*args, env=env)


@pytest.fixture
def site(tmp_path: Path, request: pytest.FixtureRequest, issuer: DevIssuer, pfx: Pfx) -> Site:
    """A SQLite deployment in upstream's state: a data key in ApplicationDatas, USERS records in
    upstream's format, no key ring yet."""
    backend = make_backend("sqlite", tmp_path / "site", request)
    backend.folder.mkdir(parents=True, exist_ok=True)
    made = site_of(backend, issuer, pfx, "site")
    run(seed(made.settings, USERS))
    return made


def damage_one_record(site: Site) -> uuid.UUID:
    """One upstream-format record with a ciphertext byte flipped: it no longer decrypts. The
    connection is closed (SQLite folds its write-ahead log into the file), so that the snapshots
    taken after it see the database file as every later reader will."""
    connection = sqlite3.connect(site.backend.folder / "kc.db")
    try:
        user, key = connection.execute(
            'SELECT "Id", "Key" FROM "UserKeys" ORDER BY "Id" DESC LIMIT 1'
        ).fetchone()
        blob = bytearray(base64.b64decode(key))
        blob[3] ^= 0x01
        connection.execute(
            'UPDATE "UserKeys" SET "Key" = ? WHERE "Id" = ?', (base64.b64encode(blob).decode(), user)
        )
        connection.commit()
    finally:
        connection.close()
    return uuid.UUID(user)


# -- transfer -----------------------------------------------------------------------------------------------

TRANSFER_FIELDS = {
    "source",
    "target",
    "records",
    "copied",
    "without_key",
    "verified",
    "failed",
    "copy_seconds",
    "verify_seconds",
}


def test_transfer_prints_its_summary_on_stdout_and_json_on_request(
    pfx: Pfx, other_pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    populate(source, upstream=20, format2=10, without_key=2)

    text = keyconnector(
        "transfer", env=command_env(source, deployment("sqlite", other_pfx, tmp_path / "a", request))
    )
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("\n") == 1 and "copied 32 record(s) (2 of them without a key)" in text.stdout
    assert "transfer: copy" in text.stderr  # progress stays on stderr

    target = deployment("sqlite", other_pfx, tmp_path / "b", request)
    result = keyconnector("transfer", "--json", env=command_env(source, target))
    assert result.returncode == 0, result.stderr
    doc = document(result)
    assert_shape(doc, "transfer", TRANSFER_FIELDS, ok=True, dry_run=False)
    assert (doc["records"], doc["copied"], doc["without_key"], doc["verified"], doc["failed"]) == (
        32,
        30,
        2,
        32,
        [],
    )
    assert doc["source"].startswith("sqlite ") and str(target.backend.folder) in doc["target"]
    assert pfx.password not in result.stdout + result.stderr


def test_transfer_dry_run_json_writes_nothing(
    pfx: Pfx, other_pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    populate(source, upstream=20, format2=10, without_key=2)
    target = deployment("sqlite", other_pfx, tmp_path / "target", request)
    populate(target, upstream=5, format2=0, without_key=0)
    before = snapshot(target.backend.folder)
    result = keyconnector("transfer", "--dry-run", "--json", env=command_env(source, target))
    assert result.returncode == 0, result.stderr
    doc = document(result)
    assert_shape(doc, "transfer", TRANSFER_FIELDS, ok=True, dry_run=True)
    assert (doc["records"], doc["copied"], doc["without_key"], doc["verified"]) == (32, 30, 2, None)
    assert snapshot(target.backend.folder) == before


def test_transfer_with_failed_records_exits_1_and_lists_them_in_json(
    pfx: Pfx, other_pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    expected = populate(source, upstream=20, format2=0, without_key=0)
    broken = list(expected.plaintexts)[3]
    blob = bytearray(base64.b64decode(expected.rows[broken].key or ""))
    blob[3] ^= 0x01
    source.backend.sql(
        'UPDATE "UserKeys" SET "Key" = ? WHERE "Id" = ?',
        (base64.b64encode(bytes(blob)).decode(), source.backend.guid(broken)),
    )
    target = deployment("sqlite", other_pfx, tmp_path / "target", request)
    result = keyconnector("transfer", "--json", env=command_env(source, target))
    assert result.returncode == 1, result.stderr
    doc = document(result)
    assert_shape(doc, "transfer", TRANSFER_FIELDS, ok=False, dry_run=False)
    assert doc["failed"] == [str(broken)] and doc["copied"] == 19 and str(broken) in doc["error"]
    assert f"keyconnector: transfer: 1 record(s) failed: {broken}" in result.stderr


def test_an_unreachable_target_database_is_exit_3_and_named_the_target(
    pfx: Pfx, other_pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    populate(source, upstream=5, format2=0, without_key=0)
    env = command_env(source)
    env.update(Deployment(source.backend, other_pfx).env("transferTo__"))
    env["keyConnectorSettings__transferTo__database__provider"] = "postgresql"
    env["keyConnectorSettings__transferTo__database__postgreSqlConnectionString"] = (
        f"Host=127.0.0.1;Port={free_port()};Database=kc;Username=kc;Password=pg-secret-password"
    )
    for args in (["transfer"], ["transfer", "--dry-run"]):
        result = keyconnector(*args, "--json", env=env)
        assert result.returncode == 3, result.stderr
        assert result.stderr.startswith("keyconnector: the target: database is unavailable"), result.stderr
        assert document(result) == {
            "ok": False,
            "exit_code": 3,
            "error": result.stderr.strip()[len("keyconnector: ") :],
        }
        assert "pg-secret-password" not in result.stdout + result.stderr


def test_a_wrong_target_setting_is_exit_2_and_names_the_target_and_its_setting(
    pfx: Pfx, other_pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment("sqlite", pfx, tmp_path / "source", request)
    populate(source, upstream=5, format2=0, without_key=0)
    wrong = Deployment(
        deployment("sqlite", other_pfx, tmp_path / "target", request).backend, Pfx(other_pfx.path, "wrong-pw")
    )

    # Given as transferTo__*: the setting's name says transferTo, the message says target.
    result = keyconnector("transfer", env=command_env(source, wrong))
    assert result.returncode == 2, result.stderr
    assert (
        "keyconnector: configuration error: the target: "
        "keyConnectorSettings__transferTo__certificate__filesystemPassword: " in result.stderr
    )

    # Given as a file: its settings have the deployment's own names, so the file is named too.
    env_file = tmp_path / "target.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in wrong.env().items()))
    result = keyconnector("transfer", "--target-env-file", str(env_file), env=command_env(source))
    assert result.returncode == 2, result.stderr
    assert (
        f"the target (--target-env-file {env_file}): keyConnectorSettings__certificate__filesystemPassword: "
        in result.stderr
    )
    assert "wrong-pw" not in result.stdout + result.stderr and result.stdout == ""
    assert not (tmp_path / "target" / "kc.db").exists()


# -- rotate-data-key ----------------------------------------------------------------------------------------

DATA_KEY_FIELDS = {
    "current_version",
    "made_version",
    "finishing",
    "rewritten",
    "from_versions",
    "passes",
    "verified",
    "retired_versions",
    "failed",
    "seconds",
}


def test_rotate_data_key_dry_run_writes_nothing_then_the_real_run_matches_it(site: Site) -> None:
    before = snapshot(site.backend.folder)
    dry = kc(site, "rotate-data-key", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    doc = document(dry)
    assert_shape(doc, "rotate-data-key", DATA_KEY_FIELDS, ok=True, dry_run=True)
    assert (doc["current_version"], doc["made_version"], doc["finishing"]) == (2, 2, False)
    assert (doc["rewritten"], doc["from_versions"], doc["verified"]) == (USERS, {"1": USERS}, USERS)
    assert (doc["retired_versions"], doc["failed"]) == ([1], [])
    assert snapshot(site.backend.folder) == before

    text = kc(site, "rotate-data-key", "--dry-run")
    assert text.returncode == 0, text.stderr
    assert text.stdout == (
        f"rotate-data-key --dry-run: would make data-key version 2 current; would re-encrypt {USERS} "
        f"record(s) ({USERS} from version 1); {USERS} record(s) decrypt; would retire version(s) 1\n"
    )
    assert snapshot(site.backend.folder) == before

    real = kc(site, "rotate-data-key", "--json", "--settle-seconds", "0")
    assert real.returncode == 0, real.stderr
    doc = document(real)
    assert_shape(doc, "rotate-data-key", DATA_KEY_FIELDS, ok=True, dry_run=False)
    assert (doc["current_version"], doc["made_version"], doc["rewritten"]) == (2, 2, USERS)
    assert (doc["from_versions"], doc["verified"], doc["retired_versions"]) == ({"1": USERS}, USERS, [1])


def test_rotate_data_key_with_a_record_that_does_not_decrypt_exits_1_in_both_modes(site: Site) -> None:
    broken = damage_one_record(site)
    before = snapshot(site.backend.folder)
    dry = kc(site, "rotate-data-key", "--dry-run", "--json")
    assert dry.returncode == 1, dry.stderr
    doc = document(dry)
    assert_shape(doc, "rotate-data-key", DATA_KEY_FIELDS, ok=False, dry_run=True)
    assert (
        doc["failed"] == [str(broken)] and doc["rewritten"] == USERS - 1 and doc["retired_versions"] is None
    )
    assert snapshot(site.backend.folder) == before

    real = kc(site, "rotate-data-key", "--json", "--settle-seconds", "0")
    assert real.returncode == 1, real.stderr
    doc = document(real)
    assert_shape(doc, "rotate-data-key", DATA_KEY_FIELDS, ok=False, dry_run=False)
    assert doc["failed"] == [str(broken)] and doc["retired_versions"] == [] and str(broken) in doc["error"]
    assert f"1 record(s) failed: {broken}" in real.stderr


def test_an_unreachable_database_is_exit_3_and_a_bad_option_exit_2(site: Site) -> None:
    down = {
        "database__provider": "postgresql",
        "database__postgreSqlConnectionString": f"Host=127.0.0.1;Port={free_port()};Database=kc;Username=kc",
    }
    for command in (["rotate-data-key"], ["upgrade-records"], ["rotate-key-pair", "--retire-old"]):
        result = kc(site, *command, "--dry-run", "--json", **down)
        assert result.returncode == 3, (command, result.stderr)
        assert document(result)["exit_code"] == 3
        assert "is unavailable" in result.stderr
    result = kc(site, "rotate-data-key", "--batch-size", "0")
    assert result.returncode == 2 and result.stdout == ""


# -- rotate-key-pair ----------------------------------------------------------------------------------------

KEY_PAIR_FIELDS = {
    "retire_old",
    "configured_key_pair",
    "new_key_pair",
    "active_versions",
    "wrapped_versions",
    "removed_key_pairs",
    "application_datas_updated",
    "ring_revision",
}


def pair_env(pfx: Pfx, prefix: str = "transferTo__") -> dict[str, str]:
    return {
        f"{prefix}rsaKey__provider": "certificate",
        f"{prefix}certificate__provider": "filesystem",
        f"{prefix}certificate__filesystemPath": str(pfx.path),
        f"{prefix}certificate__filesystemPassword": pfx.password,
    }


def test_rotate_key_pair_dry_runs_write_nothing_and_say_what_the_real_runs_do(
    site: Site, pfx: Pfx, new_pfx: Pfx
) -> None:
    before = snapshot(site.backend.folder)
    dry = kc(site, "rotate-key-pair", "--dry-run", "--json", **pair_env(new_pfx))
    assert dry.returncode == 0, dry.stderr
    doc = document(dry)
    assert_shape(doc, "rotate-key-pair", KEY_PAIR_FIELDS, ok=True, dry_run=True)
    assert (doc["retire_old"], doc["active_versions"], doc["wrapped_versions"]) == (False, [1], [1])
    old, new = doc["configured_key_pair"], doc["new_key_pair"]
    assert old != new and doc["removed_key_pairs"] == [] and doc["ring_revision"] == 0
    assert snapshot(site.backend.folder) == before

    # A new key pair that does not open fails the dry run as it would fail the real one.
    wrong = kc(site, "rotate-key-pair", "--dry-run", **pair_env(Pfx(new_pfx.path, "wrong-pw")))
    assert wrong.returncode == 2 and "transferTo__certificate__filesystemPassword" in wrong.stderr
    assert "wrong-pw" not in wrong.stderr and wrong.stdout == ""

    real = kc(site, "rotate-key-pair", "--json", **pair_env(new_pfx))
    assert real.returncode == 0, real.stderr
    doc = document(real)
    assert_shape(doc, "rotate-key-pair", KEY_PAIR_FIELDS, ok=True, dry_run=False)
    assert (doc["configured_key_pair"], doc["new_key_pair"], doc["wrapped_versions"]) == (old, new, [1])
    assert doc["ring_revision"] >= 1

    # --retire-old with the new pair configured.
    retired = pair_env(new_pfx, "")
    before = snapshot(site.backend.folder)
    dry = kc(site, "rotate-key-pair", "--retire-old", "--dry-run", "--json", **retired)
    assert dry.returncode == 0, dry.stderr
    doc = document(dry)
    assert_shape(doc, "rotate-key-pair", KEY_PAIR_FIELDS, ok=True, dry_run=True)
    assert (doc["retire_old"], doc["configured_key_pair"], doc["new_key_pair"]) == (True, new, None)
    assert (doc["removed_key_pairs"], doc["application_datas_updated"]) == ([old], True)
    assert snapshot(site.backend.folder) == before
    text = kc(site, "rotate-key-pair", "--retire-old", "--dry-run", **retired)
    assert text.stdout.startswith(f"rotate-key-pair --retire-old --dry-run: would remove the wraps of {old};")

    real = kc(site, "rotate-key-pair", "--retire-old", "--json", **retired)
    assert real.returncode == 0, real.stderr
    doc = document(real)
    assert (doc["removed_key_pairs"], doc["application_datas_updated"], doc["dry_run"]) == (
        [old],
        True,
        False,
    )
    again = document(kc(site, "rotate-key-pair", "--retire-old", "--dry-run", "--json", **retired))
    assert (again["removed_key_pairs"], again["application_datas_updated"]) == ([], False)


# -- upgrade-records ----------------------------------------------------------------------------------------

UPGRADE_FIELDS = {
    "rewritten",
    "already_bound",
    "conflicts",
    "passes",
    "verified",
    "refuses_unbound",
    "failed",
    "seconds",
}


def test_upgrade_records_dry_run_writes_nothing_then_the_real_run_matches_it(site: Site) -> None:
    refused = kc(site, "upgrade-records", "--dry-run", "--json", compat__writeLegacyFormat="true")
    assert refused.returncode == 2 and "compat__writeLegacyFormat: is set" in refused.stderr
    assert document(refused)["exit_code"] == 2

    before = snapshot(site.backend.folder)
    dry = kc(site, "upgrade-records", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    doc = document(dry)
    assert_shape(doc, "upgrade-records", UPGRADE_FIELDS, ok=True, dry_run=True)
    assert (doc["rewritten"], doc["already_bound"], doc["verified"]) == (USERS, 0, USERS)
    assert (doc["refuses_unbound"], doc["failed"]) == (True, [])
    assert snapshot(site.backend.folder) == before
    text = kc(site, "upgrade-records", "--dry-run")
    assert text.stdout.startswith(f"upgrade-records --dry-run: would rewrite {USERS} record(s) in format 2;")
    assert snapshot(site.backend.folder) == before

    real = kc(site, "upgrade-records", "--json")
    assert real.returncode == 0, real.stderr
    doc = document(real)
    assert_shape(doc, "upgrade-records", UPGRADE_FIELDS, ok=True, dry_run=False)
    assert (doc["rewritten"], doc["already_bound"], doc["verified"], doc["refuses_unbound"]) == (
        USERS,
        0,
        USERS,
        True,
    )
    again = document(kc(site, "upgrade-records", "--dry-run", "--json"))
    assert (again["rewritten"], again["already_bound"]) == (0, USERS)


def test_upgrade_records_with_a_record_that_does_not_decrypt_exits_1(site: Site) -> None:
    broken = damage_one_record(site)
    before = snapshot(site.backend.folder)
    dry = kc(site, "upgrade-records", "--dry-run", "--json")
    assert dry.returncode == 1, dry.stderr
    doc = document(dry)
    assert_shape(doc, "upgrade-records", UPGRADE_FIELDS, ok=False, dry_run=True)
    assert (doc["failed"], doc["rewritten"], doc["refuses_unbound"]) == ([str(broken)], USERS - 1, False)
    assert snapshot(site.backend.folder) == before
    real = kc(site, "upgrade-records", "--json")
    assert real.returncode == 1 and document(real)["failed"] == [str(broken)]
    assert f"1 record(s) failed: {broken}" in real.stderr


# -- downgrade-records --------------------------------------------------------------------------------------

DOWNGRADE_FIELDS = {
    "rewritten",
    "from_versions",
    "already_upstream_format",
    "conflicts",
    "passes",
    "verified",
    "ring_switched",
    "reactivated_from",
    "application_datas_updated",
    "retired_versions",
    "failed",
    "seconds",
}
LEGACY = {"compat__writeLegacyFormat": "true"}


def test_downgrade_records_json_in_both_modes_and_the_dry_run_writes_nothing(site: Site) -> None:
    assert kc(site, "rotate-data-key", "--settle-seconds", "0").returncode == 0  # records on version 2

    before = snapshot(site.backend.folder)
    dry = kc(site, "downgrade-records", "--dry-run", "--json", **LEGACY)
    assert dry.returncode == 0, dry.stderr
    doc = document(dry)
    assert_shape(doc, "downgrade-records", DOWNGRADE_FIELDS, ok=True, dry_run=True)
    assert (doc["rewritten"], doc["from_versions"], doc["already_upstream_format"]) == (
        USERS,
        {"2": USERS},
        0,
    )
    assert (doc["ring_switched"], doc["reactivated_from"], doc["application_datas_updated"]) == (
        True,
        2,
        True,
    )
    assert (doc["retired_versions"], doc["verified"], doc["failed"]) == ([2], USERS, [])
    assert snapshot(site.backend.folder) == before

    real = kc(site, "downgrade-records", "--json", "--settle-seconds", "0", **LEGACY)
    assert real.returncode == 0, real.stderr
    doc = document(real)
    assert_shape(doc, "downgrade-records", DOWNGRADE_FIELDS, ok=True, dry_run=False)
    assert (doc["rewritten"], doc["from_versions"], doc["already_upstream_format"]) == (
        USERS,
        {"2": USERS},
        0,
    )
    assert (doc["ring_switched"], doc["reactivated_from"], doc["retired_versions"]) == (True, 2, [2])
    assert (doc["verified"], doc["failed"]) == (USERS, [])

    again = document(kc(site, "downgrade-records", "--dry-run", "--json", **LEGACY))
    assert (again["rewritten"], again["already_upstream_format"], again["ring_switched"]) == (0, USERS, False)


def test_downgrade_records_with_a_record_that_does_not_decrypt_exits_1_in_both_modes(site: Site) -> None:
    broken = damage_one_record(site)
    before = snapshot(site.backend.folder)
    dry = kc(site, "downgrade-records", "--dry-run", "--json", **LEGACY)
    assert dry.returncode == 1, dry.stderr
    doc = document(dry)
    assert_shape(doc, "downgrade-records", DOWNGRADE_FIELDS, ok=False, dry_run=True)
    assert (doc["failed"], doc["retired_versions"]) == ([str(broken)], None)
    assert "downgrade-records --dry-run: records that do not decrypt" in dry.stderr
    assert snapshot(site.backend.folder) == before
    real = kc(site, "downgrade-records", "--json", "--settle-seconds", "0", **LEGACY)
    assert real.returncode == 1 and document(real)["failed"] == [str(broken)]
