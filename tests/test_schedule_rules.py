"""When schedules run and what they do when times fall due, table by table, without a
server: nominal times (interval, daily, cron) across daylight saving time, every overlap
policy, catch-up within and beyond its window and limit, pause, max_runs and jitter."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from conveyord.schedules import rules
from conveyord.schedules.model import Overlap, Policy, Run, Schedule
from conveyord.schedules.spec import Spec, SpecError, daily_cron
from tests.test_store import new_task

BERLIN = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 1, 5, 12, 0, tzinfo=BERLIN).timestamp()  # a Monday, noon


def at(year: int, month: int, day: int, hour: int, minute: int) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN).timestamp()


def local(moment: float) -> str:
    return datetime.fromtimestamp(moment, BERLIN).strftime("%m-%d %H:%M:%S%z")


def schedule(spec: Spec, cursor: float = T0, **fields: Any) -> Schedule:
    return Schedule(
        schedule_id="5c1d0f7e-0000-4000-8000-000000000001", seq=1, request=b"", spec=spec,
        policy=fields.pop("policy", Policy()), created_at=cursor, updated_at=cursor,
        cursor=cursor, **fields,
    )  # fmt: skip


# -- nominal times ---------------------------------------------------------------------


def test_an_interval_runs_every_step_from_its_phase() -> None:
    spec = Spec(every=3600, phase=900)
    assert [local(t) for t in spec.times(T0, T0 + 3 * 3600)] == [
        "01-05 12:15:00+0100",
        "01-05 13:15:00+0100",
        "01-05 14:15:00+0100",
    ]


def test_a_daily_time_across_the_change_to_summer_time() -> None:
    spec = Spec(cron=daily_cron(2, 30), second=15, zone="Europe/Berlin")
    start = at(2026, 3, 28, 12, 0)
    # 02:30 does not exist on March 29: it runs at the first moment after the gap
    assert [local(t) for t in spec.times(start, start + 3 * 86400)] == [
        "03-29 03:00:15+0200",
        "03-30 02:30:15+0200",
        "03-31 02:30:15+0200",
    ]


def test_a_daily_time_across_the_change_to_winter_time_runs_once() -> None:
    spec = Spec(cron=daily_cron(2, 30), zone="Europe/Berlin")
    start = at(2026, 10, 24, 12, 0)
    times = list(spec.times(start, start + 2 * 86400))
    assert [local(t) for t in times] == ["10-25 02:30:00+0200", "10-26 02:30:00+0100"]
    assert times[1] - times[0] == 25 * 3600  # the day had 25 hours


def test_a_cron_more_often_than_hourly_follows_the_wall_clock_through_the_repeated_hour() -> None:
    spec = Spec(cron="*/30 * * * *", zone="Europe/Berlin")
    start = at(2026, 10, 25, 1, 50)
    assert [local(t) for t in spec.times(start, start + 2 * 3600)] == [
        "10-25 02:00:00+0200",
        "10-25 02:30:00+0200",
        "10-25 02:00:00+0100",
        "10-25 02:30:00+0100",
    ]


def test_start_end_and_bad_specs() -> None:
    spec = Spec(every=60, start_at=T0 + 600, end_at=T0 + 720)
    assert list(spec.times(T0, T0 + 3600)) == [T0 + 600, T0 + 660, T0 + 720]
    with pytest.raises(SpecError) as bad_cron:
        Spec(cron="61 * * * *")
    assert bad_cron.value.field == "cron"
    with pytest.raises(SpecError) as bad_zone:
        Spec(cron="* * * * *", zone="Mars/Olympus")
    assert bad_zone.value.field == "time_zone"


def test_jitter_is_fixed_per_run_and_within_its_bound() -> None:
    spec = Spec(every=60, jitter=10)
    delays = [spec.delay("s", T0 + 60 * n) for n in range(50)]
    assert all(0 <= d < 10 for d in delays) and len(set(delays)) > 40
    assert delays == [spec.delay("s", T0 + 60 * n) for n in range(50)]  # the same every time


# -- what falls due ----------------------------------------------------------------------

EVERY_MINUTE = Spec(every=60)


def test_a_time_that_falls_due_makes_a_run() -> None:
    plan = rules.plan(schedule(EVERY_MINUTE), T0 + 60, running=False, started_at=T0)
    assert plan is not None
    assert [o.nominal for o in plan.runs] == [T0 + 60]
    assert plan.runs[0].key == "schedule:5c1d0f7e-0000-4000-8000-000000000001:2026-01-05T11:01:00Z"
    assert plan.after.cursor == T0 + 60 and plan.after.spec_runs == 1
    assert rules.plan(schedule(EVERY_MINUTE), T0 + 59, running=False, started_at=T0) is None


@pytest.mark.parametrize(
    ("overlap", "runs", "skipped", "dropped", "buffered", "cancel"),
    [
        (Overlap.SKIP, 0, 3, 0, 0, False),
        (Overlap.BUFFER_ONE, 0, 0, 2, 1, False),
        (Overlap.BUFFER_ALL, 0, 0, 0, 3, False),
        (Overlap.CANCEL_OTHER, 1, 2, 0, 0, True),
        (Overlap.ALLOW_ALL, 3, 0, 0, 0, False),
    ],
)
def test_each_overlap_policy_while_the_previous_run_goes(
    overlap: Overlap, runs: int, skipped: int, dropped: int, buffered: int, cancel: bool
) -> None:
    busy = schedule(EVERY_MINUTE, policy=Policy(overlap=overlap))
    plan = rules.plan(busy, T0 + 180, running=True, started_at=T0)
    assert plan is not None
    assert (len(plan.runs), plan.after.skipped, plan.after.buffer_dropped) == (
        runs,
        skipped,
        dropped,
    )
    assert (len(plan.after.buffer), plan.cancel_running) == (buffered, cancel)


def test_a_buffered_run_is_made_when_the_previous_one_ends() -> None:
    busy = schedule(EVERY_MINUTE, policy=Policy(overlap=Overlap.BUFFER_ALL))
    plan = rules.plan(busy, T0 + 120, running=True, started_at=T0)
    assert plan is not None and plan.after.buffer == (T0 + 60, T0 + 120)
    assert rules.release(plan.after, running=True) is None
    released = rules.release(plan.after, running=False)
    assert released is not None and [o.nominal for o in released.runs] == [T0 + 60]
    assert released.after.buffer == (T0 + 120,)


def test_with_no_run_going_skip_makes_the_first_and_skips_the_rest_of_a_burst() -> None:
    plan = rules.plan(schedule(EVERY_MINUTE), T0 + 180, running=False, started_at=T0)
    assert plan is not None and [o.nominal for o in plan.runs] == [T0 + 60]
    assert plan.after.skipped == 2


def test_catch_up_keeps_the_latest_runs_within_its_window_and_limit() -> None:
    policy = Policy(overlap=Overlap.ALLOW_ALL, catchup_window=300, catchup_limit=2)
    down = schedule(EVERY_MINUTE, policy=policy)
    now = T0 + 1200  # the server was down for 20 minutes and starts now
    plan = rules.plan(down, now, running=False, started_at=now)
    assert plan is not None
    # two catch-up runs (the latest of those that fell due while down), and the one due now
    assert [o.nominal for o in plan.runs] == [now - 120, now - 60, now]
    assert plan.after.missed == 17 and plan.after.cursor == now


def test_a_paused_schedule_misses_its_times_and_shows_no_next_ones() -> None:
    paused = schedule(EVERY_MINUTE, paused=True)
    plan = rules.plan(paused, T0 + 180, running=False, started_at=T0)
    assert plan is not None and not plan.runs and plan.after.missed == 3
    assert rules.next_times(paused) == []


def test_max_runs_ends_the_schedule() -> None:
    allowed = rules.plan(
        schedule(Spec(every=60, max_runs=2), policy=Policy(overlap=Overlap.ALLOW_ALL)),
        T0 + 600, running=False, started_at=T0,
    )  # fmt: skip
    assert allowed is not None and len(allowed.runs) == 2 and allowed.after.ended
    assert rules.wake_at(allowed.after) is None and rules.next_times(allowed.after) == []


def test_a_decision_lands_only_on_the_state_it_was_planned_from_and_is_made_once() -> None:
    start = schedule(EVERY_MINUTE)
    plan = rules.plan(start, T0 + 60, running=False, started_at=T0)
    assert plan is not None
    decided = rules.decide(start, plan, (), T0 + 60)
    assert decided is not None and (decided.pending, decided.run_count) == (plan.runs, 0)
    moved_on = start.evolve(revision=start.revision + 1)  # another server decided it
    assert rules.decide(moved_on, plan, (), T0 + 60) is None
    task = new_task(created_at=T0 + 61)
    made = rules.made(decided, {plan.runs[0].key: task}, T0 + 61)
    assert made is not None and (made.pending, made.run_count) == ((), 1)
    assert made.last_run == Run(T0 + 60, T0 + 61, task.task_id)
    assert rules.made(made, {plan.runs[0].key: task}, T0 + 62) is None  # recorded once


def test_a_run_made_before_its_decision_is_not_made_or_counted_again() -> None:
    plan = rules.plan(schedule(EVERY_MINUTE), T0 + 60, running=False, started_at=T0)
    assert plan is not None
    ahead = rules.decide(plan.before, plan, {plan.runs[0].key}, T0 + 60)  # a backfill made it
    assert ahead is not None and ahead.pending == () and ahead.cursor == T0 + 60


def test_a_run_that_cancels_the_others_says_so_until_it_is_made() -> None:
    busy = schedule(EVERY_MINUTE, policy=Policy(overlap=Overlap.CANCEL_OTHER))
    plan = rules.plan(busy, T0 + 60, running=True, started_at=T0)
    assert plan is not None and plan.cancel_running
    decided = rules.decide(busy, plan, (), T0 + 60)
    assert decided is not None and decided.cancelling
    made = rules.made(decided, {plan.runs[0].key: new_task()}, T0 + 61)
    assert made is not None and not made.cancelling


def test_the_time_just_after_a_moment_is_found_to_the_microsecond() -> None:
    hourly = Spec(cron="0 * * * *")
    top = datetime(2026, 1, 1, 0, 0, tzinfo=BERLIN).timestamp()
    assert hourly.after(top - 1e-6) == top  # a moment a hair before a time finds that time
    assert hourly.after(top) == top + 3600  # and strictly after it, the next
