"""Handlers the tests register beside the built-in ones, to drive the server into every corner."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from conveyord import TaskContext, handler

# Set by `stubborn_blocking` when it finally returns, long after it was abandoned.
abandoned_returned = threading.Event()
release_stubborn = threading.Event()


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
