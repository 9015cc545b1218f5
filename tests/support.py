"""Small helpers for talking to a server through the generated stubs in tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.protojson import dict_to_struct, to_python
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

Status = task_pb2.TaskStatus
CREATED = task_pb2.TASK_STATUS_CREATED
RUNNING = task_pb2.TASK_STATUS_RUNNING
COMPLETED = task_pb2.TASK_STATUS_COMPLETED
FAILED = task_pb2.TASK_STATUS_FAILED
CANCELLED = task_pb2.TASK_STATUS_CANCELLED
PAUSED = task_pb2.TASK_STATUS_PAUSED
WAITING_INPUT = task_pb2.TASK_STATUS_WAITING_INPUT
TERMINAL = {COMPLETED, FAILED, CANCELLED}


def task_request(task_type: str, parameters: dict[str, Any] | None = None, **fields: Any) -> Any:
    request = task_pb2.TaskRequest(task_type=task_type, **fields)
    if parameters:
        request.parameters.CopyFrom(dict_to_struct(parameters))
    return request


async def create(
    stub: TaskServiceAsyncStub,
    task_type: str,
    parameters: dict[str, Any] | None = None,
    *,
    request_id: str = "",
    **fields: Any,
) -> task_pb2.TaskResponse:
    request = pb.CreateRequest(
        task=task_request(task_type, parameters, **fields), request_id=request_id
    )
    return (await stub.Create(request)).task


async def watch(stub: TaskServiceAsyncStub, **request: Any) -> list[pb.WatchResponse]:
    """Every response of a Watch of one task, until the server ends the stream."""
    return [response async for response in stub.Watch(pb.WatchRequest(**request))]


async def run_and_watch(
    stub: TaskServiceAsyncStub,
    task_type: str,
    parameters: dict[str, Any] | None = None,
    **fields: Any,
) -> list[task_pb2.TaskResponse]:
    """Create a task and return every state it went through, from CREATED to its end."""
    since = await revision(stub)
    task = await create(stub, task_type, parameters, **fields)
    responses = await watch(stub, task_id=task.task_id, since_revision=since)
    return [response.task for response in responses]


async def wait_until(
    stub: TaskServiceAsyncStub, task_id: str, condition: Callable[[task_pb2.TaskResponse], bool]
) -> task_pb2.TaskResponse:
    """Watch a task until its state meets `condition`; return that state."""
    async for response in stub.Watch(pb.WatchRequest(task_id=task_id)):
        if condition(response.task):
            return response.task
    raise AssertionError(f"task {task_id} ended without meeting the condition")


async def eventually(attempt: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> bool:
    """Whether `attempt` returns True within `seconds`, tried again every tenth of one (for
    a state other processes or replicas reach without telling: a refusal that comes, a
    database that is reachable again)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await attempt():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def wait_status(
    stub: TaskServiceAsyncStub, task_id: str, status: int
) -> task_pb2.TaskResponse:
    return await wait_until(stub, task_id, lambda task: task.status == status)


async def final(stub: TaskServiceAsyncStub, task_id: str) -> task_pb2.TaskResponse:
    """The task's terminal state, as the last response of its Watch."""
    responses = await watch(stub, task_id=task_id)
    assert responses[-1].task.status in TERMINAL
    return responses[-1].task


def result_of(task: task_pb2.TaskResponse) -> Any:
    """The task's result as Python values."""
    return to_python(task.result)


async def revision(stub: TaskServiceAsyncStub) -> int:
    return (await stub.List(pb.ListRequest(page_size=1))).revision


async def read(stream: grpc.aio.UnaryStreamCall[Any, pb.WatchResponse]) -> pb.WatchResponse:
    """The next response of a Watch stream (`read` itself is typed as possibly EOF)."""
    response = await stream.read()
    assert isinstance(response, pb.WatchResponse), f"the stream ended: {response!r}"
    return response


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations of an INVALID_ARGUMENT error, by field."""
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status details"
    violations: dict[str, str] = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations.update({v.field: v.description for v in bad_request.field_violations})
    return violations


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo an error carries."""
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("the error carries no ErrorInfo")


def error_reason(error: grpc.aio.AioRpcError) -> str:
    reason: str = error_info(error).reason
    return reason


def details(error: grpc.aio.AioRpcError) -> str:
    """The status message of an error (typed as optional, but a server's error has one)."""
    message = error.details()
    assert message is not None
    return message
