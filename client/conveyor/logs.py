"""Structured log lines, as text or JSON, for conveyord and for worker processes.

A log call puts its fields in `extra` (`log.info("task started", extra={"task_id": ...})`);
the JSON formatter writes each as a key beside `time`, `level`, `logger` and `message`,
and the text formatter writes them as key=value after the message. While a handler runs,
its attempt (task id and attempt number) is in a context variable (`attempt_scope`), and
`AttemptFilter` adds it to every record logged meanwhile, so that a handler's own
`logging.getLogger(__name__).info(...)` says which task it is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import itertools
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

# The attempt that the code running now works for: (task id, attempt number).
_attempt: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "conveyor_attempt", default=None
)

# What every LogRecord has of its own: anything else on a record came from `extra`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# A record's own attributes come first in its __dict__, those of `extra` (and of filters)
# after them: skipping the first ones is quicker than testing each (a line has ~25).
_FIRST_EXTRA = len(vars(logging.makeLogRecord({})))


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


Fields = Iterable[tuple[str, Any]]  # a line's fields, as (key, value) pairs


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record carries beyond the standard ones (its `extra`)."""
    return {key: value for key, value in _extra_items(record) if key not in _STANDARD}


def _extra_items(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    return itertools.islice(vars(record).items(), _FIRST_EXTRA, None)


class _Seconds:
    """The part of a time stamp that changes once a second, made once a second: formatting
    a time is a third of a line's cost, and a busy server writes thousands a second."""

    def __init__(self, make: Callable[[int], str]) -> None:
        self._make = make
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, self._make(second)
        return self._text


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...` (the time local, as logging's default
    asctime); values with spaces or quotes are quoted; a traceback below the line."""

    def __init__(self) -> None:
        super().__init__()
        self._seconds = _Seconds(
            lambda second: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        )

    def format(self, record: logging.LogRecord) -> str:
        line = self.render(record.created, record.levelname, record.name, record.getMessage())
        pairs = _pairs(_extra_items(record))
        if pairs:
            line += " " + pairs
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line

    def render(
        self, created: float, level: str, logger: str, message: str, items: Fields = ()
    ) -> str:
        """A line of these parts (`items`: its fields), with no record made."""
        stamp = f"{self._seconds(created)},{int((created - int(created)) * 1000):03d}"
        line = f"{stamp} {level} {logger}: {message}"
        pairs = _pairs(items)
        return f"{line} {pairs}" if pairs else line


_PLAIN = re.compile(r'[^\s"=]+')  # what a value may be unquoted: no space, quote or '='
_plain = _PLAIN.fullmatch


def _pairs(items: Fields) -> str:
    """Fields as `key=value ...`. Inlined for strings and numbers: a busy server writes a
    few lines per task, and a call per value was half of a line's cost."""
    pairs = []
    for key, value in items:
        if key in _STANDARD:  # set by a formatter (message, asctime)
            continue
        kind = type(value)
        if kind is str and _plain(value):
            pairs.append(f"{key}={value}")
        elif kind is int or kind is float:
            pairs.append(f"{key}={value!r}")
        elif kind is str and not value:
            pairs.append(f'{key}=""')
        else:
            pairs.append(f"{key}={_text(value)}")
    return " ".join(pairs)


def _text(value: Any) -> str:
    """A value as key=value writes it: plain if it can be, else quoted as JSON quotes it
    (`_pairs` writes plain strings and numbers itself; an IntEnum is its number here)."""
    if isinstance(value, str):
        return value if _PLAIN.fullmatch(value) else json.dumps(value)
    text = json.dumps(value, default=str)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then every
    field of the record's `extra`, and `exception` (its traceback) when there is one."""

    def __init__(self) -> None:
        super().__init__()
        self._seconds = _Seconds(
            lambda second: datetime.datetime.fromtimestamp(second, datetime.UTC).isoformat()[:19]
        )

    def format(self, record: logging.LogRecord) -> str:
        entry = self._entry(record.created, record.levelname, record.name, record.getMessage())
        entry.update(fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)

    def render(
        self, created: float, level: str, logger: str, message: str, items: Fields = ()
    ) -> str:
        """A line of these parts (`items`: its fields), with no record made."""
        entry = self._entry(created, level, logger, message)
        entry.update(items)
        return json.dumps(entry, default=str)

    def _entry(self, created: float, level: str, logger: str, message: str) -> dict[str, Any]:
        milliseconds = int((created - int(created)) * 1000)
        return {
            "time": f"{self._seconds(created)}.{milliseconds:03d}+00:00",
            "level": level,
            "logger": logger,
            "message": message,
        }


class PacedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines logged on an event loop together, at most `pace` seconds after the
    first of them (one write for a busy server's many lines, not a system call each; a
    crash loses at most that much); lines of other threads, and of no loop, at once.
    `flush` (at exit too) writes what waits."""

    def __init__(self, stream: TextIO, pace: float = 0.05) -> None:
        super().__init__(stream)
        self._pace = pace
        self._waiting: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # the loop's waiting lines came first
            super().emit(record)
            return
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.queue(line, loop)

    def queue(self, line: str, loop: asyncio.AbstractEventLoop) -> None:
        """Write `line` (formatted) with the others that `loop` logs meanwhile."""
        if not self._waiting:
            loop.call_later(self._pace, self.flush)
        self._waiting.append(line)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._waiting:
                self._waiting.append("")  # the last line's end
                self.stream.write(self.terminator.join(self._waiting))
                self._waiting.clear()
            self.stream.flush()


def configure(level: str = "info", log_format: LogFormat = "text") -> None:
    """Log to stderr at `level` (debug, info, warning or error) as text or JSON, with the
    running attempt on handlers' records: the one logging set-up of conveyord and of
    `conveyor worker`."""
    # What no line here shows, and what costs a third of a record's making (the caller's
    # frame above all): not gathered, as the logging HOWTO's "Optimization" advises.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = PacedHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(AttemptFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # gRPC's own debug lines (one per call and more) would drown the RPC lines out.
    logging.getLogger("grpc").setLevel(max(logging.INFO, logging.getLogger().level))


LineWriter = Callable[[str, Fields], None]  # a line's message and fields


def line_writer(logger: logging.Logger, level: int = logging.INFO) -> LineWriter | None:
    """A quick way to log lines of `level` with fields to `logger` from an event loop, for
    a logger that writes thousands a second (conveyord's line per task transition): each
    line is rendered and queued on configure()'s handler directly, with no LogRecord (whose
    making and handling were most of a line's cost). None if the logger's lines would go
    anywhere else (another handler, through a filter) or not at that level: log as usual."""
    if not logger.isEnabledFor(level):
        return None
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters or current.disabled:
            return None
        handlers.extend(current.handlers)
        current = current.parent if current.propagate else None
    if len(handlers) != 1 or type(handlers[0]) is not PacedHandler:
        return None
    handler = handlers[0]
    formatter = handler.formatter
    if handler.level > level or not isinstance(formatter, TextFormatter | JsonFormatter):
        return None
    if any(type(each) is not AttemptFilter for each in handler.filters):
        return None  # (the attempt filter adds nothing to a line that names its task)
    name, level_name, lock = logger.name, logging.getLevelName(level), handler.lock
    assert lock is not None

    def write(message: str, items: Fields) -> None:
        line = formatter.render(time.time(), level_name, name, message, items)
        with lock:  # as a record's emit: a flush from another thread takes what waits
            handler.queue(line, asyncio.get_running_loop())

    return write
