"""What a schedule does when its times fall due: pure functions from a schedule's state to a
plan (the runs to make, and the schedule once they are made), tested without a server.

A plan is made from the schedule's state and the server's view of its previous run, then
decided: recorded, with its runs pending, only if the schedule is still as the plan found it
(in a shared store, as the database has it). Only then are its runs made (each a task whose
request id is its idempotency key: the schedule and the nominal time), and recorded made.
Two servers that plan the same times, even from different views of the previous run, decide
them once: the second decision does not land, and that server finds the first one's runs
pending, and makes them rather than deciding again. A server that stops between a decision
and its record leaves the runs pending for another to make.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import UTC, datetime

from conveyord.model import Task
from conveyord.schedules.model import MAX_BUFFER, Overlap, Run, RunOrder, Schedule

MAX_STEPS = 10_000  # nominal times dealt with in one plan; the next plan goes on from there


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """The runs to make now (in order), whether they cancel the schedule's running runs,
    and the schedule as it stands once they are decided (`after`, before rules.decide)."""

    before: Schedule
    runs: tuple[RunOrder, ...]
    cancel_running: bool
    after: Schedule


def run_key(schedule_id: str, nominal: float) -> str:
    """The request id of a schedule's run for a nominal time."""
    return f"schedule:{schedule_id}:{nominal_text(nominal)}"


def nominal_text(nominal: float) -> str:
    """A nominal time as its label shows it: RFC 3339 in UTC, to the microsecond."""
    return datetime.fromtimestamp(nominal, UTC).isoformat().replace("+00:00", "Z")


def _coming(schedule: Schedule) -> Iterator[float]:
    """The nominal times after the schedule's cursor, in order, stopping where `max_runs`
    would be passed if each became a run."""
    spec = schedule.spec
    room = None if spec.max_runs is None else spec.max_runs - schedule.spec_runs
    moment = spec.after(schedule.cursor)
    while moment is not None and (room is None or room > 0):
        yield moment
        room = None if room is None else room - 1
        moment = spec.after(moment)


def due(schedule: Schedule, now: float) -> list[float]:
    """The coming times whose run falls due by `now` (their jitter included), in order, at
    most MAX_STEPS."""
    delay, schedule_id = schedule.spec.delay, schedule.schedule_id
    falling_due = itertools.takewhile(lambda t: t + delay(schedule_id, t) <= now, _coming(schedule))
    return list(itertools.islice(falling_due, MAX_STEPS))


def plan(schedule: Schedule, now: float, running: bool, started_at: float) -> Plan | None:
    """Deal with the times that fell due by `now`; None if none did.

    While paused, each is missed. A time that fell due before this server started
    (`started_at`) is a catch-up: older than the catch-up window, it is missed, and of the
    others only the latest `catchup_limit` are kept. The rest go through the overlap policy
    (`running`: the schedule's previous run has not ended).
    """
    times = due(schedule, now)
    if not times:
        return None
    policy = schedule.policy
    if schedule.paused:
        after = schedule.evolve(cursor=times[-1], missed=schedule.missed + len(times))
        return Plan(schedule, (), False, after)
    catchup = [t for t in times if t + schedule.spec.delay(schedule.schedule_id, t) < started_at]
    kept = [t for t in catchup if t >= now - policy.catchup_window][-policy.catchup_limit :]
    missed = len(catchup) - len(kept)
    chosen = kept + times[len(catchup) :]
    result = _overlap(schedule, chosen, policy.overlap, running)
    after = result.after.evolve(
        cursor=times[-1],
        missed=result.after.missed + missed,
        spec_runs=result.after.spec_runs + len(result.runs),
    )
    return dataclasses.replace(result, before=schedule, after=after)


def plan_extra(
    schedule: Schedule, times: Sequence[float], keys: Sequence[str], overlap: Overlap, running: bool
) -> Plan:
    """Runs asked for beside the spec (a trigger, a backfill): the overlap given decides,
    the cursor stays, and they do not count toward `max_runs`."""
    return _overlap(schedule, list(times), overlap, running, dict(zip(times, keys, strict=True)))


def release(schedule: Schedule, running: bool) -> Plan | None:
    """The previous run ended: the first buffered run is made. None if nothing is buffered,
    or a run still goes."""
    if running or not schedule.buffer:
        return None
    nominal, rest = schedule.buffer[0], schedule.buffer[1:]
    order = RunOrder(nominal, run_key(schedule.schedule_id, nominal))
    after = schedule.evolve(buffer=rest, spec_runs=schedule.spec_runs + 1)
    return Plan(schedule, (order,), False, after)


def decide(
    current: Schedule, done: Plan, made_before: Collection[str], now: float
) -> Schedule | None:
    """The plan's state, its runs pending, if the schedule is still as the plan found it
    (else None: another server decided the same times, or the schedule changed). A run
    whose key is in `made_before` (a backfill made it ahead of its time, or the same trigger
    was asked for again) is not made or counted again."""
    if current.revision != done.before.revision:
        return None
    runs = tuple(order for order in done.runs if order.key not in made_before)
    return done.after.evolve(
        pending=runs, cancelling=done.cancel_running and bool(runs), updated_at=now
    )


def made(current: Schedule, tasks: Mapping[str, Task], now: float) -> Schedule | None:
    """The schedule once the pending runs of `tasks` (by key) are made: counted, the last
    of them its last run. None if none of them is pending (another server recorded them)."""
    done = [order for order in current.pending if order.key in tasks]
    if not done:
        return None
    rest = tuple(order for order in current.pending if order.key not in tasks)
    last = tasks[done[-1].key]
    return current.evolve(
        pending=rest,
        cancelling=current.cancelling and bool(rest),
        run_count=current.run_count + len(done),
        last_run=Run(done[-1].nominal, last.created_at, last.task_id),
        updated_at=now,
    )


def _overlap(
    schedule: Schedule,
    times: list[float],
    overlap: Overlap,
    running: bool,
    keys: dict[float, str] | None = None,
) -> Plan:
    """Apply the overlap policy to runs falling due in order, with `running` for whether the
    previous run still goes (a buffered run waits ahead of new ones)."""
    busy = running or bool(schedule.buffer)
    runs: list[float] = []
    buffer, skipped, dropped = list(schedule.buffer), 0, 0
    cancel = False
    for moment in times:
        if overlap is Overlap.ALLOW_ALL:
            runs.append(moment)
        elif overlap is Overlap.CANCEL_OTHER:
            skipped += len(runs)  # an earlier one of this round would be cancelled at once
            runs = [moment]
            cancel = cancel or running
        elif not busy:
            runs.append(moment)
            busy = True
        elif overlap is Overlap.SKIP:
            skipped += 1
        elif len(buffer) < (1 if overlap is Overlap.BUFFER_ONE else MAX_BUFFER):
            buffer.append(moment)
        else:
            dropped += 1
    key_of = keys or {}
    orders = tuple(RunOrder(t, key_of.get(t) or run_key(schedule.schedule_id, t)) for t in runs)
    after = schedule.evolve(
        buffer=tuple(buffer),
        skipped=schedule.skipped + skipped,
        buffer_dropped=schedule.buffer_dropped + dropped,
    )
    return Plan(schedule, orders, cancel, after)


def next_times(schedule: Schedule, count: int = 5) -> list[float]:
    """The next `count` nominal times (fewer near its end); none while paused."""
    return [] if schedule.paused else list(itertools.islice(_coming(schedule), count))


def wake_at(schedule: Schedule) -> float | None:
    """When the schedule's next time falls due (its jitter included); None if it has none.
    A paused schedule wakes too, to count what it misses."""
    moment = next(_coming(schedule), None)
    return None if moment is None else moment + schedule.spec.delay(schedule.schedule_id, moment)
