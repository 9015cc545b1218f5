"""Cancel: at once while queued; told, given a grace period, then stopped while running."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests import handlers
from tests.conftest import ServerThread
from tests.support import (
    CANCELLED,
    COMPLETED,
    CREATED,
    FAILED,
    RUNNING,
    create,
    error_reason,
    final,
    revision,
    wait_status,
    wait_until,
    watch,
)

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

StartServer = Callable[..., ServerThread]


async def test_cancel_of_a_queued_task_is_immediate(start_server: StartServer) -> None:
    server: ServerThread = start_server(concurrency=1)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        blocker = await create(stub, "sleep", {"seconds": 60})
        await wait_status(stub, blocker.task_id, RUNNING)
        queued = await create(stub, "echo")
        assert queued.status == CREATED
        cancelled = (
            await stub.Cancel(pb.CancelRequest(task_id=queued.task_id, reason="not needed"))
        ).task
        assert cancelled.status == CANCELLED
        assert (cancelled.error.code, cancelled.error.message) == ("CANCELLED", "not needed")
        assert cancelled.HasField("finished_at") and not cancelled.HasField("started_at")
        # It never runs, even once the slot frees.
        await stub.Cancel(pb.CancelRequest(task_id=blocker.task_id))
        await final(stub, blocker.task_id)
        assert (await stub.Get(pb.GetRequest(task_id=queued.task_id))).task == cancelled


async def test_cancel_of_a_running_task_tells_the_handler_and_ends_cancelled(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "sleep", {"seconds": 60, "steps": 1})
    await wait_status(stub, task.task_id, RUNNING)
    updates = stub.Watch(pb.WatchRequest(task_id=task.task_id))
    answer = (await stub.Cancel(pb.CancelRequest(task_id=task.task_id, reason="user left"))).task
    # Cancel answers at once: the handler has been told, and the task still runs.
    assert answer.status == RUNNING and answer.HasField("cancel_requested_at")
    states = [response.task async for response in updates]
    assert states[-1].status == CANCELLED
    assert (states[-1].error.code, states[-1].error.message) == ("CANCELLED", "user left")
    assert states[-1].cancel_requested_at == answer.cancel_requested_at


async def test_a_blocking_handler_sees_the_cancellation(stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "cooperative_blocking")
    await wait_status(stub, task.task_id, RUNNING)
    await stub.Cancel(pb.CancelRequest(task_id=task.task_id))
    ended = await final(stub, task.task_id)
    assert ended.status == CANCELLED
    assert ended.error.message == "cancelled by request"


async def test_an_async_handler_that_ignores_cancel_is_cancelled_after_the_grace(
    start_server: StartServer,
) -> None:
    grace = 0.3
    server: ServerThread = start_server(cancel_grace=grace, concurrency=1)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "stubborn_async")
        await wait_status(stub, task.task_id, RUNNING)
        await stub.Cancel(pb.CancelRequest(task_id=task.task_id, reason="stop"))
        ended = await final(stub, task.task_id)
        assert ended.status == CANCELLED
        # Not before its grace period was over.
        waited = ended.finished_at.ToNanoseconds() - ended.cancel_requested_at.ToNanoseconds()
        assert waited >= (grace - 0.01) * 1e9, waited
        # Its one slot is free again.
        assert (await final(stub, (await create(stub, "echo")).task_id)).status == COMPLETED


async def test_a_blocking_handler_that_ignores_cancel_is_abandoned_and_its_result_discarded(
    start_server: StartServer,
) -> None:
    server: ServerThread = start_server(cancel_grace=0.1, concurrency=1)
    handlers.abandoned_returned.clear()
    handlers.release_stubborn.clear()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "stubborn_blocking")
        await wait_status(stub, task.task_id, RUNNING)
        await stub.Cancel(pb.CancelRequest(task_id=task.task_id, reason="stop"))
        ended = await final(stub, task.task_id)
        assert ended.status == CANCELLED
        # The slot is free again although the thread still runs.
        assert (await final(stub, (await create(stub, "echo")).task_id)).status == COMPLETED
        handlers.release_stubborn.set()
        assert await asyncio.to_thread(handlers.abandoned_returned.wait, 10)
        rev = await revision(stub)
        # Whatever it did after being abandoned changed nothing: let its thread end and
        # the server's loop run what the thread handed it, then look again.
        for thread in threading.enumerate():
            if thread.name == f"conveyor-{task.task_id}":
                await asyncio.to_thread(thread.join, 10)
        server.call(asyncio.sleep(0))
        assert (await stub.Get(pb.GetRequest(task_id=task.task_id))).task == ended
        assert await revision(stub) == rev


async def test_cancelling_a_cancelled_task_is_a_no_op(stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "sleep", {"seconds": 60})
    await stub.Cancel(pb.CancelRequest(task_id=task.task_id, reason="first"))
    ended = await final(stub, task.task_id)
    again = (await stub.Cancel(pb.CancelRequest(task_id=task.task_id, reason="second"))).task
    assert again == ended
    assert again.error.message == "first"


@pytest.mark.parametrize(("task_type", "status"), [("echo", COMPLETED), ("fail", FAILED)])
async def test_cancelling_an_ended_task_is_failed_precondition(
    stub: TaskServiceAsyncStub, task_type: str, status: int
) -> None:
    task = await create(stub, task_type)
    ended = await final(stub, task.task_id)
    assert ended.status == status
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Cancel(pb.CancelRequest(task_id=task.task_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "TASK_ALREADY_ENDED"
    assert (await stub.Get(pb.GetRequest(task_id=task.task_id))).task == ended


async def test_cancel_of_an_unknown_task_is_not_found(stub: TaskServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Cancel(pb.CancelRequest(task_id=str(uuid.uuid4())))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_of_a_task_waiting_for_its_retry_is_immediate(
    start_server: StartServer,
) -> None:
    server: ServerThread = start_server(retry_initial=60)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "fail", max_attempts=3)
        waiting = await wait_until(
            stub, task.task_id, lambda t: t.status == CREATED and t.attempt == 2
        )
        assert waiting.HasField("next_attempt_at")
        cancelled = (await stub.Cancel(pb.CancelRequest(task_id=task.task_id))).task
        assert cancelled.status == CANCELLED
        assert not cancelled.HasField("next_attempt_at")
        assert [r.task.status for r in await watch(stub, task_id=task.task_id)] == [CANCELLED]
