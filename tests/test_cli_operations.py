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
    """One upstream-format record with a ciphertext byte flipped: it no longer decrypts."""
    user, key = site.backend.sql('SELECT "Id", "Key" FROM "UserKeys" ORDER BY "Id" DESC LIMIT 1')[0]
    blob = bytearray(base64.b64decode(key))
    blob[3] ^= 0x01
    site.backend.sql(
        'UPDATE "UserKeys" SET "Key" = ? WHERE "Id" = ?', (base64.b64encode(blob).decode(), user)
    )
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
