"""Shell completion: argcomplete answering from the one parser, fast enough to use on every Tab.

Why a snapshot: building the real parser imports every command's module (pydantic's settings model,
SQLAlchemy, the key-pair code), about a second on a small machine, and a Tab that takes a second is one
nobody uses. So a completion request (argcomplete sets ``_ARGCOMPLETE``) reads the parser's shape
(commands, options, their arguments, choices and help) from a snapshot in the user's cache and lets
argcomplete answer from a bare ``argparse`` tree rebuilt from it. The snapshot is named after a
fingerprint of the installed package (its version and every source file's size and time), so an
upgrade or an edited source makes a new one on the next Tab: the real parser is built once, described,
saved, and answers that Tab the same way. A cache that cannot be written only costs the speed.

Nothing is executed from the snapshot: it is JSON, and a doctored one can only change what Tab offers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import keyconnector

__all__ = ["complete", "describe", "rebuild", "snapshot_path"]

FORMAT = 1
"""The snapshot's layout; part of the fingerprint, so a new layout never reads an old file."""

Spec = dict[str, Any]


def complete(build: Callable[[], argparse.ArgumentParser]) -> NoReturn:
    """Answer one completion request on argcomplete's channel (file descriptor 8) and exit."""
    import argcomplete

    path = snapshot_path()
    spec = _read(path) if path else None
    if spec is None:
        spec = describe(build())
        if path:
            _write(path, spec)
    # Options once a "-" is typed (as git and kubectl do): a bare Tab lists commands and values.
    argcomplete.autocomplete(rebuild(spec), always_complete_options=False)
    # autocomplete returns only when the environment is not a completion request after all.
    sys.exit(0)


def snapshot_path() -> Path | None:
    """Where this installation's snapshot lives (``$XDG_CACHE_HOME/keyconnector``, else
    ``~/.cache/keyconnector``), or None when there is no home to cache in."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no passwd entry
            return None
    return Path(base) / "keyconnector" / f"{_installation()}-{_fingerprint()}.json"


def _installation() -> str:
    """The snapshots' name prefix for this installation: two virtualenvs (or checkouts) used in
    turn keep one snapshot each instead of replacing each other's on every Tab."""
    package = str(Path(keyconnector.__file__).parent)
    return "completion-" + hashlib.sha256(package.encode()).hexdigest()[:8]


def _fingerprint() -> str:
    """The version and every source file's path, size and modification time: any change to the
    code (an upgrade, an edit in a development checkout) gives a new snapshot name."""
    package = Path(keyconnector.__file__).parent
    digest = hashlib.sha256(f"{FORMAT} {keyconnector.__version__}".encode())
    for folder, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                stat = os.stat(os.path.join(folder, name))
                digest.update(f"{folder}/{name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _read(path: Path) -> Spec | None:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) and spec.get("format") == FORMAT else None


def _write(path: Path, spec: Spec) -> None:
    """Replace this installation's snapshot atomically and drop its older ones; never fail a Tab."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".completion-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(spec, handle)
        os.replace(temporary, path)
        for old in path.parent.glob(f"{_installation()}-*.json"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass


# -- the parser's shape ------------------------------------------------------------------------------


def describe(parser: argparse.ArgumentParser) -> Spec:
    """What completion needs of ``parser`` and its sub-commands, as JSON-ready data."""
    return {"format": FORMAT, **_describe(parser)}


def _describe(parser: argparse.ArgumentParser) -> Spec:
    groups = [list(group._group_actions) for group in parser._mutually_exclusive_groups]
    actions: list[Spec] = []
    commands: list[Spec] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue  # the rebuilt parser has its own -h/--help
        if isinstance(action, argparse._SubParsersAction):
            names: dict[int, list[str]] = {}
            for name, child in action.choices.items():
                names.setdefault(id(child), []).append(name)
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for child in dict.fromkeys(action.choices.values()):
                first, *aliases = names[id(child)]
                commands.append(
                    {"name": first, "aliases": aliases, "help": helps.get(first), "parser": _describe(child)}
                )
            continue
        group = next((i for i, members in enumerate(groups) if action in members), None)
        actions.append(
            {
                "options": list(action.option_strings),
                "dest": action.dest,
                "nargs": action.nargs,
                "const": action.const if isinstance(action.const, str | int | float) else None,
                "choices": [str(choice) for choice in action.choices] if action.choices else None,
                "metavar": action.metavar if isinstance(action.metavar, str) else None,
                "help": action.help,
                "count": isinstance(action, argparse._CountAction),
                "group": group,
            }
        )
    return {
        "prog": parser.prog,
        "actions": actions,
        "exclusive": [group.required for group in parser._mutually_exclusive_groups],
        "commands": commands,
    }


def rebuild(spec: Spec) -> argparse.ArgumentParser:
    """A bare ``argparse`` tree with the shape ``describe`` recorded: the same commands, options,
    numbers of arguments, choices, help and mutually exclusive groups, and no behaviour."""
    parser = argparse.ArgumentParser(prog=spec["prog"])
    _fill(parser, spec)
    return parser


def _fill(parser: argparse.ArgumentParser, spec: Spec) -> None:
    exclusive = [parser.add_mutually_exclusive_group(required=required) for required in spec["exclusive"]]
    for action in spec["actions"]:
        where: argparse._ActionsContainer = parser if action["group"] is None else exclusive[action["group"]]
        names = action["options"] or [action["dest"]]
        options: dict[str, Any] = {"help": action["help"]}
        if action["options"]:
            options["dest"] = action["dest"]
        if action["nargs"] == 0:
            options["action"] = "count" if action["count"] else "store_true"
        else:
            options.update(nargs=action["nargs"], choices=action["choices"], metavar=action["metavar"])
            if action["nargs"] == argparse.OPTIONAL:
                options["const"] = action["const"]
        where.add_argument(*names, **options)
    if spec["commands"]:
        commands = parser.add_subparsers(dest="command", metavar="COMMAND")
        for command in spec["commands"]:
            child = commands.add_parser(command["name"], aliases=command["aliases"], help=command["help"])
            _fill(child, command["parser"])
