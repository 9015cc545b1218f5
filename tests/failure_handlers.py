"""Handlers that fail in the ways tests/test_failures.py looks at: their own error types, long
tracebacks, no retry, a retry delay, checkpoints. Written against the client package only;
tests/handlers.py registers them in the server, and the `remote.` ones run in a worker."""

from __future__ import annotations

from typing import Any

from conveyor import AttemptFailed, NonRetryableError, TaskContext, handler


class Unreachable(Exception):
    """A handler's own error: the task names its type with its module."""


def custom_failure(ctx: TaskContext) -> None:
    raise Unreachable("the backend did not answer")


def chained_failure(ctx: TaskContext) -> None:
    """Fails with a chain of `links` exceptions: a traceback far over the 16 KiB kept."""
    error: Exception | None = None
    for link in range(int(ctx.parameters.get("links", 300))):
        try:
            raise LookupError(f"link {link}") from error
        except LookupError as caught:
            error = caught
    raise ValueError("the last link") from error


def non_retryable(ctx: TaskContext) -> int:
    """A bad input, which no later attempt would get past: fails the task at once."""
    try:
        return int(ctx.parameters.get("n", "not a number"))
    except ValueError as error:
        raise NonRetryableError("n must be a whole number") from error


def retry_later(ctx: TaskContext) -> int:
    """The first attempt fails asking for its next one `delay` seconds later."""
    if ctx.attempt == 1:
        raise AttemptFailed("the backend is busy", retry_delay=float(ctx.parameters["delay"]))
    return ctx.attempt


async def checkpointed(ctx: TaskContext) -> dict[str, Any]:
    """The first attempt reports progress, saves a checkpoint as `mode` says (explicitly,
    with its error, or not at all), and fails; a later one returns what it resumed from."""
    if ctx.attempt > 1:
        return {"attempt": ctx.attempt, "resumed_from": ctx.checkpoint}
    assert ctx.checkpoint is None, "a first attempt has nothing to resume from"
    ctx.report(progress=0.3, detail={"done": 3})
    mode = ctx.parameters.get("mode")
    if mode == "explicit":
        ctx.save_checkpoint({"page": 3})
        ctx.report(detail={"done": 4})  # a later detail: the saved checkpoint still wins
    if mode == "on_error":
        raise AttemptFailed("stopped at page 4", checkpoint={"page": 4})
    raise RuntimeError("failed after page 3")


def flaky(ctx: TaskContext) -> int:
    """Fails its first `failures` attempts (a KeyError), then returns its attempt number."""
    if ctx.attempt <= int(ctx.parameters.get("failures", 1)):
        missing: dict[str, int] = {}
        return missing["missing-key"]  # the KeyError is the point
    return ctx.attempt


# The same handlers, for a worker process.


@handler("remote.custom_failure")
def remote_custom_failure(ctx: TaskContext) -> None:
    custom_failure(ctx)


@handler("remote.non_retryable")
def remote_non_retryable(ctx: TaskContext) -> int:
    return non_retryable(ctx)


@handler("remote.retry_later")
def remote_retry_later(ctx: TaskContext) -> int:
    return retry_later(ctx)


@handler("remote.checkpointed")
async def remote_checkpointed(ctx: TaskContext) -> dict[str, Any]:
    return await checkpointed(ctx)


@handler("remote.flaky")
def remote_flaky(ctx: TaskContext) -> int:
    return flaky(ctx)
