"""``keyconnector config-reference``: print, write or check the generated configuration reference.

Why a command and not only a test: CI and ``make`` can run ``--check docs/configuration.md`` to fail
a build whose committed page no longer matches the settings model, and an operator can print the
reference of the exact version they run (``keyconnector config-reference | less``).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
from pathlib import Path

from keyconnector.errors import UsageError
from keyconnector.ops import Subcommands

DIFF_LINES = 40
"""How much of the difference a failed ``--check`` shows: enough to see what changed, not a flood."""


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "config-reference",
        help="print the configuration reference (every setting), or write or check docs/configuration.md",
        description=(
            "Generates the configuration reference from the settings model: every setting with its "
            "environment-variable name, appsettings.json path, type, default, origin and the providers "
            "that use it, plus the environment variables that are not settings. Prints it, writes it "
            "(--output FILE), or compares it with FILE (--check) and exits 1 when they differ."
        ),
    )
    add_generated_arguments(parser, "the reference")
    parser.set_defaults(func=cmd_config_reference)


def add_generated_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--output FILE`` and ``--check [FILE]`` of a command that prints a generated document."""
    parser.add_argument("--output", metavar="FILE", help=f"write {what} to FILE instead of printing it")
    parser.add_argument(
        "--check",
        nargs="?",
        const="",
        metavar="FILE",
        help=f"compare FILE (default: --output's FILE) with {what}; exit 1 if it is stale",
    )


def cmd_config_reference(args: argparse.Namespace) -> int:
    from keyconnector.ops.reference import render

    return emit_generated(args, render(), regenerate="keyconnector config-reference --output")


def emit_generated(args: argparse.Namespace, text: str, *, regenerate: str) -> int:
    """What ``add_generated_arguments`` asks for: check ``text`` against the file, write it, or print it."""
    if args.check is not None:
        target = args.check or args.output
        if not target:
            raise UsageError("--check", "name the file to compare: --check FILE, or --output FILE --check")
        return check(Path(target), text, regenerate=regenerate)
    if args.output:
        write(Path(args.output), text)
        print(f"wrote {args.output}", file=sys.stderr)
        return 0
    sys.stdout.write(text)
    return 0


def check(path: Path, text: str, *, regenerate: str = "keyconnector config-reference --output") -> int:
    """0 when ``path`` holds exactly ``text``; otherwise say how to fix it (``regenerate`` followed
    by the path), show the start of the diff, 1."""
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        print(f"{path} does not exist; make it with: {regenerate} {path}")
        return 1
    if current == text:
        print(f"{path} is up to date")
        return 0
    diff = list(
        difflib.unified_diff(
            current.splitlines(), text.splitlines(), f"{path} (committed)", "generated", lineterm="", n=1
        )
    )
    print(f"{path} is stale; regenerate it with: {regenerate} {path}")
    for line in diff[:DIFF_LINES]:
        print(line)
    if len(diff) > DIFF_LINES:
        print(f"... ({len(diff) - DIFF_LINES} more diff lines)")
    return 1


def write(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a reader (or an interrupted run) never sees half a page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
