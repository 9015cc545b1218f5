"""Handlers that log and trace, for the tests of logs and traces (in conveyord and in
`conveyor worker` processes); written against the client package only."""

from __future__ import annotations

import logging

from conveyor import TaskContext, handler

log = logging.getLogger(__name__)


@handler("observed.flaky")
async def flaky(ctx: TaskContext) -> str:
    """Logs, then fails its first attempt and completes the next."""
    log.info("handling %s", ctx.task_type)
    if ctx.attempt == 1:
        raise RuntimeError("first attempts fail")
    return "done"


@handler("observed.blocking")
def blocking(ctx: TaskContext) -> str:
    """Logs from its own thread."""
    log.info("handling on a thread")
    return "done"


@handler("observed.traced")
async def traced(ctx: TaskContext) -> str:
    """Makes a span of its own (opentelemetry is imported here only, when it runs)."""
    from opentelemetry import trace

    with trace.get_tracer(__name__).start_as_current_span("handler work"):
        return "done"


@handler("observed.traced_blocking")
def traced_blocking(ctx: TaskContext) -> str:
    """The same on a thread of its own."""
    from opentelemetry import trace

    with trace.get_tracer(__name__).start_as_current_span("handler work"):
        return "done"
