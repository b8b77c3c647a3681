"""Logging set-up: human lines or JSON lines, to stderr and optionally a file.

Nothing secret is ever passed to a logger in this code base; the formatters add no request data
beyond what the caller hands in (method, path without query string, status, time, user id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import os
import sys
import time
from contextvars import ContextVar
from typing import Any

from keyconnector.runtime.settings import LoggingSettings

ACCESS_LOGGER = "keyconnector.access"

request_id: ContextVar[str | None] = ContextVar("keyconnector_request_id", default=None)
"""The id of the request being handled (set by the HTTP layer), added to every log line written
while handling it, so that an error line and its access-log line can be found together."""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            entry["request_id"] = current
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def timestamp(when: float) -> str:
    """The one timestamp format of every log line, text or JSON, service or access log: RFC 3339 in
    UTC with milliseconds (``2026-12-03T15:37:47.123Z``), so that lines from both logs, from every
    worker and from every host sort and join as text."""
    second = int(when)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{int((when - second) * 1000):03d}Z"


def escape(text: str) -> str:
    """``text`` with every non-printable character written as a Python escape (``\\n``, ``\\x1b``,
    ``\\u2028``).

    Request fields reach log lines (the path, decoded from ``%0A``; headers; a client's request id):
    a control character in one of them would start a forged line in a text log, move the cursor of
    the terminal that shows it, or hide text behind a bidirectional override. One line per record
    is what log shippers and grep rely on. ``str.isprintable`` is one C loop, so the common case (a
    clean field) costs next to nothing on the access log's hot path.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class TextFormatter(logging.Formatter):
    """Human lines; a line written while handling a request ends with ``rid=<request id>``, as the
    access log's line for that request does."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record.created)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The message may hold a request's path or a client's words: one record, one line. A
        # traceback, added after this by ``format``, keeps its lines.
        return escape(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        current = request_id.get()
        return line if current is None else f"{line} rid={current}"


class AccessLog:
    """One line per request, written in batches.

    Going through ``logging`` cost about 28 µs a request (a record, a formatter, a lock and a write
    system call per line): a third of a login's budget. Here a line is one f-string appended to a list,
    and the list is written every ``interval`` seconds with one ``os.write`` per destination, so a
    line reaches the file at most that late. ``flush`` runs at shutdown too.
    """

    def __init__(self, *, json_format: bool, file: str | None, interval: float = 0.05) -> None:
        self.enabled = True
        self._json = json_format
        self._file = file
        self._file_fd: int | None = None
        self._file_id: tuple[int, int] | None = None
        self._interval = interval
        self._lines: list[str] = []
        self._scheduled = False
        self._second = -1
        self._stamp = ""
        self.dropped = 0

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        # ``timestamp``'s format, with the formatted second cached (this is on every request's path).
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def record(
        self,
        method: str,
        path: str,
        status: int,
        millis: float,
        user: object,
        request_id: str,
        client: str | None,
    ) -> None:
        if self._json:
            line = json.dumps(
                {
                    "time": self._timestamp(),
                    "level": "info",
                    "logger": ACCESS_LOGGER,
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": round(millis, 3),
                    "user_id": str(user) if user else None,
                    "client": client,
                    "request_id": request_id,
                }
            )
        else:
            # JSON escapes control characters by itself; a text line must do it for every field a
            # client chose (see ``escape``). The user id is a UUID the token check produced.
            line = (
                f"{self._timestamp()} INFO    {ACCESS_LOGGER}: {escape(method)} {escape(path)} {status} "
                f"{millis:.2f}ms user={user or '-'} rid={escape(request_id)}"
            )
        self._lines.append(line)
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_later(self._interval, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        data = ("\n".join(self._lines) + "\n").encode("utf-8", "replace")
        self._lines.clear()
        try:
            _write_all(sys.stderr.fileno(), data)
        except (OSError, ValueError):  # stderr closed or gone: nothing better to report it to
            self.dropped += 1
        if self._file:
            try:
                _write_all(self._file_descriptor(), data)
            except OSError as exc:
                logging.getLogger("keyconnector").warning(
                    "cannot write the access log to %s: %s", self._file, exc
                )

    def _file_descriptor(self) -> int:
        # Reopen when logrotate has moved the file away (as WatchedFileHandler does).
        assert self._file is not None
        try:
            stat = os.stat(self._file)
            identity: tuple[int, int] | None = (stat.st_dev, stat.st_ino)
        except FileNotFoundError:
            identity = None
        if self._file_fd is None or identity != self._file_id:
            if self._file_fd is not None:
                os.close(self._file_fd)
            self._file_fd = os.open(self._file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            stat = os.fstat(self._file_fd)
            self._file_id = (stat.st_dev, stat.st_ino)
        return self._file_fd


def create_private(path: str) -> None:
    """Create ``path`` with mode 0600 if it does not exist, so a log opened by ``logging`` (which
    creates with 0644 less the umask) is not readable by every local account from its first line.

    Logs hold user ids, client addresses and error details. A file that exists keeps its mode (the
    operator chose it, or logrotate's ``create`` did); a file logrotate moves away is recreated by
    the handler, with logrotate's own mode rules.
    """
    # OSError: it exists already, or cannot be created (the handler that opens it next says why).
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_access = AccessLog(json_format=False, file=None)


def access_log() -> AccessLog:
    return _access


def override_level(level: str) -> None:
    """The command line's ``-q``/``-v``/``--log-level``: wins over ``logging__level`` for this
    process and every later ``configure`` (a command configures logging again once it has read
    its settings). Server workers get it through the environment (``KEYCONNECTOR_LOG_LEVEL``)."""
    os.environ[LEVEL_OVERRIDE_ENV] = level
    logging.getLogger().setLevel(level.upper())


LEVEL_OVERRIDE_ENV = "KEYCONNECTOR_LOG_LEVEL"


def configure(settings: LoggingSettings) -> None:
    """Replace the root handlers; safe to call in every worker process."""
    global _access
    _access.flush()
    _access = AccessLog(json_format=settings.format == "json", file=settings.file)
    _access.enabled = settings.access_log
    formatter: logging.Formatter
    formatter = JsonFormatter() if settings.format == "json" else TextFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file:
        create_private(settings.file)
        # WatchedFileHandler reopens the file after logrotate moves it.
        handlers.append(logging.handlers.WatchedFileHandler(settings.file, encoding="utf-8"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel((os.environ.get(LEVEL_OVERRIDE_ENV) or settings.level).upper())
    # Client libraries log request URLs and headers at INFO/DEBUG (a SAS signature, a Vault path):
    # keep them at WARNING whatever our own level is.
    for noisy in (
        "httpx",
        "httpcore",
        "alembic",
        "urllib3",
        "azure",
        "botocore",
        "boto3",
        "hvac",
        "google",
        "grpc",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
