"""Progress output: periodic plain lines when not on a terminal, a bar when on one."""

from __future__ import annotations

import io
import os
import pty
import select

from keyconnector.ops.progress import Progress


def test_plain_lines_carry_counts_rate_and_the_final_summary() -> None:
    out = io.StringIO()
    with Progress("copying", 4, stream=out, interval=0) as progress:
        progress.advance(1)
        progress.advance(3)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("copying: 1 of 4 (25%), ") and "/s" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("copying: 4 of 4 (100%), ") and "done in" in lines[-1]


def test_unknown_totals_and_quiet_intervals() -> None:
    out = io.StringIO()
    with Progress("scanning", None, stream=out, interval=3600) as progress:
        for _ in range(1000):
            progress.advance()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, "nothing between intervals, one summary at the end"
    assert lines[0].startswith("scanning: 1,000, ") and "done in" in lines[0]


def test_a_terminal_gets_a_bar() -> None:
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as stream:
            with Progress("rotating", 10, stream=stream) as progress:
                progress.advance(10)
            stream.flush()
        chunks = []
        while select.select([leader], [], [], 0.5)[0]:
            chunks.append(os.read(leader, 65536))
        drawn = b"".join(chunks).decode(errors="replace")
    finally:
        os.close(leader)
        os.close(follower)
    assert "rotating" in drawn and "10/10" in drawn
