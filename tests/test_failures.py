"""Failures you can act on, against a real server: a failed attempt keeps its error's type and
traceback (the last 16 KiB), the history of attempts is read with the task, a handler fails
without retry, puts off its next attempt or leaves a checkpoint for it, and task types have
retry defaults. Run by the server's own handlers, by a Python worker (conveyor.worker) and
by a worker that speaks the protocol alone."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from conveyor import AttemptFailed, NonRetryableError
from conveyor.cli import main
from conveyor.handlers import HandlerRegistry, error_type_of, traceback_of
from conveyor.limits import MAX_TRACEBACK_BYTES
from conveyor.protojson import dict_to_struct, struct_to_dict
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1 import worker_service_pb2 as wpb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyor.v1.worker_service_pb2_grpc import WorkerServiceStub
from conveyor.worker import Worker
from conveyord.cli import build_parser, config_from_args
from conveyord.lifecycle import TypeRetry
from conveyord.worker.local import LOCAL_HOLDER
from tests.conftest import ManualClock, ServerThread
from tests.failure_handlers import Unreachable
from tests.support import (
    COMPLETED,
    CREATED,
    FAILED,
    create,
    field_violations,
    final,
    result_of,
    wait_until,
)
from tests.test_worker_protocol import Session

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub
    from conveyor.v1.worker_service_pb2_grpc import WorkerServiceAsyncStub

StartServer = Callable[..., ServerThread]
FAILED_ATTEMPT = task_pb2.ATTEMPT_OUTCOME_FAILED
COMPLETED_ATTEMPT = task_pb2.ATTEMPT_OUTCOME_COMPLETED
REMOTE = "remote.echo"  # run by the protocol-only worker of these tests
PYTHON_TYPES = frozenset({
    "remote.custom_failure", "remote.non_retryable", "remote.retry_later",
    "remote.checkpointed", "remote.flaky",
})  # fmt: skip


def _seconds(timestamp: timestamp_pb2.Timestamp) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


async def _with_attempts(stub: TaskServiceAsyncStub, task_id: str) -> task_pb2.TaskResponse:
    request = pb.GetRequest(task_id=task_id, include_attempts=True)
    return (await stub.Get(request)).task


@pytest.fixture
async def stub(server: ServerThread) -> AsyncIterator[TaskServiceAsyncStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield TaskServiceStub(channel)


# -- what a failed attempt keeps --------------------------------------------------------


async def test_a_failed_task_keeps_its_exception_s_type_message_and_traceback(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "raises_key_error")
    error = (await final(stub, task.task_id)).error
    assert (error.code, error.message, error.error_type) == (
        "HANDLER_ERROR", "KeyError: 'missing-key'", "KeyError",
    )  # fmt: skip
    assert error.traceback.startswith("Traceback (most recent call last):\n")
    assert 'return {}["missing-key"]' in error.traceback  # the line that raised
    assert error.traceback.endswith("KeyError: 'missing-key'\n") and not error.non_retryable

    custom = await final(stub, (await create(stub, "custom_failure")).task_id)
    assert custom.error.error_type == "tests.failure_handlers.Unreachable"  # with its module
    assert custom.error.message == "Unreachable: the backend did not answer"


async def test_a_long_traceback_keeps_its_last_16_kib_and_says_what_was_cut(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "chained_failure", {"links": 300})
    traceback = (await final(stub, task.task_id)).error.traceback
    assert 15_000 < len(traceback.encode()) <= MAX_TRACEBACK_BYTES
    first, _, rest = traceback.partition("\n")
    assert first.startswith("[the traceback's first ") and "bytes were cut" in first
    assert rest.endswith("ValueError: the last link\n")  # the end, where it failed, is kept
    assert "LookupError: link 299" in rest and "LookupError: link 0\n" not in rest


def test_a_traceback_is_cut_between_characters_never_inside_one() -> None:
    try:
        raise ValueError("é" * 20_000)  # two bytes each: the cut falls on one or between
    except ValueError as error:
        kept = traceback_of(error)
    assert len(kept.encode()) <= MAX_TRACEBACK_BYTES
    assert kept.endswith("é" * 100 + "\n") and "\ufffd" not in kept
    assert error_type_of(Unreachable()) == "tests.failure_handlers.Unreachable"
    assert error_type_of(KeyError()) == "KeyError"


# -- the history of attempts -------------------------------------------------------------


async def test_the_attempts_of_a_retried_task_are_read_with_it_when_asked(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "flaky", {"failures": 2}, max_attempts=3)
    done = await final(stub, task.task_id)
    assert (done.status, done.attempt) == (COMPLETED, 3)
    assert len(done.attempts) == 0  # a Watch event does not carry them
    assert len((await stub.Get(pb.GetRequest(task_id=task.task_id))).task.attempts) == 0

    attempts = (await _with_attempts(stub, task.task_id)).attempts
    assert [(a.number, a.outcome, a.worker) for a in attempts] == [
        (1, FAILED_ATTEMPT, LOCAL_HOLDER),
        (2, FAILED_ATTEMPT, LOCAL_HOLDER),
        (3, COMPLETED_ATTEMPT, LOCAL_HOLDER),
    ]
    assert [a.error.error_type for a in attempts[:2]] == ["KeyError", "KeyError"]
    assert attempts[0].error.traceback.endswith("KeyError: 'missing-key'\n")
    assert not attempts[2].HasField("error")
    for earlier, later in itertools.pairwise(attempts):
        assert _seconds(earlier.started_at) <= _seconds(earlier.ended_at)
        assert _seconds(earlier.ended_at) <= _seconds(later.started_at)
    assert _seconds(attempts[2].ended_at) == _seconds(done.finished_at)
    assert done.last_attempt_error.error_type == "KeyError"  # the failure stays in view


# -- no retry, a retry delay, a checkpoint ------------------------------------------------


async def test_a_non_retryable_error_fails_the_task_at_once_with_attempts_left(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "non_retryable", {"n": "twelve"}, max_attempts=5)
    ended = await _with_attempts(stub, (await final(stub, task.task_id)).task_id)
    assert (ended.status, ended.attempt, ended.max_attempts) == (FAILED, 1, 5)
    assert ended.error.non_retryable
    assert ended.error.message == "NonRetryableError: n must be a whole number"
    assert "ValueError: invalid literal for int()" in ended.error.traceback  # its cause
    assert [a.outcome for a in ended.attempts] == [FAILED_ATTEMPT]


async def test_the_handler_s_retry_delay_sets_the_next_attempt_s_time(
    start_server: StartServer,
) -> None:
    clock = ManualClock()
    server = start_server(clock=clock)  # a backoff of 0.05 s, which the handler overrides
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "retry_later", {"delay": 120}, max_attempts=2)
        waiting = await wait_until(stub, task.task_id, lambda t: t.attempt == 2)
        assert waiting.status == CREATED
        assert _seconds(waiting.next_attempt_at) == pytest.approx(clock.now + 120)
        assert waiting.error.message == "AttemptFailed: the backend is busy"
        server.advance(119)
        assert (await stub.Get(pb.GetRequest(task_id=task.task_id))).task.status == CREATED
        server.advance(1)
        done = await final(stub, task.task_id)
    assert (done.status, result_of(done)) == (COMPLETED, 2)


@pytest.mark.parametrize(
    ("mode", "resumed_from", "kept"),
    [
        ("explicit", {"page": 3}, {"page": 3}),  # saved, whatever detail came after it
        ("on_error", {"page": 4}, {"page": 4}),  # given with the error
        (None, {"done": 3}, None),  # none saved: the latest progress detail
    ],
)
async def test_the_next_attempt_resumes_from_the_checkpoint(
    stub: TaskServiceAsyncStub,
    mode: str | None,
    resumed_from: dict[str, Any],
    kept: dict[str, Any] | None,
) -> None:
    task = await create(stub, "checkpointed", {"mode": mode} if mode else {}, max_attempts=2)
    done = await final(stub, task.task_id)
    assert done.status == COMPLETED
    assert result_of(done) == {"attempt": 2, "resumed_from": resumed_from}
    assert (struct_to_dict(done.checkpoint) if done.HasField("checkpoint") else None) == kept


# -- retry defaults per task type ----------------------------------------------------------


async def test_a_task_type_s_retry_defaults_apply_unless_the_request_says(
    start_server: StartServer,
) -> None:
    clock = ManualClock()
    retry = {"flaky": TypeRetry(3, initial=20.0)}
    server = start_server(clock=clock, type_retry=retry)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "flaky", {"failures": 1})
        assert task.max_attempts == 3  # the type's default
        waiting = await wait_until(stub, task.task_id, lambda t: t.attempt == 2)
        assert _seconds(waiting.next_attempt_at) == pytest.approx(clock.now + 20)  # its backoff
        server.advance(20)
        assert (await final(stub, task.task_id)).status == COMPLETED

        once = await create(stub, "flaky", {"failures": 1}, max_attempts=1)  # the request wins
        assert (await final(stub, once.task_id)).status == FAILED
        assert (await create(stub, "echo")).max_attempts == 1  # another type: the default 1


def test_type_retry_defaults_come_from_flags_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONVEYORD_TYPE_RETRY", "sms=2, email=4")
    args = build_parser().parse_args(["--type-retry", "email=5:10::600", "--store", "memory"])
    assert config_from_args(args).scheduler.type_retry == {
        "sms": TypeRetry(2),
        "email": TypeRetry(5, 10.0, None, 600.0),  # the flag after the variable wins
    }


@pytest.mark.parametrize(
    "value", ["email", "=3", "email=0", "email=101", "email=x", "email=3:-1", "email=3:1:0",
              "email=3:1:2:3:4", "email=3:soon"],
)  # fmt: skip
def test_a_bad_type_retry_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--type-retry", value])
    assert exited.value.code == 2 and "--type-retry" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"retry_delay": -1.0}, "retry_delay"),
        ({"retry_delay": float("inf")}, "retry_delay"),
        ({"checkpoint": {"bad": float("nan")}}, "checkpoint"),
        ({"checkpoint": {"big": "x" * 70_000}}, "checkpoint"),
        ({"error_type": ""}, "error_type"),
    ],
)
def test_an_attempt_failure_with_bad_arguments_is_refused_where_it_is_made(
    arguments: dict[str, Any], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        AttemptFailed("no", **arguments)
    assert NonRetryableError("bad input").retryable is False


# -- the command line -----------------------------------------------------------------------


async def test_conveyor_get_shows_the_error_type_traceback_and_attempts(
    server: ServerThread, stub: TaskServiceAsyncStub, capsys: pytest.CaptureFixture[str]
) -> None:
    task = await create(stub, "flaky", {"failures": 3}, max_attempts=2)
    await final(stub, task.task_id)
    code = await asyncio.to_thread(main, ["--server", server.address, "get", task.task_id])
    out = capsys.readouterr().out
    assert code == 0
    assert "HANDLER_ERROR: KeyError: 'missing-key'" in out and "error type  KeyError" in out
    assert "Traceback (most recent call last):" in out
    assert "1  FAILED       " in out and "2  FAILED       " in out and LOCAL_HOLDER in out

    code = await asyncio.to_thread(
        main, ["--server", server.address, "--json", "get", task.task_id]
    )
    shown = json.loads(capsys.readouterr().out)
    assert code == 0 and shown["error"]["errorType"] == "KeyError"
    assert [a["outcome"] for a in shown["attempts"]] == ["FAILED", "FAILED"]


# -- a worker that speaks the protocol ------------------------------------------------------


@pytest.fixture
async def protocol(
    start_server: StartServer,
) -> AsyncIterator[tuple[TaskServiceAsyncStub, WorkerServiceAsyncStub]]:
    server = start_server(worker_types=frozenset({REMOTE}))
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield TaskServiceStub(channel), WorkerServiceStub(channel)


def _ref(assignment: wpb.Assignment) -> wpb.LeaseRef:
    return wpb.LeaseRef(task_id=assignment.task.task_id, lease_id=assignment.lease_id)


async def test_a_worker_s_failure_details_and_checkpoint_reach_the_task_and_the_next_attempt(
    protocol: tuple[TaskServiceAsyncStub, WorkerServiceAsyncStub],
) -> None:
    tasks, workers = protocol
    session = Session(workers)
    await session.next("welcome")
    task = await create(tasks, REMOTE, max_attempts=3)
    first = await session.next("assignment")
    assert not first.HasField("checkpoint")  # a first attempt has nothing to resume from
    saved = wpb.ReportRequest(lease=_ref(first), checkpoint=dict_to_struct({"page": 1}))
    await workers.Report(saved)
    error = wpb.AttemptError(
        message="ValueError: bad page", error_type="ValueError", traceback="Traceback ...\n",
        retry_delay=duration_pb2.Duration(seconds=0),
    )  # fmt: skip
    retried = (await workers.Finish(wpb.FinishRequest(lease=_ref(first), error=error))).task
    assert (retried.status, retried.attempt) == (CREATED, 2)
    assert (retried.error.error_type, retried.error.traceback) == ("ValueError", "Traceback ...\n")
    assert retried.next_attempt_at == retried.updated_at  # its delay of 0: at once

    second = await session.next("assignment")
    assert struct_to_dict(second.checkpoint) == {"page": 1}
    assert second.task.last_attempt_error.error_type == "ValueError"
    refused = wpb.AttemptError(message="no", no_retry=True, checkpoint=dict_to_struct({"p": 2}))
    ended = (await workers.Finish(wpb.FinishRequest(lease=_ref(second), error=refused))).task
    assert (ended.status, ended.attempt, ended.error.non_retryable) == (FAILED, 2, True)
    assert struct_to_dict(ended.checkpoint) == {"p": 2}
    history = (await _with_attempts(tasks, task.task_id)).attempts
    assert [(a.number, a.worker, a.outcome) for a in history] == [
        (1, "w-1", FAILED_ATTEMPT), (2, "w-1", FAILED_ATTEMPT),
    ]  # fmt: skip


async def test_a_worker_s_retry_delay_sets_the_next_attempt_s_time(
    protocol: tuple[TaskServiceAsyncStub, WorkerServiceAsyncStub],
) -> None:
    tasks, workers = protocol
    session = Session(workers)
    await session.next("welcome")
    await create(tasks, REMOTE, max_attempts=2)
    assignment = await session.next("assignment")
    later = wpb.AttemptError(message="busy", retry_delay=duration_pb2.Duration(seconds=3600))
    task = (await workers.Finish(wpb.FinishRequest(lease=_ref(assignment), error=later))).task
    assert task.status == CREATED
    assert _seconds(task.next_attempt_at) == pytest.approx(_seconds(task.updated_at) + 3600)


BIG = dict_to_struct({"big": "x" * 70_000})


@pytest.mark.parametrize(
    ("error", "field"),
    [
        (wpb.AttemptError(error_type="E" * 257), "error.error_type"),
        (wpb.AttemptError(error_type="Bad\nType"), "error.error_type"),
        (wpb.AttemptError(traceback="é" * 9000), "error.traceback"),  # 18,000 bytes of UTF-8
        (wpb.AttemptError(retry_delay=duration_pb2.Duration(seconds=-1)), "error.retry_delay"),
        (wpb.AttemptError(retry_delay=duration_pb2.Duration(seconds=400 * 86400)),
         "error.retry_delay"),
        (wpb.AttemptError(checkpoint=BIG), "error.checkpoint"),
    ],
)  # fmt: skip
async def test_bad_failure_details_are_refused_naming_the_field_and_change_nothing(
    protocol: tuple[TaskServiceAsyncStub, WorkerServiceAsyncStub],
    error: wpb.AttemptError,
    field: str,
) -> None:
    tasks, workers = protocol
    session = Session(workers)
    await session.next("welcome")
    task = await create(tasks, REMOTE, max_attempts=2)
    assignment = await session.next("assignment")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await workers.Finish(wpb.FinishRequest(lease=_ref(assignment), error=error))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(refused.value)) == [field]
    with pytest.raises(grpc.aio.AioRpcError) as too_big:
        await workers.Report(wpb.ReportRequest(lease=_ref(assignment), checkpoint=BIG))
    assert list(field_violations(too_big.value)) == ["checkpoint"]
    unchanged = (await tasks.Get(pb.GetRequest(task_id=task.task_id))).task
    assert (unchanged.status, unchanged.attempt) == (task_pb2.TASK_STATUS_RUNNING, 1)
    assert not unchanged.HasField("error") and not unchanged.HasField("checkpoint")


# -- the Python worker -----------------------------------------------------------------------


@pytest.fixture
def python_server(start_server: StartServer) -> ServerThread:
    return start_server(worker_types=PYTHON_TYPES)


@pytest.fixture
async def python_worker(python_server: ServerThread) -> AsyncIterator[Worker]:
    """A conveyor.worker.Worker with the `remote.` handlers of tests/failure_handlers.py, run
    on the test's loop and drained at the end."""
    registry = HandlerRegistry.from_modules(["tests.failure_handlers"], builtins=False)
    worker = Worker(python_server.address, registry, worker_id="py-1")
    running = asyncio.create_task(worker.run())
    yield worker
    worker.drain()
    await asyncio.wait_for(running, 10)


@pytest.fixture
async def python_stub(python_server: ServerThread) -> AsyncIterator[TaskServiceAsyncStub]:
    async with grpc.aio.insecure_channel(python_server.address) as channel:
        yield TaskServiceStub(channel)


async def test_a_python_worker_keeps_the_type_and_traceback_and_its_retries_history(
    python_worker: Worker, python_stub: TaskServiceAsyncStub
) -> None:
    custom = await create(python_stub, "remote.custom_failure")
    error = (await final(python_stub, custom.task_id)).error
    assert error.error_type == "tests.failure_handlers.Unreachable"
    assert 'raise Unreachable("the backend did not answer")' in error.traceback

    flaky = await create(python_stub, "remote.flaky", {"failures": 1}, max_attempts=2)
    await final(python_stub, flaky.task_id)
    history = (await _with_attempts(python_stub, flaky.task_id)).attempts
    assert [(a.number, a.worker, a.outcome) for a in history] == [
        (1, "py-1", FAILED_ATTEMPT), (2, "py-1", COMPLETED_ATTEMPT),
    ]  # fmt: skip
    assert history[0].error.error_type == "KeyError"


async def test_a_python_worker_fails_without_retry_puts_off_and_resumes(
    python_worker: Worker, python_stub: TaskServiceAsyncStub
) -> None:
    refused = await create(python_stub, "remote.non_retryable", max_attempts=3)
    ended = await final(python_stub, refused.task_id)
    assert (ended.status, ended.attempt, ended.error.non_retryable) == (FAILED, 1, True)

    for mode, resumed_from in [("explicit", {"page": 3}), ("on_error", {"page": 4})]:
        task = await create(python_stub, "remote.checkpointed", {"mode": mode}, max_attempts=2)
        done = await final(python_stub, task.task_id)
        assert result_of(done) == {"attempt": 2, "resumed_from": resumed_from}

    later = await create(python_stub, "remote.retry_later", {"delay": 3600}, max_attempts=2)
    waiting = await wait_until(python_stub, later.task_id, lambda t: t.attempt == 2)
    assert waiting.status == CREATED
    assert _seconds(waiting.next_attempt_at) == pytest.approx(_seconds(waiting.updated_at) + 3600)
