"""Handlers that the tests run in `conveyor worker` processes, written against the client
package only (`from conveyor import ...`), as a team's worker would be."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from conveyor import TaskContext, handler
from tests import control_handlers


def _record(ctx: TaskContext) -> None:
    """Append `task attempt pid` to the file named by the `record` parameter, if any."""
    if path := ctx.parameters.get("record"):
        with open(path, "a") as out:
            out.write(f"{ctx.task_id} {ctx.attempt} {os.getpid()}\n")


@handler("remote.square")
async def square(ctx: TaskContext) -> dict[str, Any]:
    _record(ctx)
    ctx.report(progress=0.5, message="halfway", detail={"seen": ctx.parameters["n"]})
    return {"square": ctx.parameters["n"] ** 2, "pid": os.getpid()}


@handler("remote.blocking")
def blocking(ctx: TaskContext) -> str:
    """A plain def, on a thread of its own; waits for cancellation if told to."""
    _record(ctx)
    if ctx.parameters.get("wait_cancel"):
        ctx.report(message="waiting to be cancelled")
        ctx.cancel_event.wait(60)
        return "stopped: " + ctx.cancel_reason
    time.sleep(0.01)
    return "done"


@handler("remote.fail")
async def fail(ctx: TaskContext) -> None:
    raise KeyError("missing-key")


@handler("remote.stuck_once")
async def stuck_once(ctx: TaskContext) -> int:
    """The first attempt reports and then waits until cancelled (or its worker dies); a
    later one returns its attempt number."""
    _record(ctx)
    if ctx.attempt == 1:
        ctx.report(message="stuck")
        await ctx.wait_cancelled(60)
        return -1
    return ctx.attempt


@handler("remote.record")
async def record(ctx: TaskContext) -> None:
    _record(ctx)


@handler("remote.until_file")
def until_file(ctx: TaskContext) -> int:
    """Reports, then returns once the file named by `path` exists (or when cancelled)."""
    _record(ctx)
    ctx.report(message="waiting for the file")
    while not os.path.exists(ctx.parameters["path"]) and not ctx.cancelled:
        time.sleep(0.01)
    return ctx.attempt


@handler("remote.pausable", pausable=True)
def pausable(ctx: TaskContext) -> dict[str, Any]:
    return control_handlers.steps_blocking(ctx)


@handler("remote.ask")
def ask(ctx: TaskContext) -> dict[str, Any]:
    return control_handlers.ask(ctx)


@handler("remote.collect")
async def collect(ctx: TaskContext) -> list[dict[str, Any]]:
    return await control_handlers.collect(ctx)


@handler("remote.brief")
async def brief(ctx: TaskContext) -> int:
    """Records its attempt, then takes a few milliseconds (long enough to be under way when
    its server dies)."""
    _record(ctx)
    await asyncio.sleep(float(ctx.parameters.get("seconds", 0.02)))
    return ctx.attempt
