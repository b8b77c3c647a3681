"""How the record-changing commands (``transfer``, ``rotate-*``, ``upgrade-records``,
``downgrade-records``) end: their summary on stdout, as text or as one JSON document, and the exit
code of ``errors.ExitCode``.

Why not simply raise ``OperationFailed`` up to ``cli.main``: with ``--json``, ``main`` prints a bare
``{"ok": false, "error": ...}`` document, and a script would lose the counts and the list of failed
records, which are the point of the document. So these commands print their own document, with
``ok`` false, ``exit_code`` 1 and the ``error`` line, and print that line on stderr the way ``main``
does. Every other error still goes up to ``main`` (2 for a setting, 3 for an unreachable dependency).
The shapes are documented in docs/cli.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from keyconnector.errors import ExitCode
from keyconnector.ops import OperationFailed
from keyconnector.ops.report import emit_json, wants_json

__all__ = ["finish"]


def finish(
    args: argparse.Namespace,
    command: str,
    document: Mapping[str, Any],
    text: list[str],
    failure: OperationFailed | None = None,
) -> int:
    """Print the outcome on stdout (``document`` with ``--json``, else the ``text`` lines) and return
    the exit code: 0, or 1 with ``failure`` (its line also on stderr, as for any failed command)."""
    code = ExitCode.FAILED if failure is not None else ExitCode.OK
    if wants_json(args):
        head: dict[str, Any] = {"ok": failure is None, "exit_code": int(code), "command": command}
        if failure is not None:
            head["error"] = str(failure)
        emit_json({**head, **document})
    else:
        for line in text:
            print(line, flush=True)
    if failure is not None:
        print(f"keyconnector: {failure}", file=sys.stderr, flush=True)
    return int(code)
