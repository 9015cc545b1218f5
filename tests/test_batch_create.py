"""BatchCreate: up to 1000 tasks, all validated before any is stored, answered in order."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.conftest import ServerThread
from tests.support import (
    COMPLETED,
    CREATED,
    RUNNING,
    create,
    details,
    error_reason,
    field_violations,
    final,
    revision,
    task_request,
    wait_status,
)

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

StartServer = Callable[..., ServerThread]


def _batch(count: int, **fields: object) -> pb.BatchCreateRequest:
    return pb.BatchCreateRequest(
        requests=[
            pb.CreateRequest(
                task=task_request("echo", {"i": i}, **fields), request_id=str(uuid.uuid4())
            )
            for i in range(count)
        ]
    )


async def test_a_batch_answers_with_the_tasks_in_order(stub: TaskServiceAsyncStub) -> None:
    request = _batch(5, priority=7)
    tasks = (await stub.BatchCreate(request)).tasks
    assert [t.parameters["i"] for t in tasks] == [0, 1, 2, 3, 4]
    assert all(t.status == CREATED and t.priority == 7 for t in tasks)
    assert len({t.task_id for t in tasks}) == 5
    assert [t.revision for t in tasks] == sorted(t.revision for t in tasks)
    for task in tasks:
        assert (await final(stub, task.task_id)).status == COMPLETED


async def test_a_batch_of_a_thousand_is_accepted(stub: TaskServiceAsyncStub) -> None:
    tasks = (await stub.BatchCreate(_batch(1000))).tasks
    assert len({t.task_id for t in tasks}) == 1000


async def test_a_replayed_batch_returns_the_same_tasks(stub: TaskServiceAsyncStub) -> None:
    request = _batch(3)
    first = (await stub.BatchCreate(request)).tasks
    again = (await stub.BatchCreate(request)).tasks
    assert [t.task_id for t in again] == [t.task_id for t in first]
    listed = await stub.List(pb.ListRequest())
    assert len(listed.tasks) == 3


@pytest.mark.parametrize("count", [0, 1001])
async def test_a_batch_of_the_wrong_size_is_invalid(stub: TaskServiceAsyncStub, count: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.BatchCreate(_batch(count))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 to 1000" in field_violations(caught.value)["requests"]


async def test_one_bad_request_refuses_the_whole_batch(stub: TaskServiceAsyncStub) -> None:
    request = _batch(4)
    request.requests[2].task.priority = 42
    request.requests[3].task.task_type = "missing"
    before = await revision(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.BatchCreate(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {
        "requests[2].task.priority",
        "requests[3].task.task_type",
    }
    assert await revision(stub) == before


async def test_one_request_id_twice_in_a_batch_is_invalid(stub: TaskServiceAsyncStub) -> None:
    request = _batch(3)
    request.requests[2].request_id = request.requests[0].request_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.BatchCreate(request)
    assert "requests[0]" in field_violations(caught.value)["requests[2].request_id"]


async def test_a_reused_request_id_refuses_the_whole_batch(stub: TaskServiceAsyncStub) -> None:
    earlier = await create(stub, "echo", {"x": 1}, request_id="taken")
    request = _batch(3)
    request.requests[1].request_id = "taken"  # with a different TaskRequest
    before = await revision(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.BatchCreate(request)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert earlier.task_id in details(caught.value)
    assert await revision(stub) == before


async def test_a_batch_that_does_not_fit_the_queue_stores_nothing(
    start_server: StartServer,
) -> None:
    server = start_server(concurrency=1, max_queued=5)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        blocker = await create(stub, "sleep", {"seconds": 60})
        await wait_status(stub, blocker.task_id, RUNNING)
        await stub.BatchCreate(_batch(3))
        before = await revision(stub)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.BatchCreate(_batch(3))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(caught.value) == "QUEUE_FULL"
        assert await revision(stub) == before
        assert len((await stub.BatchCreate(_batch(2))).tasks) == 2  # what fits is taken
        await stub.Cancel(pb.CancelRequest(task_id=blocker.task_id))
