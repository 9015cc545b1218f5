"""Schedules fired by two replicas on one PostgreSQL database: two stores, each with its own
runner, on a clock that moves only when told. Whatever each replica's view of the previous
run, each nominal time is decided once (a run, a skip or a buffer) and its run made once; a
buffered run is released once, in order; Trigger and Backfill keep to their overlap policy
though the other replica fires the schedule meanwhile; a run decided by a replica that stops
before making it is made by the other, and one the queue refuses to a Trigger is taken back.
Last, Trigger and Backfill through two servers.

One replica's view of the tasks trails the database by a few milliseconds; a test makes that
lag certain (`Replica.unseen`: the ends it has not read yet) and makes one replica wait for
the other at the worst moment (`Replica.before_make`: just before it makes its runs)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.v1 import schedule_service_pb2 as spb
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyord.api import new_task_id
from conveyord.errors import ShuttingDown
from conveyord.model import Task, TaskFilter
from conveyord.scheduler import QueueFull
from conveyord.schedules import rules
from conveyord.schedules.model import SCHEDULE_LABEL, Overlap, Policy, Schedule
from conveyord.schedules.runner import RETRY_AFTER, RunRequest, ScheduleRunner
from conveyord.schedules.spec import Spec
from conveyord.store.postgres import PostgresStore
from conveyord.validation import NewTask
from tests.conftest import ManualClock
from tests.conftest import PostgresOpener as Opener
from tests.support import RUNNING, wait_until
from tests.test_postgres_schedules import Heard
from tests.test_schedules import (
    NOMINAL,
    START,
    StartServer,
    Stubs,
    every,
    get,
    make,
    runs,
    stamp,
)
from tests.test_store import complete, start

NOW = 1_800_000_000.0
EVERY = 60.0


class Replica:
    """A store and the runner of its schedules, as one conveyord has them."""

    def __init__(self, store: PostgresStore, clock: ManualClock) -> None:
        self.store = store
        self.clock = clock
        self.unseen: set[str] = set()  # runs it does not know have ended (its view lags)
        self.before_make: Callable[[], Awaitable[None]] | None = None  # once, then cleared
        self.runner = _Runner(self)
        self.heard = Heard(store.schedules)

    async def _make(self, requests: Sequence[RunRequest]) -> list[tuple[Task, bool]]:
        """Make runs' tasks as the server does (queued, for their schedule's tenant)."""
        hook, self.before_make = self.before_make, None
        if hook is not None:
            await hook()
        tasks = [
            NewTask(request, 60.0).to_task(new_task_id(), self.clock(), tenant)
            for request, tenant in requests
        ]
        return await self.store.create(tasks, lambda new: None)

    async def runs(self, schedule_id: str) -> list[Task]:
        """The schedule's runs, in the order they were made, as the database has them."""
        await self.store._catch_up()
        listed, _ = await self.store.list(TaskFilter(labels={SCHEDULE_LABEL: schedule_id}), 0, 100)
        return list(listed)

    async def latest(self, schedule_id: str) -> Schedule:
        """The schedule as the database has it (a change that changes nothing, answered
        once this replica's book has the latest state)."""
        return await self.store.schedules.update(schedule_id, lambda s: None)

    async def end(self, task_id: str) -> None:
        await self.store.update(task_id, start)
        await self.store.update(task_id, complete)


class _Runner(ScheduleRunner):
    def __init__(self, replica: Replica) -> None:
        super().__init__(replica.store, replica._make, replica.clock)
        self.replica = replica

    async def running(self, schedule: Schedule) -> bool:
        """Its view of the previous run, lagging behind the ends it has not read yet."""
        last = schedule.last_run
        if last is not None and last.task_id in self.replica.unseen:
            return True
        return await super().running(schedule)


async def replicas(opened: Opener) -> tuple[Replica, Replica]:
    clock = ManualClock(NOW)
    pair = Replica(await opened(clock=clock), clock), Replica(await opened(clock=clock), clock)
    for replica in pair:
        replica.runner.start()
    return pair


async def new_schedule(a: Replica, b: Replica, overlap: Overlap) -> str:
    """A schedule every minute from NOW, made on `a`, and known to `b` once this returns."""
    request = spb.ScheduleRequest(
        spec=spb.ScheduleSpec(interval=spb.IntervalSpec(every=Duration(seconds=int(EVERY)))),
        task=task_pb2.TaskRequest(task_type="echo"),
    )
    schedule = Schedule(
        schedule_id=str(uuid.uuid4()), seq=0, request=request.SerializeToString(),
        spec=Spec(every=EVERY), policy=Policy(overlap), created_at=NOW, updated_at=NOW,
        cursor=NOW, tenant="acme",
    )  # fmt: skip
    made, _ = await a.store.schedules.create(schedule)
    assert await b.store.schedules.find(made.schedule_id) == made
    return made.schedule_id


async def first_run(a: Replica, b: Replica, schedule_id: str) -> Task:
    """Fire the schedule's first time (on `a`); its run, going."""
    a.clock.now = NOW + EVERY
    await a.runner.fire(schedule_id)
    (run,) = await a.runs(schedule_id)
    await b.heard.until(lambda s, _: s.run_count == 1)
    return run


def counted(runs: int) -> Callable[[Schedule, bool], bool]:
    return lambda schedule, _: schedule.run_count == runs


def stopped(*pair: Replica) -> None:
    for replica in pair:
        replica.runner.stop()


def nominal(task: Task) -> str:
    return task.labels["conveyor/nominal-time"]


def at(moment: float) -> str:
    return rules.nominal_text(moment)


def one_state(schedule: Schedule, runs: list[Task], due: int) -> None:
    """Each of the `due` times was decided once: a run made and counted, or skipped."""
    assert len({nominal(task) for task in runs}) == len(runs) == schedule.run_count
    assert schedule.run_count + schedule.skipped + len(schedule.buffer) == due
    assert schedule.last_run is not None and schedule.last_run.task_id == runs[-1].task_id


# -- skip and buffer, decided once -------------------------------------------------------------


async def test_skip_is_decided_once_though_the_replicas_see_the_previous_run_differently(
    opened: Opener,
) -> None:
    a, b = await replicas(opened)
    schedule_id = await new_schedule(a, b, Overlap.SKIP)
    previous = await first_run(a, b, schedule_id)
    b.unseen.add(previous.task_id)  # b has not read that it ended; a has
    await a.end(previous.task_id)
    a.before_make = lambda: b.runner.fire(schedule_id)  # b decides while a is about to make
    a.clock.now = NOW + 2 * EVERY
    await a.runner.fire(schedule_id)
    schedule, runs = await a.latest(schedule_id), await a.runs(schedule_id)
    one_state(schedule, runs, due=2)
    stopped(a, b)


async def test_a_buffer_decided_on_a_lagging_replica_is_released_by_the_other(
    opened: Opener,
) -> None:
    a, b = await replicas(opened)
    schedule_id = await new_schedule(a, b, Overlap.BUFFER_ONE)
    previous = await first_run(a, b, schedule_id)
    b.unseen.add(previous.task_id)
    await a.end(previous.task_id)
    b.clock.now = NOW + 2 * EVERY
    await b.runner.fire(schedule_id)  # b buffers the run: it thinks the previous one goes
    # a has seen the end: it makes the buffered run once it hears of the buffer.
    released = await a.heard.until(lambda s, _: s.run_count == 2)
    runs = await a.runs(schedule_id)
    assert [nominal(task) for task in runs] == [at(NOW + EVERY), at(NOW + 2 * EVERY)]
    assert released.buffer == () and released.last_run is not None
    assert released.last_run.task_id == runs[1].task_id
    stopped(a, b)


async def test_a_run_one_replica_makes_while_the_other_buffers_it_is_made_and_counted_once(
    opened: Opener,
) -> None:
    a, b = await replicas(opened)
    schedule_id = await new_schedule(a, b, Overlap.BUFFER_ONE)
    previous = await first_run(a, b, schedule_id)
    b.unseen.add(previous.task_id)
    await a.end(previous.task_id)
    a.before_make = lambda: b.runner.fire(schedule_id)
    a.clock.now = NOW + 2 * EVERY
    await a.runner.fire(schedule_id)
    schedule, runs = await a.latest(schedule_id), await a.runs(schedule_id)
    assert [nominal(task) for task in runs] == [at(NOW + EVERY), at(NOW + 2 * EVERY)]
    one_state(schedule, runs, due=2)
    stopped(a, b)


async def test_buffered_runs_are_released_once_each_in_order_by_two_replicas(
    opened: Opener,
) -> None:
    a, b = await replicas(opened)
    schedule_id = await new_schedule(a, b, Overlap.BUFFER_ALL)
    previous = await first_run(a, b, schedule_id)
    for minutes in (2, 3, 4):
        a.clock.now = NOW + minutes * EVERY
        await asyncio.gather(a.runner.fire(schedule_id), b.runner.fire(schedule_id))
    await b.heard.until(lambda s, _: len(s.buffer) == 3)
    going = previous
    for made in range(2, 5):  # each end releases the next buffered run, on both replicas
        await (a if made % 2 else b).end(going.task_id)
        for replica in (a, b):
            await replica.heard.until(counted(made))
        runs = await a.runs(schedule_id)
        assert [task.terminal for task in runs] == [True] * (made - 1) + [False]  # one goes
        going = runs[-1]
    schedule = await a.latest(schedule_id)
    assert [nominal(task) for task in runs] == [at(NOW + m * EVERY) for m in (1, 2, 3, 4)]
    one_state(schedule, runs, due=4)
    stopped(a, b)


# -- trigger and backfill ----------------------------------------------------------------------


async def test_a_trigger_s_run_made_while_the_other_replica_fires_is_answered_and_counted(
    opened: Opener,
) -> None:
    a, b = await replicas(opened)
    schedule_id = await new_schedule(a, b, Overlap.ALLOW_ALL)
    schedule = await a.store.schedules.find(schedule_id)
    assert schedule is not None
    a.clock.now = NOW + EVERY  # the first time falls due as the trigger's run is made
    a.before_make = lambda: b.runner.fire(schedule_id)
    key = f"schedule:{schedule_id}:trigger:t-1"
    _, made = await a.runner.extra(schedule, [a.clock.now], [key], Overlap.SKIP)
    runs = await a.runs(schedule_id)
    assert len(made) == 1 and made[0].request_id == key
    assert {task.request_id for task in runs} == {key, rules.run_key(schedule_id, NOW + EVERY)}
    schedule = await a.latest(schedule_id)
    assert (schedule.run_count, schedule.skipped) == (2, 0)
    stopped(a, b)


async def test_a_trigger_under_skip_on_one_replica_while_the_other_fires_makes_one_run(
    opened: Opener,
) -> None:
    a, b = await replicas(opened)
    schedule_id = await new_schedule(a, b, Overlap.SKIP)
    schedule = await b.store.schedules.find(schedule_id)
    assert schedule is not None
    a.clock.now = NOW + EVERY
    a.before_make = lambda: b.runner.fire(schedule_id)
    key = f"schedule:{schedule_id}:trigger:t-1"
    _, made = await a.runner.extra(schedule, [a.clock.now], [key], Overlap.SKIP)
    runs = await a.runs(schedule_id)
    assert len(runs) == 1 and [task.task_id for task in made] == [runs[0].task_id]
    schedule = await a.latest(schedule_id)
    one_state(schedule, runs, due=2)  # the trigger's and the time's: one ran, one skipped
    stopped(a, b)


async def test_a_backfill_under_skip_while_the_other_replica_fires_makes_one_run(
    opened: Opener,
) -> None:
    a, b = await replicas(opened)
    schedule_id = await new_schedule(a, b, Overlap.SKIP)
    schedule = await b.store.schedules.find(schedule_id)
    assert schedule is not None
    a.clock.now = NOW + EVERY
    a.before_make = lambda: b.runner.fire(schedule_id)
    times = [NOW - 3 * EVERY, NOW - 2 * EVERY, NOW - EVERY]
    keys = [rules.run_key(schedule_id, t) for t in times]
    _, made = await a.runner.extra(schedule, times, keys, Overlap.SKIP)
    runs = await a.runs(schedule_id)
    assert len(runs) == 1 and [task.task_id for task in made] == [runs[0].task_id]
    schedule = await a.latest(schedule_id)
    one_state(schedule, runs, due=4)
    stopped(a, b)


async def test_one_backfill_asked_of_both_replicas_at_once_makes_each_run_once(
    opened: Opener,
) -> None:
    a, b = await replicas(opened)
    schedule_id = await new_schedule(a, b, Overlap.ALLOW_ALL)
    times = [NOW - m * EVERY for m in range(5, 0, -1)]
    keys = [rules.run_key(schedule_id, t) for t in times]
    answers: list[Any] = []
    for replica in (a, b):
        schedule = await replica.store.schedules.find(schedule_id)
        assert schedule is not None
        answers.append(replica.runner.extra(schedule, times, keys, Overlap.ALLOW_ALL))
    (_, on_a), (_, on_b) = await asyncio.gather(*answers)
    runs = await a.runs(schedule_id)
    assert [nominal(task) for task in runs] == [at(t) for t in times]
    assert [t.task_id for t in on_a] == [t.task_id for t in on_b] == [t.task_id for t in runs]
    one_state(await a.latest(schedule_id), runs, due=5)
    stopped(a, b)


# -- runs that cannot be made --------------------------------------------------------------------


async def test_a_run_decided_by_a_replica_that_stops_before_making_it_is_made_by_the_other(
    opened: Opener,
) -> None:
    a, b = await replicas(opened)
    schedule_id = await new_schedule(a, b, Overlap.SKIP)

    async def stop() -> None:
        a.runner.stop()
        raise ShuttingDown()

    a.before_make = stop
    a.clock.now = NOW + EVERY
    await a.runner.fire(schedule_id)  # decided, never made by a
    await b.heard.until(lambda s, _: bool(s.pending))
    a.clock.now += RETRY_AFTER  # b makes what another server left pending
    b.runner.clock_moved()
    made = await b.heard.until(counted(1))
    runs = await b.runs(schedule_id)
    assert [nominal(task) for task in runs] == [at(NOW + EVERY)] and made.pending == ()
    stopped(b)


async def test_a_trigger_whose_run_the_queue_refuses_is_taken_back(opened: Opener) -> None:
    a, b = await replicas(opened)
    schedule_id = await new_schedule(a, b, Overlap.SKIP)
    schedule = await a.store.schedules.find(schedule_id)
    assert schedule is not None

    async def full() -> None:
        raise QueueFull(1, 0)

    a.before_make = full
    key = f"schedule:{schedule_id}:trigger:t-1"
    with pytest.raises(QueueFull):
        await a.runner.extra(schedule, [NOW], [key], Overlap.SKIP)
    latest = await a.latest(schedule_id)
    assert (latest.pending, latest.run_count, latest.skipped) == ((), 0, 0)
    assert await a.runs(schedule_id) == []
    _, made = await a.runner.extra(latest, [NOW], [key], Overlap.SKIP)  # with room, it runs
    assert [task.task_id for task in made] == [task.task_id for task in await a.runs(schedule_id)]
    assert (await a.latest(schedule_id)).run_count == 1
    stopped(a, b)


# -- through two servers ---------------------------------------------------------------------


async def test_trigger_and_backfill_through_two_servers_keep_to_skip_and_run_once(
    start_server: StartServer, postgres_url: str
) -> None:
    clock = ManualClock(START)
    one, two = (start_server(store=postgres_url, clock=clock) for _ in range(2))
    async with (
        grpc.aio.insecure_channel(one.address) as first,
        grpc.aio.insecure_channel(two.address) as second,
    ):
        on_one, on_two = Stubs(first), Stubs(second)
        schedule = await make(on_one, every(3600, "cooperative_blocking"))  # SKIP
        schedule_id = schedule.schedule_id
        trigger = spb.TriggerScheduleRequest(
            schedule_id=schedule_id, request_id="t-1", overlap=spb.OVERLAP_POLICY_SKIP
        )
        made = (await on_one.schedules.TriggerSchedule(trigger)).task
        again = await on_two.schedules.TriggerSchedule(trigger)  # the same, on the other
        assert again.task.task_id == made.task_id and again.schedule.info.run_count == 1
        await wait_until(on_two.tasks, made.task_id, lambda t: t.status == RUNNING)
        window = spb.BackfillScheduleRequest(
            schedule_id=schedule_id, start_at=stamp(START - 3 * 3600), end_at=stamp(START),
            overlap=spb.OVERLAP_POLICY_SKIP,
        )  # fmt: skip
        skipped = await on_two.schedules.BackfillSchedule(window)  # the trigger's run goes
        assert not skipped.tasks and skipped.schedule.info.skipped == 3
        window.overlap = spb.OVERLAP_POLICY_ALLOW_ALL
        filled = await asyncio.gather(*(
            stubs.schedules.BackfillSchedule(window) for stubs in (on_one, on_two)
        ))  # fmt: skip
        assert [t.task_id for t in filled[0].tasks] == [t.task_id for t in filled[1].tasks]
        made_runs = await runs(on_one, schedule_id)
        assert sorted(t.labels[NOMINAL] for t in made_runs) == [
            "2026-03-28T08:00:00Z",
            "2026-03-28T09:00:00Z",
            "2026-03-28T10:00:00Z",
            made.labels[NOMINAL],
        ]
        assert (await get(on_two, schedule_id)).info.run_count == 4
        for task in made_runs:
            await on_one.tasks.Cancel(pb.CancelRequest(task_id=task.task_id))
