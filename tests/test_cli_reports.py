"""`stats`, `audit verify`, `backup` and `restore` as a script sees them: the JSON shape of each
(docs/cli.md), stdout holding the result and nothing else, logs and progress on stderr, plain text
when piped, and the exit codes of `errors.ExitCode`.

Every command runs as a real `keyconnector` subprocess (stdout is a pipe, as in a script) against a
real SQLite database, populated as `test_backup` does or by a real `keyconnector serve`; an
unreachable database is a PostgreSQL connection string to a port where nothing listens.
"""

from __future__ import annotations

import json
import os
import pty
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.ops.backup import PASSPHRASE_ENV
from tests.conftest import Pfx, Service, base_env
from tests.support.backends import make_backend
from tests.test_backup import Source, populate, write_config
from tests.test_stats import write_deployment
from tests.test_transfer import clean_env, command_env, deployment, keyconnector

RECORDS = 60
BOX_DRAWING = re.compile("[\u2500-\u257f\u2026]")
"""Box-drawing characters, and the ellipsis rich puts in a cell it cut short."""
KEY = "c2VjcmV0LWtleS1vZi10aGUtdXNlci0xMjM0NTY3OA=="


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`keyconnector ARGS` with stdout and stderr piped, as a script runs it."""
    return keyconnector(*(str(arg) for arg in args), env=env if env is not None else script_env())


def script_env() -> dict[str, str]:
    env = clean_env()
    env.pop(PASSPHRASE_ENV, None)
    env.pop("NO_COLOR", None)
    env["COLUMNS"] = "80"  # what rich falls back to: a long line must still not be wrapped
    return env


def parsed(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """stdout as exactly one JSON document (anything else on stdout fails ``json.loads``)."""
    document = json.loads(result.stdout)
    assert isinstance(document, dict), result.stdout
    return document


def assert_plain(text: str) -> None:
    assert not BOX_DRAWING.search(text), text
    assert "\x1b[" not in text, text


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def unreachable_config(path: Path, pfx: Pfx, **audit: str) -> Path:
    """A deployment whose PostgreSQL listens nowhere: every command must say 3, not 1 or 70."""
    section: dict[str, Any] = {
        "database": {
            "provider": "postgresql",
            "postgreSqlConnectionString": (
                f"Host=127.0.0.1;Port={closed_port()};Database=kc;Username=kc;Password=not-shown-pw"
            ),
        },
        "rsaKey": {"provider": "certificate"},
        "certificate": {
            "provider": "filesystem",
            "filesystemPath": str(pfx.path),
            "filesystemPassword": pfx.password,
        },
    }
    if audit:
        section["audit"] = audit
    path.write_text(json.dumps({"keyConnectorSettings": section}))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, pfx: Pfx, request: pytest.FixtureRequest) -> Source:
    """A rotated deployment (data key version 1 in ApplicationDatas and the ring, version 2 current)."""
    folder = tmp_path_factory.mktemp("reports") / "source"
    folder.mkdir()
    return populate(make_backend("sqlite", folder, request), pfx, RECORDS)


# -- stats ---------------------------------------------------------------------------------------------

STATS_FIELDS = {
    "ok",
    "database",
    "generated_at",
    "users",
    "with_key",
    "without_key",
    "records_per_version",
    "records_per_format",
    "last_access",
    "enrolled_never_fetched",
    "key_ring_stored",
    "key_ring_revision",
    "current_version",
    "application_datas_wrap",
    "versions",
    "unbound_records",
    "key_ring_authentication",
}
VERSION_FIELDS = {
    "version",
    "state",
    "current",
    "created",
    "key_pairs",
    "stored_in",
    "fingerprints",
    "algorithms",
}


def test_stats_json_is_the_documented_shape_and_alone_on_stdout(source: Source) -> None:
    result = run("stats", "--config", source.config, "--json")
    assert result.returncode == 0, result.stderr
    stats = parsed(result)
    assert set(stats) == STATS_FIELDS
    assert stats["ok"] is True
    assert stats["users"] == RECORDS
    assert stats["records_per_format"] == {
        "upstream": len(source.legacy),
        "bound": len(source.format2),
        "unknown": 0,
    }
    versions = {entry["version"]: entry for entry in stats["versions"]}
    assert all(set(entry) == VERSION_FIELDS for entry in stats["versions"])
    assert versions[1]["stored_in"] == ["key ring", "ApplicationDatas"]
    assert versions[2]["stored_in"] == ["key ring"]
    assert (versions[1]["key_pairs"], versions[2]["key_pairs"]) == (1, 1)
    never_fetched = source.backend.sql(
        'SELECT COUNT(*) FROM "UserKeys" WHERE "Key" IS NOT NULL AND "LastAccessDate" IS NULL'
    )[0][0]
    assert never_fetched > 0
    assert stats["enrolled_never_fetched"] == never_fetched
    assert stats["key_ring_authentication"].startswith("ok")


def test_stats_piped_is_plain_aligned_text_without_wrapping(source: Source) -> None:
    result = run("stats", "--config", source.config)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert_plain(out)
    stats = parsed(run("stats", "--config", source.config, "--json"))
    # The database's description and the fingerprints are longer than 80 columns or a cell: whole.
    assert f"database: {stats['database']}\n" in out
    assert len(stats["database"]) > 80
    fingerprint = stats["versions"][1]["fingerprints"][0]
    row = next(line for line in out.splitlines() if "(current)" in line)
    assert row.split()[:3] == ["2", "active", "(current)"], row
    assert row.split()[-5:] == ["key", "ring", fingerprint, "RSA-OAEP", "(SHA-1)"], row
    users = next(line for line in out.splitlines() if line.startswith("rows in UserKeys"))
    assert users.split()[-1] == str(RECORDS)


def test_stats_of_a_deployment_taken_over_from_upstream_says_where_version_1_lives(
    pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Upstream's data key lives in ApplicationDatas and no ring is stored: one key pair wraps it,
    and "ApplicationDatas" is where it is, not a fingerprint."""
    upstream = deployment("sqlite", pfx, tmp_path, request)
    write_deployment(upstream, rotated=False)
    env = command_env(upstream)
    stats = parsed(run("stats", "--json", env=env))
    (version,) = stats["versions"]
    assert version["version"] == 1
    assert version["stored_in"] == ["ApplicationDatas"]
    assert version["key_pairs"] == 1
    assert version["fingerprints"] == []
    assert stats["key_ring_stored"] is False

    out = run("stats", env=env).stdout
    assert_plain(out)
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("version") and "stored in" in line)
    row = lines[lines.index(header) + 1]
    assert row.split()[:2] == ["1", "active"], row
    assert "ApplicationDatas" in row
    assert row[header.index("key pairs") :].split()[0] == "1", (header, row)
    fingerprints = slice(header.index("fingerprints"), header.index("algorithm"))
    assert "ApplicationDatas" not in row[fingerprints], (header, row)
    assert row[header.index("algorithm") :].strip() == "RSA-OAEP (SHA-1) in ApplicationDatas", (header, row)


# -- a deployment served for real: enrolment, and an audit trail ------------------------------------------


@dataclass
class Served:
    env: dict[str, str]
    audit: Path
    folder: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, pfx: Pfx) -> Iterator[Served]:
    """A real service that saw one enrolment (POST /user-keys) and a few reads of unknown users."""
    folder = tmp_path_factory.mktemp("served")
    env = base_env(issuer, pfx, folder / "kc.db")
    audit = folder / "audit.log"
    env["keyConnectorSettings__audit__file"] = str(audit)
    service = Service(env, folder / "service.log").start()
    try:
        with service.client() as client:
            enrolled = {"Authorization": f"Bearer {issuer.mint(uuid.uuid4())}"}
            assert client.post("/user-keys", headers=enrolled, json={"key": KEY}).status_code == 200
            for _ in range(4):
                headers = {"Authorization": f"Bearer {issuer.mint(uuid.uuid4())}"}
                assert client.get("/user-keys", headers=headers).status_code == 404
    finally:
        service.stop()
    yield Served(env, audit, folder)


def test_stats_right_after_enrolment_says_enrolment_is_not_an_access(served: Served) -> None:
    stats = parsed(run("stats", "--json", env=served.env))
    assert (stats["with_key"], stats["last_access"]["never"], stats["enrolled_never_fetched"]) == (1, 1, 1)
    out = run("stats", env=served.env).stdout
    never = next(line for line in out.splitlines() if line.startswith("never"))
    assert "enrolled, not yet fetched" in never, out


AUDIT_FIELDS = {
    "ok",
    "trail",
    "sink",
    "entries",
    "chains",
    "keyed",
    "adopted",
    "key_ring_anchor",
    "problem",
    "problems",
    "newest_checkpoint",
    "checkpointed_chains",
    "notes",
}


def test_audit_verify_json_and_exit_codes(served: Served, tmp_path: Path) -> None:
    lines = served.audit.read_text().splitlines(keepends=True)
    result = run("audit", "verify", "--json", env=served.env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = parsed(result)
    assert set(report) == AUDIT_FIELDS
    assert (report["ok"], report["sink"], report["trail"]) == (True, "file", str(served.audit))
    assert (report["entries"], report["chains"], report["keyed"], report["problem"]) == (
        len(lines),
        1,
        5,
        None,
    )
    assert re.fullmatch("[0-9a-f]{20}", report["key_ring_anchor"])

    broken = tmp_path / "broken.log"
    broken.write_text("".join(lines[:2] + lines[3:]))
    result = run("audit", "verify", "--file", broken, "--json", env=served.env)
    assert result.returncode == 1, result.stdout + result.stderr
    report = parsed(result)
    assert report["ok"] is False and "seq 3 removed" in report["problem"] and report["problems"] >= 1

    text = run("audit", "verify", "--file", broken, env=served.env)
    assert text.returncode == 1 and "NOT VERIFIED" in text.stdout and "line 3" in text.stdout
    assert_plain(text.stdout)

    missing = run("audit", "verify", "--file", tmp_path / "missing.log", "--json", env=served.env)
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert parsed(missing) == {
        "ok": False,
        "exit_code": 2,
        "error": missing.stderr.strip()[len("keyconnector: ") :],
    }
    assert "--file" in missing.stderr and "missing.log" in missing.stderr


# -- backup and restore --------------------------------------------------------------------------------

BACKUP_FIELDS = {
    "ok",
    "output",
    "bytes",
    "records",
    "data_key",
    "source",
    "protection",
    "recipients",
    "key_ring_anchor",
}
RESTORE_FIELDS = {
    "ok",
    "input",
    "verify_only",
    "records",
    "made",
    "source",
    "target",
    "decrypted",
    "without_key",
    "failed",
    "rows_kept",
    "key_ring_anchor",
    "notes",
}


@dataclass
class Backup:
    """A backup made by `keyconnector backup --json`: the file, its passphrase file, what it printed."""

    path: Path
    phrase: Path
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def backup(source: Source, tmp_path_factory: pytest.TempPathFactory) -> Backup:
    folder = tmp_path_factory.mktemp("backup")
    phrase = folder / "phrase.txt"
    phrase.write_text("a long enough passphrase for tests\n")
    output = folder / "kc.backup"
    result = run("backup", "--config", source.config, output, "--passphrase-file", phrase, "--json")
    return Backup(output, phrase, result)


def test_backup_and_restore_json_with_progress_on_stderr(
    source: Source, backup: Backup, pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    output, phrase, result = backup.path, backup.phrase, backup.result
    assert result.returncode == 0, result.stderr
    made = parsed(result)
    assert set(made) == BACKUP_FIELDS
    assert made["ok"] is True
    assert (made["output"], made["bytes"], made["records"]) == (str(output), output.stat().st_size, RECORDS)
    assert (made["data_key"], made["protection"], made["recipients"]) == (True, "passphrase", 0)
    assert "kc.db" in made["source"]
    assert f"backup of {made['source']}" in result.stderr  # the progress line
    stats = parsed(run("stats", "--config", source.config, "--json"))
    assert made["key_ring_anchor"] in stats["key_ring_authentication"]

    verified = run(
        "restore", "--config", source.config, output, "--passphrase-file", phrase, "--verify-only", "--json"
    )
    assert verified.returncode == 0, verified.stderr
    report = parsed(verified)
    assert set(report) == RESTORE_FIELDS
    assert (report["ok"], report["verify_only"], report["target"], report["records"]) == (
        True,
        True,
        None,
        RECORDS,
    )
    assert report["decrypted"] + report["without_key"] == RECORDS and report["failed"] == 0
    assert report["key_ring_anchor"] == made["key_ring_anchor"]
    assert f"checking {output.name}" in verified.stderr  # the progress line

    target = make_backend("sqlite", tmp_path / "target", request)
    (tmp_path / "target").mkdir()
    config = write_config(tmp_path / "target.json", target, pfx)
    restored = run(
        "restore", "--config", config, output, "--passphrase-file", phrase,
        "--expect-anchor", made["key_ring_anchor"], "--json",
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    report = parsed(restored)
    assert set(report) == RESTORE_FIELDS
    assert (report["ok"], report["verify_only"], report["records"], report["rows_kept"]) == (
        True,
        False,
        RECORDS,
        0,
    )
    assert "target" in report["target"] and report["source"] == made["source"]
    assert any("restart" in note for note in report["notes"])

    again = run("restore", "--config", config, output, "--passphrase-file", phrase, "--replace")
    assert again.returncode == 0, again.stderr
    assert_plain(again.stdout)
    assert all(line.startswith("restore: ") for line in again.stdout.splitlines()), again.stdout

    damaged = tmp_path / "damaged.backup"
    damaged.write_bytes(output.read_bytes()[:-40])
    refused = run("restore", "--config", config, damaged, "--passphrase-file", phrase, "--json")
    assert refused.returncode == 1, refused.stderr
    assert parsed(refused)["ok"] is False and parsed(refused)["exit_code"] == 1


def test_backup_mistakes_are_usage_errors(source: Source, tmp_path: Path) -> None:
    no_secret = run("backup", "--config", source.config, tmp_path / "a.backup", "--json")
    assert no_secret.returncode == 2, no_secret.stderr
    assert parsed(no_secret)["exit_code"] == 2 and PASSPHRASE_ENV in no_secret.stderr

    phrase = tmp_path / "phrase.txt"
    phrase.write_text("a long enough passphrase for tests\n")
    # /proc takes no new file, even from root (whom a mode-0555 folder would not stop).
    unwritable = run("backup", "--config", source.config, "/proc/kc.backup", "--passphrase-file", phrase)
    assert unwritable.returncode == 2, unwritable.stderr
    assert "OUTPUT" in unwritable.stderr and "/proc" in unwritable.stderr
    assert "internal error" not in unwritable.stderr


def test_an_unreachable_database_is_exit_code_3_for_every_command(
    backup: Backup, pfx: Pfx, tmp_path: Path
) -> None:
    config = unreachable_config(tmp_path / "down.json", pfx, database="true")
    phrase, good = backup.phrase, backup.path
    absent = tmp_path / "absent.backup"
    commands: list[list[str | Path]] = [
        ["stats"],
        ["audit", "verify", "--database"],
        ["backup", absent, "--passphrase-file", phrase],
        ["restore", good, "--passphrase-file", phrase],
    ]
    for command in commands:
        result = run(*command, "--config", config, "--json")
        assert result.returncode == 3, (command, result.stdout, result.stderr)
        assert parsed(result)["exit_code"] == 3
        assert "unavailable" in parsed(result)["error"]
        assert "not-shown-pw" not in result.stdout + result.stderr
    assert not absent.exists()


def test_an_unreachable_key_provider_is_exit_code_3_where_the_command_needs_it(
    source: Source, backup: Backup, tmp_path: Path
) -> None:
    """backup, restore and audit verify cannot work without the key pair; stats still counts (and says
    the ring was not checked), and `restore --verify-only` still checks the file (and says the records
    were not decrypted): both by design, exit 0."""
    section = {
        "database": source.backend.plain,
        "rsaKey": {
            "provider": "vaulttransit",
            "vaultTransitServerUri": f"http://127.0.0.1:{closed_port()}",
            "vaultTransitToken": "hvs.not-shown-token",
            "vaultTransitKeyName": "keyconnector",
        },
    }
    config = tmp_path / "vault-down.json"
    config.write_text(json.dumps({"keyConnectorSettings": section}))
    phrase, good = backup.phrase, backup.path
    trail = tmp_path / "audit.log"
    trail.write_text("")
    for command in (
        ["backup", tmp_path / "absent.backup", "--passphrase-file", phrase],
        ["restore", good, "--passphrase-file", phrase],
        ["audit", "verify", "--file", trail],
    ):
        result = run(*command, "--config", config, "--json")
        assert result.returncode == 3, (command, result.stdout, result.stderr)
        assert "vaulttransit" in parsed(result)["error"] and "unavailable" in parsed(result)["error"]
        assert "not-shown-token" not in result.stdout + result.stderr
    stats = run("stats", "--config", config, "--json")
    assert stats.returncode == 0 and parsed(stats)["key_ring_authentication"].startswith("not checked")
    checked = run("restore", good, "--passphrase-file", phrase, "--verify-only", "--config", config, "--json")
    assert checked.returncode == 0, checked.stderr
    assert parsed(checked)["decrypted"] is None and "not usable" in parsed(checked)["notes"][0]


def on_a_terminal(*args: str | Path, no_color: bool) -> str:
    """`keyconnector ARGS` with stdout on a pseudo-terminal: everything it wrote there."""
    env = script_env()
    if no_color:
        env["NO_COLOR"] = "1"
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.execve(sys.executable, [sys.executable, "-m", "keyconnector", *map(str, args)], env)
    output = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child has gone
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    return output.decode(errors="replace")


COLOUR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-8]|9[0-7])(?:;[0-9;]*)?m")
"""An SGR sequence that sets a foreground colour (not bold or italic)."""


def test_stats_on_a_terminal_draws_tables_in_colour_unless_no_color(source: Source) -> None:
    coloured = on_a_terminal("stats", "--config", source.config, no_color=False)
    assert BOX_DRAWING.search(coloured) and COLOUR.search(coloured), coloured
    plain = on_a_terminal("stats", "--config", source.config, no_color=True)
    assert BOX_DRAWING.search(plain) and not COLOUR.search(plain), plain
