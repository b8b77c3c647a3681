"""The manual page keyconnector(1), generated from the parser: current, complete and well-formed roff.

Why: operators read ``man keyconnector`` for the options and the exit codes their scripts depend on.
A page not regenerated after an option was added lies by omission, and roff that ``man`` warns about
renders with missing or garbled lines, which nobody notices in the source.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keyconnector.cli import build_parser
from keyconnector.cli.conventions import ENVIRONMENT, walk
from keyconnector.cli.manpage import render
from keyconnector.errors import EXIT_CODE_MEANINGS

ROOT = Path(__file__).resolve().parents[1]
MAN_PAGE = ROOT / "docs" / "keyconnector.1"

PAGE = render()


def roff(text: str) -> str:
    """How the generator writes plain text in roff (hyphens escaped)."""
    return text.replace("\\", "\\e").replace("-", "\\-")


def test_committed_man_page_is_current() -> None:
    assert MAN_PAGE.read_text(encoding="utf-8") == PAGE, (
        "docs/keyconnector.1 is stale: run `make docs` "
        "(or `keyconnector man-page --output docs/keyconnector.1`)"
    )


def test_the_page_is_the_same_on_every_run() -> None:
    """No date or other moving part: otherwise the check above fails the day after `make docs`."""
    assert render() == PAGE


def test_every_command_and_option_is_on_the_page() -> None:
    for path, parser in walk(build_parser()):
        if path:
            assert f".SS \\fBkeyconnector {roff(path)}\\fR" in PAGE, f"command {path!r} missing"
        for action in parser._actions:
            if "--help" in action.option_strings or isinstance(action, argparse._SubParsersAction):
                continue  # -h is everywhere; a command list is its .SS sections, checked above
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"\\fB{roff(option)}\\fR" in PAGE, f"{path or 'keyconnector'} {option} missing"
            if action.help and "%" not in action.help and action.help != "==SUPPRESS==":
                first_words = " ".join(action.help.split()[:4])
                assert roff(first_words) in PAGE, f"{path} {action.dest}: help text missing"


def test_the_epilog_becomes_exit_status_and_environment_sections() -> None:
    exit_status = PAGE.split(".SH EXIT STATUS", 1)[1].split(".SH ", 1)[0]
    for code, meaning in EXIT_CODE_MEANINGS.items():
        assert f".B {int(code)}\n{roff(meaning)}" in exit_status
    environment = PAGE.split(".SH ENVIRONMENT", 1)[1].split(".SH ", 1)[0]
    for name, meaning in ENVIRONMENT:
        assert f".B {roff(name)}\n{roff(meaning)}" in environment


def test_options_show_their_defaults_as_help_does() -> None:
    """The library's own formatter would drop the "(default: ...)" that ``--help`` adds."""
    upgrade = PAGE.split(".SS \\fBkeyconnector upgrade\\-records\\fR", 1)[1].split(".SS ", 1)[0]
    assert "records per transaction (default: 2000)" in upgrade


def test_check_command_exit_codes(tmp_path: Path) -> None:
    page = tmp_path / "keyconnector.1"
    command = [sys.executable, "-m", "keyconnector", "man-page"]
    written = subprocess.run([*command, "--output", str(page)], capture_output=True, text=True, timeout=60)
    assert written.returncode == 0, written.stderr
    assert page.read_text(encoding="utf-8") == PAGE
    fresh = subprocess.run([*command, "--check", str(page)], capture_output=True, text=True, timeout=60)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    page.write_text(PAGE.replace("\\-\\-workers", "\\-\\-threads"), encoding="utf-8")
    stale = subprocess.run([*command, "--check", str(page)], capture_output=True, text=True, timeout=60)
    assert stale.returncode == 1
    assert "is stale; regenerate it with: keyconnector man-page --output" in stale.stdout
    assert "workers" in stale.stdout  # the diff shows what changed
    missing = subprocess.run(
        [*command, "--check", str(tmp_path / "none.1")], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1 and "does not exist" in missing.stdout
    alone = subprocess.run([*command, "--check"], capture_output=True, text=True, timeout=60)
    assert alone.returncode == 2 and "name the file to compare" in alone.stderr


KNOWN_MACROS = {"TH", "SH", "SS", "TP", "B", "I", "RS", "RE", "PP", "P", "nf", "fi", "UR", "UE", "br", "IP"}


def test_the_page_renders_without_warnings(tmp_path: Path) -> None:
    """With man (as an operator reads it), else groff or mandoc; and in every case a check that each
    control line is a man macro, so text that happens to start with a dot cannot vanish."""
    for number, line in enumerate(PAGE.splitlines(), 1):
        if line.startswith((".", "'")):
            macro = re.match(r"[.'](\S*)", line)
            assert macro and macro.group(1) in KNOWN_MACROS, f"line {number}: not a man macro: {line!r}"
    assert PAGE.startswith('.TH KEYCONNECTOR "1" ')
    env = dict(os.environ, MANWIDTH="100", LC_ALL="C.UTF-8", MANPAGER="cat", PAGER="cat")
    if shutil.which("man"):
        command = ["man", "--warnings", "-l", str(MAN_PAGE)]
    elif shutil.which("groff"):
        command = ["groff", "-ww", "-man", "-Tutf8", str(MAN_PAGE)]
    elif shutil.which("mandoc"):
        command = ["mandoc", "-W", "warning", "-Tutf8", str(MAN_PAGE)]
    else:
        pytest.skip("no man, groff or mandoc to render the page (the macro check above ran)")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip(), f"{command[0]} warns:\n{result.stderr}"
    shown = result.stdout
    assert "EXIT STATUS" in shown and "keyconnector audit verify" in shown
