"""How every command reports: one JSON document on stdout with ``--json``, plain aligned text when
stdout is not a terminal, colour only on a terminal and never with ``NO_COLOR``.

Results and summaries go to stdout, logs and progress to stderr, so ``keyconnector stats --json |
jq`` and ``keyconnector check > report.txt`` hold the result and nothing else. The JSON shape of each
command is documented in ``docs/cli.md`` and pinned by the tests that run each command
(``tests/test_cli_reports.py``, ``tests/test_cli_operations.py``, ``tests/test_cli_config.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

__all__ = ["add_json_option", "colour", "emit_json", "plain_table", "wants_json"]


def add_json_option(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: ``what`` as one JSON document on stdout instead of text (shape: docs/cli.md)."""
    parser.add_argument(
        "--json",
        action="store_true",
        help=f"print {what} as one JSON document on stdout (shape: docs/cli.md)",
    )


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def emit_json(document: Mapping[str, Any], stream: IO[str] | None = None) -> None:
    """One JSON document, indented, on stdout (UUIDs, paths and the like as strings)."""
    out = stream or sys.stdout
    out.write(json.dumps(document, indent=2, default=str) + "\n")
    out.flush()


def colour(stream: IO[str] | None = None) -> bool:
    """Colour only on a terminal, and never with ``NO_COLOR`` set (https://no-color.org)."""
    out = stream or sys.stdout
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned with spaces, no box drawing and no wrapping: what ``grep``, ``awk`` and a
    pasted ticket read well. Numbers are right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    return text.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()
