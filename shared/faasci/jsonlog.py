"""Every function's own log as JSON lines, one object a line, ready for Loki to take its
fields as labels:

    {"time": "2026-11-27T22:10:01.123Z", "level": "INFO", "logger": "faasci.stage",
     "message": "run …: unit attempt 1 started", "function": "unit", "service": "web",
     "run_id": "…", "stage": "unit", "attempt": 1, "trace_id": "…", "span_id": "…"}

`function` is the function's name (FAASCI_FUNCTION); `service` (the pipeline's service),
`run_id`, `stage` and `attempt` are those `bind` set in the current context (a stage
attempt binds them: faasci.tracing.begin_attempt; a request naming a run binds its run_id:
faasci.api) and absent outside a run; `trace_id` and
`span_id` are the current span's (faasci.tracing), absent when there is none. A line is
bounded: the message, and an exception's traceback (`exc`), are each cut to MAX_CHARS
with a marker saying how much went. Secrets are masked before formatting (faasci.masking's
filter on the handler). A stage's own log (its commands' output, stored in S3) is not this.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator

from opentelemetry import trace

MAX_CHARS = 4000  # of a message, and of a traceback: a line stays under ~9 kB
FIELDS = ("run_id", "stage", "attempt", "service")

_bound: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "faasci_log_fields", default=None
)


@contextlib.contextmanager
def bind(**fields) -> Iterator[None]:
    """Within the block (this context: a thread, or a copy `tracing.in_context` made), every
    JSON log line carries `fields` (run_id, stage, attempt, service; None leaves one out)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(f"jsonlog.bind: unknown fields {sorted(unknown)}")
    token = _bound.set(
        {**(_bound.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    )
    try:
        yield
    finally:
        _bound.reset(token)


def bound() -> dict:
    """The fields bound in the current context."""
    return dict(_bound.get() or {})


def cut(text: str, limit: int = MAX_CHARS) -> str:
    """`text`, or its first `limit` characters and a marker naming how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[faas-ci: {len(text) - limit} more characters cut]"


class JsonFormatter(logging.Formatter):
    """A record as one JSON line (see the module's docstring)."""

    def __init__(self, function: str | None = None):
        super().__init__()
        self.function = function if function is not None else os.environ.get("FAASCI_FUNCTION")

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": cut(record.getMessage()),
        }
        if self.function:
            line["function"] = self.function
        line.update(_bound.get() or {})
        found = trace.get_current_span().get_span_context()
        if found.is_valid:
            line["trace_id"] = format(found.trace_id, "032x")
            line["span_id"] = format(found.span_id, "016x")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = cut(record.exc_text)
        # One physical line whatever the message holds: JSON escapes every control
        # character (newlines included); other characters stay as they are (UTF-8).
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str | None = None, stream=None) -> logging.Handler:
    """The root logger writes JSON lines to `stream` (stderr) at `level` (LOG_LEVEL, INFO),
    with secrets masked (faasci.masking), replacing the handlers it had. The template's
    server calls it at start."""
    from .masking import install_filter

    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("LOG_LEVEL", "INFO"))
    install_filter(root)
    return handler
