"""How the command logs: plain lines for people, or one JSON object per line for log pipelines.

The library only logs (named loggers, lazy arguments); the application decides the format here.
Records may carry structured fields in `extra` ("event": "progress" | "summary" | ..., and the
figures), which the JSON format puts beside the message.
"""

from __future__ import annotations

import json
import logging
import sys
import time

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "warning" if record.levelno >= logging.WARNING else "log"),
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in d:
                d[key] = value
        if record.exc_info:
            d["traceback"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


def configure(level: str, fmt: str) -> None:
    """Handlers on the root logger for this process (force: the command owns its logging)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(PLAIN))
    logging.basicConfig(force=True, level=level.upper(), handlers=[handler])
