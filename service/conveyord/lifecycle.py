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
from conveyord.model import (
    LEASED,
    Attempt,
    AttemptOutcome,
    ErrorCode,
    Task,
    TaskError,
    TaskInput,
    TaskStatus,
)

# The fields of a task whose attempt is over: its lease, and a Pause it had not reached.
_NO_LEASE: Mapping[str, Any] = {
    "lease_id": "",
    "lease_holder": "",
    "lease_expires_at": None,
    "pause_requested_at": None,
}
_NOT_WAITING: Mapping[str, Any] = {"input_prompt": "", "input_label": "", "input_deadline": None}


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """How long a task waits before its next attempt: `initial` seconds after the first
    failed attempt, times `multiplier` for each one after it, at most `maximum`."""

    initial: float = 1.0
    multiplier: float = 2.0
    maximum: float = 300.0

    def delay(self, failed_attempt: int) -> float:
        """Seconds before the attempt after `failed_attempt` (1 s, 2 s, 4 s ... by default)."""
        return min(self.initial * self.multiplier ** (failed_attempt - 1), self.maximum)


@dataclasses.dataclass(frozen=True, slots=True)
class TypeRetry:
    """The retry defaults of one task type: the attempts of a task whose request does not
    say, and the parts of its backoff that differ from the server's (None: the server's)."""

    max_attempts: int
    initial: float | None = None
    multiplier: float | None = None
    maximum: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed attempt runs again: after `initial` seconds, times `multiplier` for each
    attempt after the first, at most `maximum` (or as `by_type` says for a task type); and
    how often the server's own shutdown may send an attempt back to the queue without
    using it."""

    initial: float = 1.0
    multiplier: float = 2.0
    maximum: float = 300.0
    max_interruptions: int = 3
    by_type: Mapping[str, Backoff] = dataclasses.field(default_factory=dict)

    def delay(self, failed_attempt: int, task_type: str = "") -> float:
        """Seconds before the attempt after `failed_attempt` of a task of `task_type`
        (1 s, 2 s, 4 s ... by default)."""
        backoff = self.by_type.get(task_type)
        if backoff is None:
            backoff = Backoff(self.initial, self.multiplier, self.maximum)
        return backoff.delay(failed_attempt)

    def with_types(self, types: Mapping[str, TypeRetry]) -> RetryPolicy:
        """This policy with the backoff of each task type that sets one."""
        by_type = {
            task_type: Backoff(
                self.initial if retry.initial is None else retry.initial,
                self.multiplier if retry.multiplier is None else retry.multiplier,
                self.maximum if retry.maximum is None else retry.maximum,
            )
            for task_type, retry in types.items()
            if (retry.initial, retry.multiplier, retry.maximum) != (None, None, None)
        }
        return dataclasses.replace(self, by_type=by_type)


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """The right to run one attempt: its id, who holds it, and until when (epoch seconds)."""

    lease_id: str
    holder: str
    expires_at: float
    pausable: bool = False  # the holder's handler for the task can park at a pause point


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended, before the retry policy is applied."""

    result: Any = None
    error: TaskError | None = None
    retryable: bool = True
    interrupted: bool = False  # stopped by the server's own shutdown, not by the task
    wait: InputWait | None = None  # the handler waits for input: the attempt is suspended
    retry_delay: float | None = None  # the handler's delay before the next attempt
    checkpoint: Mapping[str, Any] | None = None  # the handler's, for the next attempt


@dataclasses.dataclass(frozen=True, slots=True)
class InputWait:
    """A handler's wait for input: what it asks, for how long (seconds; None: no limit),
    and how many of the task's inputs it had seen (one that came since answers the wait)."""

    prompt: str
    label: str
    timeout: float | None
    seen: int


@dataclasses.dataclass(frozen=True, slots=True)
class InputLimits:
    """How much input a task keeps: inputs, and their encoded bytes together."""

    count: int
    total_bytes: int


class TaskAlreadyEnded(ConveyorError):
    """A Cancel of a task that already COMPLETED or FAILED."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "TASK_ALREADY_ENDED"

    def __init__(self, task: Task) -> None:
        super().__init__(f"task {task.task_id} already ended {task.status.name}")
        self.task = task

    def metadata(self) -> dict[str, str]:
        return {"status": self.task.status.name}


class InputsFull(ConveyorError):
    """A SendInput to a task that already holds as much input as it may."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "TASK_INPUTS_FULL"

    def __init__(self, task: Task, limits: InputLimits) -> None:
        super().__init__(
            f"task {task.task_id} already holds {len(task.inputs)} inputs of "
            f"{sum(i.size for i in task.inputs)} bytes; a task keeps at most {limits.count} "
            f"inputs of {limits.total_bytes} bytes together"
        )
        self.task_id = task.task_id

    def metadata(self) -> dict[str, str]:
        return {"task_id": self.task_id}


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
        pausable=lease.pausable,
        paused_seconds=0.0,
        started_at=now,
        updated_at=now,
        next_attempt_at=None,
        message=f"running (attempt {task.attempt} of {task.max_attempts})",
    )


def renew(task: Task, lease_id: str, expires_at: float) -> Task:
    """Extend a held lease (of a running attempt, or of a parked one)."""
    _check_lease(task, lease_id)
    return task.evolve(lease_expires_at=expires_at)


def report(task: Task, lease_id: str, changes: Mapping[str, Any], now: float) -> Task:
    """Apply a holder's progress report (progress, message, progress_detail)."""
    _check_lease(task, lease_id)
    return task.evolve(updated_at=now, **changes)


def finish(task: Task, lease_id: str, outcome: Outcome, policy: RetryPolicy, now: float) -> Task:
    """End an attempt: COMPLETED with its result; CANCELLED if a Cancel came meanwhile;
    back to the queue on the same attempt if the server's shutdown stopped it (up to the
    policy's limit); WAITING_INPUT if the handler waits for input (CREATED again at once if
    an input it had not seen came meanwhile); else a failure, retried per the policy while
    attempts remain. An attempt that ends while parked lands the same way, except that
    where it would be queued again it is held PAUSED."""
    _check_lease(task, lease_id)
    if task.status is TaskStatus.PAUSED:
        running = task.evolve(status=TaskStatus.RUNNING)
        return _ended_parked(task, finish(running, lease_id, outcome, policy, now))
    if outcome.checkpoint is not None:
        task = task.evolve(checkpoint=outcome.checkpoint)
    if task.cancel_requested_at is not None:
        return cancelled(task, task.cancel_reason, now)
    if outcome.wait is not None:
        return _waiting(task, outcome.wait, now)
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
    delay = outcome.retry_delay
    if delay is None:
        delay = policy.delay(task.attempt, task.task_type)
    return failed(task, error, retryable=outcome.retryable, now=now, delay=delay)


def failed(task: Task, error: TaskError, *, retryable: bool, now: float, delay: float) -> Task:
    """A failed attempt: back to CREATED for the next one after `delay`, or FAILED (at once
    if not `retryable`, its error marked so)."""
    if not retryable and not error.non_retryable:
        error = dataclasses.replace(error, non_retryable=True)
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


def checkpoint_of(task: Task) -> Mapping[str, Any] | None:
    """What an attempt of `task` resumes from: the checkpoint its handler last saved, else
    the latest progress detail (None on a first attempt that has neither)."""
    return task.checkpoint if task.checkpoint is not None else task.progress_detail


def ended_attempt(old: Task, new: Task) -> Attempt | None:
    """The attempt that the change from `old` to `new` ended, for the task's history: one
    whose lease `new` no longer holds. None if the change ended none."""
    if not old.lease_id or new.lease_id == old.lease_id:
        return None
    error = new.error
    if new.status is TaskStatus.COMPLETED:
        outcome, error = AttemptOutcome.COMPLETED, None
    elif new.status is TaskStatus.CANCELLED:
        outcome = AttemptOutcome.CANCELLED
    elif new.status is TaskStatus.FAILED or new.attempt > old.attempt:
        outcome = AttemptOutcome.FAILED
    elif new.interruptions > old.interruptions:
        outcome = AttemptOutcome.INTERRUPTED
    else:  # its handler waits for input (queued again at once if one had come)
        outcome, error = AttemptOutcome.SUSPENDED, None
    started = old.started_at if old.started_at is not None else new.updated_at
    return Attempt(old.attempt, started, new.updated_at, old.lease_holder, outcome, error)


def cancel(task: Task, reason: str, now: float) -> Task | None:
    """A Cancel: a queued task ends CANCELLED at once; a running one records the request
    (its holder is told, and the attempt ends CANCELLED when it finishes or is stopped),
    as does a parked one. None for a task already cancelled or being cancelled;
    TaskAlreadyEnded for one that COMPLETED or FAILED."""
    if task.status is TaskStatus.CANCELLED:
        return None
    if task.terminal:
        raise TaskAlreadyEnded(task)
    if task.status not in LEASED or not task.lease_id:
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
    a failed attempt (retried after `delay` while attempts remain; held PAUSED if it was
    parked), or CANCELLED if a Cancel had been accepted. None if no attempt holds a lease."""
    if task.status not in LEASED or not task.lease_id:
        return None
    if task.status is TaskStatus.PAUSED:
        landed = expire(task.evolve(status=TaskStatus.RUNNING), error, policy, now, delay)
        return None if landed is None else _ended_parked(task, landed)
    if task.cancel_requested_at is not None:
        return cancelled(task, task.cancel_reason, now)
    return failed(task, error, retryable=True, now=now, delay=delay)


def pause(task: Task, reason: str, now: float) -> Task | None:
    """A Pause. A queued task (or one waiting for input) leaves the queue, PAUSED, keeping
    where it stood in it (its age counts on) and the rest of its queue timeout. A running
    attempt whose handler can park is asked to (PAUSED once it has parked). None for a task
    already PAUSED or being paused, or running a handler that cannot park;
    TaskAlreadyEnded for one that ended."""
    if task.terminal:
        raise TaskAlreadyEnded(task)
    if task.status is TaskStatus.RUNNING:
        if not task.pausable or task.pause_requested_at or task.cancel_requested_at:
            return None
        return task.evolve(
            pause_requested_at=now,
            pause_reason=reason,
            updated_at=now,
            message=f"pausing: {reason}",
        )
    if task.status not in (TaskStatus.CREATED, TaskStatus.WAITING_INPUT):
        return None
    return task.evolve(
        **_NOT_WAITING,
        status=TaskStatus.PAUSED,
        queued_at=task.queued_since,
        paused_at=now,
        pause_reason=reason,
        updated_at=now,
        message=f"paused: {reason}",
    )


def park(task: Task, lease_id: str, now: float, lease_expires_at: float | None) -> Task | None:
    """A running attempt's handler parked at a pause point, as a Pause asked: PAUSED, its
    lease kept (until `lease_expires_at`; None: a holder in this process, which settles its
    leases itself) and its timeout stopped. None if no Pause is asked any more."""
    _check_lease(task, lease_id)
    if task.status is not TaskStatus.RUNNING or task.pause_requested_at is None:
        return None
    return task.evolve(
        status=TaskStatus.PAUSED,
        pause_requested_at=None,
        paused_at=now,
        lease_expires_at=lease_expires_at,
        updated_at=now,
        message=f"paused: {task.pause_reason}",
    )


def resume(task: Task, now: float, lease_margin: float = 0.0) -> Task | None:
    """A Resume. A PAUSED queued task is queued again where it stood, its start deadline
    moved on by the time it was paused; a parked attempt runs on (its timeout moved on
    likewise; a lease that had no expiry lasts the rest of its timeout and `lease_margin`);
    a Pause not yet reached is withdrawn. None for a task that is none of these."""
    if task.status is TaskStatus.RUNNING and task.pause_requested_at is not None:
        return task.evolve(
            pause_requested_at=None, pause_reason="", updated_at=now, message="running"
        )
    if task.status is not TaskStatus.PAUSED:
        return None
    paused_for = now - task.paused_at if task.paused_at is not None else 0.0
    if task.lease_id:
        paused_seconds = task.paused_seconds + paused_for
        lease_expires_at = task.lease_expires_at
        if lease_expires_at is None:
            started = task.started_at if task.started_at is not None else now
            lease_expires_at = started + task.timeout_seconds + paused_seconds + lease_margin
        return task.evolve(
            status=TaskStatus.RUNNING,
            paused_at=None,
            pause_reason="",
            paused_seconds=paused_seconds,
            lease_expires_at=lease_expires_at,
            updated_at=now,
            message="running (resumed)",
        )
    deadline = task.start_deadline
    if deadline is not None:
        deadline += paused_for
    return task.evolve(
        status=TaskStatus.CREATED,
        paused_at=None,
        pause_reason="",
        start_deadline=deadline,
        updated_at=now,
        message="queued (resumed)",
    )


def deliver_input(task: Task, sent: TaskInput, limits: InputLimits, now: float) -> Task | None:
    """A SendInput: the input is kept with the task, after the others. A task waiting for
    input is queued again (its handler runs and finds it); a running one's holder is given
    it (dispatch follows the store). None for an input already kept under the same request
    id; TaskAlreadyEnded for a task that ended; InputsFull past the limits."""
    if task.terminal:
        raise TaskAlreadyEnded(task)
    if sent.request_id and any(kept.request_id == sent.request_id for kept in task.inputs):
        return None
    if (
        len(task.inputs) >= limits.count
        or sum(kept.size for kept in task.inputs) + sent.size > limits.total_bytes
    ):
        raise InputsFull(task, limits)
    if task.status is not TaskStatus.WAITING_INPUT:
        return task.evolve(inputs=(*task.inputs, sent), updated_at=now)
    return task.evolve(
        **_NOT_WAITING,
        status=TaskStatus.CREATED,
        inputs=(*task.inputs, sent),
        next_attempt_at=None,
        updated_at=now,
        message=f"queued (input {len(task.inputs) + 1} received)",
    )


def overdue(task: Task, now: float) -> Task | None:
    """A task past the deadline of what it waits for: a start (QUEUE_TIMEOUT) or an input
    (INPUT_TIMEOUT). None if it is not waiting for either any more, or not yet due."""
    if task.status is TaskStatus.WAITING_INPUT:
        return input_timed_out(task, now)
    return queue_timed_out(task, now)


def input_timed_out(task: Task, now: float) -> Task | None:
    """A task whose handler waited for input past the wait's timeout: FAILED, with
    INPUT_TIMEOUT (not retried: another attempt would wait for the same input)."""
    deadline = task.input_deadline
    if task.status is not TaskStatus.WAITING_INPUT or deadline is None or deadline > now:
        return None
    prompt = f" ({task.input_prompt})" if task.input_prompt else ""
    error = TaskError(ErrorCode.INPUT_TIMEOUT, f"no input came in time{prompt}")
    return task.evolve(
        **_NOT_WAITING,
        status=TaskStatus.FAILED,
        error=error,
        last_attempt_error=error,
        message="failed: no input came in time",
        finished_at=now,
        updated_at=now,
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


def _waiting(task: Task, wait: InputWait, now: float) -> Task:
    """An attempt suspended to wait for input: WAITING_INPUT, holding no lease and no slot
    (an input queues it again, and its handler runs afresh, seeing every input); queued
    again at once if an input it had not seen came meanwhile."""
    if len(task.inputs) > wait.seen:
        return task.evolve(
            **_NO_LEASE,
            status=TaskStatus.CREATED,
            next_attempt_at=None,
            updated_at=now,
            message=f"queued (input {wait.seen + 1} had come)",
        )
    return task.evolve(
        **_NO_LEASE,
        status=TaskStatus.WAITING_INPUT,
        input_prompt=wait.prompt,
        input_label=wait.label,
        input_deadline=None if wait.timeout is None else now + wait.timeout,
        next_attempt_at=None,
        updated_at=now,
        message=f"waiting for input: {wait.prompt}" if wait.prompt else "waiting for input",
    )


def _ended_parked(task: Task, landed: Task) -> Task:
    """The end of a parked attempt: where it `landed` as a running one, except that where
    it would be queued again (a retry, an interruption, a wait) it stays held PAUSED, so
    that Resume decides when it runs."""
    if landed.status in (TaskStatus.CREATED, TaskStatus.WAITING_INPUT):
        return landed.evolve(
            **_NOT_WAITING,
            status=TaskStatus.PAUSED,
            paused_at=task.paused_at,
            pause_reason=task.pause_reason,
            message=f"paused: {task.pause_reason} (its attempt ended: {landed.message})",
        )
    return landed.evolve(paused_at=None, pause_reason="")


def _check_lease(task: Task, lease_id: str) -> None:
    if task.status not in LEASED or task.lease_id != lease_id:
        raise StaleLease(task, lease_id)
