"""Bad input: INVALID_ARGUMENT naming the field, nothing changed, never INTERNAL or UNKNOWN."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskFilter, TaskStatus
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.conftest import ServerThread
from tests.support import field_violations, revision, task_request

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


async def _invalid(stub: TaskServiceAsyncStub, call: Any) -> dict[str, str]:
    before = await revision(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert await revision(stub) == before, "a refused request changed the store"
    return field_violations(caught.value)


@pytest.mark.parametrize(
    ("task", "field", "words"),
    [
        ({"task_type": ""}, "task.task_type", "is required"),
        ({"task_type": "no_such_type"}, "task.task_type", "not a registered task type"),
        ({"priority": 0}, "task.priority", "between 1 and 10"),
        ({"priority": 11}, "task.priority", "between 1 and 10"),
        ({"timeout_seconds": -1}, "task.timeout_seconds", "positive"),
        ({"timeout_seconds": 0}, "task.timeout_seconds", "positive"),
        ({"timeout_seconds": math.nan}, "task.timeout_seconds", "positive"),
        ({"max_attempts": 0}, "task.max_attempts", "between 1 and 100"),
        ({"max_attempts": 101}, "task.max_attempts", "between 1 and 100"),
        ({"description": "x" * 4097}, "task.description", "longer than 4096"),
        ({"labels": {"": "v"}}, "task.labels['']", "label key"),
        ({"labels": {"k": "v" * 256}}, "task.labels['k']", "longer than 255"),
        ({"labels": {f"k{i}": "" for i in range(65)}}, "task.labels", "at most 64"),
    ],
)
async def test_a_bad_task_request_names_the_field(
    stub: TaskServiceAsyncStub, task: dict[str, Any], field: str, words: str
) -> None:
    fields = {"task_type": "echo", **task}
    request = pb.CreateRequest(task=task_request(**fields))
    violations = await _invalid(stub, stub.Create(request))
    assert words in violations[field]


async def test_every_bad_field_is_named_at_once(stub: TaskServiceAsyncStub) -> None:
    request = pb.CreateRequest(
        task=task_request("nope", priority=42, timeout_seconds=-5), request_id="r" * 129
    )
    violations = await _invalid(stub, stub.Create(request))
    assert set(violations) == {
        "task.task_type",
        "task.priority",
        "task.timeout_seconds",
        "request_id",
    }


async def test_a_create_without_a_task_is_invalid(stub: TaskServiceAsyncStub) -> None:
    assert "task" in await _invalid(stub, stub.Create(pb.CreateRequest()))


@pytest.mark.parametrize("bad_id", ["", "42", "not-a-uuid", "g" * 36])
async def test_a_malformed_task_id_is_invalid_everywhere(
    stub: TaskServiceAsyncStub, bad_id: str
) -> None:
    assert "task_id" in await _invalid(stub, stub.Get(pb.GetRequest(task_id=bad_id)))
    assert "task_id" in await _invalid(stub, stub.Cancel(pb.CancelRequest(task_id=bad_id)))


async def test_a_cancel_reason_that_is_too_long_is_invalid(stub: TaskServiceAsyncStub) -> None:
    request = pb.CancelRequest(task_id=str(uuid.uuid4()), reason="r" * 1025)
    assert "reason" in await _invalid(stub, stub.Cancel(request))


@pytest.mark.parametrize("page_size", [-1, 1001])
async def test_a_page_size_out_of_range_is_invalid(
    stub: TaskServiceAsyncStub, page_size: int
) -> None:
    violations = await _invalid(stub, stub.List(pb.ListRequest(page_size=page_size)))
    assert "between 0 and 1000" in violations["page_size"]


@pytest.mark.parametrize("token", ["garbage", "!!!", "eyJhZnRlciI6IC0xfQ", "e30"])
async def test_a_malformed_page_token_is_invalid(stub: TaskServiceAsyncStub, token: str) -> None:
    violations = await _invalid(stub, stub.List(pb.ListRequest(page_token=token)))
    assert "page token" in violations["page_token"]


async def test_a_bad_list_filter_is_invalid(stub: TaskServiceAsyncStub) -> None:
    statuses = [TaskStatus.ValueType(1), TaskStatus.ValueType(99)]  # 99 names no status
    request = pb.ListRequest(filter=TaskFilter(statuses=statuses))
    assert "filter.statuses[1]" in await _invalid(stub, stub.List(request))


METHODS = ["Create", "BatchCreate", "Get", "List", "Cancel"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(method=st.sampled_from([*METHODS, "Watch"]), payload=st.binary(max_size=64))
def test_arbitrary_bytes_never_yield_internal_or_unknown(
    server: ServerThread, method: str, payload: bytes
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        path = f"/conveyor.v1.TaskService/{method}"
        try:
            if method == "Watch":
                watch: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
                call = watch(payload, timeout=1)
                for _ in call:
                    break
                call.cancel()
            else:
                unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
                unary(payload, timeout=5)
        except grpc.RpcError as error:
            assert error.code() not in NEVER, (error.code(), error.details())


_text = st.text(max_size=70)
_labels = st.dictionaries(_text, _text, max_size=3)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    task_type=st.sampled_from(["echo", "", "missing", "sleep"]),
    priority=st.none() | st.integers(-(2**31), 2**31 - 1),
    timeout=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    attempts=st.none() | st.integers(-(2**31), 2**31 - 1),
    labels=_labels,
    request_id=st.text(max_size=140),
    description=st.text(max_size=50),
)
def test_any_create_request_is_answered_cleanly(
    server: ServerThread,
    task_type: str,
    priority: int | None,
    timeout: float | None,
    attempts: int | None,
    labels: dict[str, str],
    request_id: str,
    description: str,
) -> None:
    fields: dict[str, Any] = {"labels": labels, "description": description}
    if priority is not None:
        fields["priority"] = priority
    if timeout is not None:
        fields["timeout_seconds"] = timeout
    if attempts is not None:
        fields["max_attempts"] = attempts
    request = pb.CreateRequest(
        task=task_request(task_type, {"seconds": 0}, **fields), request_id=request_id
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        try:
            stub.Create(request, timeout=5)
        except grpc.RpcError as error:
            assert error.code() in {
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.ALREADY_EXISTS,
            }, (error.code(), error.details())


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    task_id=st.text(max_size=40),
    page_size=st.integers(-(2**31), 2**31 - 1),
    page_token=st.text(max_size=40),
    statuses=st.lists(st.integers(-5, 10), max_size=3),
    labels=_labels,
)
def test_any_read_request_is_answered_cleanly(
    server: ServerThread,
    task_id: str,
    page_size: int,
    page_token: str,
    statuses: list[TaskStatus.ValueType],
    labels: dict[str, str],
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        task_filter = TaskFilter(statuses=statuses, labels=labels)
        calls: list[Callable[[], object]] = [
            lambda: stub.Get(pb.GetRequest(task_id=task_id), timeout=5),
            lambda: stub.Cancel(pb.CancelRequest(task_id=task_id), timeout=5),
            lambda: stub.List(
                pb.ListRequest(page_size=page_size, page_token=page_token, filter=task_filter),
                timeout=5,
            ),
        ]
        for call in calls:
            try:
                call()
            except grpc.RpcError as error:
                assert error.code() in {
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.NOT_FOUND,
                }, (error.code(), error.details())
