"""A deploy is not the task's failure: a real conveyord stopped by SIGTERM while a task runs
tells its handler at once, queues the attempt again without using it, and the next server
on the same file runs it; a task interrupted too often uses its attempts after all."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import grpc

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskResponse
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.processes import Conveyord
from tests.support import CREATED, FAILED, RUNNING, create, read, wait_status, wait_until

Start = Callable[..., Conveyord]


def _on_file(tmp_path: Path) -> tuple[str, ...]:
    return ("--store", f"sqlite:{tmp_path / 'tasks.db'}", "--handlers", "tests.handlers")


def _stopped(server: Conveyord) -> None:
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0


async def _running_again(server: Conveyord, task_id: str) -> TaskResponse:
    async with grpc.aio.insecure_channel(server.address) as channel:
        return await wait_status(TaskServiceStub(channel), task_id, RUNNING)


async def test_a_task_stopped_by_a_deploy_runs_again_on_the_same_attempt(
    conveyord: Start, tmp_path: Path
) -> None:
    options = (*_on_file(tmp_path), "--shutdown-grace", "30")
    first = conveyord(*options)
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "cooperative_blocking")  # one attempt, the default
        running = await wait_status(stub, task.task_id, RUNNING)
    _stopped(first)

    second = conveyord(*options)
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = TaskServiceStub(channel)
        history = stub.Watch(pb.WatchRequest(task_id=task.task_id, since_revision=running.revision))
        queued = (await read(history)).task
        assert (queued.status, queued.attempt, queued.error.code) == (CREATED, 1, "INTERRUPTED")
        assert "without using an attempt (interruption 1 of at most 3)" in queued.message
        again = await wait_until(stub, task.task_id, lambda t: t.status == RUNNING)
        assert again.attempt == 1
        history.cancel()


async def test_a_task_interrupted_past_the_limit_uses_its_attempt(
    conveyord: Start, tmp_path: Path
) -> None:
    options = (*_on_file(tmp_path), "--max-interruptions", "1")
    first = conveyord(*options)
    async with grpc.aio.insecure_channel(first.address) as channel:
        task = await create(TaskServiceStub(channel), "cooperative_blocking")
    await _running_again(first, task.task_id)
    _stopped(first)  # interruption 1 of 1: queued again

    second = conveyord(*options)
    assert (await _running_again(second, task.task_id)).attempt == 1
    _stopped(second)  # one more: this time the attempt is used, and it was the only one

    third = conveyord(*options)
    async with grpc.aio.insecure_channel(third.address) as channel:
        ended = (await TaskServiceStub(channel).Get(pb.GetRequest(task_id=task.task_id))).task
    assert (ended.status, ended.attempt, ended.error.code) == (FAILED, 1, "INTERRUPTED")
    assert "after 1 earlier interruptions" in ended.error.message
