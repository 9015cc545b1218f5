"""Handlers the tests register beside the built-in ones, to drive the server into every corner."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from conveyord import TaskContext, handler
from tests import control_handlers, failure_handlers

# Set by `stubborn_blocking` when it finally returns, long after it was abandoned.
abandoned_returned = threading.Event()
release_stubborn = threading.Event()


class Gate:
    """Holds `gated` handlers until the test opens it, counting how many are inside at once."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.opened = threading.Event()
        self.inside = 0
        self.peak = 0  # the most handlers inside at once

    def reset(self) -> None:
        with self._changed:
            self.opened.clear()
            self.inside = self.peak = 0

    def pass_through(self, timeout: float) -> bool:
        """Wait inside until the gate opens; False if it stayed shut for `timeout` seconds."""
        with self._changed:
            self.inside += 1
            self.peak = max(self.peak, self.inside)
            self._changed.notify_all()
        try:
            return self.opened.wait(timeout)
        finally:
            with self._changed:
                self.inside -= 1
                self._changed.notify_all()

    def wait_inside(self, count: int, timeout: float) -> bool:
        """Wait until exactly `count` handlers are inside; False if that did not happen in time."""
        with self._changed:
            return self._changed.wait_for(lambda: self.inside == count, timeout)


gate = Gate()


@handler("gated")
def gated(ctx: TaskContext) -> str:
    """Waits at `gate` until the test opens it."""
    if not gate.pass_through(timeout=30):
        raise TimeoutError("the gate was never opened")
    return "passed"


@handler("stubborn_async")
async def stubborn_async(ctx: TaskContext) -> str:
    """Ignores cancellation until it is cancelled by force."""
    await asyncio.Event().wait()
    return "never"


@handler("stubborn_blocking")
def stubborn_blocking(ctx: TaskContext) -> str:
    """Ignores cancellation; returns only when the test releases it, and reports after that."""
    release_stubborn.wait(timeout=30)
    ctx.report(progress=0.5, message="too late")
    abandoned_returned.set()
    return "too late"


@handler("cooperative_blocking")
def cooperative_blocking(ctx: TaskContext) -> str:
    """A blocking handler that stops as soon as it is told."""
    ctx.cancel_event.wait(timeout=30)
    return "stopped"


@handler("not_json")
def not_json(ctx: TaskContext) -> Any:
    return {"when": object()}


@handler("report_then_wait")
async def report_then_wait(ctx: TaskContext) -> dict[str, Any]:
    """Reports progress with detail, then waits until cancelled or `seconds` pass."""
    ctx.report(progress=0.25, message="a quarter", detail={"stage": "one", "items": [1, 2]})
    await ctx.wait_cancelled(float(ctx.parameters.get("seconds", 30)))
    return {"done": True}


@handler("bad_progress")
def bad_progress(ctx: TaskContext) -> None:
    ctx.report(progress=1.5)


@handler("blocks_loop")
async def blocks_loop(ctx: TaskContext) -> str:
    """Wrongly blocks the event loop (as `time.sleep` in `async def` does) for `seconds`."""
    await asyncio.sleep(0)  # a step that does not block, before the one that does
    time.sleep(float(ctx.parameters.get("seconds", 1)))  # noqa: ASYNC251 - the point of it
    return "unblocked"


@handler("sized_result")
def sized_result(ctx: TaskContext) -> str:
    """Returns a string of `bytes` characters."""
    return "x" * int(ctx.parameters["bytes"])


@handler("deep_result")
def deep_result(ctx: TaskContext) -> Any:
    """Returns lists nested `depth` deep."""
    result: Any = []
    for _ in range(int(ctx.parameters["depth"])):
        result = [result]
    return result


@handler("bad_report")
def bad_report(ctx: TaskContext) -> str:
    """Reports what `kind` names, over a cap or not JSON, then waits to be told to stop."""
    kind = ctx.parameters["kind"]
    if kind == "big_detail":
        ctx.report(detail={"blob": "x" * 70_000})
    elif kind == "long_message":
        ctx.report(message="m" * 5000)
    else:
        ctx.report(detail={"when": object()})
    ctx.cancel_event.wait(timeout=30)
    return "stopped"


@handler("raises_key_error")
def raises_key_error(ctx: TaskContext) -> Any:
    return {}["missing-key"]  # type: ignore[index]  # the KeyError is the point


@handler("pausable", pausable=True)
async def pausable(ctx: TaskContext) -> dict[str, Any]:
    return await control_handlers.steps(ctx)


@handler("pausable_blocking", pausable=True)
def pausable_blocking(ctx: TaskContext) -> dict[str, Any]:
    return control_handlers.steps_blocking(ctx)


@handler("ask")
async def ask(ctx: TaskContext) -> dict[str, Any]:
    """An async handler that waits for input (the worker process's `remote.ask` is blocking)."""
    return control_handlers.ask(ctx)


@handler("collect")
async def collect(ctx: TaskContext) -> list[dict[str, Any]]:
    return await control_handlers.collect(ctx)


@handler("pause_point_after_input", pausable=True)
async def pause_point_after_input(ctx: TaskContext) -> dict[str, Any]:
    return await control_handlers.pause_point_after_input(ctx)


# -- failures (tests/test_failures.py) ------------------------------------------------


@handler("custom_failure")
def custom_failure(ctx: TaskContext) -> None:
    failure_handlers.custom_failure(ctx)


@handler("chained_failure")
def chained_failure(ctx: TaskContext) -> None:
    failure_handlers.chained_failure(ctx)


@handler("non_retryable")
def non_retryable(ctx: TaskContext) -> int:
    return failure_handlers.non_retryable(ctx)


@handler("retry_later")
def retry_later(ctx: TaskContext) -> int:
    return failure_handlers.retry_later(ctx)


@handler("checkpointed")
async def checkpointed(ctx: TaskContext) -> dict[str, Any]:
    return await failure_handlers.checkpointed(ctx)


@handler("flaky")
def flaky(ctx: TaskContext) -> int:
    return failure_handlers.flaky(ctx)
