"""The conventions every ``keyconnector`` command follows, applied in one place to the whole parser.

A command module registers its parser and options and nothing else: ``finish`` then gives every
command the same help layout (each option's default shown), the same epilog (environment, exit
codes, where the docs are), the same ``-q``/``-v``/``--log-level`` options, and "did you mean"
for a mistyped command or option.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Iterator
from typing import NoReturn

from keyconnector.errors import CONFIG_FILE_ENV, EXIT_CODE_TABLE

__all__ = ["ENVIRONMENT", "EPILOG", "HelpFormatter", "Parser", "finish", "log_level", "walk"]

ENVIRONMENT: tuple[tuple[str, str], ...] = (
    (
        "keyConnectorSettings__...",
        "every setting, upstream's names (man keyconnector, docs/configuration.md)",
    ),
    (CONFIG_FILE_ENV, "an appsettings JSON file, as --config"),
    ("ASPNETCORE_URLS", "serve's address when --host/--port are not given, as upstream's"),
    ("NO_COLOR", "no colour in the output"),
)
"""The environment variables the epilog names; the man page's ENVIRONMENT section is made from the
same list (the module imports only ``errors``: every Tab of shell completion imports it)."""

_ENVIRONMENT_TABLE = "\n".join(f"  {name:<26} {meaning}" for name, meaning in ENVIRONMENT)

EPILOG = f"""\
environment:
{_ENVIRONMENT_TABLE}

exit codes:
{EXIT_CODE_TABLE}

Results go to standard output, logs and progress to standard error. Documentation: `man keyconnector`,
and README.md and docs/ (cli.md, configuration.md, troubleshooting.md) in the source distribution."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and shows each option's default (unless it has none, is a plain
    switch, or the help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
            or isinstance(action, argparse._CountAction)
        ):
            return text
        return f"{text} (default: %(default)s)"


_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<given>[^']*)' \(choose from (?P<choices>.*)\)")


class Parser(argparse.ArgumentParser):
    """``argparse`` with "did you mean" on a mistyped command, choice or option (exit 2, as every
    usage error)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        super().error(message + _suggestion(self, message))


def _suggestion(parser: argparse.ArgumentParser, message: str) -> str:
    match = _INVALID_CHOICE.search(message)
    if match:
        choices = re.findall(r"'([^']*)'", match.group("choices"))
        close = difflib.get_close_matches(match.group("given"), choices, n=1, cutoff=0.6)
        return f"; did you mean '{close[0]}'?" if close else ""
    if message.startswith("unrecognized arguments: "):
        given = [word.split("=", 1)[0] for word in message.split(": ", 1)[1].split() if word.startswith("-")]
        # The root parser reports a sub-command's unknown options: look through the whole tree.
        options = sorted(
            {s for _, each in walk(parser) for action in each._actions for s in action.option_strings}
        )
        for word in given:
            close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
            if close:
                return f"; did you mean '{close[0]}'?"
    return ""


def walk(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under ``parser`` (itself first), with its command path (``"audit verify"``)."""
    yield parser.prog.removeprefix("keyconnector").strip(), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from walk(child)


def _has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(action, argparse._SubParsersAction) for action in parser._actions)


def finish(root: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Apply the conventions to every command of ``root``'s tree."""
    for _, parser in walk(root):
        parser.formatter_class = HelpFormatter
        if parser.epilog is None:
            parser.epilog = EPILOG
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and not action.help:
                action.help = "one of the commands below; each has its own --help"
        if _has_subcommands(parser):
            continue
        common = parser.add_argument_group("output and logging (every command)")
        common.add_argument(
            "-q",
            "--quiet",
            action="count",
            default=0,
            help="fewer log lines: -q warnings and errors, -qq errors only",
        )
        common.add_argument(
            "-v", "--verbose", action="count", default=0, help="debug log lines, and tracebacks"
        )
        common.add_argument(
            "--log-level",
            choices=["debug", "info", "warning", "error"],
            help="the least severe log level written (wins over -q/-v and logging__level)",
        )
    return root


def log_level(args: argparse.Namespace) -> str | None:
    """The level the command line asks for, or None to leave it to ``logging__level``."""
    if getattr(args, "log_level", None):
        return str(args.log_level)
    verbose = getattr(args, "verbose", 0) or 0
    quiet = getattr(args, "quiet", 0) or 0
    if verbose:
        return "debug"
    if quiet:
        return "warning" if quiet == 1 else "error"
    return None
