"""Handlers that pause and take input, written against the client package only, so that the
same code runs in conveyord (tests.handlers) and in `conveyor worker` (tests.worker_handlers)."""

from __future__ import annotations

import asyncio
from typing import Any

from conveyor import TaskContext


async def steps(ctx: TaskContext) -> dict[str, Any]:
    """Works in steps of a few milliseconds, with a pause point before each, until `steps`
    are done or it is told to stop; says how often it parked."""
    parks = 0
    for step in range(int(ctx.parameters.get("steps", 10**6))):
        if ctx.cancelled:
            return {"stopped_at": step, "parks": parks}
        if await ctx.pause_point():
            parks += 1
            ctx.report(message=f"resumed at step {step}")
        await asyncio.sleep(0.002)
    return {"parks": parks}


def steps_blocking(ctx: TaskContext) -> dict[str, Any]:
    """`steps`, as a blocking handler on a thread of its own."""
    parks = 0
    for step in range(int(ctx.parameters.get("steps", 10**6))):
        if ctx.cancelled:
            return {"stopped_at": step, "parks": parks}
        if ctx.pause_point_sync():
            parks += 1
            ctx.report(message=f"resumed at step {step}")
        ctx.cancel_event.wait(0.002)
    return {"parks": parks}


def ask(ctx: TaskContext) -> dict[str, Any]:
    """Asks for a name, then a colour (each a wait for input, with the `timeout` given)."""
    timeout = ctx.parameters.get("timeout")
    name = ctx.wait_for_input("your name?", label="name", timeout=timeout)
    colour = ctx.wait_for_input("your colour?", label="colour", timeout=timeout)
    return {"name": name, "colour": colour, "inputs": len(ctx.inputs)}


async def collect(ctx: TaskContext) -> list[dict[str, Any]]:
    """Runs until it has been sent `count` inputs (they reach it while it runs), then returns
    them all; on an attempt before `fail_until`, fails once it has them."""
    count = int(ctx.parameters.get("count", 1))
    while len(ctx.inputs) < count and not ctx.cancelled:
        await ctx.wait_cancelled(0.002)
    if ctx.attempt < int(ctx.parameters.get("fail_until", 0)):
        raise RuntimeError(f"attempt {ctx.attempt} fails after {len(ctx.inputs)} inputs")
    return ctx.inputs


async def pause_point_after_input(ctx: TaskContext) -> dict[str, Any]:
    """Reaches its one pause point once it has been sent an input; says if it parked there."""
    while not ctx.inputs and not ctx.cancelled:
        await ctx.wait_cancelled(0.002)
    return {"parked": await ctx.pause_point()}
