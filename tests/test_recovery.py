"""A server restarted on its SQLite file carries on: tasks, revisions, history, and the
tasks that were running when it stopped (killed -9 here, which leaves them RUNNING in the
file; a graceful stop is in test_shutdown.py, and test_crash.py kills under load)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from conveyor.protojson import to_python
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskResponse
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.conftest import ServerThread
from tests.processes import Conveyord
from tests.support import (
    CANCELLED,
    COMPLETED,
    CREATED,
    FAILED,
    RUNNING,
    create,
    final,
    read,
    revision,
    wait_status,
    wait_until,
    watch,
)

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

StartServer = Callable[..., ServerThread]


def _store(tmp_path: Path) -> str:
    return f"sqlite:{tmp_path / 'tasks.db'}"


async def _get(stub: TaskServiceAsyncStub, task_id: str) -> TaskResponse:
    return (await stub.Get(pb.GetRequest(task_id=task_id))).task


def _killed(server: Conveyord) -> None:
    """Kill -9: the tasks it was running stay RUNNING in its file, as after any crash."""
    server.process.kill()
    server.process.wait()


async def test_a_crash_uses_the_attempt_and_a_task_with_attempts_left_is_retried(
    conveyord: Callable[..., Conveyord], tmp_path: Path
) -> None:
    store = _store(tmp_path)
    first = conveyord("--store", store)
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "sleep", {"seconds": 60}, max_attempts=2)
        running = await wait_status(stub, task.task_id, RUNNING)
    _killed(first)
    second = conveyord("--store", store)
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = TaskServiceStub(channel)
        stream = stub.Watch(pb.WatchRequest(task_id=task.task_id, since_revision=running.revision))
        retry, rerun = (await read(stream)).task, (await read(stream)).task
        assert (retry.status, retry.attempt, retry.error.code) == (CREATED, 2, "INTERRUPTED")
        assert "stopped while attempt 1 ran" in retry.error.message
        assert (rerun.status, rerun.attempt) == (RUNNING, 2)
        await stub.Cancel(pb.CancelRequest(task_id=task.task_id))
        assert (await final(stub, task.task_id)).status == CANCELLED


async def test_a_crash_fails_a_running_task_without_attempts_left(
    conveyord: Callable[..., Conveyord], tmp_path: Path
) -> None:
    store = _store(tmp_path)
    first = conveyord("--store", store)
    async with grpc.aio.insecure_channel(first.address) as channel:
        task = await create(TaskServiceStub(channel), "sleep", {"seconds": 60})
        await wait_status(TaskServiceStub(channel), task.task_id, RUNNING)
    _killed(first)
    second = conveyord("--store", store)
    async with grpc.aio.insecure_channel(second.address) as channel:
        ended = await _get(TaskServiceStub(channel), task.task_id)
    assert (ended.status, ended.attempt, ended.error.code) == (FAILED, 1, "INTERRUPTED")
    assert ended.HasField("finished_at")


async def test_an_accepted_cancel_of_a_running_task_survives(
    start_server: StartServer, tmp_path: Path
) -> None:
    first = start_server(store=_store(tmp_path), cancel_grace=60)
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "stubborn_async", max_attempts=3)
        await wait_status(stub, task.task_id, RUNNING)
        answer = (await stub.Cancel(pb.CancelRequest(task_id=task.task_id, reason="stop it"))).task
        assert answer.status == RUNNING and answer.HasField("cancel_requested_at")
    first.stop()
    second = start_server(store=_store(tmp_path))
    async with grpc.aio.insecure_channel(second.address) as channel:
        ended = await _get(TaskServiceStub(channel), task.task_id)
    assert (ended.status, ended.error.code, ended.error.message) == (
        CANCELLED,
        "CANCELLED",
        "stop it",
    )


async def test_queued_tasks_run_in_their_order_after_a_restart(
    start_server: StartServer, tmp_path: Path
) -> None:
    first = start_server(store=_store(tmp_path), concurrency=1, aging_per_minute=0)
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = TaskServiceStub(channel)
        # Stopped by the server, the blocker is queued again; at the lowest priority, it comes last.
        blocker = await create(stub, "sleep", {"seconds": 60}, priority=1)
        await wait_status(stub, blocker.task_id, RUNNING)
        queued = [
            await create(stub, "echo", {"i": i}, priority=p) for i, p in enumerate([2, 9, 2, 9, 5])
        ]
        since = await revision(stub)
    first.stop()
    second = start_server(store=_store(tmp_path), concurrency=1, aging_per_minute=0)
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = TaskServiceStub(channel)
        wanted = {t.task_id for t in queued}
        order: list[str] = []
        async for response in stub.Watch(pb.WatchRequest(since_revision=since)):
            if response.task.task_id in wanted and response.task.status == RUNNING:
                order.append(response.task.task_id)
                if len(order) == len(wanted):
                    break
    assert order == [t.task_id for t in sorted(queued, key=lambda t: -t.priority)]


async def test_revisions_and_history_carry_on_across_a_restart(
    start_server: StartServer, tmp_path: Path
) -> None:
    first = start_server(store=_store(tmp_path))
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = TaskServiceStub(channel)
        done = await create(stub, "echo", {"a": 1})
        ended = await final(stub, done.task_id)
        before = await revision(stub)
    first.stop()
    second = start_server(store=_store(tmp_path))
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = TaskServiceStub(channel)
        assert await revision(stub) == before
        assert await _get(stub, done.task_id) == ended
        assert to_python(ended.result) == {"a": 1}
        later = await create(stub, "echo")
        assert later.revision == before + 1
        # A watcher that saw revision `before` on the old server resumes with no gap.
        replay = await watch(stub, task_id=later.task_id, since_revision=before)
        assert [r.task.status for r in replay] == [CREATED, RUNNING, COMPLETED]
        assert [r.revision for r in replay] == sorted({r.revision for r in replay})
        # And the history from before the restart is still there.
        old = await watch(stub, task_id=done.task_id, since_revision=done.revision - 1)
        assert [r.task.status for r in old] == [CREATED, RUNNING, COMPLETED]


async def test_a_retry_that_was_waiting_still_happens(
    start_server: StartServer, tmp_path: Path
) -> None:
    first = start_server(store=_store(tmp_path), retry_initial=0.3)
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "fail", {"times": 1}, max_attempts=2)
        waiting = await wait_until(stub, task.task_id, lambda t: t.attempt == 2)
        assert waiting.status == CREATED and waiting.HasField("next_attempt_at")
    first.stop()
    second = start_server(store=_store(tmp_path))
    async with grpc.aio.insecure_channel(second.address) as channel:
        ended = await final(TaskServiceStub(channel), task.task_id)
    assert (ended.status, ended.attempt, to_python(ended.result)) == (COMPLETED, 2, {"attempt": 2})
