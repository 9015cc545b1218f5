"""The handler the benchmarks run: it does nothing, so that what is measured is conveyor."""

from __future__ import annotations

from conveyord import TaskContext, handler


@handler("noop")
async def noop(ctx: TaskContext) -> None:
    return None
