"""The JSON-lines sinks: a file (``audit.file``) and standard output (``audit.stdout``).

Each entry is one ``os.write`` of one whole line on a descriptor opened with ``O_APPEND``: the
kernel places every write at the end of the file atomically, so lines of several worker processes
never interleave and no lock is needed (entries stay far below PIPE_BUF, which makes the same true
for a pipe on stdout). The write goes to the page cache and costs microseconds; there is no fsync
per entry (a host crash can lose the last entries, as with any log; the chain then shows the end
missing against the newest checkpoint).

A failed write is reported to the caller (for ``failClosed``), counted and logged at most every ten
seconds; the file is reopened on the next entry, so a full disk or a replaced mount recovers by
itself. A short write leaves a torn line; the next entry starts on a new line, and ``audit verify``
names the torn one.

When the sink is keyed, the file is read once from the start (``survey``), to adopt the unkeyed
entries of an earlier version (see ``keyconnector.audit.sink``); reading stops at the first keyed
entry, so on every later start only the beginning of the file is read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Iterable
from typing import Any

from keyconnector.audit.chain import CHECKPOINT, Chain
from keyconnector.audit.sink import KeyedSink, Survey

log = logging.getLogger("keyconnector.audit")

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


def survey_lines(lines: Iterable[bytes]) -> Survey:
    """The unkeyed chains' heads in JSON lines, up to the first keyed entry (then: ``keyed``).

    Lines that are not entries are skipped: ``audit verify`` reports them, adoption only needs the
    heads of what is there."""
    heads: dict[str, tuple[int, str]] = {}
    entries = 0
    for line in lines:
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                continue
            if "v" in entry:
                return Survey(keyed=True)
            chain, seq, digest = entry["chain"], entry["seq"], entry["hash"]
        except (ValueError, KeyError):
            continue
        if isinstance(chain, str) and type(seq) is int and isinstance(digest, str):
            heads.pop(chain, None)  # re-inserted: the order found is the order of newest entries
            heads[chain] = (seq, digest)
            entries += 1
    return Survey(False, [(chain, seq, digest) for chain, (seq, digest) in heads.items()], entries)


class LineSink(KeyedSink):
    """A JSON-lines sink on a file path, or on an already open descriptor (stdout)."""

    def __init__(self, name: str, chain_id: str, *, path: str | None = None, fd: int | None = None) -> None:
        super().__init__(chain_id)
        self.name = name
        self.path = path
        self._fd = fd
        self._owned = fd is None
        self._ok = True
        self._torn = False
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
        super()._failed(problem)

    def _can_record(self) -> bool:
        """Whether the last attempt succeeded (and there is something to write to)."""
        return self._ok and self._fd is not None

    def _write(self, chain: Chain, fields: dict[str, Any]) -> bool:
        """Write one entry synchronously; True once it is in the file (or pipe)."""
        fd = self._fd if self._fd is not None else (self._open() if self._owned else None)
        if fd is None:
            return False
        _, line, digest = chain.seal(fields)
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
        chain.advance(digest)
        self._recorded(chain.seq - 1, digest, None if fields.get("outcome") == CHECKPOINT else chain.seq - 1)
        return True

    def survey(self) -> Survey | None:
        """Read the file back (a regular file only: a pipe or a device cannot be read back).

        A file that cannot be read is not waited for (unlike a database that is down, it will not
        come back by itself): its unkeyed entries, if any, are then not adopted, which verify reports.
        """
        if self.path is None:
            return None
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                return None
            with open(self.path, "rb") as handle:
                return survey_lines(handle)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error(
                "audit %s sink: cannot read %s to adopt the unkeyed entries it may hold (%s); "
                "`audit verify` will report any as not covered",
                self.name,
                self.path,
                exc.strerror or exc,
            )
            return None

    def _close(self) -> None:
        if self._owned and self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    async def aclose(self) -> None:
        self._close()
