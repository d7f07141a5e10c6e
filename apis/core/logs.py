"""Log lines of the server and of every worker: text or JSON, each with the request id.

Every request has an id (apis/http/metrics.py picks it). It sits in :data:`REQUEST_ID` while
the request is handled, so every log line written meanwhile carries it, and it travels with
the job to the model worker, whose lines during that batch carry the ids of the batch.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from typing import Any

log = logging.getLogger("visionserve")
LOG_FORMAT_ENV = "VISIONSERVE_LOG_FORMAT"
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


JsonFormatter.converter = time.gmtime


def log_handler(fmt: str) -> logging.Handler:
    """The root handler of the server and of every worker: text or JSON lines, with request ids."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d] [%(request_id)s]: %(message)s")
        )
    handler.addFilter(RequestIdFilter())
    return handler


def adopt_litserve_logger() -> None:
    """LitServe gives its logger a handler of its own (at import and again in ``run``) that does
    not propagate; in JSON mode its lines go through the root handler like every other."""
    lg = logging.getLogger("litserve")
    lg.handlers.clear()
    lg.propagate = True


def configure_logging(level: str, fmt: str | None = None) -> None:
    """Same log format in the server process and in every (spawned) worker: text, or one JSON
    object per line. Workers read the format from ``$VISIONSERVE_LOG_FORMAT`` (app.py sets it)."""
    fmt = fmt or os.environ.get(LOG_FORMAT_ENV, "text")
    logging.basicConfig(level=logging.WARNING, handlers=[log_handler(fmt)], force=True)
    log.setLevel(level.upper())
    if fmt == "json":
        adopt_litserve_logger()
