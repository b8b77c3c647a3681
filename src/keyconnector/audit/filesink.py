"""The JSON-lines sinks: a file (``audit.file``) and standard output (``audit.stdout``).

Each entry is one ``os.write`` of one whole line on a descriptor opened with ``O_APPEND``: the
kernel places every write at the end of the file atomically, so lines of several worker processes
never interleave and no lock is needed (entries stay far below PIPE_BUF, which makes the same true
for a pipe on stdout). The write goes to the page cache and costs microseconds; there is no fsync
per entry (a host crash can lose the last entries, as with any log; the chain then shows the end
missing against the anchor logged at shutdown).

A failed write is reported to the caller (for ``failClosed``), counted and logged at most every ten
seconds; the file is reopened on the next entry, so a full disk or a replaced mount recovers by
itself. A short write leaves a torn line; the next entry starts on a new line, and ``audit verify``
names the torn one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from keyconnector.audit.chain import Chain

log = logging.getLogger("keyconnector.audit")

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_LOG_EVERY = 10.0


class LineSink:
    """A JSON-lines sink on a file path, or on an already open descriptor (stdout)."""

    def __init__(self, name: str, chain_id: str, *, path: str | None = None, fd: int | None = None) -> None:
        self.name = name
        self.path = path
        self.chain = Chain(chain_id)
        self.failures = 0
        self._fd = fd
        self._owned = fd is None
        self._ok = True
        self._torn = False
        self._logged_at = -1e9
        if self._fd is None:
            self._open()

    def _open(self) -> int | None:
        assert self.path is not None
        try:
            self._fd = os.open(self.path, _FLAGS, 0o600)
        except OSError as exc:
            self._fd = None
            self._failed(f"cannot open {self.path}: {exc.strerror or exc}")
        return self._fd

    def _failed(self, problem: str) -> None:
        self._ok = False
        self.failures += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            self._logged_at = now
            log.error("audit %s sink: %s (%d failed entries so far)", self.name, problem, self.failures)

    def can_record(self) -> bool:
        """Whether the last attempt succeeded (and there is something to write to)."""
        return self._ok and self._fd is not None

    def write(self, fields: dict[str, Any]) -> bool:
        """Write one entry synchronously; True once it is in the file (or pipe)."""
        fd = self._fd if self._fd is not None else (self._open() if self._owned else None)
        if fd is None:
            return False
        _, line, digest = self.chain.seal(fields)
        if self._torn:
            line = b"\n" + line
        try:
            written = os.write(fd, line)
        except OSError as exc:
            self._close()
            self._failed(f"cannot write to {self.path or 'stdout'}: {exc.strerror or exc}")
            return False
        if written != len(line):
            self._torn = True
            self._failed(f"short write to {self.path or 'stdout'} (disk full?)")
            return False
        self._torn = False
        self._ok = True
        self.chain.advance(digest)
        return True

    def _close(self) -> None:
        if self._owned and self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        self._close()
