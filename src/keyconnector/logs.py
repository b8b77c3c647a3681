"""Logging set-up: human lines or JSON lines, to stderr and optionally a file.

Nothing secret is ever passed to a logger in this code base; the formatters add no request data
beyond what the caller hands in (method, path without query string, status, time, user id).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime
from typing import Any

from keyconnector.settings import LoggingSettings

ACCESS_LOGGER = "keyconnector.access"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure(settings: LoggingSettings) -> None:
    """Replace the root handlers; safe to call in every worker process."""
    formatter: logging.Formatter
    formatter = JsonFormatter() if settings.format == "json" else logging.Formatter(TEXT_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file:
        # WatchedFileHandler reopens the file after logrotate moves it.
        handlers.append(logging.handlers.WatchedFileHandler(settings.file, encoding="utf-8"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(settings.level.upper())
    logging.getLogger(ACCESS_LOGGER).disabled = not settings.access_log
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
