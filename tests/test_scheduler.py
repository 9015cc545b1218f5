"""The scheduler through a real server: priority, limits, timeouts, retries, handlers, retention."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest

from conveyor.protojson import struct_to_dict, to_python
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskFilter
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.scheduler import SchedulerConfig
from tests import handlers
from tests.conftest import ServerThread
from tests.support import (
    COMPLETED,
    CREATED,
    FAILED,
    RUNNING,
    create,
    final,
    revision,
    run_and_watch,
    wait_status,
)

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

StartServer = Callable[..., ServerThread]


async def _start_order(stub: TaskServiceAsyncStub, since: int, ids: set[str]) -> list[str]:
    """The order in which the tasks `ids` start running, from the changes after `since`."""
    started: list[str] = []
    async for response in stub.Watch(pb.WatchRequest(since_revision=since)):
        if response.task.task_id in ids and response.task.status == RUNNING:
            started.append(response.task.task_id)
            if len(started) == len(ids):
                return started
    raise AssertionError("the watch ended")


async def test_priority_order_under_a_concurrency_limit_of_one(start_server: StartServer) -> None:
    server = start_server(concurrency=1, aging_per_minute=0)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        blocker = await create(stub, "sleep", {"seconds": 60})
        await wait_status(stub, blocker.task_id, RUNNING)
        priorities = [3, 7, 1, 10, 5, 7, 3, 10, 1, 5]
        tasks = [await create(stub, "echo", priority=p) for p in priorities]
        since = await revision(stub)
        await stub.Cancel(pb.CancelRequest(task_id=blocker.task_id))
        order = await _start_order(stub, since, {t.task_id for t in tasks})
    expected = [
        t.task_id for t in sorted(tasks, key=lambda t: -t.priority)
    ]  # stable: FIFO among equals
    assert order == expected


async def test_a_type_limit_of_one_runs_that_type_one_at_a_time(start_server: StartServer) -> None:
    server = start_server(concurrency=4, type_concurrency={"sleep": 1})
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        since = await revision(stub)
        first = await create(stub, "sleep", {"seconds": 60})
        second = await create(stub, "sleep", {"seconds": 60})
        other = await create(stub, "echo")
        # Another type is not held up by the full one.
        assert (await final(stub, other.task_id)).status == COMPLETED
        await wait_status(stub, first.task_id, RUNNING)
        assert (await stub.Get(pb.GetRequest(task_id=second.task_id))).task.status == CREATED
        await stub.Cancel(pb.CancelRequest(task_id=first.task_id))
        await wait_status(stub, second.task_id, RUNNING)
        await stub.Cancel(pb.CancelRequest(task_id=second.task_id))
        # Never two sleeps at once: replay every change and count.
        running: set[str] = set()
        async for response in stub.Watch(pb.WatchRequest(since_revision=since)):
            task = response.task
            if task.task_type == "sleep":
                if task.status == RUNNING:
                    running.add(task.task_id)
                else:
                    running.discard(task.task_id)
                assert len(running) <= 1
            if task.task_id == second.task_id and task.status not in (CREATED, RUNNING):
                break


async def test_a_task_that_runs_past_its_timeout_fails_with_deadline_exceeded(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "sleep", {"seconds": 60}, timeout_seconds=0.2)
    ended = await final(stub, task.task_id)
    assert ended.status == FAILED
    assert ended.error.code == "DEADLINE_EXCEEDED"
    assert "timeout of 0.2 s" in ended.error.message


async def test_a_blocking_task_past_its_timeout_is_abandoned_after_the_grace_and_fails(
    start_server: StartServer,
) -> None:
    timeout, grace = 0.1, 0.3
    server = start_server(cancel_grace=grace)
    handlers.abandoned_returned.clear()
    handlers.release_stubborn.clear()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = TaskServiceStub(channel)
            # The handler ignores being told to stop: only abandoning it ends the attempt.
            task = await create(stub, "stubborn_blocking", timeout_seconds=timeout)
            ended = await asyncio.wait_for(final(stub, task.task_id), 10)
            assert (ended.status, ended.error.code) == (FAILED, "DEADLINE_EXCEEDED")
            # It ended while the handler still ran ...
            assert not handlers.abandoned_returned.is_set()
            (thread,) = [t for t in threading.enumerate() if t.name == f"conveyor-{task.task_id}"]
            assert thread.is_alive()
            # ... and only once the grace period after the timeout was over.
            ran = ended.finished_at.ToNanoseconds() - ended.started_at.ToNanoseconds()
            assert ran >= (timeout + grace - 0.01) * 1e9, ran
            since = await revision(stub)

            # Let it return and report; what it does after being abandoned changes nothing.
            handlers.release_stubborn.set()
            assert await asyncio.to_thread(handlers.abandoned_returned.wait, 10)
            await asyncio.to_thread(thread.join, 10)
            assert not thread.is_alive()
            # Whatever the thread handed the server's loop runs before this task does.
            later = await create(stub, "echo")
            assert (await final(stub, later.task_id)).status == COMPLETED
            assert (await stub.Get(pb.GetRequest(task_id=task.task_id))).task == ended
            async for response in stub.Watch(pb.WatchRequest(since_revision=since)):
                assert response.task.task_id == later.task_id, response
                if response.task.status == COMPLETED:
                    break
    finally:
        handlers.release_stubborn.set()  # never leave its thread behind


async def test_a_retry_succeeds_on_the_second_attempt(stub: TaskServiceAsyncStub) -> None:
    states = await run_and_watch(stub, "fail", {"times": 1, "message": "flaky"}, max_attempts=3)
    waiting = next(s for s in states if s.status == CREATED and s.attempt == 2)
    assert waiting.HasField("next_attempt_at")
    assert (waiting.error.code, waiting.error.message) == ("HANDLER_ERROR", "RuntimeError: flaky")
    ended = states[-1]
    assert (ended.status, ended.attempt, ended.max_attempts) == (COMPLETED, 2, 3)
    assert to_python(ended.result) == {"attempt": 2}
    assert not ended.HasField("next_attempt_at")


async def test_a_task_fails_once_its_attempts_are_spent(stub: TaskServiceAsyncStub) -> None:
    states = await run_and_watch(stub, "fail", {"message": "always"}, max_attempts=2)
    assert [(s.status, s.attempt) for s in states] == [
        (CREATED, 1),
        (RUNNING, 1),
        (CREATED, 2),
        (RUNNING, 2),
        (FAILED, 2),
    ]
    assert (states[-1].error.code, states[-1].error.message) == (
        "HANDLER_ERROR",
        "RuntimeError: always",
    )


async def test_a_handler_exception_keeps_its_type_and_logs_its_traceback(
    stub: TaskServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    task = await create(stub, "raises_key_error")
    ended = await final(stub, task.task_id)
    assert (ended.status, ended.error.code) == (FAILED, "HANDLER_ERROR")
    assert ended.error.message == "KeyError: 'missing-key'"
    (record,) = [r for r in caplog.records if task.task_id in r.getMessage()]
    assert record.levelname == "ERROR" and record.exc_info is not None
    assert "raises_key_error" in record.getMessage()
    assert 'return {}["missing-key"]' in caplog.text  # the traceback, down to the line


def test_the_default_backoff_doubles_from_one_second() -> None:
    config = SchedulerConfig()
    assert [config.retry_delay(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert config.retry_delay(30) == config.retry_max


async def test_a_timed_out_attempt_is_retried(stub: TaskServiceAsyncStub) -> None:
    states = await run_and_watch(
        stub, "sleep", {"seconds": 60}, timeout_seconds=0.1, max_attempts=2
    )
    assert any(s.status == CREATED and s.attempt == 2 for s in states)
    assert (states[-1].status, states[-1].attempt, states[-1].error.code) == (
        FAILED,
        2,
        "DEADLINE_EXCEEDED",
    )


async def test_progress_message_and_detail_reach_the_watcher(stub: TaskServiceAsyncStub) -> None:
    states = await run_and_watch(stub, "report_then_wait", {"seconds": 0})
    reported = next(s for s in states if s.message == "a quarter")
    assert reported.progress == 0.25
    assert struct_to_dict(reported.progress_detail) == {"stage": "one", "items": [1, 2]}
    assert states[-1].status == COMPLETED and states[-1].progress == 1.0


async def test_the_sleep_handler_reports_each_step(stub: TaskServiceAsyncStub) -> None:
    states = await run_and_watch(stub, "sleep", {"seconds": 0.2, "steps": 4})
    progress = [s.progress for s in states if s.status == RUNNING and s.message.startswith("step")]
    assert progress == [0.25, 0.5, 0.75, 1.0]
    assert to_python(states[-1].result) == {"slept": 0.2}


async def test_a_handler_exception_fails_the_attempt_and_the_server_goes_on(
    stub: TaskServiceAsyncStub,
) -> None:
    bad = await create(stub, "bad_progress")
    ended = await final(stub, bad.task_id)
    assert (ended.status, ended.error.code) == (FAILED, "HANDLER_ERROR")
    assert "progress must be between 0.0 and 1.0" in ended.error.message
    assert (await final(stub, (await create(stub, "echo")).task_id)).status == COMPLETED


async def test_a_result_that_is_not_json_fails_without_retry(stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "not_json", max_attempts=3)
    ended = await final(stub, task.task_id)
    assert (ended.status, ended.attempt, ended.error.code) == (FAILED, 1, "INVALID_RESULT")
    assert "result.when is a object" in ended.error.message


async def test_bad_parameters_of_a_builtin_handler_fail_the_task(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "sleep", {"seconds": "soon"})
    ended = await final(stub, task.task_id)
    assert (ended.status, ended.error.code) == (FAILED, "HANDLER_ERROR")
    assert "parameters.seconds" in ended.error.message


async def test_terminal_tasks_are_removed_after_the_retention_period(
    start_server: StartServer,
) -> None:
    server = start_server(retention=0.05, sweep_interval=0.05)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        since = await revision(stub)
        task = await create(stub, "echo")
        removed = None
        async for response in stub.Watch(pb.WatchRequest(since_revision=since)):
            if response.type == pb.WATCH_EVENT_TYPE_REMOVED:
                removed = response
                break
        assert removed is not None and removed.task.task_id == task.task_id
        assert removed.task.status == COMPLETED
        try:
            await stub.Get(pb.GetRequest(task_id=task.task_id))
            raise AssertionError("an expired task was still there")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.List(pb.ListRequest(filter=TaskFilter(task_type="echo")))
        assert list(listed.tasks) == []


async def test_tasks_that_are_not_terminal_are_never_removed(start_server: StartServer) -> None:
    server = start_server(retention=0, sweep_interval=0.02, concurrency=1)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        blocker = await create(stub, "sleep", {"seconds": 60})
        await wait_status(stub, blocker.task_id, RUNNING)
        queued = await create(stub, "echo")
        # Let a removal of an ended task happen, which proves that sweeps ran meanwhile.
        since = await revision(stub)
        ended = await create(stub, "echo", priority=10)
        await stub.Cancel(pb.CancelRequest(task_id=ended.task_id))
        async for response in stub.Watch(pb.WatchRequest(since_revision=since)):
            if response.type == pb.WATCH_EVENT_TYPE_REMOVED:
                assert response.task.task_id == ended.task_id
                break
        for task, status in ((blocker, RUNNING), (queued, CREATED)):
            assert (await stub.Get(pb.GetRequest(task_id=task.task_id))).task.status == status
        await stub.Cancel(pb.CancelRequest(task_id=blocker.task_id))


async def _running_and_queued(server: ServerThread) -> tuple[int, int]:
    scheduler = server.server.scheduler
    return scheduler.running, scheduler.queued


async def test_tasks_run_at_once_up_to_the_concurrency_limit_and_never_beyond(
    start_server: StartServer,
) -> None:
    limit, count = 3, 6
    server = start_server(concurrency=limit)
    handlers.gate.reset()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = TaskServiceStub(channel)
            since = await revision(stub)
            # Each `gated` handler waits until the gate opens, so nothing ends before that.
            ids = {(await create(stub, "gated")).task_id for _ in range(count)}
            running: set[str] = set()
            completed: set[str] = set()
            peak = 0
            stream = stub.Watch(pb.WatchRequest(since_revision=since), timeout=20)
            async for response in stream:  # if fewer than three ever run, it times out
                if response.type == pb.WATCH_EVENT_TYPE_HEARTBEAT:
                    continue
                task = response.task
                assert task.task_id in ids, task
                if task.status == RUNNING:
                    running.add(task.task_id)
                else:
                    running.discard(task.task_id)
                if task.status == COMPLETED:
                    completed.add(task.task_id)
                peak = max(peak, len(running))
                if len(running) == limit and not handlers.gate.opened.is_set():
                    # Every task was created, and the scheduler starts what it may at once:
                    # the rest stay queued. The limit's handlers really are in at once.
                    assert server.call(_running_and_queued(server)) == (limit, count - limit)
                    assert await asyncio.to_thread(handlers.gate.wait_inside, limit, 10)
                    handlers.gate.opened.set()
                if completed == ids:
                    break
            assert handlers.gate.opened.is_set()
        assert peak == limit  # seen by a watcher: three RUNNING at once, never four
        assert handlers.gate.peak == limit  # seen by the handlers themselves
    finally:
        handlers.gate.opened.set()


async def test_a_completed_retry_has_no_error_and_keeps_the_failed_attempts_apart(
    stub: TaskServiceAsyncStub,
) -> None:
    states = await run_and_watch(stub, "fail", {"times": 1, "message": "flaky"}, max_attempts=3)
    ended = states[-1]
    assert (ended.status, ended.attempt) == (COMPLETED, 2)
    assert not ended.HasField("error")
    assert (ended.last_attempt_error.code, ended.last_attempt_error.message) == (
        "HANDLER_ERROR",
        "RuntimeError: flaky",
    )
