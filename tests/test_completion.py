"""Shell completion, for real: bash runs the script ``keyconnector completion bash`` prints, and asks it
what Tab would offer, the way bash does (``COMP_LINE``, ``COMP_POINT``, ``COMP_WORDS``), with a
``keyconnector`` on the PATH that is this checkout.

Why this much: the script is argcomplete's, but the answers come from our parser through a snapshot
(``keyconnector.cli.completion``); a snapshot that lost an option, a choice or a sub-command, or a fast
path that quietly imported the whole service again, would each go unnoticed without a shell in the loop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keyconnector.cli import build_parser
from keyconnector.cli.completion import describe, rebuild, snapshot_path
from keyconnector.cli.conventions import walk

DRIVER = r"""
source "$1"
complete -p keyconnector >/dev/null || { echo "no completion registered" >&2; exit 9; }
COMP_LINE="$2"
COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMPREPLY=()
_python_argcomplete keyconnector
printf '%s\n' "${COMPREPLY[@]}"
"""


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A PATH whose ``keyconnector`` is this checkout's, and a cache of the module's own (shared: each
    first Tab builds the whole parser, seconds on a busy machine)."""
    tmp_path = tmp_path_factory.mktemp("completion")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "keyconnector"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m keyconnector "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_ARC", "COMP_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return env


def script(shell: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        ["keyconnector", "completion", shell], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory, shell_env: dict[str, str]) -> Path:
    path = tmp_path_factory.mktemp("script") / "keyconnector.bash"
    path.write_text(script("bash", shell_env))
    return path


def tab(line: str, bash_script: Path, env: dict[str, str]) -> list[str]:
    """What bash offers for Tab at the end of ``line``."""
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", DRIVER, "driver", str(bash_script), line],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [word.strip() for word in result.stdout.splitlines() if word.strip()]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("keyconnector ch", ["check"]),
        ("keyconnector stats --js", ["--json"]),
        ("keyconnector audit v", ["verify"]),
        ("keyconnector init --key-bits ", ["2048", "3072", "4096"]),
        ("keyconnector completion ", ["bash", "fish", "zsh"]),
        ("keyconnector serve --tls-", ["--tls-cert", "--tls-key"]),
        ("keyconnector restore backup.age --pass", ["--passphrase-file"]),
    ],
)
def test_bash_completes_commands_options_and_choices(
    line: str, expected: list[str], bash_script: Path, shell_env: dict[str, str]
) -> None:
    assert sorted(tab(line, bash_script, shell_env)) == expected


def test_every_command_is_offered(bash_script: Path, shell_env: dict[str, str]) -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    offered = tab("keyconnector ", bash_script, shell_env)
    assert set(commands.choices) <= set(offered)


def test_the_first_tab_writes_a_snapshot_the_next_ones_answer_from_without_the_service(
    shell_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second Tab must not import the settings model or SQLAlchemy (what makes the first one
    slow), and must answer the same; this installation's snapshot of older code is replaced, another
    installation's is left alone."""
    shell_env = dict(shell_env, XDG_CACHE_HOME=str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = snapshot_path()
    assert path is not None and path.parent == tmp_path / "cache" / "keyconnector"
    cache = path.parent
    cache.mkdir(parents=True)
    older = cache / (path.name.rsplit("-", 1)[0] + "-0000.json")
    older.write_text('{"format": 1, "prog": "stale"}')
    other = cache / "completion-00000000-0000.json"
    other.write_text('{"format": 1, "prog": "another virtualenv"}')
    answers = tmp_path / "answers"

    def ask(line: str) -> tuple[list[str], str]:
        env = dict(
            shell_env,
            _ARGCOMPLETE="1",
            _ARGCOMPLETE_SHELL="bash",
            COMP_LINE=line,
            COMP_POINT=str(len(line)),
            _ARGCOMPLETE_STDOUT_FILENAME=str(answers),
        )
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "keyconnector"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return sorted(answers.read_text().split("\v")), result.stderr

    first, imported_first = ask("keyconnector rotate-")
    assert sorted(cache.glob("completion-*.json")) == sorted([path, other])
    second, imported_second = ask("keyconnector rotate-")
    assert first == second == ["rotate-data-key", "rotate-key-pair"]
    assert "pydantic" in imported_first  # the check below can fail
    for heavy in ("pydantic", "sqlalchemy", "keyconnector.runtime.settings", "keyconnector.ops"):
        assert f" {heavy}\n" not in imported_second, f"a warm Tab imports {heavy}"


def test_a_corrupt_snapshot_is_rebuilt(shell_env: dict[str, str], bash_script: Path, tmp_path: Path) -> None:
    shell_env = dict(shell_env, XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert tab("keyconnector ch", bash_script, shell_env) == ["check"]
    (snapshot,) = (tmp_path / "cache" / "keyconnector").glob("completion-*.json")
    snapshot.write_text("{not json")
    assert tab("keyconnector ch", bash_script, shell_env) == ["check"]
    assert snapshot.read_text().startswith("{")
    assert '"check"' in snapshot.read_text()


def test_the_snapshot_keeps_the_whole_shape_of_the_parser() -> None:
    """Every command, option, number of arguments, choice and exclusive group survives
    ``describe`` and ``rebuild`` (what argcomplete looks at)."""
    parser = build_parser()
    rebuilt = rebuild(describe(parser))

    def shape(root: argparse.ArgumentParser) -> dict[str, object]:
        found: dict[str, object] = {}
        for path, each in walk(root):
            found[path] = sorted(
                (
                    tuple(action.option_strings) or (action.dest,),
                    0 if action.nargs == 0 else action.nargs,
                    tuple(str(c) for c in action.choices or ()),
                )
                for action in each._actions
                if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction)
            )
            found[path + " exclusive"] = sorted(
                sorted(tuple(a.option_strings) for a in group._group_actions)
                for group in each._mutually_exclusive_groups
            )
        return found

    assert shape(rebuilt) == shape(parser)


def test_zsh_and_fish_scripts_are_produced(shell_env: dict[str, str], tmp_path: Path) -> None:
    zsh = script("zsh", shell_env)
    assert zsh.startswith("#compdef keyconnector")
    assert "compdef _python_argcomplete keyconnector" in zsh
    fish = script("fish", shell_env)
    assert "complete --command keyconnector" in fish
    bash = script("bash", shell_env)
    for shell, text in (("bash", bash), ("zsh", zsh), ("fish", fish)):
        if shutil.which(shell):
            path = tmp_path / f"completion.{shell}"
            path.write_text(text)
            checked = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=30)
            assert checked.returncode == 0, f"{shell} -n: {checked.stderr}"


def test_an_unknown_shell_is_a_usage_error(shell_env: dict[str, str]) -> None:
    result = subprocess.run(
        ["keyconnector", "completion", "tcsh"], env=shell_env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "invalid choice: 'tcsh'" in result.stderr and not result.stdout
