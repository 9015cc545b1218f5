"""OpenTelemetry traces of a real server (in this process, with the SDK and an in-memory
exporter): the caller's span reaches the handler's through the Create and the attempt's
run, in the server's own worker and in a Python worker; RPC spans carry their status."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor import AsyncClient, NotFound, TaskStatus
from conveyor.handlers import HandlerRegistry
from conveyor.worker import Worker
from conveyord.store.sqlite import SqliteStore
from tests import observed_handlers
from tests.conftest import TEST_HANDLERS, ServerThread, server_config
from tests.test_store import create_one, new_task

CREATE = "conveyor.v1.TaskService/Create"
REMOTE = "remote.traced"
_exporter = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans ended during the test (the SDK is installed once, for the whole process)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    _exporter.clear()
    yield _exporter
    _exporter.clear()


@pytest.fixture
def server() -> Iterator[ServerThread]:
    """A server with tracing on, whose own worker also runs the observed handlers."""
    config = dataclasses.replace(server_config(worker_types=frozenset({REMOTE})), tracing=True)
    running = ServerThread(config, handler_modules=(TEST_HANDLERS, observed_handlers.__name__))
    yield running
    running.stop()


def chain(spans: Sequence[ReadableSpan], start: ReadableSpan) -> list[str]:
    """The names of `start` and of its ancestors among `spans`, up to the root."""
    by_id = {span.context.span_id: span for span in spans if span.context is not None}
    names = []
    span: ReadableSpan | None = start
    while span is not None:
        names.append(span.name)
        span = by_id.get(span.parent.span_id) if span.parent is not None else None
    return names


async def _traced_run(server: ServerThread, task_type: str) -> tuple[str, list[ReadableSpan]]:
    """Create a task inside a caller's span and wait for its end; its id and the spans."""
    async with AsyncClient(server.address) as client:
        with trace.get_tracer(__name__).start_as_current_span("caller"):
            task = await client.create(task_type)
        assert (await client.wait(task.task_id, timeout=20)).status is TaskStatus.COMPLETED
    return task.task_id, list(_exporter.get_finished_spans())


@pytest.mark.parametrize("task_type", ["observed.traced", "observed.traced_blocking"])
async def test_a_local_handler_s_span_is_a_descendant_of_the_caller_s_create(
    server: ServerThread, spans: InMemorySpanExporter, task_type: str
) -> None:
    task_id, finished = await _traced_run(server, task_type)
    (work,) = [span for span in finished if span.name == "handler work"]
    assert chain(finished, work) == ["handler work", f"run {task_type}", CREATE, "caller"]
    (caller,) = [span for span in finished if span.name == "caller"]
    assert work.context and caller.context and work.context.trace_id == caller.context.trace_id
    (run,) = [span for span in finished if span.name == f"run {task_type}"]
    assert dict(run.attributes or {}) == {
        "conveyor.task_id": task_id,
        "conveyor.task_type": task_type,
        "conveyor.attempt": 1,
        "conveyor.worker": "conveyord/local",
    }
    (create,) = [span for span in finished if span.name == CREATE]
    assert create.kind is trace.SpanKind.SERVER
    assert (create.attributes or {})["rpc.grpc.status_code"] == 0


async def test_a_python_worker_s_handler_span_is_a_descendant_of_the_caller_s_create(
    server: ServerThread, spans: InMemorySpanExporter
) -> None:
    registry = HandlerRegistry({REMOTE: observed_handlers.traced})
    worker = Worker(server.address, registry, worker_id="traced-worker")
    running = asyncio.create_task(worker.run())
    try:
        task_id, finished = await _traced_run(server, REMOTE)
    finally:
        worker.drain()
        await asyncio.wait_for(running, 20)
    (work,) = [span for span in finished if span.name == "handler work"]
    assert chain(finished, work) == ["handler work", f"run {REMOTE}", CREATE, "caller"]
    (run,) = [span for span in finished if span.name == f"run {REMOTE}"]
    assert (run.attributes or {})["conveyor.worker"] == "traced-worker"
    assert (run.attributes or {})["conveyor.task_id"] == task_id


async def test_an_rpc_span_carries_its_status_code_and_an_untraced_create_roots_the_run(
    server: ServerThread, spans: InMemorySpanExporter
) -> None:
    async with AsyncClient(server.address) as client:
        with pytest.raises(NotFound):
            await client.get("00000000-0000-4000-8000-000000000000")
        task = await client.create("observed.traced")  # no span is active: none is passed on
        await client.wait(task.task_id, timeout=20)
    finished = spans.get_finished_spans()
    (get,) = [span for span in finished if span.name == "conveyor.v1.TaskService/Get"]
    assert (get.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert get.status.is_unset  # a refusal of the caller's, not a fault of the server's
    (work,) = [span for span in finished if span.name == "handler work"]
    assert chain(finished, work) == ["handler work", "run observed.traced", CREATE]


async def test_a_task_keeps_its_create_s_trace_across_a_restart(tmp_path: Path) -> None:
    """So that an attempt run after a restart still joins the trace of its Create."""
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    store = SqliteStore(tmp_path / "tasks.db")
    await store.open()
    task, _ = await create_one(store, new_task(trace_parent=traceparent))
    await store.close()
    store = SqliteStore(tmp_path / "tasks.db")
    await store.open()
    kept = await store.get(task.task_id)
    await store.close()
    assert kept is not None and kept.trace_parent == traceparent
