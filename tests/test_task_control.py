"""Task control through a real server with a controllable clock: delayed start, the queue
timeout (schedule-to-start), and cancel by labels with its dry run, amid creates and starts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskFilter
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.conftest import ManualClock, ServerThread
from tests.support import (
    CANCELLED,
    COMPLETED,
    CREATED,
    FAILED,
    RUNNING,
    create,
    field_violations,
    final,
    task_request,
    wait_until,
)

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

StartServer = Callable[..., ServerThread]
ELSEWHERE = "elsewhere.type"  # declared for workers elsewhere; none is connected
YEAR = 366 * 24 * 3600


def _seconds(timestamp: timestamp_pb2.Timestamp) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


@pytest.fixture
def clocked(start_server: StartServer) -> ServerThread:
    return start_server(clock=ManualClock(), worker_types=frozenset({ELSEWHERE}))


@pytest.fixture
async def stub(clocked: ServerThread) -> Any:
    async with grpc.aio.insecure_channel(clocked.address) as channel:
        yield TaskServiceStub(channel)


# -- delayed start ---------------------------------------------------------------------


async def test_a_delayed_task_waits_as_created_until_its_time(
    clocked: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    later = await create(stub, "echo", start_after_seconds=3600)
    assert later.status == CREATED
    assert _seconds(later.next_attempt_at) == pytest.approx(_seconds(later.created_at) + 3600)
    now = await create(stub, "echo")  # created after it, and run at once
    assert (await final(stub, now.task_id)).status == COMPLETED
    assert (await stub.Get(pb.GetRequest(task_id=later.task_id))).task.status == CREATED
    clocked.advance(3600)
    ran = await final(stub, later.task_id)
    assert ran.status == COMPLETED
    assert _seconds(ran.started_at) >= _seconds(later.next_attempt_at)


async def test_a_start_time_in_the_past_runs_at_once(stub: TaskServiceAsyncStub) -> None:
    past = timestamp_pb2.Timestamp(seconds=1_000_000_000)
    task = await create(stub, "echo", start_at=past)
    assert not task.HasField("next_attempt_at")
    assert (await final(stub, task.task_id)).status == COMPLETED


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"start_after_seconds": YEAR + 1}, "task.start_after_seconds", "366 days"),
        ({"start_after_seconds": -1.0}, "task.start_after_seconds", "366 days"),
        ({"start_after_seconds": float("nan")}, "task.start_after_seconds", "366 days"),
        ({"start_at": {"seconds": 2**40}}, "task.start_at", "366 days"),
        ({"start_at": {"seconds": 1, "nanos": -1}}, "task.start_at", "nanos"),
        ({"queue_timeout_seconds": 0.0}, "task.queue_timeout_seconds", "positive"),
        ({"queue_timeout_seconds": YEAR * 2.0}, "task.queue_timeout_seconds", "366 days"),
    ],
)
async def test_an_absurd_start_or_queue_timeout_is_refused_with_its_limit(
    stub: TaskServiceAsyncStub, fields: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(stub, "echo", **fields)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in field_violations(refused.value)[field]
    listed = await stub.List(pb.ListRequest())
    assert not listed.tasks  # nothing was created


async def test_a_delayed_start_survives_a_restart(start_server: StartServer, tmp_path: Any) -> None:
    store = f"sqlite:{tmp_path / 'tasks.db'}"
    first = start_server(store=store)
    async with grpc.aio.insecure_channel(first.address) as channel:
        later = await create(TaskServiceStub(channel), "echo", start_after_seconds=3600)
    first.stop()
    again = start_server(store=store)
    async with grpc.aio.insecure_channel(again.address) as channel:
        kept = (await TaskServiceStub(channel).Get(pb.GetRequest(task_id=later.task_id))).task
    assert kept.status == CREATED and kept.next_attempt_at == later.next_attempt_at


# -- queue timeout ---------------------------------------------------------------------


async def test_a_task_no_worker_takes_in_time_fails_with_queue_timeout(
    clocked: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    waiting = await create(stub, ELSEWHERE, queue_timeout_seconds=30)
    assert _seconds(waiting.start_deadline) == pytest.approx(_seconds(waiting.created_at) + 30)
    clocked.advance(31)
    failed = await final(stub, waiting.task_id)
    assert (failed.status, failed.error.code) == (FAILED, "QUEUE_TIMEOUT")
    assert "queue timeout of 30 s" in failed.error.message
    assert not failed.HasField("started_at")  # it never ran


async def test_the_queue_timeout_counts_from_a_delayed_start(
    clocked: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    delayed = await create(stub, ELSEWHERE, start_after_seconds=100, queue_timeout_seconds=10)
    assert _seconds(delayed.start_deadline) == pytest.approx(_seconds(delayed.created_at) + 110)
    clocked.advance(111)
    assert (await final(stub, delayed.task_id)).error.code == "QUEUE_TIMEOUT"


async def test_a_task_that_starts_in_time_loses_its_deadline(
    clocked: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    task = await create(stub, "echo", queue_timeout_seconds=30)
    done = await final(stub, task.task_id)
    assert done.status == COMPLETED and not done.HasField("start_deadline")
    clocked.advance(60)  # the deadline passes: nothing happens to a task that started
    assert (await stub.Get(pb.GetRequest(task_id=task.task_id))).task == done


# -- cancel by labels --------------------------------------------------------------------


async def test_cancel_matching_cancels_one_conversation_and_no_other(
    server: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    ours = {"conversation": "c-1"}
    theirs = {"conversation": "c-2"}
    running = await create(stub, "cooperative_blocking", labels=ours)
    await wait_until(stub, running.task_id, lambda task: task.status == RUNNING)
    queued = [await create(stub, ELSEWHERE, labels=ours) for _ in range(3)]
    other = await create(stub, ELSEWHERE, labels=theirs)
    match = TaskFilter(labels=ours)
    dry = await stub.CancelMatching(pb.CancelMatchingRequest(filter=match, dry_run=True))
    assert dry.count == 4
    assert (await stub.Get(pb.GetRequest(task_id=queued[0].task_id))).task.status == CREATED
    answer = await stub.CancelMatching(pb.CancelMatchingRequest(filter=match, reason="closed"))
    assert answer.count == 4
    for task in [running, *queued]:
        ended = await final(stub, task.task_id)
        assert (ended.status, ended.error.message) == (CANCELLED, "closed")
    assert (await stub.Get(pb.GetRequest(task_id=other.task_id))).task.status == CREATED
    again = await stub.CancelMatching(pb.CancelMatchingRequest(filter=match))
    assert again.count == 0  # nothing unfinished is left to cancel


@pytest.mark.parametrize(
    "task_filter",
    [TaskFilter(), TaskFilter(statuses=[CREATED, RUNNING]), TaskFilter(labels={"": "x"})],
)
async def test_cancel_matching_refuses_a_filter_that_could_match_everything(
    stub: TaskServiceAsyncStub, task_filter: TaskFilter
) -> None:
    queued = await create(stub, ELSEWHERE)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CancelMatching(pb.CancelMatchingRequest(filter=task_filter))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any(field.startswith("filter") for field in field_violations(refused.value))
    assert (await stub.Get(pb.GetRequest(task_id=queued.task_id))).task.status == CREATED


async def test_cancel_matching_amid_creates_and_starts_cancels_every_task_that_existed(
    server: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    """Tasks are created, and started, while the cancel runs: every one created before the
    call ends CANCELLED by it, the count is exactly the tasks it cancelled, and those created
    after it are left alone (a second cancel, with another reason, ends them)."""
    label = {"batch": "amid"}
    match = TaskFilter(labels=label)
    acknowledged: list[str] = []
    request = pb.CreateRequest(task=task_request("cooperative_blocking", labels=label))
    enough, stop = asyncio.Event(), asyncio.Event()

    async def keep_creating() -> None:
        while not stop.is_set():
            acknowledged.append((await stub.Create(request)).task.task_id)
            if len(acknowledged) >= 300:
                enough.set()

    creators = [asyncio.create_task(keep_creating()) for _ in range(8)]
    await enough.wait()
    before = set(acknowledged)
    first = await stub.CancelMatching(pb.CancelMatchingRequest(filter=match, reason="first"))
    stop.set()
    await asyncio.gather(*creators)
    second = await stub.CancelMatching(pb.CancelMatchingRequest(filter=match, reason="second"))
    ends = [await final(stub, task_id) for task_id in acknowledged]
    assert {task.status for task in ends} == {CANCELLED}
    by_first = {task.task_id for task in ends if task.error.message == "first"}
    assert before <= by_first  # running or queued, each was cancelled by the first call
    assert first.count == len(by_first) and second.count == len(ends) - len(by_first)
