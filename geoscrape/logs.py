"""Logging for every command: `--log-level`, `--log-file`, `--log-format text|json`.

Set up once, on the root logger, before a command runs; the commands' own
`logging.basicConfig` calls then do nothing. JSON lines (one object per
record) suit containers whose log collector parses them.
"""

from __future__ import annotations

import enum
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class LogFormat(enum.StrEnum):
    text = "text"
    json = "json"


class LogLevel(enum.StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC), level, logger, message, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: LogLevel, file: Path | None, fmt: LogFormat) -> None:
    """Root handler to stderr (or `file`, appended) at `level` in `fmt`."""
    handler: logging.Handler = (
        logging.FileHandler(file, encoding="utf-8") if file else logging.StreamHandler()
    )
    handler.setFormatter(
        JsonFormatter() if fmt is LogFormat.json else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Alembic narrates every migration step at INFO: only worth reading when debugging.
    if level is not LogLevel.debug:
        logging.getLogger("alembic").setLevel(logging.WARNING)
