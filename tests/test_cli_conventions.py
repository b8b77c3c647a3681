"""The conventions every command follows (issue 16): exit codes, the two output channels, help
that names defaults, environment and exit codes, "did you mean", -q/-v/--log-level, and one log
timestamp format. Each is checked through the real ``keyconnector`` command."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from keyconnector.cli import build_parser
from keyconnector.cli.conventions import walk
from keyconnector.devtools import free_port
from keyconnector.errors import ExitCode

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def keyconnector(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.lower().startswith("keyconnectorsettings")}
    clean.pop("ASPNETCORE_URLS", None)
    clean.pop("KEYCONNECTOR_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh ``init`` folder (SQLite and a PFX); its env file."""
    folder = tmp_path_factory.mktemp("conventions") / "kc"
    made = keyconnector(
        "init", str(folder), "--key-bits", "2048", "--identity-server-uri", "http://127.0.0.1:9",
        "--web-vault-uri", "https://vault.example.com",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return folder / "keyconnector.env"


def test_every_option_of_every_command_has_help_text() -> None:
    missing = [
        f"{path or 'keyconnector'} {action.option_strings or action.dest}"
        for path, parser in walk(build_parser())
        for action in parser._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert not missing, missing


def test_every_command_has_a_description_or_help_and_the_common_epilog() -> None:
    for path, parser in walk(build_parser()):
        help_text = parser.format_help()
        assert "exit codes:" in help_text, path
        for code in ExitCode:
            assert re.search(rf"^\s+{code.value}\s+\S", help_text, re.M), (path, code)
        assert "ASPNETCORE_URLS" in help_text and "KEYCONNECTOR_CONFIG" in help_text, path


def test_help_shows_defaults() -> None:
    text = keyconnector("init", "--help").stdout
    assert "(default: 4096)" in text


def test_a_misspelt_command_option_or_sub_command_gets_did_you_mean() -> None:
    for args, suggestion in (
        (["chek"], "'check'"),
        (["stats", "--jsn"], "'--json'"),
        (["audit", "verfy"], "'verify'"),
    ):
        result = keyconnector(*args)
        assert result.returncode == ExitCode.USAGE, result
        assert f"did you mean {suggestion}?" in result.stderr, result.stderr
        assert result.stdout == ""


def test_version_names_the_commit_python_and_openssl() -> None:
    result = keyconnector("--version")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"keyconnector \d+\.\d+\.\d+\S*", lines[0])
    assert lines[1].startswith("commit ") and lines[1] != "commit "
    assert lines[2].startswith("Python 3.")
    assert "OpenSSL" in lines[3]


def test_a_missing_env_file_is_a_usage_error_in_every_command(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.env")
    for command in (["serve"], ["stats"], ["transfer", "--dry-run"], ["rotate-data-key"]):
        result = keyconnector(*command, "--env-file", missing)
        assert result.returncode == ExitCode.USAGE, (command, result.returncode, result.stderr)
        assert "nowhere.env" in result.stderr
        assert "Traceback" not in result.stderr


def test_with_json_a_failure_is_one_document_on_stdout(tmp_path: Path) -> None:
    result = keyconnector("stats", "--json", "--env-file", str(tmp_path / "nowhere.env"))
    assert result.returncode == ExitCode.USAGE
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["exit_code"] == 2
    assert "nowhere.env" in document["error"]


def test_quiet_and_log_level_silence_warnings_and_verbose_adds_debug(deployment: Path) -> None:
    env = {"keyConnectorSettings__databse__provider": "sqlite"}  # a typo: one WARNING on stderr
    normal = keyconnector("check", "--env-file", str(deployment), env=env)
    assert "ignoring unknown setting" in normal.stderr
    assert "ignoring unknown setting" not in normal.stdout
    for quiet in (["-qq"], ["--log-level", "error"]):
        silent = keyconnector("check", *quiet, "--env-file", str(deployment), env=env)
        assert silent.returncode == normal.returncode
        assert "ignoring unknown setting" not in silent.stderr, quiet
        assert silent.stdout.splitlines()[0] == normal.stdout.splitlines()[0]
    settings = ("--env-file", str(deployment))
    assert "ignoring unknown setting" in keyconnector("check", "-q", *settings, env=env).stderr
    assert "DEBUG" in keyconnector("check", "-v", *settings, env=env).stderr


def test_serve_writes_nothing_on_stdout_and_every_log_line_has_one_timestamp_format(
    deployment: Path, tmp_path: Path
) -> None:
    """granian's own lines (a worker that died) went to stdout in granian's format; the access log
    and the service log had two different timestamp formats."""
    port = free_port()
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("keyconnectorsettings")}
    env.pop("ASPNETCORE_URLS", None)
    with out.open("wb") as stdout, err.open("wb") as stderr:
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keyconnector",
                "serve",
                "--env-file",
                str(deployment),
                "--port",
                f"{port}",
            ],
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}/health/live"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.1)
            workers = [
                int(pid)
                for pid in subprocess.run(
                    ["pgrep", "-P", str(serve.pid), "-f", "spawn_main"], capture_output=True, text=True
                ).stdout.split()
            ]
            assert workers, "no worker process found"
            os.kill(workers[0], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while "worker" not in err.read_text().lower() or not _answers(url):
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.2)
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=30)
    assert out.read_text() == "", out.read_text()
    lines = [line for line in err.read_text().splitlines() if line.strip()]
    assert any("keyconnector.access" in line for line in lines)
    assert any("worker" in line.lower() and "exit" in line.lower() for line in lines), lines
    for line in lines:
        assert re.match(rf"{STAMP} (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s", line), line


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
