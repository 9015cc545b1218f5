"""Bad and oversized input from outside: every answer is a clear error that a client with
gRPC's default limits can read, nothing changes, and no stored task can become unreadable."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_status import rpc_status

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskFilter, TaskRequest
from conveyord.convert import _length_delimited  # how the server frames a field, reused
from conveyord.limits import MAX_PARAMETERS_BYTES, MAX_RESULT_BYTES
from conveyord.validation import MAX_VIOLATIONS_SHOWN
from tests.support import (
    COMPLETED,
    FAILED,
    create,
    details,
    error_info,
    field_violations,
    final,
    task_request,
)

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

# What a client with gRPC's default settings accepts: 4 MiB messages, 8 KiB of metadata
# (grpc-message and the status details travel in the trailing metadata).
DEFAULT_CLIENT_LIMIT = 4 * 1024 * 1024


async def _refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def _list_all(stub: TaskServiceAsyncStub) -> list[Any]:
    tasks: list[Any] = []
    token = ""
    while True:
        page = await stub.List(pb.ListRequest(page_size=1000, page_token=token))
        tasks.extend(page.tasks)
        if not (token := page.next_page_token):
            return tasks


async def test_a_page_token_that_nests_deeply_is_invalid_argument(
    stub: TaskServiceAsyncStub,
) -> None:
    token = base64.urlsafe_b64encode(b"[" * 1000 + b"]" * 1000).decode()
    refused = await _refusal(stub.List(pb.ListRequest(page_token=token)))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(refused)


@pytest.mark.parametrize("token", ["A" * 10_000, base64.urlsafe_b64encode(b"1" * 40).decode()])
async def test_a_long_page_token_is_invalid_argument(
    stub: TaskServiceAsyncStub, token: str
) -> None:
    refused = await _refusal(stub.List(pb.ListRequest(page_token=token)))
    assert "page_token" in field_violations(refused)


@pytest.mark.parametrize("bad_keys", [100, 10_000])
async def test_an_error_naming_many_bad_fields_fits_a_default_client(
    stub: TaskServiceAsyncStub, bad_keys: int
) -> None:
    labels = {f"bad key {i}!": "v" for i in range(bad_keys)}
    refused = await _refusal(
        stub.Create(pb.CreateRequest(task=task_request("echo", labels=labels)))
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(refused)
    assert len(violations) == MAX_VIOLATIONS_SHOWN
    assert "task.labels" in violations  # the count of labels comes first
    assert details(refused).endswith(f"and {bad_keys + 1 - MAX_VIOLATIONS_SHOWN} more")


async def test_a_batch_of_bad_requests_gets_an_error_that_fits(stub: TaskServiceAsyncStub) -> None:
    labels = {f"bad key {i}!": "v" for i in range(64)}
    requests = [pb.CreateRequest(task=task_request("echo", labels=labels)) for _ in range(1000)]
    refused = await _refusal(stub.BatchCreate(pb.BatchCreateRequest(requests=requests)))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(field_violations(refused)) == MAX_VIOLATIONS_SHOWN
    assert len(details(refused)) < 4096
    assert await _list_all(stub) == []


def _nested(depth: int) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    inner = struct
    for _ in range(depth - 1):
        inner = inner.fields["next"].struct_value
    inner.fields["end"].number_value = 1
    return struct


@pytest.mark.parametrize(
    ("parameters", "problem"),
    [
        (
            struct_pb2.Struct(fields={"blob": struct_pb2.Value(string_value="x" * (1 << 20))}),
            "bytes",
        ),
        (_nested(33), "deeper than 32"),
    ],
)
async def test_parameters_past_their_caps_are_invalid(
    stub: TaskServiceAsyncStub, parameters: struct_pb2.Struct, problem: str
) -> None:
    request = pb.CreateRequest(task=TaskRequest(task_type="echo", parameters=parameters))
    refused = await _refusal(stub.Create(request))
    assert problem in field_violations(refused)["task.parameters"]
    assert await _list_all(stub) == []


async def test_parameters_at_their_caps_are_taken(stub: TaskServiceAsyncStub) -> None:
    blob = "x" * (MAX_PARAMETERS_BYTES - 100)
    task = await create(stub, "echo", {"blob": blob})
    assert (await final(stub, task.task_id)).status == COMPLETED
    request = pb.CreateRequest(task=TaskRequest(task_type="echo", parameters=_nested(32)))
    assert (await stub.Create(request)).task.task_id


async def test_a_result_past_its_cap_fails_the_attempt_and_the_task_stays_readable(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "sized_result", {"bytes": 5_000_000}, max_attempts=3)
    ended = await final(stub, task.task_id)
    assert (ended.status, ended.attempt, ended.error.code) == (FAILED, 1, "RESULT_TOO_LARGE")
    assert str(MAX_RESULT_BYTES) in ended.error.message
    assert (await stub.Get(pb.GetRequest(task_id=task.task_id))).task.status == FAILED
    fits = await create(stub, "sized_result", {"bytes": MAX_RESULT_BYTES - 100})
    assert (await final(stub, fits.task_id)).status == COMPLETED
    assert len(await _list_all(stub)) == 2


async def test_a_result_that_nests_too_deeply_is_refused(stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "deep_result", {"depth": 200})
    ended = await final(stub, task.task_id)
    assert (ended.status, ended.error.code) == (FAILED, "INVALID_RESULT")
    assert "deeper than 32 levels" in ended.error.message


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("big_detail", "REPORT_TOO_LARGE"),
        ("long_message", "REPORT_TOO_LARGE"),
        ("not_json", "INVALID_REPORT"),
    ],
)
async def test_a_report_past_its_caps_fails_the_attempt(
    stub: TaskServiceAsyncStub, kind: str, code: str
) -> None:
    task = await create(stub, "bad_report", {"kind": kind}, max_attempts=2)
    ended = await final(stub, task.task_id)
    assert (ended.status, ended.attempt, ended.error.code) == (FAILED, 1, code)
    assert (await stub.Get(pb.GetRequest(task_id=task.task_id))).task.error.code == code


async def test_a_page_of_large_tasks_holds_fewer_of_them(stub: TaskServiceAsyncStub) -> None:
    blob = "x" * (MAX_PARAMETERS_BYTES - 100)
    created = [
        (
            await stub.Create(
                pb.CreateRequest(task=task_request("sleep", {"seconds": 60, "b": blob}))
            )
        ).task.task_id
        for _ in range(6)
    ]
    first = await stub.List(pb.ListRequest(page_size=50, filter=TaskFilter(task_type="sleep")))
    assert 1 <= len(first.tasks) < 6 and first.next_page_token
    assert first.ByteSize() < DEFAULT_CLIENT_LIMIT
    listed = [task.task_id for task in await _list_all(stub)]
    assert listed == created
    for task_id in created:
        await stub.Cancel(pb.CancelRequest(task_id=task_id))


async def test_a_request_past_its_methods_limit_is_refused_unread(
    channel: grpc.aio.Channel,
) -> None:
    # A GetRequest padded with an unknown field to 4 MiB, as a hostile client might send.
    padding = b"x" * (4 * 1024 * 1024 - 64)
    unknown_field = _length_delimited(1000, padding)
    request = pb.GetRequest(task_id="0" * 8 + "-0000-4000-8000-" + "0" * 12).SerializeToString()
    get: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/conveyor.v1.TaskService/Get"
    )
    refused = await _refusal(get(request + unknown_field))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refused)
    assert (info.reason, info.metadata["limit_bytes"]) == ("REQUEST_TOO_LARGE", "4096")
    assert rpc_status.from_call(refused) is not None
