"""Watch: current state first, every change, the end on the terminal state, resume by revision."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import duration_pb2

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TASK_STATUS_UNSPECIFIED, TaskFilter
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.conftest import ServerThread
from tests.support import (
    COMPLETED,
    CREATED,
    RUNNING,
    create,
    error_reason,
    field_violations,
    final,
    read,
    revision,
    run_and_watch,
    wait_status,
    watch,
)

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

StartServer = Callable[..., ServerThread]
CURRENT = pb.WATCH_EVENT_TYPE_CURRENT
CHANGED = pb.WATCH_EVENT_TYPE_CHANGED
HEARTBEAT = pb.WATCH_EVENT_TYPE_HEARTBEAT


def _interval(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


async def test_watch_sends_the_current_state_first_and_ends_after_the_terminal_state(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "sleep", {"seconds": 0.1, "steps": 2})
    responses = await watch(stub, task_id=task.task_id)
    assert responses[0].type == CURRENT
    assert all(r.type == CHANGED for r in responses[1:])
    assert responses[-1].task.status == COMPLETED
    assert [r.task.status for r in responses[:-1]].count(COMPLETED) == 0
    revisions = [r.revision for r in responses]
    assert revisions == sorted(set(revisions))  # rising, no duplicate
    assert all(r.revision == r.task.revision for r in responses)


async def test_a_task_that_has_ended_gets_its_final_state_and_the_stream_closes(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "echo", {"x": 1})
    ended = await final(stub, task.task_id)
    responses = await watch(stub, task_id=task.task_id)
    assert [(r.type, r.task) for r in responses] == [(CURRENT, ended)]


async def test_watch_shows_every_change_of_a_task(stub: TaskServiceAsyncStub) -> None:
    states = await run_and_watch(stub, "sleep", {"seconds": 0.1, "steps": 3})
    assert [s.status for s in states] == [CREATED, RUNNING, RUNNING, RUNNING, RUNNING, COMPLETED]
    assert [s.progress for s in states[2:5]] == pytest.approx([1 / 3, 2 / 3, 1.0])


async def test_a_resumed_watch_continues_with_no_gap_and_no_duplicate(
    stub: TaskServiceAsyncStub,
) -> None:
    since = await revision(stub)
    task = await create(stub, "sleep", {"seconds": 0.2, "steps": 4})
    everything = await watch(stub, task_id=task.task_id, since_revision=since)
    for cut in range(len(everything) - 1):
        resumed = await watch(stub, task_id=task.task_id, since_revision=everything[cut].revision)
        assert resumed == everything[cut + 1 :]


async def test_resuming_after_the_end_closes_at_once(stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "echo")
    ended = await final(stub, task.task_id)
    assert await watch(stub, task_id=task.task_id, since_revision=ended.revision) == []
    assert await watch(stub, task_id=task.task_id, since_revision=ended.revision - 1) == [
        pb.WatchResponse(type=CHANGED, task=ended, revision=ended.revision)
    ]


async def test_a_revision_older_than_the_history_is_out_of_range(start_server: StartServer) -> None:
    server = start_server(history_size=5)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        first = await create(stub, "sleep", {"seconds": 60})
        for _ in range(6):
            await create(stub, "sleep", {"seconds": 60}, priority=1)
        for request in (
            pb.WatchRequest(task_id=first.task_id, since_revision=first.revision - 1),
            pb.WatchRequest(since_revision=0),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await watch(stub, **{f.name: v for f, v in request.ListFields()})
            assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert error_reason(caught.value) == "REVISION_OUT_OF_RANGE"
        # A revision still in the history is fine.
        latest = await revision(stub)
        recent = stub.Watch(
            pb.WatchRequest(since_revision=latest - 4, heartbeat_interval=_interval(0.1))
        )
        kinds = []
        async for response in recent:
            kinds.append(response.type)
            if response.type == HEARTBEAT:
                break
        assert kinds == [CHANGED] * 4 + [HEARTBEAT]


async def test_a_revision_ahead_of_the_server_is_out_of_range(stub: TaskServiceAsyncStub) -> None:
    ahead = await revision(stub) + 100
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch(stub, since_revision=ahead)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_list_then_watch_from_its_revision_misses_nothing(stub: TaskServiceAsyncStub) -> None:
    """Tasks are created all along; every one shows up in the list or in the watch after it."""
    created: list[str] = []
    stop, under_way = asyncio.Event(), asyncio.Event()

    async def keep_creating() -> None:
        while not stop.is_set():
            created.append((await create(stub, "echo")).task_id)
            if len(created) >= 50:
                under_way.set()

    creators = [asyncio.create_task(keep_creating()) for _ in range(4)]
    await under_way.wait()
    seen: set[str] = set()
    token, first_revision = "", None
    while True:
        page = await stub.List(pb.ListRequest(page_size=20, page_token=token))
        first_revision = page.revision if first_revision is None else first_revision
        seen.update(t.task_id for t in page.tasks)
        token = page.next_page_token
        if not token:
            break
    stop.set()
    await asyncio.gather(*creators)
    expected = set(created)
    # Ends as soon as every task was seen; a task missing from both times out the stream.
    async for response in stub.Watch(pb.WatchRequest(since_revision=first_revision), timeout=20):
        seen.add(response.task.task_id)
        if expected <= seen:
            break
    assert expected <= seen  # not so if the stream ended early


async def test_watching_all_starts_from_now_by_default(stub: TaskServiceAsyncStub) -> None:
    old = await create(stub, "echo")
    await final(stub, old.task_id)
    stream = stub.Watch(pb.WatchRequest(heartbeat_interval=_interval(0.1)))
    first = await read(stream)
    assert first.type == HEARTBEAT  # nothing from before the watch
    new = await create(stub, "echo")
    response = await read(stream)
    assert (response.type, response.task.task_id, response.task.status) == (
        CHANGED,
        new.task_id,
        CREATED,
    )
    stream.cancel()


async def test_watching_all_applies_the_filter(stub: TaskServiceAsyncStub) -> None:
    since = await revision(stub)
    wanted = await create(stub, "echo", labels={"team": "a"})
    await create(stub, "echo", labels={"team": "b"})
    await create(stub, "sleep", {"seconds": 0}, labels={"team": "a"})
    last = await create(stub, "echo", labels={"team": "a"})
    request = pb.WatchRequest(
        since_revision=since,
        filter=TaskFilter(task_type="echo", labels={"team": "a"}, statuses=[COMPLETED]),
    )
    completed = []
    async for response in stub.Watch(request):
        assert response.task.task_type == "echo" and response.task.labels["team"] == "a"
        assert response.task.status == COMPLETED
        completed.append(response.task.task_id)
        if len(completed) == 2:
            break
    assert sorted(completed) == sorted([wanted.task_id, last.task_id])


async def test_a_quiet_stream_gets_heartbeats_with_the_latest_revision(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "sleep", {"seconds": 60, "steps": 1})
    running = await wait_status(stub, task.task_id, RUNNING)
    stream = stub.Watch(pb.WatchRequest(task_id=task.task_id, heartbeat_interval=_interval(0.1)))
    assert (await read(stream)).type == CURRENT
    for _ in range(2):
        beat = await read(stream)
        assert beat.type == HEARTBEAT
        assert beat.revision == await revision(stub) >= running.revision
    stream.cancel()
    await stub.Cancel(pb.CancelRequest(task_id=task.task_id))


async def test_resuming_from_a_heartbeat_misses_nothing(stub: TaskServiceAsyncStub) -> None:
    stream = stub.Watch(pb.WatchRequest(heartbeat_interval=_interval(0.1)))
    beat = await read(stream)
    stream.cancel()
    task = await create(stub, "echo")
    responses = await watch(stub, task_id=task.task_id, since_revision=beat.revision)
    assert [r.task.status for r in responses] == [CREATED, RUNNING, COMPLETED]


async def test_watch_of_an_unknown_task_is_not_found(stub: TaskServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch(stub, task_id=str(uuid.uuid4()))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"task_id": "nope"}, "task_id"),
        ({"heartbeat_interval": _interval(0.01)}, "heartbeat_interval"),
        ({"heartbeat_interval": _interval(7200)}, "heartbeat_interval"),
        ({"since_revision": -1}, "since_revision"),
        ({"task_id": str(uuid.uuid4()), "filter": TaskFilter(task_type="echo")}, "filter"),
        ({"filter": TaskFilter(statuses=[TASK_STATUS_UNSPECIFIED])}, "filter.statuses[0]"),
        ({"filter": TaskFilter(labels={"bad key": "v"})}, "filter.labels['bad key']"),
    ],
)
async def test_a_bad_watch_request_is_invalid_argument(
    stub: TaskServiceAsyncStub, request_fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch(stub, **request_fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(caught.value)


async def test_stopping_the_server_ends_watches_with_unavailable(start_server: StartServer) -> None:
    server = start_server()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "sleep", {"seconds": 60})
        stream = stub.Watch(pb.WatchRequest(task_id=task.task_id))
        await stream.read()
        await asyncio.to_thread(server.stop)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                await stream.read()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
