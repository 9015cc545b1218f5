"""Schedule runners on a store of one server's own (memory, SQLite), without a server: a
runner decides a time in the store's book at once and makes its runs before the decision
is on disk. A second runner on the store at the worst moment (the run made, not recorded)
counts the run once, and a crash at that moment leaves the decision on disk with the run,
so that the next start counts it once; a write of decisions that fails leaves their
schedules to be fired again."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.v1 import schedule_service_pb2 as spb
from conveyor.v1 import task_pb2
from conveyord.api import new_task_id
from conveyord.errors import ShuttingDown
from conveyord.model import Task, TaskFilter
from conveyord.schedules import rules
from conveyord.schedules.model import SCHEDULE_LABEL, Overlap, Policy, Schedule
from conveyord.schedules.runner import RunRequest, ScheduleRunner
from conveyord.schedules.spec import Spec
from conveyord.store.base import TaskStore
from conveyord.store.memory import MemoryStore
from conveyord.store.sqlite import SqliteStore
from conveyord.validation import NewTask
from tests.conftest import ManualClock

NOW = 1_800_000_000.0
EVERY = 60.0


class Maker:
    """Makes runs' tasks as the server does; a runner given `hold` stops once its runs are
    made, before it can record them, until `release` is set."""

    def __init__(self, store: TaskStore, clock: ManualClock, hold: bool = False) -> None:
        self.store, self.clock, self.hold = store, clock, hold
        self.made = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, requests: Sequence[RunRequest]) -> list[tuple[Task, bool]]:
        tasks = [
            NewTask(request, 60.0).to_task(new_task_id(), self.clock(), tenant)
            for request, tenant in requests
        ]
        made = await self.store.create(tasks, lambda new: None)
        if self.hold:
            self.made.set()
            await self.release.wait()
        return made


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskStore]:
    opened: TaskStore = MemoryStore() if request.param == "memory" else sqlite(tmp_path)
    await opened.open()
    yield opened
    await opened.close()


def sqlite(folder: Path) -> SqliteStore:
    return SqliteStore(folder / "tasks.db")


async def new_schedule(store: TaskStore) -> str:
    """A schedule every minute from NOW, that makes every run (ALLOW_ALL)."""
    request = spb.ScheduleRequest(
        spec=spb.ScheduleSpec(interval=spb.IntervalSpec(every=Duration(seconds=int(EVERY)))),
        task=task_pb2.TaskRequest(task_type="echo"),
    )
    schedule = Schedule(
        schedule_id=str(uuid.uuid4()), seq=0, request=request.SerializeToString(),
        spec=Spec(every=EVERY), policy=Policy(Overlap.ALLOW_ALL), created_at=NOW,
        updated_at=NOW, cursor=NOW, tenant="acme",
    )  # fmt: skip
    made, _ = await store.schedules.create(schedule)
    return made.schedule_id


async def runs(store: TaskStore, schedule_id: str) -> list[Task]:
    listed, _ = await store.list(TaskFilter(labels={SCHEDULE_LABEL: schedule_id}), 0, 100)
    return list(listed)


def made_once(schedule: Schedule | None, made: list[Task]) -> None:
    """The first time was decided once, and its one run made and counted once."""
    assert schedule is not None
    assert schedule.cursor == NOW + EVERY and schedule.pending == ()
    assert [task.labels["conveyor/nominal-time"] for task in made] == [
        rules.nominal_text(NOW + EVERY)
    ]
    assert schedule.run_count == 1
    assert schedule.last_run is not None and schedule.last_run.task_id == made[0].task_id


async def test_a_run_made_under_another_runner_s_decision_not_recorded_yet_is_counted_once(
    store: TaskStore,
) -> None:
    clock = ManualClock(NOW + EVERY)
    schedule_id = await new_schedule(store)
    first = Maker(store, clock, hold=True)
    a = ScheduleRunner(store, first, clock)
    b = ScheduleRunner(store, Maker(store, clock), clock)
    firing = asyncio.create_task(a.fire(schedule_id))
    await first.made.wait()  # a made the run, and has not recorded it
    # b fires the same time: it finds a's decision (not on disk yet), not a time to decide.
    await b.fire(schedule_id)
    first.release.set()
    await firing
    made_once(store.schedules.get(schedule_id), await runs(store, schedule_id))


async def test_a_crash_once_the_runs_are_made_leaves_them_decided_and_counted_at_the_restart(
    tmp_path: Path,
) -> None:
    clock = ManualClock(NOW + EVERY)
    store = sqlite(tmp_path)
    await store.open()
    schedule_id = await new_schedule(store)

    async def made_then_stopped(requests: Sequence[RunRequest]) -> list[tuple[Task, bool]]:
        await Maker(store, clock)(requests)  # on disk once this returns
        raise ShuttingDown()  # the server stops before it records them made

    await ScheduleRunner(store, made_then_stopped, clock).fire(schedule_id)
    await store.close()
    again = sqlite(tmp_path)
    await again.open()
    try:
        kept = again.schedules.get(schedule_id)
        assert kept is not None and kept.pending and kept.run_count == 0
        await ScheduleRunner(again, Maker(again, clock), clock).fire(schedule_id)
        made_once(again.schedules.get(schedule_id), await runs(again, schedule_id))
    finally:
        await again.close()


async def test_decisions_whose_write_fails_leave_their_schedules_to_be_fired_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(NOW + EVERY)
    store = sqlite(tmp_path)
    await store.open()
    schedule_ids = [await new_schedule(store) for _ in range(3)]
    (tmp_path / "tasks.db").unlink()  # the next write fails: the file is no longer the store's
    failed: list[Exception] = []
    store.on_failure = failed.append
    runner = ScheduleRunner(store, Maker(store, clock), clock)
    with caplog.at_level(logging.WARNING, logger="conveyord.schedules.runner"):
        await runner._fire_together(schedule_ids)  # decided and made in one write, which fails
    await store.close()
    assert len(failed) == 1
    assert "3 schedules: their runs could not be made: writing to the store failed" in caplog.text
    assert sorted(schedule_id for _, schedule_id in runner._heap) == sorted(schedule_ids)
