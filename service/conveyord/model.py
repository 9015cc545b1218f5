"""The task as the server keeps it: an immutable record, its status, and the rules of its life.

Every change makes a new `Task` (with `dataclasses.replace`), so a record handed to a
watcher or kept in the change history never changes under it.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Mapping
from typing import Any, NamedTuple

from conveyor.protojson import json_problem as json_problem  # re-exported


class TaskStatus(enum.IntEnum):
    """Mirrors conveyor.v1.TaskStatus, without the prefix."""

    CREATED = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5
    PAUSED = 6
    WAITING_INPUT = 7

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
UNFINISHED = frozenset(TaskStatus) - TERMINAL
# The statuses in which an attempt may hold a lease: RUNNING, and PAUSED with its handler
# parked at a pause point (a PAUSED task without a lease is a queued one held).
LEASED = frozenset({TaskStatus.RUNNING, TaskStatus.PAUSED})

# The only moves a task may make. RUNNING -> CREATED is a retry of a failed attempt (or a
# wait for input that an input already answers); CREATED -> FAILED, a task not started
# within its queue timeout. PAUSED is a queued task held (from CREATED or WAITING_INPUT,
# back to CREATED), or a running attempt parked by its handler (from RUNNING, back to
# RUNNING; its end, if its worker ends it while parked, is that of a running attempt).
# WAITING_INPUT is a task whose handler waits for input: an input queues it again.
TRANSITIONS: Mapping[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.CREATED: frozenset(
        {TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.FAILED, TaskStatus.PAUSED}
    ),
    TaskStatus.PAUSED: frozenset(
        {
            TaskStatus.CREATED,
            TaskStatus.RUNNING,
            TaskStatus.CANCELLED,
            TaskStatus.FAILED,
            TaskStatus.COMPLETED,
        }
    ),
    TaskStatus.RUNNING: frozenset(
        {
            TaskStatus.COMPLETED,
            TaskStatus.FAILED,
            TaskStatus.CANCELLED,
            TaskStatus.CREATED,
            TaskStatus.PAUSED,
            TaskStatus.WAITING_INPUT,
        }
    ),
    TaskStatus.WAITING_INPUT: frozenset(
        {TaskStatus.CREATED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.PAUSED}
    ),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}


class ErrorCode:
    """The stable codes of `TaskError.code`."""

    HANDLER_ERROR = "HANDLER_ERROR"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    INVALID_RESULT = "INVALID_RESULT"
    INTERRUPTED = "INTERRUPTED"
    LEASE_EXPIRED = "LEASE_EXPIRED"
    WORKER_LOST = "WORKER_LOST"
    RESULT_TOO_LARGE = "RESULT_TOO_LARGE"
    INVALID_REPORT = "INVALID_REPORT"
    REPORT_TOO_LARGE = "REPORT_TOO_LARGE"
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"
    INPUT_TIMEOUT = "INPUT_TIMEOUT"


@dataclasses.dataclass(frozen=True, slots=True)
class TaskInput:
    """One input sent to a task (SendInput): kept with the task, in order, for every
    attempt to see."""

    request_id: str  # empty: sent without one (not deduplicated)
    data: Mapping[str, Any]
    received_at: float
    size: int  # encoded bytes, for the cap on what a task keeps


@dataclasses.dataclass(frozen=True, slots=True)
class TaskError:
    """Why an attempt or a task failed: a stable code, a message, and for a handler's
    failure, what failed (`error_type`) and where (`traceback`, its last 16 KiB)."""

    code: str
    message: str
    error_type: str = ""
    traceback: str = ""
    non_retryable: bool = False  # not retried, even with attempts left


class AttemptOutcome(enum.IntEnum):
    """How an attempt ended; mirrors conveyor.v1.AttemptOutcome without the prefix."""

    COMPLETED = 1
    FAILED = 2
    CANCELLED = 3
    INTERRUPTED = 4  # the server's shutdown: queued again on the same attempt
    SUSPENDED = 5  # its handler waits for input: the same attempt runs again afresh


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One ended run of a task's handler, as the task's history keeps it (apart from the
    task's record: see store.memory)."""

    number: int
    started_at: float
    ended_at: float
    holder: str  # who held its lease: the worker that ran it
    outcome: AttemptOutcome
    error: TaskError | None = None


@dataclasses.dataclass(slots=True)
class Task:
    """One task at one revision. Times are seconds since the epoch (UTC).

    A Task is never changed once made: every change makes a new one with `evolve`, so
    that a record held by a watcher or by the history stays as it was. (It is not a frozen
    dataclass only because a frozen one takes four times as long to copy, and a task is
    copied at every change.)
    """

    task_id: str
    seq: int  # creation order, the key that List pages by
    task_type: str
    description: str
    parameters: Mapping[str, Any]
    priority: int
    timeout_seconds: float
    max_attempts: int
    labels: Mapping[str, str]
    created_at: float
    updated_at: float
    tenant: str = ""  # whose task it is: its creator's tenant ("" where nobody signs in)
    request_id: str = ""
    request_hash: bytes = b""  # fingerprint of the TaskRequest, to judge a reused request_id
    # The W3C traceparent of the traced Create that made it: its attempts' runs are its
    # children ("" untraced).
    trace_parent: str = ""
    status: TaskStatus = TaskStatus.CREATED
    progress: float = 0.0
    message: str = ""
    progress_detail: Mapping[str, Any] | None = None
    result: Any = None
    error: TaskError | None = None
    attempt: int = 1
    next_attempt_at: float | None = None  # when a waiting task (delayed, or a retry) may run
    start_deadline: float | None = None  # not started by then: it fails with QUEUE_TIMEOUT
    queued_at: float | None = None  # kept across a pause: where it stands in the queue
    paused_at: float | None = None
    pause_reason: str = ""
    pause_requested_at: float | None = None  # a Pause of a RUNNING task, not yet parked
    pausable: bool = False  # the attempt's handler can park at a pause point
    paused_seconds: float = 0.0  # this attempt's time parked: its timeout does not count it
    inputs: tuple[TaskInput, ...] = ()  # every input sent to it, in order
    input_prompt: str = ""  # while WAITING_INPUT: what the handler asked for
    input_label: str = ""
    input_deadline: float | None = None  # while WAITING_INPUT: no input by then, it fails
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested_at: float | None = None
    cancel_reason: str = ""
    interruptions: int = 0  # attempts stopped by a server's shutdown, which used no attempt
    # The error of the latest failed attempt, kept when a later attempt completes.
    last_attempt_error: TaskError | None = None
    # What the handler last saved for the next attempt (None: it gets the progress detail).
    checkpoint: Mapping[str, Any] | None = None
    # The lease of the running attempt: its id fences the attempt's reports and result.
    lease_id: str = ""
    lease_holder: str = ""
    lease_expires_at: float | None = None
    # What a Rerun repeats beyond the request's other fields, and the task it repeated.
    queue_timeout: float | None = None  # as the request gave it (start_deadline is derived)
    rerun_of: str = ""  # the id of the ended task this one reruns
    revision: int = 0
    # This state's TaskResponse, serialized, once something has needed it (see convert.py):
    # every reader of the same state (Get, List, watchers) shares one encoding.
    wire: bytes | None = dataclasses.field(default=None, init=False, compare=False, repr=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def parked(self) -> bool:
        """PAUSED with its attempt's handler parked at a pause point (it holds a lease)."""
        return self.status is TaskStatus.PAUSED and bool(self.lease_id)

    @property
    def queued_since(self) -> float:
        """Where a CREATED task stands in the queue: the time its age counts from (kept
        across a pause; a waiting task's runnable time; else when it last changed)."""
        if self.queued_at is not None:
            return self.queued_at
        return self.next_attempt_at if self.next_attempt_at is not None else self.updated_at

    def evolve(self, **changes: Any) -> Task:
        """A copy with `changes`; refuses a status change the state machine does not allow."""
        status = changes.get("status", self.status)
        if status != self.status and status not in TRANSITIONS[self.status]:
            raise IllegalTransition(self.status, status)
        copy = Task(*_all_fields(self))
        for name, value in changes.items():
            setattr(copy, name, value)
        return copy


TASK_FIELDS = tuple(field.name for field in dataclasses.fields(Task) if field.init)
_all_fields = operator.attrgetter(*TASK_FIELDS)


class IllegalTransition(Exception):
    """A move the state machine does not allow; always a bug in the server."""

    def __init__(self, old: TaskStatus, new: TaskStatus) -> None:
        super().__init__(f"a task cannot go from {old.name} to {new.name}")


@dataclasses.dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks a List or a Watch covers; every part that is set must match."""

    task_id: str = ""
    statuses: frozenset[TaskStatus] = frozenset()
    task_type: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    task_id_prefix: str = ""  # lower case, as ids are
    tenant: str | None = None  # a caller's tenant: only its tasks exist for it (None: any)

    def matches(self, task: Task) -> bool:
        if self.tenant is not None and task.tenant != self.tenant:
            return False
        if self.task_id and task.task_id != self.task_id:
            return False
        if self.task_id_prefix and not task.task_id.startswith(self.task_id_prefix):
            return False
        if self.statuses and task.status not in self.statuses:
            return False
        if self.task_type and task.task_type != self.task_type:
            return False
        return all(task.labels.get(key) == value for key, value in self.labels.items())


class ChangeKind(enum.IntEnum):
    """Mirrors conveyor.v1.WatchEventType for the events that a change makes; RENEWED is a
    change that no watcher sees (a lease renewed: nothing of the task's answer changed)."""

    CHANGED = 2
    REMOVED = 3
    RENEWED = 4


class Change(NamedTuple):
    """One entry of the change history: a task's new state, or its removal, at `revision`.

    (A named tuple: one is made for every change, and a tuple is the cheapest to make.)
    """

    revision: int
    kind: ChangeKind
    task: Task
    at: float  # when the change was made, to trim the history by age
    # The revision of the same task's change before this one (0: none), so that one task's
    # changes are a chain through the history rather than a list of their own.
    previous: int = 0
    # The attempt that this change ended, if it ended one: the store adds it to the task's
    # history of attempts, in the same write.
    ended: Attempt | None = None
