"""The client against a real server on a real port: every method, for both twins."""

from __future__ import annotations

import asyncio
import collections
import inspect
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import grpc
import pytest

import conveyor
from conveyor import (
    AlreadyExists,
    AsyncClient,
    Client,
    ConveyorError,
    DeadlineExceeded,
    EventKind,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Task,
    TaskCancelled,
    TaskError,
    TaskFailed,
    TaskStatus,
    Unavailable,
    WaitTimeout,
)
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from tests.client_support import (
    KINDS,
    Calls,
    ScriptedServer,
    Twin,
    closed_port_address,
    first_item,
    open_twin,
    server_record,
)
from tests.conftest import ServerThread

StartServer = Callable[..., ServerThread]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def twin(kind: str, server: ServerThread) -> AsyncIterator[Twin]:
    async with open_twin(kind, server.address) as client:
        yield client


def unique_labels() -> dict[str, str]:
    return {"test": uuid.uuid4().hex}


# -- create, get --------------------------------------------------------------------


async def test_create_returns_the_task_as_plain_python(twin: Twin) -> None:
    task = await twin.create(
        "echo",
        {"n": 1, "items": [1, "two", None], "nested": {"ok": True}},
        priority=7,
        timeout_seconds=12.5,
        max_attempts=3,
        labels={"team": "data"},
        description="an echo",
    )
    assert isinstance(task, Task)
    assert task.status is TaskStatus.CREATED
    assert task.parameters == {"n": 1, "items": [1, "two", None], "nested": {"ok": True}}
    assert (task.priority, task.timeout_seconds, task.max_attempts) == (7, 12.5, 3)
    assert (task.labels, task.description, task.task_type) == ({"team": "data"}, "an echo", "echo")
    assert task.created_at.tzinfo is UTC
    assert (task.result, task.error, task.started_at, task.finished_at) == (None, None, None, None)
    assert isinstance(task.proto, task_pb2.TaskResponse)
    assert task.proto.task_id == task.task_id
    assert "proto" not in repr(task)


async def test_create_many_creates_every_task_in_order(twin: Twin) -> None:
    labels = unique_labels()
    specs = [
        {"task_type": "echo", "parameters": {"i": i}, "labels": labels, "priority": 1 + i % 10}
        for i in range(1005)  # more than one batch of 1,000
    ]
    tasks = await twin.create_many(specs)
    assert [t.parameters for t in tasks] == [{"i": i} for i in range(1005)]
    assert [t.priority for t in tasks] == [1 + i % 10 for i in range(1005)]
    assert len({t.task_id for t in tasks}) == 1005
    assert len(await twin.list(labels=labels)) == 1005


async def test_create_many_with_request_ids_is_idempotent(twin: Twin) -> None:
    specs = [{"task_type": "echo", "request_id": f"many-{uuid.uuid4()}"} for _ in range(3)]
    first = await twin.create_many(specs)
    again = await twin.create_many(specs)
    assert [t.task_id for t in again] == [t.task_id for t in first]


async def test_create_many_refuses_a_bad_task_and_creates_none(twin: Twin) -> None:
    labels = unique_labels()
    specs = [{"task_type": "echo", "labels": labels}, {"task_type": "echo", "priority": 99}]
    with pytest.raises(InvalidArgument) as caught:
        await twin.create_many(specs)
    assert [v.field for v in caught.value.field_violations] == ["requests[1].task.priority"]
    assert await twin.list(labels=labels) == []


async def test_create_many_names_an_item_it_cannot_use(twin: Twin) -> None:
    with pytest.raises(TypeError, match="task 1: unknown keys \\['kind'\\]"):
        await twin.create_many([{"task_type": "echo"}, {"kind": "echo"}])
    with pytest.raises(TypeError, match="task 0: no task_type"):
        await twin.create_many([{"parameters": {}}])


async def test_get_returns_the_task_as_it_stands(twin: Twin) -> None:
    task = await twin.create("echo", {"x": [1, 2]})
    ended = await twin.wait(task.task_id)
    got = await twin.get(task.task_id)
    assert got == ended
    assert got.status is TaskStatus.COMPLETED
    assert got.result == {"x": [1, 2]}
    assert got.finished_at is not None and got.finished_at.tzinfo is UTC
    assert got.started_at is not None and got.created_at <= got.started_at <= got.finished_at


async def test_a_repeated_request_id_gives_the_same_task(twin: Twin) -> None:
    request_id = str(uuid.uuid4())
    first = await twin.create("echo", {"a": 1}, request_id=request_id)
    again = await twin.create("echo", {"a": 1}, request_id=request_id)
    assert again.task_id == first.task_id
    with pytest.raises(AlreadyExists) as caught:
        await twin.create("echo", {"a": 2}, request_id=request_id)
    assert caught.value.reason == "REQUEST_ID_REUSED"
    assert caught.value.metadata["task_id"] == first.task_id


async def test_each_create_without_a_request_id_makes_a_new_task(twin: Twin) -> None:
    labels = unique_labels()
    first = await twin.create("echo", labels=labels)
    second = await twin.create("echo", labels=labels)
    assert first.task_id != second.task_id
    assert len(await twin.list(labels=labels)) == 2


async def test_a_bad_request_names_every_bad_field(twin: Twin) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await twin.create("no_such_type", priority=11)
    error = caught.value
    fields = {violation.field for violation in error.field_violations}
    assert fields == {"task.task_type", "task.priority"}
    assert all(isinstance(v, FieldViolation) and v.description for v in error.field_violations)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(error.__cause__, grpc.RpcError)


async def test_parameters_that_are_not_json_are_refused_before_sending(twin: Twin) -> None:
    with pytest.raises(TypeError, match="parameters"):
        await twin.create("echo", {"when": object()})


async def test_get_of_an_unknown_task_is_not_found(twin: Twin) -> None:
    task_id = str(uuid.uuid4())
    with pytest.raises(NotFound) as caught:
        await twin.get(task_id)
    assert caught.value.reason == "TASK_NOT_FOUND"
    assert caught.value.domain == "conveyor.v1"
    assert caught.value.metadata == {"task_id": task_id}
    assert isinstance(caught.value, conveyor.ConveyorError)


# -- list, revision -----------------------------------------------------------------


async def test_list_follows_the_page_tokens_and_keeps_the_filters(twin: Twin) -> None:
    labels = unique_labels()
    created = [await twin.create("echo", {"i": i}, labels=labels) for i in range(7)]
    await twin.create("echo", labels=unique_labels())  # not matching
    listed = await twin.list(labels=labels, page_size=2)
    assert [task.task_id for task in listed] == [task.task_id for task in created]
    for task in created:
        await twin.wait(task.task_id)
    assert len(await twin.list(labels=labels, statuses=[TaskStatus.COMPLETED])) == 7
    assert await twin.list(labels=labels, statuses=[TaskStatus.RUNNING]) == []
    assert await twin.list(labels=labels, task_type="sleep") == []


async def test_list_newest_first_gives_the_latest_created_first(twin: Twin) -> None:
    labels = unique_labels()
    created = [await twin.create("echo", {"i": i}, labels=labels) for i in range(5)]
    listed = await twin.list(labels=labels, newest_first=True, page_size=2)
    assert [task.task_id for task in listed] == [task.task_id for task in reversed(created)]


async def test_list_and_watch_all_filter_by_the_start_of_the_task_id(twin: Twin) -> None:
    since = await twin.revision()
    ids = [(await twin.create("echo")).task_id for _ in range(17)]
    # 17 ids, 16 hex digits: at least two start with the most common first digit.
    shared = collections.Counter(task_id[0] for task_id in ids).most_common(1)[0][0]
    expected = [task_id for task_id in ids if task_id.startswith(shared)]
    assert len(expected) >= 2
    listed = await twin.list(task_id_prefix=shared, page_size=1)
    assert [task.task_id for task in listed] == expected
    assert [task.task_id for task in await twin.list(task_id_prefix=ids[0][:8].upper())] == [
        task_id for task_id in ids if task_id.startswith(ids[0][:8])
    ]
    ended: set[str] = set()

    def until_all_end(event: conveyor.TaskEvent) -> bool:
        if event.task.status.terminal:
            ended.add(event.task.task_id)
        return ended == set(expected)

    events = await twin.collect(
        "watch_all", task_id_prefix=shared, since_revision=since, each=until_all_end
    )
    assert {event.task.task_id for event in events} == set(expected)
    with pytest.raises(InvalidArgument) as caught:
        await twin.list(task_id_prefix="xyz!")
    assert [v.field for v in caught.value.field_violations] == ["filter.task_id_prefix"]


async def test_the_revision_rises_with_every_change(twin: Twin) -> None:
    before = await twin.revision()
    task = await twin.create("echo")
    assert await twin.revision() >= task.revision > before


# -- cancel -------------------------------------------------------------------------


async def test_cancel_of_a_running_task_answers_at_once_and_the_task_ends_cancelled(
    twin: Twin,
) -> None:
    task = await twin.create("report_then_wait", {"seconds": 30})
    await twin.collect("watch", task.task_id, each=lambda state: state.progress == 0.25)
    answered = await twin.cancel(task.task_id, reason="not needed")
    assert answered.status is TaskStatus.RUNNING
    assert answered.cancel_requested_at is not None
    ended = await twin.wait(task.task_id)
    assert ended.status is TaskStatus.CANCELLED
    assert ended.error == TaskError("CANCELLED", "not needed")


async def test_a_delayed_start_and_its_queue_timeout_come_back_as_times(twin: Twin) -> None:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    task = await twin.create("echo", start_at=start, queue_timeout_seconds=60)
    assert (task.status, task.next_attempt_at) == (TaskStatus.CREATED, start)
    assert task.start_deadline == start + timedelta(seconds=60)
    later = await twin.create("echo", start_after_seconds=60)
    assert later.next_attempt_at is not None and later.start_deadline is None
    with pytest.raises(ValueError, match="aware"):
        await twin.create("echo", start_at=start.replace(tzinfo=None))
    with pytest.raises(ValueError, match="not both"):
        await twin.create("echo", start_at=start, start_after_seconds=1)


async def test_pause_holds_a_queued_task_and_resume_queues_it_again(twin: Twin) -> None:
    task = await twin.create("echo", start_after_seconds=3600)
    paused = await twin.pause(task.task_id, reason="hold")
    assert (paused.status, paused.pause_reason) == (TaskStatus.PAUSED, "hold")
    assert paused.paused_at is not None and not paused.status.terminal
    resumed = await twin.resume(task.task_id)
    assert (resumed.status, resumed.paused_at, resumed.pause_reason) == (
        TaskStatus.CREATED,
        None,
        "",
    )
    assert resumed.next_attempt_at == task.next_attempt_at  # still waiting for its start


async def test_send_input_reaches_the_handler_and_keeps_one_per_request_id(
    twin: Twin,
) -> None:
    task = await twin.create("ask")
    sent = await twin.send_input(task.task_id, {"text": "Ann"}, request_id="name-1")
    again = await twin.send_input(task.task_id, {"text": "Ann"}, request_id="name-1")
    assert sent.sequence == again.sequence == 1 and again.task.input_count == 1
    await twin.send_input(task.task_id, {"text": "green"})
    done = await twin.wait(task.task_id)
    assert done.result["colour"] == {"text": "green"} and done.input_count == 2
    with pytest.raises(FailedPrecondition):
        await twin.send_input(task.task_id, {"text": "late"})
    with pytest.raises(TypeError, match="JSON"):
        await twin.send_input(task.task_id, {"when": object()})


async def test_cancel_matching_counts_with_a_dry_run_then_cancels(twin: Twin) -> None:
    labels = unique_labels()
    spec = {"task_type": "echo", "labels": labels, "start_after_seconds": 3600}
    tasks = await twin.create_many([spec, spec, spec])
    assert await twin.cancel_matching(labels=labels, dry_run=True) == 3
    assert await twin.cancel_matching(labels=labels, reason="done") == 3
    ended = [await twin.get(task.task_id) for task in tasks]
    assert {(task.status, task.error) for task in ended} == {
        (TaskStatus.CANCELLED, TaskError("CANCELLED", "done"))
    }
    with pytest.raises(ValueError, match="cancel everything"):
        await twin.cancel_matching(statuses=[TaskStatus.CREATED])


async def test_cancel_of_a_completed_task_is_a_failed_precondition(twin: Twin) -> None:
    task = await twin.create("echo")
    await twin.wait(task.task_id)
    with pytest.raises(FailedPrecondition) as caught:
        await twin.cancel(task.task_id)
    assert caught.value.reason == "TASK_ALREADY_ENDED"


# -- watch, watch_all ---------------------------------------------------------------


async def test_watch_gives_each_state_once_and_ends_after_the_terminal_one(
    twin: Twin, server: ServerThread
) -> None:
    task = await twin.create("sleep", {"seconds": 0.3, "steps": 3})
    states = await twin.watch(task.task_id)
    assert states[-1].status is TaskStatus.COMPLETED
    assert not any(state.status.terminal for state in states[:-1])
    revisions = [state.revision for state in states]
    assert revisions == sorted(set(revisions))
    assert [s.proto for s in states[1:]] == server_record(
        server.address, task.task_id, states[0].revision
    )


async def test_watch_of_a_task_that_has_ended_gives_its_final_state(twin: Twin) -> None:
    task = await twin.create("fail", {"message": "no"})
    ended = await twin.wait(task.task_id)
    assert await twin.watch(task.task_id) == [ended]


async def test_watch_of_an_unknown_task_is_not_found(twin: Twin) -> None:
    with pytest.raises(NotFound):
        await twin.watch(str(uuid.uuid4()))


async def test_watch_that_runs_out_of_time_raises_deadline_exceeded(twin: Twin) -> None:
    task = await twin.create("report_then_wait", {"seconds": 30})
    with pytest.raises(DeadlineExceeded):
        await twin.watch(task.task_id, timeout=0.3)
    await twin.cancel(task.task_id)


async def test_watch_all_gives_the_changes_of_matching_tasks(twin: Twin) -> None:
    labels = unique_labels()
    since = await twin.revision()
    other = await twin.create("echo", labels=unique_labels())
    first = await twin.create("echo", {"n": 1}, labels=labels)
    second = await twin.create("fail", {"message": "x"}, labels=labels)
    ended: set[str] = set()

    def until_both_end(event: conveyor.TaskEvent) -> bool:
        if event.task.status.terminal:
            ended.add(event.task.task_id)
        return len(ended) == 2

    events = await twin.collect(
        "watch_all", labels=labels, since_revision=since, each=until_both_end
    )
    assert {event.task.task_id for event in events} == {first.task_id, second.task_id}
    assert other.task_id not in {event.task.task_id for event in events}
    assert all(event.kind is EventKind.CHANGED for event in events)
    assert [e.revision for e in events] == sorted({e.revision for e in events})
    assert all(event.revision == event.task.revision for event in events)


async def test_watch_all_filters_by_status_and_type(twin: Twin) -> None:
    labels = unique_labels()
    since = await twin.revision()
    await twin.create("echo", labels=labels)
    failing = await twin.create("fail", labels=labels)
    events = await twin.collect(
        "watch_all",
        labels=labels,
        statuses=[TaskStatus.FAILED],
        task_type="fail",
        since_revision=since,
        each=lambda event: True,
    )
    assert [(e.task.task_id, e.task.status) for e in events] == [
        (failing.task_id, TaskStatus.FAILED)
    ]


async def test_watch_all_reports_removed_tasks(kind: str, start_server: StartServer) -> None:
    server = start_server(retention=0.05, sweep_interval=0.05)
    labels = unique_labels()
    async with open_twin(kind, server.address) as twin:
        since = await twin.revision()
        task = await twin.create("echo", labels=labels)
        events = await twin.collect(
            "watch_all",
            labels=labels,
            since_revision=since,
            each=lambda event: event.kind is EventKind.REMOVED,
        )
        assert events[-1].kind is EventKind.REMOVED
        assert events[-1].task.task_id == task.task_id
        assert events[-1].task.status is TaskStatus.COMPLETED
        with pytest.raises(NotFound):
            await twin.get(task.task_id)


async def test_watch_all_from_now_sees_what_changes_after_it_begins(
    kind: str, start_server: StartServer
) -> None:
    calls = Calls()
    server = start_server(interceptors=[calls])
    labels = unique_labels()
    async with open_twin(kind, server.address) as twin:
        before = await twin.create("echo", labels=labels)
        await twin.wait(before.task_id)
        calls.arrived["Watch"].clear()
        stream = twin.client.watch_all(labels=labels)
        pending = first_item(stream)
        # Its Watch reaches the server after it has read the revision to start from.
        assert await asyncio.to_thread(calls.arrived["Watch"].wait, 10)
        after = await twin.create("echo", labels=labels)
        event = await pending
        # The clients' generators, typed as mere iterators.
        if isinstance(stream, AsyncIterator):
            await cast("AsyncGenerator[conveyor.TaskEvent, None]", stream).aclose()
        else:
            cast("Generator[conveyor.TaskEvent, None, None]", stream).close()
    assert event.task.task_id == after.task_id
    assert event.task.status is TaskStatus.CREATED


async def test_watch_all_can_start_with_the_running_tasks(twin: Twin) -> None:
    labels = unique_labels()
    ended = await twin.create("echo", labels=labels)
    await twin.wait(ended.task_id)
    running = await twin.create("report_then_wait", {"seconds": 30}, labels=labels)
    await twin.collect("watch", running.task_id, each=lambda t: t.status is TaskStatus.RUNNING)
    stream = twin.client.watch_all(labels=labels, start_with=[TaskStatus.RUNNING])
    current = await first_item(stream)
    assert (current.kind, current.task.task_id) == (EventKind.CURRENT, running.task_id)
    assert current.task.status is TaskStatus.RUNNING
    await twin.cancel(running.task_id)
    changed = await first_item(stream)  # the watch goes on from the List's revision
    if isinstance(stream, AsyncIterator):
        await cast("AsyncGenerator[conveyor.TaskEvent, None]", stream).aclose()
    else:
        cast("Generator[conveyor.TaskEvent, None, None]", stream).close()
    assert (changed.kind, changed.task.task_id) == (EventKind.CHANGED, running.task_id)
    assert changed.task.cancel_requested_at is not None and changed.revision > current.revision
    with pytest.raises(ValueError, match="start_with or since_revision"):
        await twin.collect("watch_all", start_with=[TaskStatus.RUNNING], since_revision=1)


# -- wait, poll, result -------------------------------------------------------------


async def test_wait_returns_the_terminal_state(twin: Twin) -> None:
    task = await twin.create("sleep", {"seconds": 0.2, "steps": 2})
    ended = await twin.wait(task.task_id, timeout=30)
    assert ended.status is TaskStatus.COMPLETED
    assert ended.result == {"slept": 0.2}


async def test_wait_that_runs_out_of_time_raises_wait_timeout(twin: Twin) -> None:
    task = await twin.create("report_then_wait", {"seconds": 30})
    running = await twin.collect("watch", task.task_id, each=lambda state: state.progress == 0.25)
    with pytest.raises(WaitTimeout) as caught:
        await twin.wait(task.task_id, timeout=1)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.task == running[-1]  # the last state seen, which does not change
    assert caught.value.task_id == task.task_id
    await twin.cancel(task.task_id)


async def test_poll_returns_the_terminal_state(twin: Twin) -> None:
    task = await twin.create("sleep", {"seconds": 0.2})
    ended = await twin.poll(task.task_id, initial=0.05, maximum=0.1)
    assert ended.status is TaskStatus.COMPLETED


async def test_poll_that_runs_out_of_time_raises_wait_timeout(twin: Twin) -> None:
    task = await twin.create("report_then_wait", {"seconds": 30})
    with pytest.raises(WaitTimeout) as caught:
        await twin.poll(task.task_id, timeout=1, initial=0.05)
    assert caught.value.task is not None and not caught.value.task.status.terminal
    await twin.cancel(task.task_id)


async def test_poll_refuses_a_policy_that_makes_no_sense(twin: Twin) -> None:
    with pytest.raises(ValueError, match="multiplier"):
        await twin.poll(str(uuid.uuid4()), multiplier=0.5)


async def test_result_of_a_completed_task(twin: Twin) -> None:
    task = await twin.create("echo", {"answer": 42})
    assert await twin.result(task.task_id) == {"answer": 42}


async def test_result_of_a_failed_task_raises_task_failed_with_its_error(twin: Twin) -> None:
    task = await twin.create("fail", {"message": "disk full"})
    with pytest.raises(TaskFailed, match="HANDLER_ERROR: RuntimeError: disk full") as caught:
        await twin.result(task.task_id)
    error = caught.value.task.error
    assert error is not None and error.traceback.endswith("RuntimeError: disk full\n")
    assert error == TaskError(
        "HANDLER_ERROR", "RuntimeError: disk full", "RuntimeError", error.traceback
    )
    assert caught.value.task.task_id == task.task_id


async def test_result_of_a_cancelled_task_raises_task_cancelled(twin: Twin) -> None:
    task = await twin.create("report_then_wait", {"seconds": 30})
    await twin.cancel(task.task_id, reason="changed my mind")
    with pytest.raises(TaskCancelled, match="changed my mind") as caught:
        await twin.result(task.task_id)
    assert caught.value.task.status is TaskStatus.CANCELLED


# -- a newer server: a status and an event type this client has never seen ---------

NEW_STATUS = task_pb2.TaskStatus.ValueType(9)  # such as a newer server's PAUSED
NEW_EVENT = pb.WatchEventType.ValueType(9)


def newer_event(
    kind: pb.WatchEventType.ValueType,
    revision: int,
    status: task_pb2.TaskStatus.ValueType,
    task_id: str,
) -> pb.WatchResponse:
    task = task_pb2.TaskResponse(task_id=task_id, status=status, revision=revision)
    return pb.WatchResponse(type=kind, task=task, revision=revision)


async def test_a_newer_servers_status_and_event_type_are_taken_in_stride(kind: str) -> None:
    task_id = str(uuid.uuid4())
    paused = task_pb2.TaskResponse(task_id=task_id, status=NEW_STATUS, revision=5)
    events = [
        newer_event(pb.WATCH_EVENT_TYPE_CURRENT, 5, NEW_STATUS, task_id),
        pb.WatchResponse(type=NEW_EVENT, revision=6),
        newer_event(pb.WATCH_EVENT_TYPE_CHANGED, 7, NEW_STATUS, task_id),
        newer_event(pb.WATCH_EVENT_TYPE_CHANGED, 8, task_pb2.TASK_STATUS_COMPLETED, task_id),
    ]
    with ScriptedServer(paused, events, hold=False) as server:
        async with open_twin(kind, server.address) as twin:
            got = await twin.get(task_id)
            listed = await twin.list()
            states = await twin.watch(task_id)
            ended = await twin.wait(task_id)
            changes = await twin.collect(
                "watch_all", since_revision=5, each=lambda event: event.revision == 8
            )
    assert got.status is TaskStatus.UNKNOWN and got.raw_status == NEW_STATUS
    assert [task.status for task in listed] == [TaskStatus.UNKNOWN]
    assert [(state.revision, state.status_label) for state in states] == [
        (5, "UNKNOWN(9)"),
        (7, "UNKNOWN(9)"),
        (8, "COMPLETED"),
    ]
    assert ended.status is TaskStatus.COMPLETED and ended.revision == 8
    assert [(event.kind, event.revision, event.task.status) for event in changes] == [
        (EventKind.CHANGED, 7, TaskStatus.UNKNOWN),
        (EventKind.CHANGED, 8, TaskStatus.COMPLETED),
    ]


async def test_a_wait_for_a_task_a_newer_server_ended_in_a_status_not_known_says_so(
    kind: str,
) -> None:
    """The server ends the watch at the task's end, which this client cannot see as one."""
    task_id = str(uuid.uuid4())
    ended = newer_event(pb.WATCH_EVENT_TYPE_CURRENT, 5, NEW_STATUS, task_id)
    with ScriptedServer(ended.task, [ended], hold=False) as server:
        async with open_twin(kind, server.address, timeout=0.5) as twin:
            with pytest.raises(ConveyorError, match="a status this client does not know"):
                await twin.wait(task_id, timeout=10)
    assert len(server.watches) > 1  # it asked again before it gave up


# -- errors the server gives for its limits, and a server that is not there ---------


async def test_a_full_queue_says_when_to_try_again(kind: str, start_server: StartServer) -> None:
    server = start_server(concurrency=1, max_queued=1)
    async with open_twin(kind, server.address) as twin:
        running = await twin.create("report_then_wait", {"seconds": 30})
        queued = await twin.create("echo")
        with pytest.raises(ResourceExhausted) as caught:
            await twin.create("echo")
        assert caught.value.reason == "QUEUE_FULL"
        assert caught.value.retry_delay == 1.0
        await twin.cancel(running.task_id)
        await twin.wait(queued.task_id)


async def test_a_server_that_is_not_there_is_unavailable(kind: str) -> None:
    async with open_twin(kind, closed_port_address(), timeout=0.5) as twin:
        with pytest.raises(Unavailable) as caught:
            await twin.get(str(uuid.uuid4()))
        assert isinstance(caught.value.__cause__, grpc.RpcError)
        with pytest.raises(Unavailable):
            await twin.watch(str(uuid.uuid4()))


async def test_a_client_told_not_to_retry_refusals_says_at_once_that_nothing_listens(
    kind: str,
) -> None:
    address = closed_port_address()
    async with open_twin(kind, address, timeout=30, retry_refused=False) as twin:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await twin.get(str(uuid.uuid4()))
        with pytest.raises(Unavailable):
            await twin.watch(str(uuid.uuid4()))
        assert time.monotonic() - started < 5  # both, far below their 30 s timeout
    assert "Connection refused" in caught.value.message


# -- construction -------------------------------------------------------------------


async def test_the_server_comes_from_the_environment_when_not_given(
    kind: str, server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_SERVER", server.address)
    client = Client() if kind == "Client" else AsyncClient()
    twin = Twin(client)
    task = await twin.create("echo")
    assert (await twin.get(task.task_id)).task_id == task.task_id
    await twin.close()


def test_a_channel_of_ones_own_is_used_and_left_open(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        with Client(channel=channel) as client:
            task = client.create("echo")
        assert Client(channel=channel).get(task.task_id).task_id == task.task_id


async def test_an_async_channel_of_ones_own_is_left_open(server: ServerThread) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        async with AsyncClient(channel=channel) as client:
            task = await client.create("echo")
        assert (await AsyncClient(channel=channel).get(task.task_id)).task_id == task.task_id


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target": "x:1", "channel": object()}, "not both"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"heartbeat_interval": 0.01}, "heartbeat_interval"),
        ({"heartbeat_interval": 7200}, "heartbeat_interval"),
    ],
)
def test_options_that_make_no_sense_are_refused(options: dict[str, Any], message: str) -> None:
    for client_type in (Client, AsyncClient):
        with pytest.raises(ValueError, match=message):
            client_type(**options)


def test_a_call_timeout_that_makes_no_sense_is_refused(server: ServerThread) -> None:
    with Client(server.address) as client, pytest.raises(ValueError, match="timeout"):
        client.get(str(uuid.uuid4()), timeout=0)


# -- the public surface -------------------------------------------------------------


def test_the_public_names_are_pinned() -> None:
    assert sorted(conveyor.__all__) == [
        "AlreadyExists",
        "AsyncClient",
        "AttemptFailed",
        "AttemptOutcome",
        "Client",
        "ConveyorError",
        "DeadlineExceeded",
        "EventKind",
        "FailedPrecondition",
        "FieldViolation",
        "InputSent",
        "InvalidArgument",
        "NonRetryableError",
        "NotFound",
        "OutOfRange",
        "Overlap",
        "PermissionDenied",
        "ResourceExhausted",
        "RpcError",
        "Schedule",
        "ScheduleEvent",
        "ScheduleEventKind",
        "ScheduleRun",
        "Task",
        "TaskAttempt",
        "TaskCancelled",
        "TaskContext",
        "TaskCounts",
        "TaskError",
        "TaskEvent",
        "TaskFailed",
        "TaskStatus",
        "TaskType",
        "TaskWorker",
        "Tls",
        "Unauthenticated",
        "Unavailable",
        "WaitTimeout",
        "handler",
    ]
    assert all(hasattr(conveyor, name) for name in conveyor.__all__)


def _public_functions() -> list[tuple[str, Callable[..., object], str | None]]:
    """(name, function, its docstring) of every public method; a constructor's is its class's."""
    found: list[tuple[str, Callable[..., object], str | None]] = []
    for class_name in conveyor.__all__:
        cls = getattr(conveyor, class_name)
        for name, member in vars(cls).items():
            if inspect.isfunction(member) and name == "__init__":
                found.append((f"{class_name}()", member, cls.__doc__))
            elif inspect.isfunction(member) and not name.startswith("_"):
                found.append((f"{class_name}.{name}", member, member.__doc__))
    return found


@pytest.mark.parametrize(
    ("function", "docstring"),
    [pytest.param(function, doc, id=name) for name, function, doc in _public_functions()],
)
def test_every_public_function_says_what_its_timeout_bounds(
    function: Callable[..., object], docstring: str | None
) -> None:
    assert docstring and docstring.strip()
    if "timeout" in inspect.signature(function).parameters:
        assert "`timeout`" in docstring


def test_each_twin_drives_its_own_kind_of_channel() -> None:
    """Neither twin runs the other on a thread: each stands on its own kind of channel."""
    async_source = inspect.getsource(conveyor._async_client)
    sync_source = inspect.getsource(conveyor._sync_client)
    assert "grpc.aio.insecure_channel" in async_source
    assert "grpc.insecure_channel" in sync_source
    for source, other in ((async_source, "_sync_client"), (sync_source, "_async_client")):
        assert other not in source and "to_thread" not in source and "run_in_executor" not in source
    assert "import asyncio" not in sync_source


def test_a_blocking_watch_runs_on_the_thread_that_reads_it(server: ServerThread) -> None:
    """grpc's own stream thread fails when the channel closes under it: none may be started."""
    with Client(server.address) as client:
        task = client.create("report_then_wait", {"seconds": 30})
        before = set(threading.enumerate())
        states = client.watch(task.task_id)
        next(states)
        started = set(threading.enumerate()) - before
        cast("Generator[Task, None, None]", states).close()  # a generator, typed as an iterator
        client.cancel(task.task_id)
    assert not [thread.name for thread in started if thread.name.endswith("(_run)")]


def test_the_twins_have_the_same_methods_with_the_same_parameters() -> None:
    def methods(cls: type) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(member).parameters)
            for name, member in vars(cls).items()
            if inspect.isfunction(member) and not name.startswith("_")
        }

    assert methods(Client) == methods(AsyncClient)
