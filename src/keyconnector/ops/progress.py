"""Progress of long operations (transfer, rotation, backup): a bar on a terminal, plain lines in logs.

An operator copying a hundred thousand keys wants to see that it moves and when it will end; a
log collector wants one line every few seconds, not a redrawn bar full of control characters.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


class Progress:
    """Counts done items; ``total`` may be unknown (None). Use as a context manager."""

    def __init__(
        self,
        description: str,
        total: int | None,
        *,
        stream: TextIO | None = None,
        interval: float = 5.0,
        force_plain: bool = False,
    ) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._interval = interval
        self._started = time.monotonic()
        self._last_line = self._started
        self._rich: object | None = None
        self._task: object | None = None
        self._plain = force_plain or not self._stream.isatty()

    def __enter__(self) -> Progress:
        self._started = self._last_line = time.monotonic()
        if not self._plain:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(file=self._stream),
                transient=False,
            )
            bar.start()
            self._task = bar.add_task(self.description, total=self.total, rate="")
            self._rich = bar
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._rich is not None:
            self._rich.stop()  # type: ignore[attr-defined]
        else:
            self._write(final=True)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._rich is not None:
            self._rich.update(  # type: ignore[attr-defined]
                self._task, completed=self.done, rate=f"{self.rate:,.0f}/s"
            )
            return
        now = time.monotonic()
        if now - self._last_line >= self._interval:
            self._last_line = now
            self._write(final=False)

    def _write(self, *, final: bool) -> None:
        elapsed = time.monotonic() - self._started
        parts = [f"{self.description}: {self.done:,}"]
        if self.total is not None:
            percent = 100.0 * self.done / self.total if self.total else 100.0
            parts[0] += f" of {self.total:,} ({percent:.0f}%)"
        parts.append(f"{self.rate:,.0f}/s")
        if final:
            parts.append(f"done in {elapsed:.1f} s")
        elif self.total is not None and self.rate > 0:
            parts.append(f"about {max(self.total - self.done, 0) / self.rate:.0f} s left")
        self._stream.write(", ".join(parts) + "\n")
        self._stream.flush()
