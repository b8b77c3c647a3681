"""``keyconnector man-page``: the manual page ``keyconnector(1)``, generated from the one parser.

Why generated: the page lists every command and option with its help, and a hand-kept copy drifts
the day an option is added. argparse-manpage renders the parser (every command, every option, its
help with the default the ``--help`` shows); this module adds what the epilog says in ``--help``
(environment, exit status, results and logs, where the rest is documented) as the man sections a
reader looks for, from the same lists ``cli.conventions`` prints. ``make docs`` writes
``docs/keyconnector.1``; ``make lint`` and ``tests/test_cli_docs.py`` check that it is current.

argparse-manpage is a development dependency (the ``dev`` extra): an installed service never needs
to regenerate its own manual.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import keyconnector
from keyconnector.cli.conventions import ENVIRONMENT, HelpFormatter, walk
from keyconnector.errors import EXIT_CODE_MEANINGS, UsageError
from keyconnector.ops import Subcommands

__all__ = ["add_commands", "render"]

DESCRIPTION = "a drop-in, hardened replacement for Bitwarden's Key Connector"
"""The NAME line's summary (``keyconnector - ...``), as pyproject describes the package."""


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "man-page",
        help="print the manual page keyconnector(1) (roff), or write or check docs/keyconnector.1",
        description=(
            "Generates the manual page from the command line itself: every command and option with its "
            "help, the environment, the exit status. Prints it (read it with `keyconnector man-page | "
            "man -l -`), writes it (--output FILE) or compares it with FILE (--check) and exits 1 when "
            "they differ. Needs argparse-manpage (the dev extra)."
        ),
    )
    from keyconnector.ops.docs import add_generated_arguments

    add_generated_arguments(parser, "the page")
    parser.set_defaults(func=cmd_man_page)


def cmd_man_page(args: argparse.Namespace) -> int:
    from keyconnector.ops.docs import emit_generated

    return emit_generated(args, render(), regenerate="keyconnector man-page --output")


def render() -> str:
    """The page, in roff (man macros), the same on every run for the same command line."""
    try:
        from argparse_manpage.manpage import Manpage
    except ImportError:
        raise UsageError(
            "man-page",
            "needs the Python package 'argparse-manpage', which is not installed; "
            "install it with: pip install 'keyconnector[dev]'",
        ) from None
    from keyconnector.cli import build_parser

    parser = build_parser()
    for _, each in walk(parser):
        _with_defaults(each)
        _keep_layout(each)
    # The page's order: the program's own options, then its commands (argparse files the commands
    # under "positional arguments"); the epilog becomes the sections below instead of one paragraph.
    parser._positionals.title = "commands"
    parser._action_groups.sort(key=lambda group: group is parser._positionals)
    parser.epilog = None
    page: Any = Manpage(parser, format="single-commands-section")
    page.description = DESCRIPTION
    page.source = f"keyconnector {keyconnector.__version__}"
    page.manual = "keyconnector manual"
    page.date = ""  # a date would make every regeneration a change; the version says enough
    codes = ((str(int(code)), meaning) for code, meaning in EXIT_CODE_MEANINGS.items())
    page.add_section("exit status", ">", _definitions(codes))
    page.add_section("environment", ">", _definitions(ENVIRONMENT))
    page.add_section("files", ">", _FILES)
    page.add_section("notes", ">", _NOTES)
    page.add_section("see also", ">", _SEE_ALSO)
    return str(page)


def _with_defaults(parser: argparse.ArgumentParser) -> None:
    """Give each option the help text ``--help`` shows, default included (the library's formatter
    would drop it)."""
    formatter = HelpFormatter(parser.prog)
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            action.help = formatter._get_help_string(action)


def _keep_layout(parser: argparse.ArgumentParser) -> None:
    """Keep the indented blocks of a description (a table, a command to copy) as ``--help`` shows
    them: roff would fill them into one paragraph. The library escapes backslashes and hyphens but
    leaves a line's leading dot alone, so a ``.nf``/``.fi`` pair passes through as the request it is."""
    if not parser.description:
        return
    lines: list[str] = []
    indented = False
    for line in parser.description.splitlines():
        block = line.startswith("  ")
        if block != indented:
            lines.append(".nf" if block else ".fi")
            indented = block
        lines.append(line)
    if indented:
        lines.append(".fi")
    parser.description = "\n".join(lines)


def _escape(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, a leading dot or quote made literal."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.MULTILINE)


def _definitions(items: Any) -> str:
    """A ``.TP`` list: each term in bold, its meaning indented under it."""
    return "\n".join(f".TP\n.B {_escape(term)}\n{_escape(meaning)}" for term, meaning in items)


_FILES = "\n".join(
    [
        ".TP",
        ".B ~/.cache/keyconnector/",
        "Shell completion's description of the commands (see \\fBkeyconnector completion\\fR), made again "
        "after an upgrade; \\fB$XDG_CACHE_HOME\\fR/keyconnector/ when that is set.",
    ]
)

_NOTES = (
    "Results and summaries go to standard output, logs and progress to standard error, so that "
    "a command's output can be piped or parsed (\\fB\\-\\-json\\fR where a command has it) "
    "while its log stays on the terminal."
)

_SEE_ALSO = "\n".join(
    [
        "Every setting (its environment variable, appsettings.json path, type and default) is in",
        "docs/configuration.md, or printed by \\fBkeyconnector config\\-reference\\fR; what each error",
        "and warning means in docs/troubleshooting.md; taking over an upstream deployment in",
        "docs/takeover.md; all in the source distribution beside README.md.",
    ]
)
