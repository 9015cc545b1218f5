"""Pause and resume of running tasks, and input to tasks, through a real server (with a
controllable clock where time matters): handlers that park at a pause point and wait for
input, on the local worker; a restart while parked or waiting; a retried attempt that sees
the inputs of the first. Remote workers: tests/test_worker.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from conveyor.protojson import dict_to_struct
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.conftest import ManualClock, ServerThread
from tests.support import (
    CANCELLED,
    COMPLETED,
    CREATED,
    FAILED,
    PAUSED,
    RUNNING,
    WAITING_INPUT,
    create,
    error_reason,
    field_violations,
    final,
    result_of,
    wait_status,
    wait_until,
)

if TYPE_CHECKING:
    from conveyor.v1 import task_pb2
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

StartServer = Callable[..., ServerThread]


@pytest.fixture
def clocked(start_server: StartServer) -> ServerThread:
    return start_server(clock=ManualClock())


@pytest.fixture
async def stub(clocked: ServerThread) -> Any:
    async with grpc.aio.insecure_channel(clocked.address) as channel:
        yield TaskServiceStub(channel)


async def send(
    stub: TaskServiceAsyncStub, task_id: str, data: dict[str, Any], request_id: str = ""
) -> pb.SendInputResponse:
    request = pb.SendInputRequest(
        task_id=task_id, request_id=request_id, input=dict_to_struct(data)
    )
    answer: pb.SendInputResponse = await stub.SendInput(request)
    return answer


async def pause(stub: TaskServiceAsyncStub, task_id: str, reason: str = "") -> pb.PauseResponse:
    answer: pb.PauseResponse = await stub.Pause(pb.PauseRequest(task_id=task_id, reason=reason))
    return answer


async def resume(stub: TaskServiceAsyncStub, task_id: str) -> task_pb2.TaskResponse:
    return (await stub.Resume(pb.ResumeRequest(task_id=task_id))).task


# -- pause of a running task ------------------------------------------------------------


@pytest.mark.parametrize("task_type", ["pausable", "pausable_blocking"])
async def test_a_running_handler_parks_and_its_timeout_waits_while_it_is_paused(
    clocked: ServerThread, stub: TaskServiceAsyncStub, task_type: str
) -> None:
    task = await create(stub, task_type, {"steps": 500}, timeout_seconds=10)
    await wait_status(stub, task.task_id, RUNNING)
    asked = await pause(stub, task.task_id, "look at it first")
    assert asked.paused and asked.task.status == RUNNING
    assert asked.task.HasField("pause_requested_at")
    parked = await wait_status(stub, task.task_id, PAUSED)
    assert parked.pause_reason == "look at it first" and not parked.HasField("pause_requested_at")
    clocked.advance(60)  # six timeouts, parked: it must not count
    running = await resume(stub, task.task_id)
    assert running.status == RUNNING and not running.pause_reason
    done = await final(stub, task.task_id)
    assert (done.status, done.result.struct_value["parks"]) == (COMPLETED, 1)


async def test_a_parked_task_keeps_its_slot(start_server: StartServer) -> None:
    server = start_server(concurrency=1)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "pausable", {"steps": 500})
        await wait_status(stub, task.task_id, RUNNING)
        await pause(stub, task.task_id)
        await wait_status(stub, task.task_id, PAUSED)
        other = await create(stub, "echo")
        assert (await stub.Get(pb.GetRequest(task_id=other.task_id))).task.status == CREATED
        await resume(stub, task.task_id)
        assert (await final(stub, task.task_id)).status == COMPLETED
        assert (await final(stub, other.task_id)).status == COMPLETED


async def test_a_cancel_reaches_a_parked_handler(stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "pausable_blocking")
    await wait_status(stub, task.task_id, RUNNING)
    await pause(stub, task.task_id)
    await wait_status(stub, task.task_id, PAUSED)
    await stub.Cancel(pb.CancelRequest(task_id=task.task_id, reason="not needed"))
    ended = await final(stub, task.task_id)
    assert (ended.status, ended.error.message, ended.pause_reason) == (CANCELLED, "not needed", "")


async def test_a_resume_before_the_handler_parks_withdraws_the_pause(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "pause_point_after_input")  # its pause point waits for input
    await wait_status(stub, task.task_id, RUNNING)
    asked = await pause(stub, task.task_id)
    assert asked.paused and asked.task.HasField("pause_requested_at")
    withdrawn = await resume(stub, task.task_id)
    assert withdrawn.status == RUNNING and not withdrawn.HasField("pause_requested_at")
    await send(stub, task.task_id, {"go": True})  # now it reaches its pause point
    done = await final(stub, task.task_id)
    assert (done.status, done.result.struct_value["parked"]) == (COMPLETED, False)


async def test_a_pause_of_a_handler_that_cannot_pause_is_refused(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "cooperative_blocking")  # not marked pausable
    await wait_status(stub, task.task_id, RUNNING)
    refused = await pause(stub, task.task_id)
    assert not refused.paused and not refused.task.HasField("pause_requested_at")
    await stub.Cancel(pb.CancelRequest(task_id=task.task_id))
    assert (await final(stub, task.task_id)).status == CANCELLED


async def test_a_task_parked_when_the_server_stops_is_held_paused_across_the_restart(
    start_server: StartServer, tmp_path: Any
) -> None:
    store = f"sqlite:{tmp_path / 'tasks.db'}"
    first = start_server(store=store)
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "pausable", {"steps": 500})
        await wait_status(stub, task.task_id, RUNNING)
        await pause(stub, task.task_id, "overnight")
        await wait_status(stub, task.task_id, PAUSED)
    first.stop()
    again = start_server(store=store)
    async with grpc.aio.insecure_channel(again.address) as channel:
        stub = TaskServiceStub(channel)
        held = (await stub.Get(pb.GetRequest(task_id=task.task_id))).task
        assert (held.status, held.pause_reason, held.attempt) == (PAUSED, "overnight", 1)
        assert (await resume(stub, task.task_id)).status == CREATED
        done = await final(stub, task.task_id)
        assert (done.status, done.result.struct_value["parks"]) == (COMPLETED, 0)


# -- input -------------------------------------------------------------------------------


async def test_inputs_sent_before_and_after_a_wait_reach_the_handler_in_order(
    clocked: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    task = await create(stub, "ask", start_after_seconds=60)
    first = await send(stub, task.task_id, {"text": "Ann"})  # before it runs
    assert (first.sequence, first.task.status, first.task.input_count) == (1, CREATED, 1)
    clocked.advance(60)
    waiting = await wait_status(stub, task.task_id, WAITING_INPUT)
    assert (waiting.input_prompt, waiting.input_label) == ("your colour?", "colour")
    assert not waiting.HasField("input_deadline")
    second = await send(stub, task.task_id, {"text": "green"})  # while it waits
    assert (second.sequence, second.task.status) == (2, CREATED)
    done = await final(stub, task.task_id)
    assert done.status == COMPLETED and not done.input_prompt
    assert result_of(done)["name"]["text"] == "Ann"
    assert result_of(done)["colour"]["text"] == "green"


async def test_inputs_sent_while_a_task_runs_reach_its_handler_at_once(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "collect", {"count": 2})
    await wait_status(stub, task.task_id, RUNNING)
    await send(stub, task.task_id, {"n": 1})
    await send(stub, task.task_id, {"n": 2})
    done = await final(stub, task.task_id)
    assert [item["n"] for item in result_of(done)] == [1, 2]


async def test_a_retried_attempt_sees_every_input_from_the_first(
    clocked: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    task = await create(stub, "collect", {"count": 1, "fail_until": 2}, max_attempts=2)
    await wait_status(stub, task.task_id, RUNNING)
    await send(stub, task.task_id, {"n": 1})
    await wait_until(stub, task.task_id, lambda t: t.attempt == 2 and t.status == CREATED)
    clocked.advance(1)  # its retry's backoff
    done = await final(stub, task.task_id)
    assert (done.status, done.attempt) == (COMPLETED, 2)
    assert [item["n"] for item in result_of(done)] == [1]


async def test_an_input_is_kept_once_per_request_id(stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "ask")
    await wait_status(stub, task.task_id, WAITING_INPUT)
    once = await send(stub, task.task_id, {"text": "Ann"}, request_id="r-1")
    again = await send(stub, task.task_id, {"text": "Ann"}, request_id="r-1")
    assert once.sequence == again.sequence == 1 and again.task.input_count == 1
    waiting = await wait_until(
        stub, task.task_id, lambda t: t.status == WAITING_INPUT and t.input_label == "colour"
    )
    assert waiting.input_count == 1


async def test_a_wait_for_input_that_times_out_fails_the_task(
    clocked: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    task = await create(stub, "ask", {"timeout": 30})
    waiting = await wait_status(stub, task.task_id, WAITING_INPUT)
    assert waiting.HasField("input_deadline")
    clocked.advance(31)
    ended = await final(stub, task.task_id)
    assert (ended.status, ended.error.code) == (FAILED, "INPUT_TIMEOUT")
    assert "your name?" in ended.error.message


async def test_a_waiting_task_paused_and_resumed_waits_again(stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "ask")
    await wait_status(stub, task.task_id, WAITING_INPUT)
    held = await pause(stub, task.task_id, "later")
    assert held.paused and (held.task.status, held.task.input_prompt) == (PAUSED, "")
    await send(stub, task.task_id, {"text": "Ann"})  # kept while paused
    assert (await resume(stub, task.task_id)).status == CREATED
    again = await wait_until(stub, task.task_id, lambda t: t.input_label == "colour")
    assert again.status == WAITING_INPUT


async def test_a_waiting_task_and_its_inputs_survive_a_restart(
    start_server: StartServer, tmp_path: Any
) -> None:
    store = f"sqlite:{tmp_path / 'tasks.db'}"
    first = start_server(store=store)
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "ask")
        await send(stub, task.task_id, {"text": "Ann"})
        await wait_until(stub, task.task_id, lambda t: t.input_label == "colour")
    first.stop()
    again = start_server(store=store)
    async with grpc.aio.insecure_channel(again.address) as channel:
        stub = TaskServiceStub(channel)
        kept = (await stub.Get(pb.GetRequest(task_id=task.task_id))).task
        assert (kept.status, kept.input_prompt, kept.input_count) == (
            WAITING_INPUT,
            "your colour?",
            1,
        )
        await send(stub, task.task_id, {"text": "green"})
        done = await final(stub, task.task_id)
        assert result_of(done)["name"]["text"] == "Ann"
        assert done.result.struct_value["inputs"] == 2


async def test_bad_inputs_are_refused_and_change_nothing(stub: TaskServiceAsyncStub) -> None:
    done = await create(stub, "echo")
    await final(stub, done.task_id)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await send(stub, done.task_id, {"late": True})
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(ended.value) == "TASK_ALREADY_ENDED"
    task = await create(stub, "ask", start_after_seconds=3600)
    with pytest.raises(grpc.aio.AioRpcError) as large:
        await send(stub, task.task_id, {"text": "x" * 70_000})
    assert "at most 65536" in field_violations(large.value)["input"]
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.SendInput(pb.SendInputRequest(task_id="nope", request_id="r" * 200))
    assert set(field_violations(bad.value)) == {"task_id", "request_id"}
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await send(stub, "0f0e0d0c-0b0a-4908-8706-050403020100", {})
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    kept = (await stub.Get(pb.GetRequest(task_id=task.task_id))).task
    assert kept.input_count == 0


async def test_a_task_keeps_at_most_so_many_inputs(stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "ask", start_after_seconds=3600)
    data = {"text": "x" * 63_000}
    fits = (1024 * 1024) // dict_to_struct(data).ByteSize()  # 16 such inputs in 1 MiB
    for _ in range(fits):
        await send(stub, task.task_id, data)
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await send(stub, task.task_id, data)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(full.value) == "TASK_INPUTS_FULL"
    kept = (await stub.Get(pb.GetRequest(task_id=task.task_id))).task
    assert kept.input_count == fits
