"""OpenTelemetry tracing of conveyord (`--tracing`): a span for each RPC, and the trace
context of a Create kept with the tasks it makes.

Off by default, and then free: the server imports this module's interceptor only when
tracing is on, and opentelemetry is imported only by what is called then. A call's span
is the child of the caller's (the W3C `traceparent` of its metadata, or whatever the
OTEL_PROPAGATORS say); while a call runs, `create_trace` holds its span's traceparent,
which Create stores with the task, so that the span of each attempt's run (its worker's:
conveyor._tracing) is a child of the Create that made the task.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from conveyor._tracing import traceparent_of
from conveyord.rpc import MethodWrapper, code_of

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

# While a traced call runs: its span's W3C traceparent ("" untraced).
create_trace: contextvars.ContextVar[str] = contextvars.ContextVar("create_trace", default="")


def configure_sdk() -> None:
    """Install the OpenTelemetry SDK for `conveyord --tracing`: spans go in batches to the
    exporter that OTEL_TRACES_EXPORTER names (otlp, the default, over gRPC to
    OTEL_EXPORTER_OTLP_ENDPOINT; console; or none), with the resource of OTEL_SERVICE_NAME
    (default conveyord) and OTEL_RESOURCE_ATTRIBUTES. ImportError without the `tracing` extra."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "conveyord")})
    resource = resource.merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter | None
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if kind == "console":
        exporter = ConsoleSpanExporter()
    elif kind == "none":
        exporter = None
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


class TracingInterceptor(MethodWrapper):
    """Runs every call in a server span named after its method (`conveyor.v1.TaskService/
    Create`), the child of the caller's span, with its status code."""

    def __init__(self) -> None:
        from opentelemetry import trace

        super().__init__()
        self._tracer: Tracer = trace.get_tracer("conveyord")

    def wrap(self, handler: Any, method: str) -> Any:
        return _traced(handler, method, self._tracer)


def _traced(handler: Any, method: str, tracer: Tracer) -> Any:
    """The handler, each call of it in a span of its own."""
    from opentelemetry import propagate, trace

    name = method.lstrip("/")
    service, _, rpc = name.rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
    # Only the calls that make tasks keep their trace for them (decided once per method).
    makes_tasks = service == "conveyor.v1.TaskService" and rpc in ("Create", "BatchCreate")

    def span(context: Any) -> Any:
        carrier = {key: value for key, value in context.invocation_metadata() or ()}
        return tracer.start_as_current_span(
            name,
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,  # an abort is the call's answer, not a crash
            set_status_on_exception=False,
        )

    if handler.response_streaming:
        stream = handler.unary_stream

        async def streamed(request: Any, context: Any) -> AsyncIterator[Any]:
            with span(context) as current:
                try:
                    async for response in stream(request, context):
                        yield response
                except BaseException as error:
                    _ended(current, code_of(error, context), error)
                    raise
                _ended(current, grpc.StatusCode.OK, None)

        return grpc.unary_stream_rpc_method_handler(
            streamed, handler.request_deserializer, handler.response_serializer
        )
    unary = handler.unary_unary

    async def call(request: Any, context: Any) -> Any:
        with span(context) as current:
            if makes_tasks:
                create_trace.set(traceparent_of())
            try:
                response = await unary(request, context)
            except BaseException as error:
                _ended(current, code_of(error, context), error)
                raise
            _ended(current, context.code() or grpc.StatusCode.OK, None)
            return response

    return grpc.unary_unary_rpc_method_handler(
        call, handler.request_deserializer, handler.response_serializer
    )


def _ended(span: Span, code: grpc.StatusCode, error: BaseException | None) -> None:
    """Give the span the call's status code; an error status for a failure of the server's
    (as OpenTelemetry's gRPC conventions say: not for a refusal of a bad request)."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, code.name))
        if isinstance(error, grpc.aio.AbortError):
            return  # the call's own answer, not a crash
        if error is not None and not isinstance(error, asyncio.CancelledError | GeneratorExit):
            span.record_exception(error)


_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
