"""The gRPC face for remote workers: conveyor.v1.WorkerService on top of dispatch.

Each RPC validates its request (nothing changes for a bad one) and speaks to dispatch with
the attempt's lease id, as the local worker does in-process; a stale lease is refused by
dispatch (lifecycle.StaleLease: FAILED_PRECONDITION, LEASE_NOT_HELD). The sessions, their
reconnect grace and the attempts' bookkeeping are worker/remote.py's.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from conveyor.handlers import MAX_LABEL
from conveyor.limits import MAX_ERROR_TYPE, MAX_RETRY_DELAY, MAX_TRACEBACK_BYTES
from conveyor.protojson import struct_to_dict, to_python
from conveyor.v1 import worker_service_pb2 as pb
from conveyord.auth import Permission, current_tenant, require_types
from conveyord.convert import task_to_proto
from conveyord.dispatch import Dispatcher
from conveyord.lifecycle import InputWait, Outcome, StaleLease
from conveyord.limits import MAX_DETAIL_BYTES, MAX_MESSAGE, MAX_RESULT_BYTES, MAX_WAIT_SECONDS
from conveyord.model import ErrorCode, Task, TaskError, json_problem
from conveyord.rpc import stream_method, unary_method
from conveyord.store.base import TaskNotFound
from conveyord.tenants import Tenants
from conveyord.validation import Checker, InvalidArgument, task_id_in
from conveyord.worker.remote import Hello, RemoteWorker, SessionTimings, WorkerSessions, holder_name

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WorkerService"].full_name

MAX_SLOTS = 1000
MAX_LEASES = 1000  # in one Renew, or one ConnectRequest.held
_WORKER_ID = re.compile(r"[A-Za-z0-9._:/@-]{1,128}")
_TASK_TYPE = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_LEASE_ID = re.compile(r"[0-9a-f]{32}")

RECEIVE_LIMITS = {
    "Connect": 256 * 1024,
    "Report": 2 * MAX_DETAIL_BYTES + 32 * 1024,  # a detail and a checkpoint
    "Renew": 128 * 1024,
    "Finish": MAX_RESULT_BYTES + 32 * 1024,
    "FinishMany": 4 * MAX_RESULT_BYTES,
    "Drain": 4 * 1024,
}


class WorkerServiceApi:
    """The RPCs of conveyor.v1.WorkerService."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        sessions: WorkerSessions,
        declare_types: Callable[[frozenset[str]], Awaitable[None]],
        tenants: Tenants,
    ) -> None:
        self.dispatcher = dispatcher
        self.tenants = tenants
        self.sessions = sessions
        self.timings: SessionTimings = sessions.timings
        self.declare_types = declare_types

    async def connect(self, request: pb.ConnectRequest) -> AsyncIterator[bytes]:
        """The session's stream: a welcome, then what the outbox holds, with heartbeats."""
        hello = _connect_request(request, current_tenant())
        require_types(Permission.WORKER, hello.types)
        with self.tenants.connected(hello.tenant):
            await self.declare_types(hello.types)
            worker, kept = await self.sessions.connect(hello)
            async for message in self._session(hello, worker, kept):
                yield message

    async def _session(
        self, hello: Hello, worker: RemoteWorker, kept: list[tuple[str, str]]
    ) -> AsyncIterator[bytes]:
        outbox = worker.outbox
        try:
            yield self.timings.welcome(hello.worker_id, kept)
            while True:
                try:
                    item = await outbox.get(self.timings.heartbeat_interval)
                except TimeoutError:
                    yield _heartbeat()
                    continue
                if item is None:
                    return  # drained
                if not isinstance(item, bytes):
                    raise item  # replaced, or the server stops
                yield item
        finally:
            self.sessions.disconnected(worker, outbox)

    async def _owns(self, task_id: str) -> bool:
        """Whether the task is not another tenant's (a worker of one tenant learns nothing
        of another's tasks, even holding a lease id)."""
        task = await self.dispatcher.store.get(task_id)
        return task is None or task.tenant == current_tenant()

    async def _own(self, task_id: str) -> None:
        """NOT_FOUND for another tenant's task, as for one that never was."""
        if not await self._owns(task_id):
            raise TaskNotFound(task_id)

    async def report(self, request: pb.ReportRequest) -> bytes:
        """A ReportResponse."""
        task, lease = _lease(request.lease, "lease")
        await self._own(task)
        changes = _report_changes(request)
        if changes or not request.parked:
            await self.dispatcher.report(task, lease, changes)
        if request.parked:
            await self.dispatcher.park(task, lease)
        stopping = self.dispatcher.stopping(task, lease)
        return pb.ReportResponse(stop_requested=stopping).SerializeToString()

    async def renew(self, request: pb.RenewRequest) -> bytes:
        """A RenewResponse: the leases renewed, and those lost."""
        checker = Checker()
        if not request.leases:
            checker.fail("leases", "is required")
        if len(request.leases) > MAX_LEASES:
            checker.fail("leases", f"holds {len(request.leases)}; at most {MAX_LEASES}")
        leases = [_lease_in(checker, ref, f"leases[{i}]") for i, ref in enumerate(request.leases)]
        checker.done()
        foreign = {task for task, _ in leases if not await self._owns(task)}
        seconds = self.timings.lease_duration
        answer = pb.RenewResponse()
        answer.expires_at.FromNanoseconds(int((time.time() + seconds) * 1e9))
        # Together, so that a durable store writes them in one transaction.
        # Another tenant's task is lost, as one that never was.
        renewals = [
            self.dispatcher.renew(task, lease, seconds) if task not in foreign else _not_found(task)
            for task, lease in leases
        ]
        outcomes = await asyncio.gather(*renewals, return_exceptions=True)
        for (task, lease), outcome in zip(leases, outcomes, strict=True):
            if isinstance(outcome, StaleLease | TaskNotFound):
                answer.lost.add(task_id=task, lease_id=lease)
            elif isinstance(outcome, BaseException):
                raise outcome
        return answer.SerializeToString()

    async def finish(self, request: pb.FinishRequest) -> bytes:
        """A FinishResponse: the task after the attempt."""
        task, lease = _lease(request.lease, "lease")
        await self._own(task)
        outcome = _outcome(request)
        ended = await self.dispatcher.finish(task, lease, outcome)
        return pb.FinishResponse(task=task_to_proto(ended)).SerializeToString()

    async def finish_many(self, request: pb.FinishManyRequest) -> bytes:
        """A FinishManyResponse: each attempt's end recorded, or refused on its own (a bad
        one before the others are written, a stale one as they are); the refusals alone,
        or a result with the task for each end."""
        checker = Checker()
        count = len(request.finishes)
        if not 1 <= count <= MAX_LEASES:
            checker.fail("finishes", f"holds {count}; 1 to {MAX_LEASES} are accepted")
        tasks = [finish.lease.task_id for finish in request.finishes]
        if len(set(tasks)) != len(tasks):
            checker.fail("finishes", "holds two finishes for one task")
        checker.done()
        refused: dict[int, pb.FinishRefusal] = {}
        ends: list[tuple[str, str, Outcome]] = []
        indexes: list[int] = []  # of the ends in the request
        for index, finish in enumerate(request.finishes):
            try:
                task, lease = _lease(finish.lease, "lease")
                await self._own(task)
                ends.append((task, lease, _outcome(finish)))
                indexes.append(index)
            except (InvalidArgument, TaskNotFound) as error:
                refused[index] = _refusal(finish.lease, error)
        ended = await self.dispatcher.finish_many(ends)
        recorded: dict[int, Task] = {}
        for index, outcome in zip(indexes, ended, strict=True):
            if isinstance(outcome, StaleLease | TaskNotFound):
                refused[index] = _refusal(request.finishes[index].lease, outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                recorded[index] = outcome
        if request.refusals_only:
            answer = pb.FinishManyResponse(refused=[refused[i] for i in sorted(refused)])
        else:
            answer = pb.FinishManyResponse(
                results=[
                    pb.FinishResult(refusal=refused[i])
                    if i in refused
                    else pb.FinishResult(task=task_to_proto(recorded[i]))
                    for i in range(count)
                ]
            )
        return answer.SerializeToString()

    async def drain(self, request: pb.DrainRequest) -> bytes:
        """A DrainResponse."""
        self.sessions.drain(holder_name(current_tenant(), request.worker_id))
        return pb.DrainResponse().SerializeToString()


async def _not_found(task_id: str) -> Task:
    raise TaskNotFound(task_id)


def _refusal(
    lease: pb.LeaseRef, error: InvalidArgument | StaleLease | TaskNotFound
) -> pb.FinishRefusal:
    return pb.FinishRefusal(
        lease=lease, code=error.code.value[0], message=str(error), reason=error.reason
    )


def _heartbeat() -> bytes:
    sent_at = timestamp_pb2.Timestamp()
    sent_at.GetCurrentTime()
    return pb.ConnectResponse(heartbeat=pb.Heartbeat(sent_at=sent_at)).SerializeToString()


# -- requests --------------------------------------------------------------------


def _connect_request(request: pb.ConnectRequest, tenant: str) -> Hello:
    checker = Checker()
    if not _WORKER_ID.fullmatch(request.worker_id):
        checker.fail("worker_id", "must be 1 to 128 characters of A-Z a-z 0-9 . _ : / @ -")
    if not request.task_types:
        checker.fail("task_types", "is required: the task types this worker runs")
    for index, task_type in enumerate(request.task_types):
        if not _TASK_TYPE.fullmatch(task_type):
            checker.fail(
                f"task_types[{index}]",
                f"{task_type[:64]!r} is not 1 to 128 characters of A-Z a-z 0-9 . _ : / -",
            )
    if not 1 <= request.slots <= MAX_SLOTS:
        checker.fail("slots", f"must be between 1 and {MAX_SLOTS}, not {request.slots}")
    if len(request.held) > MAX_LEASES:
        checker.fail("held", f"holds {len(request.held)}; at most {MAX_LEASES}")
    held = dict(_lease_in(checker, ref, f"held[{i}]") for i, ref in enumerate(request.held))
    types = frozenset(request.task_types)
    for index, task_type in enumerate(request.pausable_types):
        if task_type not in types:
            checker.fail(f"pausable_types[{index}]", f"{task_type[:64]!r} is not in task_types")
    checker.done()
    pausable = frozenset(request.pausable_types)
    return Hello(
        request.worker_id, types, request.slots, held, request.batch_assignments, pausable, tenant
    )


def _lease(ref: pb.LeaseRef, field: str) -> tuple[str, str]:
    checker = Checker()
    found = _lease_in(checker, ref, field)
    checker.done()
    return found


def _lease_in(checker: Checker, ref: pb.LeaseRef, field: str) -> tuple[str, str]:
    task = task_id_in(checker, ref.task_id, f"{field}.task_id")
    if not _LEASE_ID.fullmatch(ref.lease_id):
        checker.fail(f"{field}.lease_id", f"{ref.lease_id[:64]!r} is not a lease id")
    return task, ref.lease_id


def _report_changes(request: pb.ReportRequest) -> dict[str, Any]:
    checker = Checker()
    changes: dict[str, Any] = {}
    if request.HasField("progress"):
        if not (math.isfinite(request.progress) and 0.0 <= request.progress <= 1.0):
            checker.fail("progress", f"must be between 0 and 1, not {request.progress}")
        changes["progress"] = request.progress
    if request.HasField("message"):
        if len(request.message) > MAX_MESSAGE:
            checker.fail("message", f"is longer than {MAX_MESSAGE} characters")
        changes["message"] = request.message
    if request.HasField("detail"):
        changes["progress_detail"] = _struct(checker, request.detail, "detail")
    if request.HasField("checkpoint"):
        changes["checkpoint"] = _struct(checker, request.checkpoint, "checkpoint")
    checker.done()
    return changes


def _struct(checker: Checker, value: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """A progress detail or a checkpoint for the next attempt: JSON, within the cap."""
    size = value.ByteSize()
    kept = struct_to_dict(value)
    if size > MAX_DETAIL_BYTES:
        checker.fail(field, f"is {size} bytes encoded; at most {MAX_DETAIL_BYTES}")
    elif (problem := json_problem(kept, field)) is not None:
        checker.fail(field, problem)
    return kept


def _outcome(request: pb.FinishRequest) -> Outcome:
    checker = Checker()
    which = request.WhichOneof("outcome")
    if which is None:
        checker.fail("outcome", "is required: a result, an error or a wait for input")
    elif which == "wait_for_input":
        return _input_wait(checker, request.wait_for_input)
    elif which == "result":
        size = request.result.ByteSize()
        result = to_python(request.result)
        if size > MAX_RESULT_BYTES:
            checker.fail("result", f"is {size} bytes encoded; at most {MAX_RESULT_BYTES}")
        elif (problem := json_problem(result)) is not None:
            checker.fail("result", problem)
        checker.done()
        return Outcome(result=result)
    else:
        return _failed(checker, request.error)
    checker.done()
    raise AssertionError("unreachable: an outcome is required")


def _failed(checker: Checker, error: pb.AttemptError) -> Outcome:
    """The outcome of an attempt that failed, as its worker says."""
    code = error.code or ErrorCode.HANDLER_ERROR
    if not _ERROR_CODE.fullmatch(code):
        checker.fail("error.code", f"{code[:64]!r} is not UPPER_SNAKE_CASE of 1 to 64")
    if len(error.message) > MAX_MESSAGE:
        checker.fail("error.message", f"is longer than {MAX_MESSAGE} characters")
    if len(error.error_type) > MAX_ERROR_TYPE or not error.error_type.isprintable():
        checker.fail("error.error_type", f"must be at most {MAX_ERROR_TYPE} printable characters")
    if len(error.traceback.encode()) > MAX_TRACEBACK_BYTES:
        checker.fail(
            "error.traceback", f"is over {MAX_TRACEBACK_BYTES} bytes encoded: keep its end"
        )
    retry_delay: float | None = None
    if error.HasField("retry_delay"):
        retry_delay = error.retry_delay.ToNanoseconds() / 1e9
        if not 0 <= retry_delay <= MAX_RETRY_DELAY:
            checker.fail(
                "error.retry_delay", f"must be 0 to {MAX_RETRY_DELAY:.0f} s, not {retry_delay:g}"
            )
    checkpoint = None
    if error.HasField("checkpoint"):
        checkpoint = _struct(checker, error.checkpoint, "error.checkpoint")
    checker.done()
    failure = TaskError(code, error.message, error.error_type, error.traceback)
    return Outcome(
        error=failure,
        retryable=not error.no_retry,
        retry_delay=retry_delay,
        checkpoint=checkpoint,
    )


def _input_wait(checker: Checker, wait: pb.InputWait) -> Outcome:
    if len(wait.prompt) > MAX_MESSAGE:
        checker.fail("wait_for_input.prompt", f"is longer than {MAX_MESSAGE} characters")
    if len(wait.label) > MAX_LABEL:
        checker.fail("wait_for_input.label", f"is longer than {MAX_LABEL} characters")
    timeout: float | None = None
    if wait.HasField("timeout"):
        timeout = wait.timeout.ToNanoseconds() / 1e9
        if not 0 < timeout <= MAX_WAIT_SECONDS:
            checker.fail(
                "wait_for_input.timeout", f"must be positive, at most {MAX_WAIT_SECONDS:.0f} s"
            )
    if wait.inputs_seen < 0:
        checker.fail("wait_for_input.inputs_seen", f"must not be negative, not {wait.inputs_seen}")
    checker.done()
    return Outcome(wait=InputWait(wait.prompt, wait.label, timeout, wait.inputs_seen))


def method_handlers(api: WorkerServiceApi) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The RPC method handlers of WorkerService, by method name."""
    return {
        "Connect": stream_method(api.connect, pb.ConnectRequest, RECEIVE_LIMITS["Connect"]),
        "Report": unary_method(api.report, pb.ReportRequest, RECEIVE_LIMITS["Report"]),
        "Renew": unary_method(api.renew, pb.RenewRequest, RECEIVE_LIMITS["Renew"]),
        "Finish": unary_method(api.finish, pb.FinishRequest, RECEIVE_LIMITS["Finish"]),
        "FinishMany": unary_method(
            api.finish_many, pb.FinishManyRequest, RECEIVE_LIMITS["FinishMany"]
        ),
        "Drain": unary_method(api.drain, pb.DrainRequest, RECEIVE_LIMITS["Drain"]),
    }
