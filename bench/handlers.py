"""The handler the benchmarks run: it does nothing, so that what is measured is conveyor."""

from __future__ import annotations

import asyncio
import time

from conveyord import TaskContext, handler


@handler("noop")
async def noop(ctx: TaskContext) -> None:
    return None


@handler("parked")
async def parked(ctx: TaskContext) -> None:
    """Waits until cancelled: with `--type-concurrency parked=1`, the parked tasks after the
    first stay queued, so that creating them costs what Create costs, and no more."""
    await ctx.wait_cancelled()


@handler("brief")
async def brief(ctx: TaskContext) -> None:
    """Takes `seconds` (default 0.05): long enough for a watcher to be there when it ends."""
    await asyncio.sleep(float(ctx.parameters.get("seconds", 0.05)))


@handler("assigned")
async def assigned(ctx: TaskContext) -> float:
    """Returns when it started (epoch seconds): the end of its assignment."""
    return time.time()
