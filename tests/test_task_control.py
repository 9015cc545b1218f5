"""Task control through a real server with a controllable clock: delayed start, the queue
timeout (schedule-to-start), cancel by labels with its dry run (amid creates and starts),
and pause and resume of queued tasks (and of a running one whose handler cannot pause)."""

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
    PAUSED,
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


# -- pause and resume --------------------------------------------------------------------


@pytest.fixture
async def one_slot(start_server: StartServer) -> Any:
    """A server with one slot, held by a task until the test cancels it: what it creates
    meanwhile stays queued."""
    server = start_server(concurrency=1)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        holder = await create(stub, "cooperative_blocking")
        await wait_until(stub, holder.task_id, lambda task: task.status == RUNNING)
        yield stub, holder.task_id


async def test_a_paused_task_is_held_and_resume_puts_it_back_in_its_place(
    one_slot: tuple[TaskServiceAsyncStub, str],
) -> None:
    stub, holder = one_slot
    first = await create(stub, "echo")
    paused = await stub.Pause(pb.PauseRequest(task_id=first.task_id, reason="wait for Bob"))
    assert paused.paused and paused.task.status == PAUSED
    assert paused.task.pause_reason == "wait for Bob" and paused.task.HasField("paused_at")
    second = await create(stub, "echo")  # queued after the first
    resumed = (await stub.Resume(pb.ResumeRequest(task_id=first.task_id))).task
    assert resumed.status == CREATED and not resumed.HasField("paused_at")
    await stub.Cancel(pb.CancelRequest(task_id=holder))
    one, two = await final(stub, first.task_id), await final(stub, second.task_id)
    assert one.status == two.status == COMPLETED
    assert _seconds(one.started_at) < _seconds(two.started_at)  # its place, before the second


async def test_a_paused_task_stays_paused_while_others_run(
    one_slot: tuple[TaskServiceAsyncStub, str],
) -> None:
    stub, holder = one_slot
    held = await create(stub, "echo")
    await stub.Pause(pb.PauseRequest(task_id=held.task_id))
    later = await create(stub, "echo")
    await stub.Cancel(pb.CancelRequest(task_id=holder))
    assert (await final(stub, later.task_id)).status == COMPLETED
    still = (await stub.Get(pb.GetRequest(task_id=held.task_id))).task
    assert (still.status, still.pause_reason) == (PAUSED, "paused by request")
    cancelled = (await stub.Cancel(pb.CancelRequest(task_id=held.task_id))).task
    assert cancelled.status == CANCELLED and not cancelled.pause_reason


async def test_pause_of_a_running_task_whose_handler_cannot_pause_says_so(
    one_slot: tuple[TaskServiceAsyncStub, str],
) -> None:
    stub, holder = one_slot
    answer = await stub.Pause(pb.PauseRequest(task_id=holder))
    assert not answer.paused and answer.task.status == RUNNING
    again = (await stub.Resume(pb.ResumeRequest(task_id=holder))).task
    assert again == answer.task  # not paused: nothing to resume


async def test_pause_refuses_what_it_cannot_pause(stub: TaskServiceAsyncStub) -> None:
    done = await create(stub, "echo")
    await final(stub, done.task_id)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stub.Pause(pb.PauseRequest(task_id=done.task_id))
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.Pause(pb.PauseRequest(task_id="0f0e0d0c-0b0a-4908-8706-050403020100"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.Pause(pb.PauseRequest(task_id="nope", reason="x" * 2000))
    assert set(field_violations(bad.value)) == {"task_id", "reason"}


async def test_a_paused_task_s_queue_timeout_waits_for_its_resume(
    clocked: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    task = await create(stub, ELSEWHERE, queue_timeout_seconds=30)
    await stub.Pause(pb.PauseRequest(task_id=task.task_id))
    clocked.advance(60)  # past its deadline, paused
    resumed = (await stub.Resume(pb.ResumeRequest(task_id=task.task_id))).task
    assert resumed.status == CREATED  # it did not fail while paused
    assert _seconds(resumed.start_deadline) == pytest.approx(_seconds(task.start_deadline) + 60)
    clocked.advance(31)
    assert (await final(stub, task.task_id)).error.code == "QUEUE_TIMEOUT"


async def test_cancel_matching_and_a_restart_include_paused_tasks(
    start_server: StartServer, tmp_path: Any
) -> None:
    store = f"sqlite:{tmp_path / 'tasks.db'}"
    first = start_server(store=store, worker_types=frozenset({ELSEWHERE}))
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = TaskServiceStub(channel)
        tasks = [await create(stub, ELSEWHERE, labels={"c": "1"}) for _ in range(2)]
        await stub.Pause(pb.PauseRequest(task_id=tasks[0].task_id, reason="later"))
    first.stop()
    again = start_server(store=store, worker_types=frozenset({ELSEWHERE}))
    async with grpc.aio.insecure_channel(again.address) as channel:
        stub = TaskServiceStub(channel)
        kept = (await stub.Get(pb.GetRequest(task_id=tasks[0].task_id))).task
        assert (kept.status, kept.pause_reason) == (PAUSED, "later")
        match = TaskFilter(labels={"c": "1"})
        answer = await stub.CancelMatching(pb.CancelMatchingRequest(filter=match))
        assert answer.count == 2
        assert (await final(stub, tasks[0].task_id)).status == CANCELLED
