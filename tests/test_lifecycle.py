"""The rules of a task's life, table by table: every transition and every refusal, with plain
numbers for times and no server."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from conveyord import lifecycle
from conveyord.lifecycle import (
    InputLimits,
    InputsFull,
    InputWait,
    Lease,
    Outcome,
    RetryPolicy,
    StaleLease,
    TaskAlreadyEnded,
    TypeRetry,
)
from conveyord.model import (
    TRANSITIONS,
    Attempt,
    AttemptOutcome,
    ErrorCode,
    Task,
    TaskError,
    TaskInput,
    TaskStatus,
)

CREATED, RUNNING, PAUSED = TaskStatus.CREATED, TaskStatus.RUNNING, TaskStatus.PAUSED
WAITING_INPUT = TaskStatus.WAITING_INPUT
COMPLETED, FAILED, CANCELLED = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED
NOW = 1_000.0
LEASE = Lease("lease-1", "host:1/local", NOW + 60)
POLICY = RetryPolicy(initial=1.0, multiplier=2.0, maximum=300.0, max_interruptions=2)
BOOM = TaskError(ErrorCode.HANDLER_ERROR, "RuntimeError: boom")


def task(status: TaskStatus = CREATED, **fields: Any) -> Task:
    """A task in `status`; a RUNNING one holds LEASE unless told otherwise."""
    record = Task(
        task_id="0f0e0d0c-0b0a-4908-8706-050403020100", seq=1, task_type="echo",
        description="", parameters={}, priority=5, timeout_seconds=10.0, max_attempts=3,
        labels={}, created_at=1.0, updated_at=1.0,
    )  # fmt: skip
    if status is RUNNING or fields.pop("parked", False):
        fields = {"lease_id": LEASE.lease_id, "lease_holder": LEASE.holder, **fields}
    return dataclasses.replace(record, status=status, **fields)


def _holds_no_lease(ended: Task) -> bool:
    return (ended.lease_id, ended.lease_holder, ended.lease_expires_at) == ("", "", None)


# -- claim -----------------------------------------------------------------------


def test_claim_starts_a_runnable_task_under_the_lease() -> None:
    started = lifecycle.claim(task(next_attempt_at=NOW), LEASE, NOW)
    assert started is not None
    assert (started.status, started.attempt, started.started_at) == (RUNNING, 1, NOW)
    assert (started.lease_id, started.lease_holder, started.lease_expires_at) == (
        LEASE.lease_id,
        LEASE.holder,
        LEASE.expires_at,
    )
    assert started.next_attempt_at is None and started.message == "running (attempt 1 of 3)"


@pytest.mark.parametrize(
    "unclaimable",
    [
        task(next_attempt_at=NOW + 0.5),  # its next attempt (or delayed start) is not due yet
        task(start_deadline=NOW),  # too late to start: it fails with QUEUE_TIMEOUT instead
        task(RUNNING),
        task(COMPLETED),
        task(FAILED),
        task(CANCELLED),
    ],
)
def test_claim_takes_nothing_that_is_not_runnable(unclaimable: Task) -> None:
    assert lifecycle.claim(unclaimable, LEASE, NOW) is None


def test_a_start_clears_the_start_deadline() -> None:
    started = lifecycle.claim(task(start_deadline=NOW + 1), LEASE, NOW)
    assert started is not None and started.start_deadline is None


# -- queue timeout -------------------------------------------------------------------


def test_a_task_not_started_by_its_deadline_fails_with_queue_timeout() -> None:
    waiting = task(next_attempt_at=NOW - 30, start_deadline=NOW)  # delayed, then 30 s
    failed = lifecycle.queue_timed_out(waiting, NOW)
    assert failed is not None
    assert (failed.status, failed.finished_at, failed.start_deadline) == (FAILED, NOW, None)
    assert failed.error is not None and failed.error.code == ErrorCode.QUEUE_TIMEOUT
    assert "queue timeout of 30 s" in failed.error.message


@pytest.mark.parametrize(
    "untouched",
    [
        task(start_deadline=NOW + 1),  # not due yet
        task(),  # no queue timeout
        task(RUNNING),  # it started
        task(CANCELLED),
    ],
)
def test_the_queue_timeout_touches_nothing_else(untouched: Task) -> None:
    assert lifecycle.queue_timed_out(untouched, NOW) is None


# -- pause and resume ---------------------------------------------------------------


def test_a_pause_holds_a_queued_task_where_it_stood() -> None:
    paused = lifecycle.pause(task(updated_at=5.0), "hold on", NOW)
    assert paused is not None
    assert (paused.status, paused.paused_at, paused.pause_reason) == (PAUSED, NOW, "hold on")
    assert paused.queued_at == 5.0  # its age counts from when it was queued
    retried = lifecycle.pause(task(next_attempt_at=7.0, attempt=2), "hold on", NOW)
    assert retried is not None and retried.queued_at == 7.0


@pytest.mark.parametrize(
    "unchanged",
    [
        task(RUNNING),  # its handler cannot park
        task(RUNNING, pausable=True, pause_requested_at=NOW - 1),  # asked already
        task(RUNNING, pausable=True, cancel_requested_at=NOW - 1),  # being cancelled
        task(PAUSED),
        task(PAUSED, parked=True),
    ],
)
def test_a_pause_changes_nothing_it_cannot_pause_or_has(unchanged: Task) -> None:
    assert lifecycle.pause(unchanged, "hold on", NOW) is None


def test_a_pause_holds_a_task_waiting_for_input() -> None:
    waiting = task(WAITING_INPUT, input_prompt="name?", input_deadline=NOW + 60)
    paused = lifecycle.pause(waiting, "hold on", NOW)
    assert paused is not None
    assert (paused.status, paused.input_prompt, paused.input_deadline) == (PAUSED, "", None)
    resumed = lifecycle.resume(paused, NOW)
    assert resumed is not None and resumed.status is CREATED  # it runs, and waits again


def test_a_pause_of_a_running_pausable_handler_asks_it_to_park() -> None:
    asked = lifecycle.pause(task(RUNNING, pausable=True), "hold on", NOW)
    assert asked is not None
    assert (asked.status, asked.pause_requested_at, asked.pause_reason) == (
        RUNNING,
        NOW,
        "hold on",
    )
    parked = lifecycle.park(asked, LEASE.lease_id, NOW + 1, None)
    assert parked is not None
    assert (parked.status, parked.paused_at, parked.pause_requested_at) == (PAUSED, NOW + 1, None)
    assert (parked.lease_id, parked.lease_expires_at) == (LEASE.lease_id, None)
    assert parked.parked and lifecycle.renew(parked, LEASE.lease_id, NOW + 9).lease_expires_at


def test_a_park_without_a_pause_asked_changes_nothing() -> None:
    assert lifecycle.park(task(RUNNING, pausable=True), LEASE.lease_id, NOW, None) is None
    with pytest.raises(StaleLease):
        lifecycle.park(task(RUNNING, pause_requested_at=NOW), "another", NOW, None)


def test_a_resume_lets_a_parked_attempt_run_on_with_its_timeout_moved() -> None:
    parked = task(
        PAUSED, parked=True, started_at=NOW - 100, paused_at=NOW - 40, paused_seconds=5.0,
        pause_reason="x", lease_expires_at=None,
    )  # fmt: skip
    running = lifecycle.resume(parked, NOW, lease_margin=15.0)
    assert running is not None
    assert (running.status, running.paused_at, running.pause_reason) == (RUNNING, None, "")
    assert running.paused_seconds == 45.0
    # its lease lasts the rest of its timeout (10 s from its start, plus 45 s parked) and more
    assert running.lease_expires_at == NOW - 100 + 10.0 + 45.0 + 15.0
    renewing = lifecycle.resume(dataclasses.replace(parked, lease_expires_at=NOW + 7), NOW)
    assert renewing is not None and renewing.lease_expires_at == NOW + 7  # its holder renews


def test_a_resume_withdraws_a_pause_not_yet_reached() -> None:
    asked = task(RUNNING, pausable=True, pause_requested_at=NOW - 1, pause_reason="x")
    running = lifecycle.resume(asked, NOW)
    assert running is not None
    assert (running.status, running.pause_requested_at, running.pause_reason) == (
        RUNNING,
        None,
        "",
    )


@pytest.mark.parametrize("status", [COMPLETED, FAILED, CANCELLED])
def test_a_pause_of_a_task_that_ended_is_refused(status: TaskStatus) -> None:
    with pytest.raises(TaskAlreadyEnded):
        lifecycle.pause(task(status), "hold on", NOW)


def test_a_resume_queues_a_paused_task_again_and_moves_its_deadline() -> None:
    paused = task(PAUSED, queued_at=5.0, paused_at=NOW - 60, pause_reason="x", start_deadline=NOW)
    resumed = lifecycle.resume(paused, NOW)
    assert resumed is not None
    assert (resumed.status, resumed.queued_at, resumed.paused_at) == (CREATED, 5.0, None)
    assert (resumed.pause_reason, resumed.start_deadline) == ("", NOW + 60)
    started = lifecycle.claim(resumed, LEASE, NOW)
    assert started is not None and started.queued_at is None


@pytest.mark.parametrize("status", [CREATED, RUNNING, WAITING_INPUT, COMPLETED, CANCELLED])
def test_a_resume_changes_nothing_that_is_not_paused(status: TaskStatus) -> None:
    assert lifecycle.resume(task(status), NOW) is None


def test_a_cancel_ends_a_paused_task_at_once() -> None:
    ended = lifecycle.cancel(task(PAUSED, paused_at=NOW - 1, pause_reason="x"), "no", NOW)
    assert ended is not None
    assert (ended.status, ended.paused_at, ended.pause_reason) == (CANCELLED, None, "")


def test_a_cancel_of_a_parked_attempt_asks_its_holder() -> None:
    parked = task(PAUSED, parked=True, paused_at=NOW - 1, pause_reason="x")
    asked = lifecycle.cancel(parked, "no", NOW)
    assert asked is not None and (asked.status, asked.cancel_requested_at) == (PAUSED, NOW)
    ended = lifecycle.finish(asked, LEASE.lease_id, Outcome(), POLICY, NOW + 1)
    assert (ended.status, ended.paused_at, ended.pause_reason) == (CANCELLED, None, "")
    assert _holds_no_lease(ended)


# -- the end of a parked attempt -----------------------------------------------------

PARKED = task(PAUSED, parked=True, paused_at=NOW - 5, pause_reason="hold")


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        (Outcome(result=1), COMPLETED),
        (Outcome(error=BOOM, retryable=False), FAILED),
        (Outcome(error=BOOM), PAUSED),  # retried: the next attempt is held
        (Outcome(interrupted=True, error=BOOM), PAUSED),  # the server's shutdown
        (Outcome(wait=InputWait("name?", "", None, 0)), PAUSED),
    ],
)
def test_a_parked_attempt_that_ends_lands_as_a_running_one_but_is_held(
    outcome: Outcome, status: TaskStatus
) -> None:
    ended = lifecycle.finish(PARKED, LEASE.lease_id, outcome, POLICY, NOW)
    assert ended.status is status and _holds_no_lease(ended)
    if status is PAUSED:
        assert (ended.paused_at, ended.pause_reason, ended.input_prompt) == (NOW - 5, "hold", "")
        resumed = lifecycle.resume(ended, NOW)
        assert resumed is not None and resumed.status is CREATED
    else:
        assert (ended.paused_at, ended.pause_reason) == (None, "")


@pytest.mark.parametrize(("attempt", "status"), [(1, PAUSED), (3, FAILED)])
def test_a_parked_attempt_whose_lease_runs_out_is_held_or_fails(
    attempt: int, status: TaskStatus
) -> None:
    parked = dataclasses.replace(PARKED, attempt=attempt)
    ended = lifecycle.expire(parked, LOST, POLICY, NOW, delay=0.0)
    assert ended is not None and ended.status is status and _holds_no_lease(ended)


# -- input -------------------------------------------------------------------------

LIMITS = InputLimits(count=3, total_bytes=100)


def sent(request_id: str = "", size: int = 10) -> TaskInput:
    return TaskInput(request_id, {"text": request_id}, NOW, size)


@pytest.mark.parametrize("status", [CREATED, RUNNING, PAUSED])
def test_an_input_is_kept_in_order(status: TaskStatus) -> None:
    first = lifecycle.deliver_input(task(status), sent("a"), LIMITS, NOW)
    assert first is not None and first.status is status
    second = lifecycle.deliver_input(first, sent("b"), LIMITS, NOW)
    assert second is not None and [i.request_id for i in second.inputs] == ["a", "b"]


def test_an_input_queues_a_waiting_task_again() -> None:
    waiting = task(WAITING_INPUT, input_prompt="name?", input_label="n", input_deadline=NOW + 9)
    queued = lifecycle.deliver_input(waiting, sent("a"), LIMITS, NOW)
    assert queued is not None
    assert (queued.status, queued.input_prompt, queued.input_deadline) == (CREATED, "", None)
    assert lifecycle.claim(queued, LEASE, NOW) is not None  # runnable at once


def test_an_input_under_a_known_request_id_changes_nothing() -> None:
    once = lifecycle.deliver_input(task(), sent("a"), LIMITS, NOW)
    assert once is not None
    assert lifecycle.deliver_input(once, sent("a"), LIMITS, NOW) is None
    twice = lifecycle.deliver_input(once, sent(""), LIMITS, NOW)  # no request id: kept
    assert twice is not None and len(twice.inputs) == 2


@pytest.mark.parametrize("ended", [task(COMPLETED), task(FAILED), task(CANCELLED)])
def test_an_input_to_a_task_that_ended_is_refused(ended: Task) -> None:
    with pytest.raises(TaskAlreadyEnded):
        lifecycle.deliver_input(ended, sent("a"), LIMITS, NOW)


@pytest.mark.parametrize(
    "kept", [(sent("a"), sent("b"), sent("c")), (sent("a", size=95),)], ids=["count", "bytes"]
)
def test_inputs_past_the_limits_are_refused(kept: tuple[TaskInput, ...]) -> None:
    with pytest.raises(InputsFull):
        lifecycle.deliver_input(task(inputs=kept), sent("z"), LIMITS, NOW)


def test_a_wait_for_input_suspends_the_attempt() -> None:
    wait = InputWait("name?", "name", 60.0, seen=0)
    waiting = lifecycle.finish(task(RUNNING), LEASE.lease_id, Outcome(wait=wait), POLICY, NOW)
    assert (waiting.status, waiting.input_prompt, waiting.input_label) == (
        WAITING_INPUT,
        "name?",
        "name",
    )
    assert waiting.input_deadline == NOW + 60 and waiting.attempt == 1 and _holds_no_lease(waiting)
    no_limit = InputWait("", "", None, seen=0)
    forever = lifecycle.finish(task(RUNNING), LEASE.lease_id, Outcome(wait=no_limit), POLICY, NOW)
    assert forever.input_deadline is None and forever.message == "waiting for input"


def test_a_wait_that_an_unseen_input_answers_queues_the_task_at_once() -> None:
    running = task(RUNNING, inputs=(sent("a"),))
    wait = InputWait("more?", "", None, seen=0)
    queued = lifecycle.finish(running, LEASE.lease_id, Outcome(wait=wait), POLICY, NOW)
    assert queued.status is CREATED and queued.next_attempt_at is None


def test_a_wait_of_an_attempt_asked_to_cancel_ends_it_cancelled() -> None:
    asked = task(RUNNING, cancel_requested_at=NOW - 1, cancel_reason="stop")
    wait = Outcome(wait=InputWait("", "", None, seen=0))
    assert lifecycle.finish(asked, LEASE.lease_id, wait, POLICY, NOW).status is CANCELLED


def test_a_wait_that_times_out_fails_the_task() -> None:
    waiting = task(WAITING_INPUT, input_prompt="name?", input_deadline=NOW)
    assert lifecycle.overdue(dataclasses.replace(waiting, input_deadline=NOW + 1), NOW) is None
    failed = lifecycle.overdue(waiting, NOW)
    assert failed is not None and failed.status is FAILED
    assert failed.error == TaskError(ErrorCode.INPUT_TIMEOUT, "no input came in time (name?)")


def test_a_cancel_ends_a_waiting_task_at_once() -> None:
    ended = lifecycle.cancel(task(WAITING_INPUT, input_prompt="x"), "no", NOW)
    assert ended is not None and ended.status is CANCELLED


# -- renew and report --------------------------------------------------------------


def test_renew_extends_a_held_lease() -> None:
    assert lifecycle.renew(task(RUNNING), LEASE.lease_id, NOW + 90).lease_expires_at == NOW + 90


def test_report_applies_the_holders_progress() -> None:
    changes = {"progress": 0.5, "message": "half", "progress_detail": {"step": 2}}
    reported = lifecycle.report(task(RUNNING), LEASE.lease_id, changes, NOW)
    assert (reported.progress, reported.message, reported.progress_detail) == (
        0.5,
        "half",
        {"step": 2},
    )
    assert reported.updated_at == NOW


STALE = [
    ("another lease", task(RUNNING, lease_id="lease-2")),
    ("queued again", task(CREATED, attempt=2)),
    ("completed", task(COMPLETED)),
    ("cancelled", task(CANCELLED)),
]


@pytest.mark.parametrize(("case", "current"), STALE)
def test_a_stale_lease_is_refused_and_changes_nothing(case: str, current: Task) -> None:
    before = dataclasses.replace(current)
    acts: list[Callable[[], object]] = [
        lambda: lifecycle.renew(current, LEASE.lease_id, NOW + 90),
        lambda: lifecycle.report(current, LEASE.lease_id, {"progress": 0.9}, NOW),
        lambda: lifecycle.finish(current, LEASE.lease_id, Outcome(result=1), POLICY, NOW),
    ]
    for act in acts:
        with pytest.raises(StaleLease) as refused:
            act()
        assert refused.value.metadata() == {"task_id": current.task_id, "lease_id": "lease-1"}
    assert current == before


# -- finish ------------------------------------------------------------------------


def test_a_result_completes_the_task_and_releases_the_lease() -> None:
    ended = lifecycle.finish(task(RUNNING), LEASE.lease_id, Outcome(result={"n": 1}), POLICY, NOW)
    assert (ended.status, ended.result, ended.progress, ended.finished_at) == (
        COMPLETED,
        {"n": 1},
        1.0,
        NOW,
    )
    assert ended.error is None and _holds_no_lease(ended)


def test_a_completed_retry_keeps_the_failed_attempts_error_apart() -> None:
    retried = task(RUNNING, attempt=2, error=BOOM, last_attempt_error=BOOM)
    ended = lifecycle.finish(retried, LEASE.lease_id, Outcome(result=1), POLICY, NOW)
    assert (ended.status, ended.error, ended.last_attempt_error) == (COMPLETED, None, BOOM)


@pytest.mark.parametrize(
    ("attempt", "retryable", "status", "next_attempt", "next_at"),
    [
        (1, True, CREATED, 2, NOW + 1),  # attempts left: retried after 1 s
        (2, True, CREATED, 3, NOW + 2),  # then 2 s
        (3, True, FAILED, 3, None),  # the last attempt
        (1, False, FAILED, 1, None),  # not worth retrying
    ],
)
def test_a_failed_attempt_follows_the_retry_policy(
    attempt: int, retryable: bool, status: TaskStatus, next_attempt: int, next_at: float | None
) -> None:
    outcome = Outcome(error=BOOM, retryable=retryable)
    ended = lifecycle.finish(task(RUNNING, attempt=attempt), LEASE.lease_id, outcome, POLICY, NOW)
    assert (ended.status, ended.attempt, ended.next_attempt_at) == (status, next_attempt, next_at)
    kept = dataclasses.replace(BOOM, non_retryable=not retryable)  # marked if not retried
    assert ended.error == ended.last_attempt_error == kept and _holds_no_lease(ended)
    assert (ended.finished_at is not None) == (status is FAILED)


@pytest.mark.parametrize(
    ("task_type", "retry_delay", "next_at"),
    [
        ("echo", None, NOW + 4),  # the server's backoff: 1 s, 2 s, 4 s ...
        ("slow", None, NOW + 90),  # the type's own: 10 s, times 3 each time
        ("slow", 0.0, NOW),  # the handler's delay wins over any backoff: at once
        ("echo", 7.5, NOW + 7.5),
    ],
)
def test_a_retry_waits_for_the_handler_s_delay_else_the_type_s_backoff(
    task_type: str, retry_delay: float | None, next_at: float
) -> None:
    policy = POLICY.with_types({"slow": TypeRetry(5, initial=10.0, multiplier=3.0)})
    failing = task(RUNNING, task_type=task_type, attempt=3, max_attempts=5)
    outcome = Outcome(error=BOOM, retry_delay=retry_delay)
    ended = lifecycle.finish(failing, LEASE.lease_id, outcome, policy, NOW)
    assert (ended.status, ended.attempt, ended.next_attempt_at) == (CREATED, 4, next_at)


def test_a_type_s_backoff_keeps_the_server_s_parts_it_does_not_set() -> None:
    policy = POLICY.with_types({"capped": TypeRetry(3, maximum=3.0), "plain": TypeRetry(2)})
    assert [policy.delay(n, "capped") for n in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert "plain" not in policy.by_type  # attempts alone: the server's backoff
    assert policy.delay(3, "plain") == policy.delay(3) == 4.0


def test_a_non_retryable_error_fails_the_task_at_once_with_attempts_left() -> None:
    outcome = Outcome(error=BOOM, retryable=False)
    ended = lifecycle.finish(task(RUNNING, max_attempts=5), LEASE.lease_id, outcome, POLICY, NOW)
    assert (ended.status, ended.attempt, ended.max_attempts) == (FAILED, 1, 5)
    assert ended.error is not None and ended.error.non_retryable


@pytest.mark.parametrize(
    ("outcome", "checkpoint"),
    [
        (Outcome(error=BOOM, checkpoint={"page": 7}), {"page": 7}),  # the failure's own
        (Outcome(error=BOOM), {"page": 3}),  # none given: the one saved before stays
        (Outcome(result=1, checkpoint={"page": 9}), {"page": 9}),
    ],
)
def test_an_attempt_s_end_keeps_its_checkpoint(
    outcome: Outcome, checkpoint: dict[str, Any]
) -> None:
    running = task(RUNNING, checkpoint={"page": 3})
    ended = lifecycle.finish(running, LEASE.lease_id, outcome, POLICY, NOW)
    assert ended.checkpoint == checkpoint


@pytest.mark.parametrize(
    ("fields", "resumes_from"),
    [
        ({}, None),  # a first attempt: nothing to resume from
        ({"progress_detail": {"done": 4}}, {"done": 4}),  # the latest progress detail
        ({"progress_detail": {"done": 4}, "checkpoint": {"page": 2}}, {"page": 2}),  # saved
    ],
)
def test_an_attempt_resumes_from_the_saved_checkpoint_else_the_latest_detail(
    fields: dict[str, Any], resumes_from: dict[str, Any] | None
) -> None:
    assert lifecycle.checkpoint_of(task(CREATED, **fields)) == resumes_from


# -- the history of attempts -------------------------------------------------------


def _ended(running: Task, ended: Task | None) -> Attempt | None:
    assert ended is not None
    return lifecycle.ended_attempt(running, ended)


RUNS = task(RUNNING, started_at=NOW - 5, max_attempts=3)
INTERRUPTED = Outcome(error=TaskError(ErrorCode.INTERRUPTED, "stopped"), interrupted=True)
WAITS = Outcome(wait=InputWait("approve?", "", None, 0))
NOT_RETRIED = dataclasses.replace(BOOM, non_retryable=True)


@pytest.mark.parametrize(
    ("ended", "outcome", "error"),
    [
        (lifecycle.finish(RUNS, LEASE.lease_id, Outcome(result=1), POLICY, NOW),
         AttemptOutcome.COMPLETED, None),
        (lifecycle.finish(RUNS, LEASE.lease_id, Outcome(error=BOOM), POLICY, NOW),
         AttemptOutcome.FAILED, BOOM),  # retried
        (lifecycle.finish(RUNS, LEASE.lease_id, Outcome(error=BOOM, retryable=False), POLICY,
                          NOW), AttemptOutcome.FAILED, NOT_RETRIED),
        (lifecycle.cancelled(RUNS, "no", NOW), AttemptOutcome.CANCELLED,
         TaskError(ErrorCode.CANCELLED, "no")),
        (lifecycle.finish(RUNS, LEASE.lease_id, INTERRUPTED, POLICY, NOW),
         AttemptOutcome.INTERRUPTED, None),  # (error checked below: the requeue's own)
        (lifecycle.finish(RUNS, LEASE.lease_id, WAITS, POLICY, NOW), AttemptOutcome.SUSPENDED,
         None),
        (lifecycle.expire(RUNS, BOOM, POLICY, NOW, 0.0), AttemptOutcome.FAILED, BOOM),
    ],
)  # fmt: skip
def test_an_attempt_that_ends_is_recorded_with_how_it_ended(
    ended: Task, outcome: AttemptOutcome, error: TaskError | None
) -> None:
    attempt = _ended(RUNS, ended)
    assert attempt is not None
    assert (attempt.number, attempt.started_at, attempt.ended_at, attempt.holder) == (
        1, NOW - 5, NOW, LEASE.holder,
    )  # fmt: skip
    assert attempt.outcome is outcome
    if outcome is AttemptOutcome.INTERRUPTED:
        assert attempt.error is not None and attempt.error.code == ErrorCode.INTERRUPTED
    else:
        assert attempt.error == error


def test_an_attempt_that_ends_parked_is_recorded_too() -> None:
    parked = task(PAUSED, parked=True, started_at=NOW - 5, paused_at=NOW - 1, pause_reason="x")
    ended = lifecycle.finish(parked, LEASE.lease_id, Outcome(error=BOOM), POLICY, NOW)
    attempt = _ended(parked, ended)
    assert ended.status is PAUSED and attempt is not None
    assert (attempt.number, attempt.outcome, attempt.error) == (1, AttemptOutcome.FAILED, BOOM)


@pytest.mark.parametrize(
    "changed",
    [
        lifecycle.report(RUNS, LEASE.lease_id, {"progress": 0.5}, NOW),
        lifecycle.renew(RUNS, LEASE.lease_id, NOW + 60),
        lifecycle.cancel(RUNS, "asked", NOW),  # asked only: the attempt still runs
    ],
)
def test_a_change_that_keeps_the_lease_ends_no_attempt(changed: Task | None) -> None:
    assert _ended(RUNS, changed) is None


def test_a_claim_ends_no_attempt() -> None:
    queued = task(CREATED)
    assert _ended(queued, lifecycle.claim(queued, LEASE, NOW)) is None


@pytest.mark.parametrize("outcome", [Outcome(result=1), Outcome(error=BOOM)])
def test_an_attempt_asked_to_cancel_ends_cancelled_however_it_ended(outcome: Outcome) -> None:
    asked = task(RUNNING, cancel_requested_at=NOW - 1, cancel_reason="not needed")
    ended = lifecycle.finish(asked, LEASE.lease_id, outcome, POLICY, NOW)
    assert (ended.status, ended.error) == (CANCELLED, TaskError(ErrorCode.CANCELLED, "not needed"))
    assert _holds_no_lease(ended)


def test_a_shutdown_queues_the_attempt_again_without_using_it() -> None:
    outcome = Outcome(error=TaskError(ErrorCode.INTERRUPTED, "stopping"), interrupted=True)
    ended = lifecycle.finish(task(RUNNING, attempt=1), LEASE.lease_id, outcome, POLICY, NOW)
    assert (ended.status, ended.attempt, ended.interruptions) == (CREATED, 1, 1)
    assert ended.error is not None and ended.error.code == ErrorCode.INTERRUPTED
    assert ended.next_attempt_at is None and _holds_no_lease(ended)


def test_a_shutdown_past_the_limit_uses_the_attempt() -> None:
    outcome = Outcome(error=TaskError(ErrorCode.INTERRUPTED, "stopping"), interrupted=True)
    worn = task(RUNNING, attempt=3, interruptions=POLICY.max_interruptions)
    ended = lifecycle.finish(worn, LEASE.lease_id, outcome, POLICY, NOW)
    assert (ended.status, ended.attempt, ended.interruptions) == (FAILED, 3, 2)
    assert ended.error is not None and "after 2 earlier interruptions" in ended.error.message


# -- cancel ------------------------------------------------------------------------


def test_cancel_ends_a_queued_task_at_once() -> None:
    ended = lifecycle.cancel(task(CREATED, next_attempt_at=NOW + 5), "not needed", NOW)
    assert ended is not None
    assert (ended.status, ended.error, ended.finished_at, ended.next_attempt_at) == (
        CANCELLED,
        TaskError(ErrorCode.CANCELLED, "not needed"),
        NOW,
        None,
    )


def test_cancel_of_a_running_task_asks_its_holder() -> None:
    asked = lifecycle.cancel(task(RUNNING), "not needed", NOW)
    assert asked is not None
    assert (asked.status, asked.cancel_requested_at, asked.cancel_reason) == (
        RUNNING,
        NOW,
        "not needed",
    )
    assert asked.lease_id == LEASE.lease_id  # the attempt keeps its lease until it ends


@pytest.mark.parametrize("unchanged", [task(CANCELLED), task(RUNNING, cancel_requested_at=NOW - 1)])
def test_cancel_twice_changes_nothing(unchanged: Task) -> None:
    assert lifecycle.cancel(unchanged, "again", NOW) is None


@pytest.mark.parametrize("ended", [task(COMPLETED), task(FAILED)])
def test_cancel_of_an_ended_task_is_refused(ended: Task) -> None:
    with pytest.raises(TaskAlreadyEnded) as refused:
        lifecycle.cancel(ended, "too late", NOW)
    assert refused.value.metadata() == {"status": ended.status.name}


# -- expiry ------------------------------------------------------------------------

LOST = TaskError(ErrorCode.INTERRUPTED, "the server stopped while attempt 1 ran")


@pytest.mark.parametrize(("attempt", "status", "next_attempt"), [(1, CREATED, 2), (3, FAILED, 3)])
def test_an_expired_lease_fails_the_attempt(
    attempt: int, status: TaskStatus, next_attempt: int
) -> None:
    ended = lifecycle.expire(task(RUNNING, attempt=attempt), LOST, POLICY, NOW, delay=0.0)
    assert ended is not None
    assert (ended.status, ended.attempt, ended.error) == (status, next_attempt, LOST)
    assert _holds_no_lease(ended)


def test_an_expired_lease_of_a_task_asked_to_cancel_ends_it_cancelled() -> None:
    asked = task(RUNNING, cancel_requested_at=NOW - 1, cancel_reason="stop")
    ended = lifecycle.expire(asked, LOST, POLICY, NOW, delay=0.0)
    assert ended is not None and ended.status is CANCELLED


@pytest.mark.parametrize("status", [CREATED, PAUSED, WAITING_INPUT, COMPLETED, FAILED, CANCELLED])
def test_expiry_changes_nothing_that_holds_no_lease(status: TaskStatus) -> None:
    assert lifecycle.expire(task(status), LOST, POLICY, NOW, delay=0.0) is None


# -- the policy and the state machine -----------------------------------------------


def test_the_retry_delay_doubles_up_to_its_maximum() -> None:
    policy = RetryPolicy(initial=1.0, multiplier=2.0, maximum=5.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]


def test_every_move_the_rules_make_is_one_the_state_machine_lists() -> None:
    moves = {
        (CREATED, RUNNING),
        (CREATED, CANCELLED),
        (CREATED, FAILED),  # queue timeout
        (CREATED, PAUSED),
        (PAUSED, CREATED),
        (PAUSED, CANCELLED),
        (PAUSED, RUNNING),  # a parked attempt resumed
        (PAUSED, COMPLETED),  # a parked attempt's end
        (PAUSED, FAILED),
        (RUNNING, COMPLETED),
        (RUNNING, FAILED),
        (RUNNING, CANCELLED),
        (RUNNING, CREATED),
        (RUNNING, PAUSED),  # parked
        (RUNNING, WAITING_INPUT),
        (WAITING_INPUT, CREATED),  # an input came
        (WAITING_INPUT, FAILED),  # input timeout
        (WAITING_INPUT, CANCELLED),
        (WAITING_INPUT, PAUSED),
    }
    listed = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
    assert listed == moves  # each is made by a test above; nothing else is allowed
