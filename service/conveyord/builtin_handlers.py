"""Handlers every server has (unless --no-builtin-handlers), to try the service at once."""

from __future__ import annotations

from typing import Any

from conveyord.handlers import TaskContext, handler


def _number(ctx: TaskContext, name: str, default: float) -> float:
    value = ctx.parameters.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"parameters.{name} must be a number >= 0, not {value!r}")
    return float(value)


@handler("sleep")
async def sleep(ctx: TaskContext) -> dict[str, Any]:
    """Sleep `seconds` (default 1) in `steps` steps (default 10), reporting progress after each."""
    seconds = _number(ctx, "seconds", 1.0)
    steps = max(1, int(_number(ctx, "steps", 10)))
    for step in range(1, steps + 1):
        if await ctx.wait_cancelled(seconds / steps):
            return {"slept": seconds * (step - 1) / steps}
        ctx.report(progress=step / steps, message=f"step {step} of {steps}")
    return {"slept": seconds}


@handler("echo")
def echo(ctx: TaskContext) -> dict[str, Any]:
    """Return the parameters as they came."""
    return ctx.parameters


@handler("fail")
def fail(ctx: TaskContext) -> dict[str, Any]:
    """Fail with `message`; with `times`, fail that many attempts, then return {"attempt": N}."""
    times = ctx.parameters.get("times")
    if times is not None and ctx.attempt > _number(ctx, "times", 0):
        return {"attempt": ctx.attempt}
    raise RuntimeError(str(ctx.parameters.get("message", "failed as asked")))
