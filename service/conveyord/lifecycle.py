"""The rules of a task's life, in one place: pure functions from a task to its next state.

Each function takes a task's latest state and what happened, and returns the next state
(a new record made with `Task.evolve`), None when nothing changes, or raises the refusal
that the caller answers with. None of them does I/O or keeps state: the store applies them
atomically (`store.update(task_id, lambda task: claim(task, ...))`), and the dispatcher,
the workers and the API decide when. `now` is always given, so they are tested with
plain numbers (tests/test_lifecycle.py, table by table).

Every attempt runs under a lease: `claim` grants it, and a report, a renewal or a result
must carry its id. One that carries another id (the attempt was cancelled, expired or
taken over since) is refused with StaleLease and changes nothing, which fences a late or
lost holder out. The moves a task can make are the model's TRANSITIONS.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import grpc

from conveyord.errors import ConveyorError
from conveyord.model import ErrorCode, Task, TaskError, TaskStatus

# The lease fields of a task whose attempt is over.
_NO_LEASE: Mapping[str, Any] = {"lease_id": "", "lease_holder": "", "lease_expires_at": None}


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed attempt runs again: after `initial` seconds, times `multiplier` for each
    attempt after the first, at most `maximum`; and how often the server's own shutdown may
    send an attempt back to the queue without using it."""

    initial: float = 1.0
    multiplier: float = 2.0
    maximum: float = 300.0
    max_interruptions: int = 3

    def delay(self, failed_attempt: int) -> float:
        """Seconds before the attempt after `failed_attempt` (1 s, 2 s, 4 s ... by default)."""
        return min(self.initial * self.multiplier ** (failed_attempt - 1), self.maximum)


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """The right to run one attempt: its id, who holds it, and until when (epoch seconds)."""

    lease_id: str
    holder: str
    expires_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended, before the retry policy is applied."""

    result: Any = None
    error: TaskError | None = None
    retryable: bool = True
    interrupted: bool = False  # stopped by the server's own shutdown, not by the task


class TaskAlreadyEnded(ConveyorError):
    """A Cancel of a task that already COMPLETED or FAILED."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "TASK_ALREADY_ENDED"

    def __init__(self, task: Task) -> None:
        super().__init__(f"task {task.task_id} already ended {task.status.name}")
        self.task = task

    def metadata(self) -> dict[str, str]:
        return {"status": self.task.status.name}


class StaleLease(ConveyorError):
    """A report, renewal or result under a lease that the attempt no longer has."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "LEASE_NOT_HELD"

    def __init__(self, task: Task, lease_id: str) -> None:
        held = "no lease" if not task.lease_id else "another lease"
        super().__init__(
            f"lease {lease_id} of task {task.task_id} is no longer valid: the task is "
            f"{task.status.name} under {held}; the attempt's report or result is refused"
        )
        self.task_id = task.task_id
        self.lease_id = lease_id

    def metadata(self) -> dict[str, str]:
        return {"task_id": self.task_id, "lease_id": self.lease_id}


_random_bytes = bytearray()


def new_lease_id() -> str:
    """A lease id: 128 random bits, hex. Drawn from a pool that one system call fills for
    256 ids, since a lease is granted for every attempt."""
    global _random_bytes
    if not _random_bytes:
        _random_bytes = bytearray(os.urandom(4096))
    drawn = _random_bytes[-16:]
    del _random_bytes[-16:]
    return drawn.hex()


def claim(task: Task, lease: Lease, now: float) -> Task | None:
    """Start an attempt under `lease`: a CREATED task that is runnable becomes RUNNING.
    None if it is not there to take (cancelled, taken, not yet due, or past its start
    deadline: it is to fail with QUEUE_TIMEOUT, not to start late)."""
    if task.status is not TaskStatus.CREATED or (task.next_attempt_at or 0.0) > now:
        return None
    if task.start_deadline is not None and task.start_deadline <= now:
        return None
    return task.evolve(
        start_deadline=None,
        queued_at=None,
        status=TaskStatus.RUNNING,
        lease_id=lease.lease_id,
        lease_holder=lease.holder,
        lease_expires_at=lease.expires_at,
        started_at=now,
        updated_at=now,
        next_attempt_at=None,
        message=f"running (attempt {task.attempt} of {task.max_attempts})",
    )


def renew(task: Task, lease_id: str, expires_at: float) -> Task:
    """Extend a held lease."""
    _check_lease(task, lease_id)
    return task.evolve(lease_expires_at=expires_at)


def report(task: Task, lease_id: str, changes: Mapping[str, Any], now: float) -> Task:
    """Apply a holder's progress report (progress, message, progress_detail)."""
    _check_lease(task, lease_id)
    return task.evolve(updated_at=now, **changes)


def finish(task: Task, lease_id: str, outcome: Outcome, policy: RetryPolicy, now: float) -> Task:
    """End an attempt: COMPLETED with its result; CANCELLED if a Cancel came meanwhile;
    back to the queue on the same attempt if the server's shutdown stopped it (up to the
    policy's limit); else a failure, retried per the policy while attempts remain."""
    _check_lease(task, lease_id)
    if task.cancel_requested_at is not None:
        return cancelled(task, task.cancel_reason, now)
    error = outcome.error
    if outcome.interrupted:
        if task.interruptions < policy.max_interruptions:
            return _requeued(task, now, policy.max_interruptions)
        error = TaskError(
            ErrorCode.INTERRUPTED,
            f"the server stopped while attempt {task.attempt} ran, after "
            f"{task.interruptions} earlier interruptions: this one uses the attempt",
        )
    if error is None:
        return task.evolve(
            **_NO_LEASE,
            status=TaskStatus.COMPLETED,
            result=outcome.result,
            error=None,
            last_attempt_error=task.error or task.last_attempt_error,
            progress=1.0,
            message="completed",
            finished_at=now,
            updated_at=now,
        )
    delay = policy.delay(task.attempt)
    return failed(task, error, retryable=outcome.retryable, now=now, delay=delay)


def failed(task: Task, error: TaskError, *, retryable: bool, now: float, delay: float) -> Task:
    """A failed attempt: back to CREATED for the next one after `delay`, or FAILED."""
    if retryable and task.attempt < task.max_attempts:
        when = f"in {delay:g} s" if delay else "now"
        return task.evolve(
            **_NO_LEASE,
            status=TaskStatus.CREATED,
            attempt=task.attempt + 1,
            error=error,
            last_attempt_error=error,
            next_attempt_at=now + delay,
            updated_at=now,
            message=f"attempt {task.attempt} failed ({error.code}), retry {when}",
        )
    return task.evolve(
        **_NO_LEASE,
        status=TaskStatus.FAILED,
        error=error,
        last_attempt_error=error,
        finished_at=now,
        updated_at=now,
        message=f"failed: {error.message}",
    )


def cancel(task: Task, reason: str, now: float) -> Task | None:
    """A Cancel: a queued task ends CANCELLED at once; a running one records the request
    (its holder is told, and the attempt ends CANCELLED when it finishes or is stopped).
    None for a task already cancelled or being cancelled; TaskAlreadyEnded for one that
    COMPLETED or FAILED."""
    if task.status is TaskStatus.CANCELLED:
        return None
    if task.terminal:
        raise TaskAlreadyEnded(task)
    if task.status in (TaskStatus.CREATED, TaskStatus.PAUSED):
        return cancelled(task, reason, now)
    if task.cancel_requested_at is not None:
        return None
    return task.evolve(
        cancel_requested_at=now,
        cancel_reason=reason,
        updated_at=now,
        message=f"cancelling: {reason}",
    )


def expire(
    task: Task, error: TaskError, policy: RetryPolicy, now: float, delay: float
) -> Task | None:
    """An attempt whose holder is gone (its lease ran out, or the server running it died):
    a failed attempt (retried after `delay` while attempts remain), or CANCELLED if a
    Cancel had been accepted. None if the task is not RUNNING."""
    if task.status is not TaskStatus.RUNNING:
        return None
    if task.cancel_requested_at is not None:
        return cancelled(task, task.cancel_reason, now)
    return failed(task, error, retryable=True, now=now, delay=delay)


def pause(task: Task, reason: str, now: float) -> Task | None:
    """A Pause: a queued task leaves the queue, PAUSED, keeping where it stood in it (its
    age counts on) and the rest of its queue timeout. None for a task already PAUSED, or
    RUNNING (only a handler that can park pauses a running attempt); TaskAlreadyEnded for
    one that ended."""
    if task.terminal:
        raise TaskAlreadyEnded(task)
    if task.status is not TaskStatus.CREATED:
        return None
    return task.evolve(
        status=TaskStatus.PAUSED,
        queued_at=task.queued_since,
        paused_at=now,
        pause_reason=reason,
        updated_at=now,
        message=f"paused: {reason}",
    )


def resume(task: Task, now: float) -> Task | None:
    """A Resume: a PAUSED task is queued again where it stood, its start deadline moved
    on by the time it was paused. None for a task that is not PAUSED."""
    if task.status is not TaskStatus.PAUSED:
        return None
    deadline = task.start_deadline
    if deadline is not None and task.paused_at is not None:
        deadline += now - task.paused_at
    return task.evolve(
        status=TaskStatus.CREATED,
        paused_at=None,
        pause_reason="",
        start_deadline=deadline,
        updated_at=now,
        message="queued (resumed)",
    )


def queue_timed_out(task: Task, now: float) -> Task | None:
    """A task whose first attempt did not start by its start deadline: FAILED, with
    QUEUE_TIMEOUT. None if it started or ended meanwhile, or is not yet due."""
    deadline = task.start_deadline
    if task.status is not TaskStatus.CREATED or deadline is None or deadline > now:
        return None
    runnable_at = task.next_attempt_at or task.created_at
    error = TaskError(
        ErrorCode.QUEUE_TIMEOUT,
        f"not started within its queue timeout of {deadline - runnable_at:g} s: "
        "no worker took it in time",
    )
    return task.evolve(
        status=TaskStatus.FAILED,
        error=error,
        message="failed: not started in time",
        finished_at=now,
        updated_at=now,
        next_attempt_at=None,
        start_deadline=None,
    )


def cancelled(task: Task, reason: str, now: float) -> Task:
    """The task's end by a Cancel, with the reason as its error."""
    return task.evolve(
        **_NO_LEASE,
        start_deadline=None,
        paused_at=None,
        pause_reason="",
        status=TaskStatus.CANCELLED,
        error=TaskError(ErrorCode.CANCELLED, reason),
        message=f"cancelled: {reason}",
        finished_at=now,
        updated_at=now,
        next_attempt_at=None,
    )


def _requeued(task: Task, now: float, limit: int) -> Task:
    """An attempt stopped by the server's shutdown: queued again on the same attempt."""
    count = task.interruptions + 1
    message = (
        f"the server stopped while attempt {task.attempt} ran; queued again without using "
        f"an attempt (interruption {count} of at most {limit})"
    )
    return task.evolve(
        **_NO_LEASE,
        status=TaskStatus.CREATED,
        interruptions=count,
        error=TaskError(ErrorCode.INTERRUPTED, message),
        next_attempt_at=None,
        updated_at=now,
        message=message,
    )


def _check_lease(task: Task, lease_id: str) -> None:
    if task.status is not TaskStatus.RUNNING or task.lease_id != lease_id:
        raise StaleLease(task, lease_id)
