"""Structured log lines, as text or JSON, for conveyord and for worker processes.

A log call puts its fields in `extra` (`log.info("task started", extra={"task_id": ...})`);
the JSON formatter writes each as a key beside `time`, `level`, `logger` and `message`,
and the text formatter writes them as key=value after the message. While a handler runs,
its attempt (task id and attempt number) is in a context variable (`attempt_scope`), and
`AttemptFilter` adds it to every record logged meanwhile, so that a handler's own
`logging.getLogger(__name__).info(...)` says which task it is about.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any, Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

# The attempt that the code running now works for: (task id, attempt number).
_attempt: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "conveyor_attempt", default=None
)

# What every LogRecord has of its own: anything else on a record came from `extra`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


@contextlib.contextmanager
def attempt_scope(task_id: str, attempt: int) -> Iterator[None]:
    """Within it, the code of the current context (an asyncio task, and the threads it
    starts with a copy of its context) runs the attempt `attempt` of task `task_id`."""
    token = _attempt.set((task_id, attempt))
    try:
        yield
    finally:
        _attempt.reset(token)


class AttemptFilter(logging.Filter):
    """Adds `task_id` and `attempt` to the records logged while a handler runs its attempt
    (a record that names its own task keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        running = _attempt.get()
        if running is not None and not hasattr(record, "task_id"):
            record.task_id, record.attempt = running
        return True


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record carries beyond the standard ones (its `extra`)."""
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`; values with spaces or quotes are quoted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = fields(record)
        if not extra:
            return line
        head, newline, rest = line.partition("\n")  # a traceback stays below the fields
        pairs = " ".join(f"{key}={_text(value)}" for key, value in extra.items())
        return f"{head} {pairs}{newline}{rest}"


_PLAIN = re.compile(r'[^\s"=]+')  # what a value may be unquoted: no space, quote or '='


def _text(value: Any) -> str:
    """A value as key=value writes it: plain if it can be, else quoted as JSON quotes it
    (numbers and plain strings take the quick way: a line has several per task)."""
    if isinstance(value, str):
        return value if _PLAIN.fullmatch(value) else json.dumps(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)
    text = json.dumps(value, default=str)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then every
    field of the record's `extra`, and `exception` (its traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure(level: str = "info", log_format: LogFormat = "text") -> None:
    """Log to stderr at `level` (debug, info, warning or error) as text or JSON, with the
    running attempt on handlers' records: the one logging set-up of conveyord and of
    `conveyor worker`."""
    # What no line here shows, and what costs a third of a record's making (the caller's
    # frame above all): not gathered, as the logging HOWTO's "Optimization" advises.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(AttemptFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # gRPC's own debug lines (one per call and more) would drown the RPC lines out.
    logging.getLogger("grpc").setLevel(max(logging.INFO, logging.getLogger().level))
