"""OpenTelemetry, where the program uses it: the caller's trace context on each call, and a
span for each attempt a worker runs. Nothing here imports opentelemetry unless it is needed.

A client passes the trace on only when the program has imported opentelemetry (no span
can be active otherwise), so a program without it pays one dictionary look-up per call.
A task keeps the W3C `traceparent` of the Create that made it; a worker starts each
attempt's span as its child, so the handler's spans join the caller's trace.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from collections.abc import Iterator
from typing import Any

Metadata = tuple[tuple[str, str], ...]
_IMPORTED = "opentelemetry.context"  # imported by every user of opentelemetry's API


def traced(metadata: Metadata) -> Metadata:
    """`metadata` with the current trace context (W3C `traceparent`, and whatever else the
    configured propagators carry) when a span is active; `metadata` itself otherwise."""
    if _IMPORTED not in sys.modules:
        return metadata
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*metadata, *carrier.items()) if carrier else metadata


def traceparent_of(context: Any = None) -> str:
    """The W3C traceparent of the span current in `context` (default: the current one)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context)
    return carrier.get("traceparent", "")


@functools.cache
def _installed() -> bool:
    """Whether opentelemetry's API can be imported here (asked once: Python does not keep a
    failed import, and would search for it again at every attempt)."""
    return importlib.util.find_spec("opentelemetry.trace") is not None


@contextlib.contextmanager
def attempt_span(
    traceparent: str, *, task_id: str, task_type: str, attempt: int, worker: str
) -> Iterator[None]:
    """A span for one attempt's run, the child of the span `traceparent` names (a root span
    without one); nothing when opentelemetry is not installed. An exception that leaves it
    is recorded on it."""
    if not _installed():
        yield
        return
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = context.Context()  # not whatever span happened to be current when it started
    if traceparent:
        parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent}, parent)
    tracer = trace.get_tracer("conveyor")
    attributes: dict[str, str | int] = {
        "conveyor.task_id": task_id,
        "conveyor.task_type": task_type,
        "conveyor.attempt": attempt,
        "conveyor.worker": worker,
    }
    with tracer.start_as_current_span(
        f"run {task_type}", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    ):
        yield
