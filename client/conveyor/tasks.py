"""Tasks as the client hands them out: plain Python values built from conveyor.v1 messages."""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime
from typing import Any, Literal, Self

from conveyor.protojson import struct_to_dict, timestamp_to_datetime, to_python
from conveyor.v1 import task_pb2, task_service_pb2


class _WireEnum(enum.IntEnum):
    """An enum of the contract's numbers, 0 standing for one this client does not know."""

    @classmethod
    def _from_wire(cls, value: int) -> Self:
        """The member a conveyor.v1 number stands for; UNKNOWN (0) for one not known."""
        try:
            return cls(value)
        except ValueError:
            return cls(0)


class TaskStatus(_WireEnum):
    """Where a task is in its life; mirrors conveyor.v1.TaskStatus without the prefix.

    UNKNOWN stands for a status this client does not know, such as one a newer server
    added (the number the server sent is `Task.raw_status`). It is not terminal: a wait
    goes on through it. It is not a status to filter by (a server refuses it).
    """

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5
    PAUSED = 6
    WAITING_INPUT = 7

    @property
    def terminal(self) -> bool:
        """True for COMPLETED, FAILED and CANCELLED: a task in one of them never changes again."""
        return self in _TERMINAL


_TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


@dataclasses.dataclass(frozen=True)
class InputSent:
    """An input kept with a task: its place among the task's inputs (from 1), and the task."""

    sequence: int
    task: Task


@dataclasses.dataclass(frozen=True)
class TaskError:
    """Why a task failed or was cancelled: a stable `code` (HANDLER_ERROR, ...) and a message;
    for a handler's failure, what failed (`error_type`, such as `KeyError`) and its
    `traceback` (the last 16 KiB); `non_retryable` when it was not retried."""

    code: str
    message: str
    error_type: str = ""
    traceback: str = ""
    non_retryable: bool = False

    @classmethod
    def _from_proto(cls, error: task_pb2.TaskError) -> TaskError:
        return cls(
            error.code, error.message, error.error_type, error.traceback, error.non_retryable
        )


class AttemptOutcome(_WireEnum):
    """How an attempt ended; mirrors conveyor.v1.AttemptOutcome without the prefix (UNKNOWN:
    one this client does not know)."""

    UNKNOWN = 0
    COMPLETED = 1
    FAILED = 2
    CANCELLED = 3
    INTERRUPTED = 4  # the server's shutdown stopped it; the same attempt ran again
    SUSPENDED = 5  # its handler waited for input; the same attempt ran again afresh


@dataclasses.dataclass(frozen=True)
class TaskAttempt:
    """One ended run of a task's handler: its number, when it ran, the worker that ran it,
    how it ended and why (`error`, None if it completed or was suspended)."""

    number: int
    started_at: datetime
    ended_at: datetime
    worker: str
    outcome: AttemptOutcome
    error: TaskError | None

    @classmethod
    def _from_proto(cls, message: task_pb2.TaskAttempt) -> TaskAttempt:
        return cls(
            number=message.number,
            started_at=timestamp_to_datetime(message.started_at),
            ended_at=timestamp_to_datetime(message.ended_at),
            worker=message.worker,
            outcome=AttemptOutcome._from_wire(message.outcome),
            error=TaskError._from_proto(message.error) if message.HasField("error") else None,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """A task as the server reported it at one revision.

    Times are aware datetimes in UTC, None where the server left them unset; parameters,
    progress_detail and result are dicts, lists and scalars, as JSON would give them. The
    TaskResponse it was built from is `proto` (left out of comparisons and repr).
    """

    task_id: str
    task_type: str
    description: str
    status: TaskStatus
    priority: int
    progress: float
    message: str
    progress_detail: dict[str, Any]
    result: Any
    error: TaskError | None
    labels: dict[str, str]
    attempt: int
    max_attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    revision: int
    parameters: dict[str, Any]
    timeout_seconds: float
    cancel_requested_at: datetime | None
    last_attempt_error: TaskError | None
    start_deadline: datetime | None  # not started by then, it fails with QUEUE_TIMEOUT
    paused_at: datetime | None  # while PAUSED
    pause_reason: str
    pause_requested_at: datetime | None  # while a running handler is yet to park
    input_prompt: str  # while WAITING_INPUT: what the handler asks for
    input_label: str
    input_deadline: datetime | None  # while WAITING_INPUT: no input by then, it fails
    input_count: int  # inputs sent to it
    rerun_of: str  # made by `rerun`: the id of the ended task it repeats ("" otherwise)
    checkpoint: dict[str, Any] | None  # what the handler saved for the next attempt
    # The ended attempts, oldest first: only from `get(..., include_attempts=True)`, else None.
    attempts: tuple[TaskAttempt, ...] | None
    proto: task_pb2.TaskResponse = dataclasses.field(compare=False, repr=False)

    @property
    def raw_status(self) -> int:
        """The status as the server sent it: the number behind a status of UNKNOWN."""
        return self.proto.status

    @property
    def status_label(self) -> str:
        """The status's name to show, with its number when it is UNKNOWN: UNKNOWN(9)."""
        if self.status is TaskStatus.UNKNOWN:
            return f"UNKNOWN({self.raw_status})"
        return self.status.name

    @classmethod
    def _from_proto(cls, message: task_pb2.TaskResponse, *, with_attempts: bool = False) -> Task:
        """The task of a TaskResponse; `with_attempts`: it was asked with its attempts."""
        return cls(
            task_id=message.task_id,
            task_type=message.task_type,
            description=message.description,
            status=TaskStatus._from_wire(message.status),
            priority=message.priority,
            progress=message.progress,
            message=message.message,
            progress_detail=struct_to_dict(message.progress_detail),
            result=to_python(message.result) if message.HasField("result") else None,
            error=_error(message, "error"),
            labels=dict(message.labels),
            attempt=message.attempt,
            max_attempts=message.max_attempts,
            next_attempt_at=_time(message, "next_attempt_at"),
            created_at=timestamp_to_datetime(message.created_at),
            updated_at=timestamp_to_datetime(message.updated_at),
            started_at=_time(message, "started_at"),
            finished_at=_time(message, "finished_at"),
            revision=message.revision,
            parameters=struct_to_dict(message.parameters),
            timeout_seconds=message.timeout_seconds,
            cancel_requested_at=_time(message, "cancel_requested_at"),
            last_attempt_error=_error(message, "last_attempt_error"),
            start_deadline=_time(message, "start_deadline"),
            paused_at=_time(message, "paused_at"),
            pause_reason=message.pause_reason,
            pause_requested_at=_time(message, "pause_requested_at"),
            input_prompt=message.input_prompt,
            input_label=message.input_label,
            input_deadline=_time(message, "input_deadline"),
            input_count=message.input_count,
            rerun_of=message.rerun_of,
            checkpoint=(
                struct_to_dict(message.checkpoint) if message.HasField("checkpoint") else None
            ),
            attempts=(
                tuple(TaskAttempt._from_proto(attempt) for attempt in message.attempts)
                if with_attempts
                else None
            ),
            proto=message,
        )


_OptionalTime = Literal[
    "next_attempt_at",
    "started_at",
    "finished_at",
    "cancel_requested_at",
    "start_deadline",
    "paused_at",
    "pause_requested_at",
    "input_deadline",
]


def _error(
    message: task_pb2.TaskResponse, field: Literal["error", "last_attempt_error"]
) -> TaskError | None:
    if not message.HasField(field):
        return None
    return TaskError._from_proto(getattr(message, field))


def _time(message: task_pb2.TaskResponse, field: _OptionalTime) -> datetime | None:
    return timestamp_to_datetime(getattr(message, field)) if message.HasField(field) else None


class EventKind(enum.IntEnum):
    """What a TaskEvent reports; mirrors conveyor.v1.WatchEventType without the prefix.

    CURRENT is a task as it stood when the watch began (`watch_all`'s `start_with`). A
    watch passes on only these; an event of a type it does not know (from a newer server)
    it skips.
    """

    CURRENT = 1
    CHANGED = 2
    REMOVED = 3


@dataclasses.dataclass(frozen=True)
class TaskEvent:
    """One event of `watch_all`: a task CHANGED to `task`, or was REMOVED (`task`: its last
    state), or is CURRENT: `task` as it stood when the watch began.

    `revision` orders the events of a watch and is where a later watch can resume from.
    """

    kind: EventKind
    task: Task
    revision: int


@dataclasses.dataclass(frozen=True)
class TaskWorker:
    """A worker that serves a task type: the server's own handlers (`local`, id
    "conveyord/local") or a connected remote worker; its `slots` are shared by all its types."""

    worker_id: str
    local: bool
    slots: int
    free_slots: int
    pausable: bool  # its handler of the type can park at a pause point
    draining: bool  # it takes no new attempt

    @classmethod
    def _from_proto(cls, message: task_service_pb2.TaskWorker) -> TaskWorker:
        return cls(
            message.worker_id, message.local, message.slots, message.free_slots,
            message.pausable, message.draining,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TaskType:
    """A task type the server knows, whether Create takes it, and the workers serving it now
    (none: its tasks wait for one)."""

    task_type: str
    accepted: bool
    workers: tuple[TaskWorker, ...]

    @classmethod
    def _from_proto(cls, message: task_service_pb2.TaskType) -> TaskType:
        workers = tuple(TaskWorker._from_proto(worker) for worker in message.workers)
        return cls(message.task_type, message.accepted, workers)


@dataclasses.dataclass(frozen=True)
class TaskCounts:
    """How many tasks there are, by task type and status (`by_type[type][status]`; a pair
    with none is left out), their `total`, and the `revision` they are of (a `watch_all`
    from it sees every change since). A status this client does not know counts as UNKNOWN."""

    by_type: dict[str, dict[TaskStatus, int]]
    total: int
    revision: int

    def of_status(self, status: TaskStatus) -> int:
        """How many tasks, of any type, are in `status`."""
        return sum(counts.get(status, 0) for counts in self.by_type.values())

    @classmethod
    def _from_proto(cls, message: task_service_pb2.CountTasksResponse) -> TaskCounts:
        by_type: dict[str, dict[TaskStatus, int]] = {}
        for entry in message.counts:
            counts = by_type.setdefault(entry.task_type, {})
            status = TaskStatus._from_wire(entry.status)
            counts[status] = counts.get(status, 0) + entry.count
        return cls(by_type, message.total, message.revision)
