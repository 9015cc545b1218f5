"""Task handlers: plain Python functions registered by task type, and the context they run with.

The same handlers run inside conveyord (`conveyord --handlers MODULE`) and in a worker
process of their own (`conveyor worker --handlers MODULE`, see conveyor.worker).

A handler takes one argument, a `TaskContext`, and returns the task's result (anything
JSON can hold). It may be `async def` (run on the server's event loop) or a plain
`def` (run on a thread of its own, so that it never blocks the loop). Raising fails the
attempt: the task keeps the exception's message, type and traceback, and is retried while
attempts remain. Raise `NonRetryableError` to fail it at once, or `AttemptFailed` with a
`retry_delay` to choose when the next attempt runs. A handler resumes from where an
earlier attempt got to with `ctx.checkpoint`: what that attempt saved with
`ctx.save_checkpoint(...)` (or gave its AttemptFailed), else its latest progress detail.

A handler marked `pausable=True` can be paused while it runs: it parks at its next pause
point (`await ctx.pause_point()`, or `ctx.pause_point_sync()` in a blocking handler) until
the task is resumed. A handler can ask for input with `ctx.wait_for_input(prompt)`: it
returns the next input the task was sent that this run has not had yet; when there is
none, the attempt is suspended (the task waits WAITING_INPUT, holding no slot) and the
handler runs again from the start once an input comes, with `wait_for_input` returning the
inputs in order, so the code before a wait must be safe to run again (`ctx.inputs` holds
every input so far).

    from conveyor import TaskContext, handler  # or: from conveyord import ...

    @handler("resize")
    def resize(ctx: TaskContext) -> dict:
        for step in range(10):
            if ctx.cancelled:
                return {}
            ...
            ctx.report(progress=(step + 1) / 10, message=f"step {step + 1} of 10")
        return {"ok": True}
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import importlib
import importlib.metadata
import inspect
import math
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from conveyor.limits import (
    MAX_DETAIL_BYTES,
    MAX_ERROR_TYPE,
    MAX_MESSAGE,
    MAX_RESULT_BYTES,
    MAX_RETRY_DELAY,
    MAX_TRACEBACK_BYTES,
)
from conveyor.protojson import dict_to_struct, json_problem, to_value

Handler = Callable[["TaskContext"], Any]
H = TypeVar("H", bound=Handler)

_TASK_TYPE_ATTRIBUTE = "__conveyor_task_type__"
_PAUSABLE_ATTRIBUTE = "__conveyor_pausable__"
MAX_PROMPT = 4096  # characters of a wait's prompt
MAX_LABEL = 255  # characters of a wait's label
_BUILTIN_MODULE = "conveyord.builtin_handlers"
_CUT_NOTE_ROOM = 100  # bytes of a cut traceback's first line, which says what was cut
# Installed distributions name their handler modules under this entry point group:
#   [project.entry-points."conveyor.handlers"]
#   reports = "myteam.reports.handlers"
ENTRY_POINT_GROUP = "conveyor.handlers"


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """What fails an attempt whose report or result breaks a cap: an error code (such as
    REPORT_TOO_LARGE or INVALID_RESULT) and its message."""

    code: str
    message: str


# Receives a handler's report, or the refusal that fails its attempt when it breaks a cap.
ProgressSink = Callable[[dict[str, Any] | Refusal], None]


def handler(task_type: str, *, pausable: bool = False) -> Callable[[H], H]:
    """Mark a function as the handler of `task_type`; `--handlers MODULE` registers it.
    `pausable`: it calls a pause point now and then, so that a Pause of a running task
    parks it there (a Pause of a task whose handler is not pausable is refused)."""

    def mark(function: H) -> H:
        setattr(function, _TASK_TYPE_ATTRIBUTE, task_type)
        setattr(function, _PAUSABLE_ATTRIBUTE, pausable)
        return function

    return mark


class WaitForInput(BaseException):
    """Raised by `TaskContext.wait_for_input` when no input is there yet: it unwinds the
    handler (a BaseException, so that `except Exception` in handler code lets it through),
    and the worker suspends the attempt until an input comes."""

    def __init__(self, prompt: str, label: str, timeout: float | None, seen: int) -> None:
        super().__init__(prompt)
        self.prompt, self.label, self.timeout, self.seen = prompt, label, timeout, seen


class AttemptFailed(Exception):
    """Raised by a handler to fail its attempt, saying what follows: not `retryable` (the
    task fails now, whatever attempts remain), a `retry_delay` in seconds before the next
    attempt (in place of the task's backoff), a `checkpoint` for the next attempt, and the
    `error_type` the task shows (by default, the exception's class).

    Raise it `from` the exception that caused it: the traceback kept shows both.
    """

    def __init__(
        self,
        message: str = "",
        *,
        retryable: bool = True,
        retry_delay: float | None = None,
        checkpoint: Mapping[str, Any] | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        if retry_delay is not None and not 0 <= retry_delay <= MAX_RETRY_DELAY:
            raise ValueError(
                f"retry_delay must be 0 to {MAX_RETRY_DELAY:.0f} seconds, not {retry_delay!r}"
            )
        if checkpoint is not None and (refusal := checkpoint_problem(checkpoint)) is not None:
            raise ValueError(refusal.message)
        if error_type is not None and not 0 < len(error_type) <= MAX_ERROR_TYPE:
            raise ValueError(f"error_type must be 1 to {MAX_ERROR_TYPE} characters")
        self.retryable = retryable
        self.retry_delay = retry_delay
        self.checkpoint = None if checkpoint is None else dict(checkpoint)
        self.error_type = error_type


class NonRetryableError(AttemptFailed):
    """Raised by a handler to fail its task now, whatever attempts remain (a bad input,
    say, that another attempt would fail on again)."""

    def __init__(
        self,
        message: str = "",
        *,
        checkpoint: Mapping[str, Any] | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message, retryable=False, checkpoint=checkpoint, error_type=error_type)


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """A handler's exception, as the attempt's end keeps it."""

    message: str  # its type, then what it says
    error_type: str  # `KeyError` for a built-in, `module.QualName` for another
    traceback: str  # its last MAX_TRACEBACK_BYTES (UTF-8)
    retryable: bool = True
    retry_delay: float | None = None
    checkpoint: dict[str, Any] | None = None


def failure_of(error: BaseException) -> Failure:
    """What an attempt's end keeps of the exception its handler raised."""
    kept = Failure(failure_message(error), error_type_of(error), traceback_of(error))
    if isinstance(error, AttemptFailed):
        named = error.error_type
        return dataclasses.replace(
            kept,
            message=failure_message(error, named) if named else kept.message,
            error_type=named or kept.error_type,
            retryable=error.retryable,
            retry_delay=error.retry_delay,
            checkpoint=error.checkpoint,
        )
    return kept


def error_type_of(error: BaseException) -> str:
    """The exception's class: its bare name for a built-in (`KeyError`), else qualified by
    its module (`myteam.errors.Unreachable`), so that two `Error`s are told apart."""
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"[:MAX_ERROR_TYPE]


def traceback_of(error: BaseException) -> str:
    """The exception's traceback (its causes first, as Python prints them), cut to its last
    MAX_TRACEBACK_BYTES of UTF-8: the end holds the exception and the innermost frames,
    which say the most, and a first line says how much of the beginning was cut."""
    text = "".join(traceback.format_exception(error))
    encoded = text.encode()
    if len(encoded) <= MAX_TRACEBACK_BYTES:
        return text
    end = encoded[-(MAX_TRACEBACK_BYTES - _CUT_NOTE_ROOM) :].decode(errors="ignore")
    cut = len(encoded) - len(end.encode())  # (a character cut in two is dropped whole)
    return f"[the traceback's first {cut} bytes were cut; its end follows]\n{end}"


class HandlerLoadError(Exception):
    """The handlers cannot be loaded: a module failed to import, or two claim one task type."""


class HandlerRegistry:
    """The handlers a server runs, by task type."""

    def __init__(self, handlers: Mapping[str, Handler] | None = None) -> None:
        self._handlers: dict[str, Handler] = {}
        self._pausable: set[str] = set()
        for task_type, function in (handlers or {}).items():
            self.register(task_type, function)

    @classmethod
    def from_modules(cls, modules: Iterable[str], *, builtins: bool = True) -> HandlerRegistry:
        """Import each module and register every function in it marked with `@handler`."""
        registry = cls()
        names = ([_BUILTIN_MODULE] if builtins else []) + list(modules)
        for name in names:
            try:
                module = importlib.import_module(name)
            except Exception as error:
                raise HandlerLoadError(f"cannot import handler module {name!r}: {error}") from error
            for value in vars(module).values():
                task_type = getattr(value, _TASK_TYPE_ATTRIBUTE, None)
                if isinstance(task_type, str) and callable(value):
                    registry.register(task_type, value)
        return registry

    def register(self, task_type: str, function: Handler) -> None:
        """Run `function` for tasks of `task_type`.

        Raises HandlerLoadError for a task type that is empty or not printable, or that
        another function has already: silently replacing a handler (a built-in one, or one
        from another module) would run the wrong code. The same function registered again
        (say, imported into a second module) is fine.
        """
        if not task_type or not task_type.isprintable():
            raise HandlerLoadError(f"{_name_of(function)} has an invalid task type {task_type!r}")
        existing = self._handlers.get(task_type)
        if existing is not None and existing is not function:
            raise HandlerLoadError(
                f"task type {task_type!r} has two handlers, {_name_of(existing)} and "
                f"{_name_of(function)}; give one of them another task type"
                + (
                    " or start with --no-builtin-handlers"
                    if getattr(existing, "__module__", None) == _BUILTIN_MODULE
                    else ""
                )
            )
        self._handlers[task_type] = function
        if getattr(function, _PAUSABLE_ATTRIBUTE, False):
            self._pausable.add(task_type)

    def get(self, task_type: str) -> Handler | None:
        return self._handlers.get(task_type)

    def __contains__(self, task_type: object) -> bool:
        return task_type in self._handlers

    @property
    def task_types(self) -> list[str]:
        return sorted(self._handlers)

    @property
    def pausable_types(self) -> list[str]:
        """The task types whose handlers were marked `pausable`."""
        return sorted(self._pausable)


def report_problem(changes: Mapping[str, Any]) -> Refusal | None:
    """The refusal that fails an attempt whose report breaks a cap, or None if it is fine."""
    message = changes.get("message", "")
    if len(message) > MAX_MESSAGE:
        return Refusal(
            "REPORT_TOO_LARGE",
            f"a progress message of {len(message)} characters; at most {MAX_MESSAGE} are kept",
        )
    checkpoint = changes.get("checkpoint")
    if checkpoint is not None and (refusal := checkpoint_problem(checkpoint)) is not None:
        return refusal
    detail = changes.get("progress_detail")
    return None if detail is None else _struct_problem(detail, "detail", "a progress detail")


def checkpoint_problem(checkpoint: Mapping[str, Any]) -> Refusal | None:
    """Why a checkpoint cannot be kept (not JSON, or over a progress detail's cap), or None."""
    return _struct_problem(checkpoint, "checkpoint", "a checkpoint")


def _struct_problem(value: Mapping[str, Any], path: str, what: str) -> Refusal | None:
    """Why `value` (a progress detail or a checkpoint) cannot be kept, or None."""
    if (problem := json_problem(value, path)) is not None:
        return Refusal("INVALID_REPORT", problem)
    size = dict_to_struct(value).ByteSize()
    if size > MAX_DETAIL_BYTES:
        return Refusal(
            "REPORT_TOO_LARGE",
            f"{what} of {size} bytes encoded; at most {MAX_DETAIL_BYTES} are kept",
        )
    return None


def result_problem(result: Any) -> Refusal | None:
    """Why a handler's result cannot be kept (not JSON, or over the size cap), or None."""
    if result is None:
        return None
    if (problem := json_problem(result)) is not None:
        return Refusal("INVALID_RESULT", problem)
    size = to_value(result).ByteSize()
    if size > MAX_RESULT_BYTES:
        message = f"the result is {size} bytes encoded; at most {MAX_RESULT_BYTES} are kept"
        return Refusal("RESULT_TOO_LARGE", message)
    return None


def failure_message(error: BaseException, name: str = "") -> str:
    """A handler's exception as an error message: its type (or `name`), then what it says."""
    name = name or type(error).__qualname__
    message = f"{name}: {error}" if str(error) else name
    return message[:MAX_MESSAGE]


def run_on_thread(function: Handler, context: TaskContext) -> asyncio.Future[Any]:
    """Run a blocking handler on a thread of its own; its result, as a future of this loop.

    A thread per attempt (rather than a pool) means that a handler that never returns
    holds only its own thread, never a slot that other tasks need. The context's cancel
    event is made first, here on the loop's thread.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context.cancel_event  # noqa: B018 - made on the loop's thread, before the handler's

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return  # abandoned: nobody waits any more
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = function(context), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    # The thread runs in a copy of the caller's context: the attempt that handlers' log
    # records name, and the trace its spans join.
    running = contextvars.copy_context()
    name = f"conveyor-{context.task_id}"
    threading.Thread(target=running.run, args=(work,), name=name, daemon=True).start()
    return future


def _name_of(function: Handler) -> str:
    """`module.qualname` of a handler, to tell the user which function it is."""
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    module = getattr(function, "__module__", None)
    return f"{module}.{name}" if module else str(name)


def is_async(function: Handler) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004 - a callable object with `async def __call__`
    )


class TaskContext:
    """What a handler sees of its task: its parameters and inputs, a way to report progress,
    cancellation, pause points and waits for input.

    Safe to use from the handler's own thread (blocking handlers) and from the event loop.
    """

    _inputs_taken = 0  # by wait_for_input, in order
    _pause_wanted = False
    _pause_reason = ""
    # Set when a parked handler may go on; made by the first pause (on the loop's thread),
    # as the cancel events are made when first needed.
    _unparked: threading.Event | None = None
    _async_unparked: asyncio.Event | None = None

    def __init__(
        self,
        *,
        task_id: str,
        task_type: str,
        parameters: Mapping[str, Any],
        labels: Mapping[str, str],
        attempt: int,
        max_attempts: int,
        loop: asyncio.AbstractEventLoop,
        sink: ProgressSink,
        inputs: Iterable[Mapping[str, Any]] = (),
        on_park: Callable[[], None] | None = None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> None:
        """The context of attempt `attempt` of a task; reports go to `sink` on `loop`, and
        `on_park` is called on `loop` when the handler parks at a pause point. `checkpoint`:
        what an earlier run of the task left for this one."""
        self.task_id, self.task_type = task_id, task_type
        self.parameters: dict[str, Any] = dict(parameters)
        self.labels: dict[str, str] = dict(labels)
        self.attempt, self.max_attempts = attempt, max_attempts
        # Made when first asked for, on the loop's thread (for a blocking handler, before its
        # thread starts): most handlers never wait, and an Event costs a lock to make.
        self._cancel_event: threading.Event | None = None
        self._async_cancel: asyncio.Event | None = None
        self._stopping = False
        self._cancel_reason = ""
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop's thread
        self._sink = sink
        self._closed = False
        self.inputs: list[dict[str, Any]] = [dict(sent) for sent in inputs] if inputs else []
        self._on_park = on_park
        # What an earlier run left: the checkpoint it saved, else its latest progress detail
        # (None for a first attempt). Resume from it rather than from the start.
        self.checkpoint: dict[str, Any] | None = None if checkpoint is None else dict(checkpoint)
        # The pause and input state starts as the class's defaults below (an attempt is made
        # for every task, and most never pause nor wait for input).

    @property
    def cancel_event(self) -> threading.Event:
        """Set when the handler should stop: a blocking handler may wait on it."""
        if self._cancel_event is None:
            self._cancel_event = threading.Event()
            if self._stopping:
                self._cancel_event.set()
        return self._cancel_event

    @property
    def cancelled(self) -> bool:
        """True once the task was cancelled or its attempt timed out: stop soon."""
        return self._stopping

    @property
    def cancel_reason(self) -> str:
        return self._cancel_reason

    async def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Wait (in an async handler) until cancelled or `timeout` passes; True if cancelled."""
        if self._stopping:
            return True
        if self._async_cancel is None:
            self._async_cancel = asyncio.Event()
        try:
            await asyncio.wait_for(self._async_cancel.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def report(
        self,
        *,
        progress: float | None = None,
        message: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish progress (0.0 to 1.0), a message and structured detail; returns at once.

        Reports that come faster than the store takes them are merged, the latest winning.
        Raises ValueError for a progress outside 0..1.
        """
        changes: dict[str, Any] = {}
        if progress is not None:
            if (
                not isinstance(progress, int | float)
                or not 0.0 <= progress <= 1.0
                or math.isnan(progress)
            ):
                raise ValueError(f"progress must be between 0.0 and 1.0, not {progress!r}")
            changes["progress"] = float(progress)
        if message is not None:
            changes["message"] = str(message)
        if detail is not None:
            changes["progress_detail"] = dict(detail)
        if changes and not self._closed:
            self._send(changes)

    def _send(self, changes: dict[str, Any]) -> None:
        """Pass a report (or the refusal of one over a cap) to the sink, on the loop."""
        report: dict[str, Any] | Refusal = report_problem(changes) or changes
        if threading.get_ident() == self._loop_thread:  # an async handler: in order, now
            self._sink(report)
            return
        with contextlib.suppress(RuntimeError):  # the server's loop has closed: nobody listens
            self._loop.call_soon_threadsafe(self._sink, report)

    def save_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        """Leave `checkpoint` (a JSON object, at most 64 KiB encoded) for the task's next
        attempt, which finds it as `ctx.checkpoint`, whatever progress detail it reports
        later; returns at once, as `report` does. One that breaks its cap fails the attempt
        (not retried), as a report's detail would."""
        if not self._closed:
            self._send({"checkpoint": dict(checkpoint)})

    @property
    def pause_requested(self) -> bool:
        """True while a Pause asks the handler to park at its next pause point."""
        return self._pause_wanted and not self._stopping

    async def pause_point(self) -> bool:
        """Park here (in an async handler) while a Pause asks it, until the task is resumed
        or the attempt must stop; True if it parked. Cheap when no Pause is asked."""
        if not self.pause_requested:
            return False
        if self._async_unparked is None:
            self._async_unparked = asyncio.Event()
        self._async_unparked.clear()
        self._parked()
        if self.pause_requested:
            await self._async_unparked.wait()
        return True

    def pause_point_sync(self) -> bool:
        """`pause_point` for a blocking handler, on its own thread."""
        unparked = self._unparked
        if not self.pause_requested or unparked is None:
            return False
        with contextlib.suppress(RuntimeError):  # the loop is gone: the attempt is over
            self._loop.call_soon_threadsafe(self._parked)
        if self.pause_requested:
            unparked.wait()
        return True

    def _parked(self) -> None:
        """Tell the worker the handler parked (on the loop), unless it may go on already."""
        if self.pause_requested and self._on_park is not None:
            self._on_park()
        elif not self.pause_requested:
            self._unpark()

    def wait_for_input(
        self, prompt: str = "", *, label: str = "", timeout: float | None = None
    ) -> dict[str, Any]:
        """The next input the task was sent that this run has not had yet, in order.

        When there is none, the attempt is suspended: this raises WaitForInput, which ends
        the handler (let it through), and the task waits WAITING_INPUT with `prompt` (and
        `label`, a short name) until an input comes, holding no slot; then the handler runs
        again from the start, and its waits return the inputs in order. No input within
        `timeout` seconds fails the task with INPUT_TIMEOUT.
        """
        if len(prompt) > MAX_PROMPT or len(label) > MAX_LABEL:
            raise ValueError(
                f"a prompt has at most {MAX_PROMPT} characters and a label {MAX_LABEL}"
            )
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if self._inputs_taken < len(self.inputs):
            self._inputs_taken += 1
            return self.inputs[self._inputs_taken - 1]
        raise WaitForInput(prompt, label, timeout, len(self.inputs))

    def _give_inputs(self, inputs: Iterable[Mapping[str, Any]]) -> None:
        """Inputs the task was sent while the attempt runs (called on the event loop)."""
        self.inputs.extend(dict(sent) for sent in inputs)

    def _request_pause(self, reason: str) -> None:
        """Ask the handler to park at its next pause point (called on the event loop)."""
        if self._unparked is None:
            self._unparked = threading.Event()
        self._unparked.clear()
        self._pause_wanted, self._pause_reason = True, reason

    def _resume(self) -> None:
        """Let a parked handler go on, or withdraw a pause (called on the event loop)."""
        self._pause_wanted = False
        self._unpark()

    def _unpark(self) -> None:
        if self._unparked is not None:
            self._unparked.set()
        if self._async_unparked is not None:
            self._async_unparked.set()

    def _request_stop(self, reason: str) -> None:
        """Tell the handler to stop (called on the event loop)."""
        if not self._stopping:
            self._cancel_reason = reason
            self._stopping = True
            if self._cancel_event is not None:
                self._cancel_event.set()
            if self._async_cancel is not None:
                self._async_cancel.set()
            self._unpark()  # a parked handler wakes, and sees it must stop

    def _close(self) -> None:
        """The attempt is over: later reports are ignored, and a parked handler goes on."""
        self._closed = True
        self._unpark()


def entry_point_modules() -> list[str]:
    """The handler modules that installed distributions declare in the `conveyor.handlers`
    entry point group, by entry point name: installing a package is enough to serve its
    handlers, in conveyord and in a worker, without naming it in --handlers."""
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return list(dict.fromkeys(point.module for point in sorted(found, key=lambda p: p.name)))


def handler_modules(named: Iterable[str], *, discover: bool) -> list[str]:
    """The modules to load: those `named` (--handlers), then, if `discover`, those of the
    entry points that are not named already."""
    modules = list(dict.fromkeys(named))
    if discover:
        modules += [name for name in entry_point_modules() if name not in modules]
    return modules


def comma_separated(text: str) -> list[str]:
    """The names in a comma-separated list (an environment variable's), blanks left out."""
    return [name.strip() for name in text.split(",") if name.strip()]


def import_from_cwd() -> None:
    """Let --handlers name modules of the current directory, as `python -m` would: a console
    script (`conveyord`, `conveyor-worker`) puts only its own folder on sys.path; uvicorn
    and celery add the current directory the same way."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
