"""Schedules in the PostgreSQL store, shared by several stores on one database (as several
conveyord replicas share it): a change made through one store reaches every store's book and
its listeners, in the order of the store's changes; each change is applied to the schedule's
latest state in the database; a request id makes one schedule; two stores deciding the same
fire leave one decision, recorded made once; and the task changes' revisions, with gaps where
schedules changed, still resume a Watch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from conveyord.model import Change, ChangeKind, TaskFilter
from conveyord.schedules import rules
from conveyord.schedules.model import Overlap, Policy, Schedule
from conveyord.schedules.spec import Spec
from conveyord.store.base import RequestIdReused
from conveyord.store.history import ChangeHistory
from conveyord.store.schedules import ScheduleBook, ScheduleNotFound
from tests.conftest import PostgresOpener as Opener
from tests.test_store import complete, create_one, new_task, start

NOW = 1_800_000_000.0


def new_schedule(request_id: str = "", request_hash: bytes = b"h", **fields: Any) -> Schedule:
    """A schedule every second, dealt with up to NOW."""
    base: dict[str, Any] = {
        "schedule_id": str(uuid.uuid4()), "seq": 0, "request": b"template",
        "spec": Spec(every=1.0), "policy": Policy(),
        "created_at": NOW, "updated_at": NOW, "cursor": NOW, "tenant": "acme",
        "request_id": request_id, "request_hash": request_hash,
    }  # fmt: skip
    return Schedule(**{**base, **fields})


class Heard:
    """What a book's listeners are told, and a way to wait for one of them."""

    def __init__(self, book: ScheduleBook) -> None:
        self.changes: list[tuple[Schedule, bool]] = []
        self._waiting: list[tuple[Callable[[Schedule, bool], bool], asyncio.Future[Schedule]]] = []
        book.follow(self._heard)

    def _heard(self, schedule: Schedule, removed: bool) -> None:
        self.changes.append((schedule, removed))
        for condition, future in list(self._waiting):
            if not future.done() and condition(schedule, removed):
                future.set_result(schedule)

    async def until(self, condition: Callable[[Schedule, bool], bool]) -> Schedule:
        """The first change heard (before or from now) that meets `condition`."""
        for schedule, removed in self.changes:
            if condition(schedule, removed):
                return schedule
        future: asyncio.Future[Schedule] = asyncio.get_running_loop().create_future()
        self._waiting.append((condition, future))
        return await asyncio.wait_for(future, 10)


async def test_a_schedule_created_through_one_store_is_known_on_the_other_at_once(
    opened: Opener,
) -> None:
    a, b = await opened(), await opened()
    heard = Heard(b.schedules)
    made, new = await a.schedules.create(new_schedule())
    assert new and made.revision == made.seq == 1
    assert a.schedules.get(made.schedule_id) == made  # a reads its own write
    assert await b.schedules.find(made.schedule_id) == made  # b catches up at once
    assert heard.changes == [(made, False)]  # and its listeners heard of it
    other = await opened()  # one opened later loads it
    assert other.schedules.all() == [made]


async def test_an_update_and_a_pause_on_one_store_are_seen_on_the_other(opened: Opener) -> None:
    a, b = await opened(), await opened()
    heard_a, heard_b = Heard(a.schedules), Heard(b.schedules)
    made, _ = await a.schedules.create(new_schedule())
    await b.schedules.find(made.schedule_id)
    paused = await b.schedules.update(made.schedule_id, lambda s: s.evolve(paused=True))
    assert paused.paused and paused.revision > made.revision
    assert await heard_a.until(lambda s, _: s.paused) == paused
    # Each change applies to the latest state in the database, whichever store makes it and
    # whatever the store's book had heard of: none is lost.
    notes = [
        store.schedules.update(made.schedule_id, lambda s, n=n: s.evolve(note=s.note + n))
        for n in "abcdefgh"
        for store in (a, b)
    ]
    await asyncio.gather(*notes)
    latest = await heard_b.until(lambda s, _: len(s.note) == 16)
    assert sorted(latest.note) == sorted("aabbccddeeffgghh") and latest.paused
    assert await heard_a.until(lambda s, _: len(s.note) == 16) == latest
    revisions = [s.revision for s, _ in heard_a.changes]
    assert revisions == sorted(revisions) and [s.revision for s, _ in heard_b.changes] == revisions


async def test_a_delete_on_one_store_is_seen_on_the_other(opened: Opener) -> None:
    a, b = await opened(), await opened()
    heard = Heard(b.schedules)
    made, _ = await a.schedules.create(new_schedule(request_id="r-1"))
    await b.schedules.find(made.schedule_id)
    removed = await a.schedules.delete(made.schedule_id)
    assert removed == made
    assert await heard.until(lambda s, gone: gone) == made
    assert await b.schedules.find(made.schedule_id) is None
    with pytest.raises(ScheduleNotFound):
        await b.schedules.update(made.schedule_id, lambda s: s.evolve(paused=True))
    with pytest.raises(ScheduleNotFound):
        await b.schedules.delete(made.schedule_id)
    again, new = await b.schedules.create(new_schedule(request_id="r-1"))  # its id is free
    assert new and again.schedule_id != made.schedule_id


async def test_a_request_id_raced_from_two_stores_makes_one_schedule(opened: Opener) -> None:
    a, b = await opened(), await opened()
    creates = [
        store.schedules.create(new_schedule(request_id="once"))
        for _ in range(5)
        for store in (a, b)
    ]
    results = await asyncio.gather(*creates)
    assert len({schedule.schedule_id for schedule, _ in results}) == 1
    assert [new for _, new in results].count(True) == 1
    assert len(a.schedules.all()) == 1
    with pytest.raises(RequestIdReused):
        await b.schedules.create(new_schedule(request_id="once", request_hash=b"other"))


async def test_two_stores_deciding_the_same_fire_at_once_leave_one_decision_made_once(
    opened: Opener,
) -> None:
    a, b = await opened(), await opened()
    made, _ = await a.schedules.create(new_schedule(policy=Policy(Overlap.ALLOW_ALL)))
    await b.schedules.find(made.schedule_id)
    plan = rules.plan(made, NOW + 3.5, False, 0.0)  # three runs fell due
    assert plan is not None and len(plan.runs) == 3

    def decide(current: Schedule) -> Schedule | None:
        return rules.decide(current, plan, (), NOW + 4)

    decided = await asyncio.gather(*(
        store.schedules.update(made.schedule_id, decide) for _ in range(5) for store in (a, b)
    ))  # fmt: skip
    assert len({schedule.revision for schedule in decided}) == 1  # one decision landed
    (state,) = {schedule for schedule in decided}
    assert (state.pending, state.spec_runs, state.cursor) == (plan.runs, 3, NOW + 3)
    tasks = {order.key: new_task(created_at=NOW + 4) for order in plan.runs}

    def record(current: Schedule) -> Schedule | None:
        return rules.made(current, tasks, NOW + 4)

    recorded = await asyncio.gather(*(
        store.schedules.update(made.schedule_id, record) for _ in range(5) for store in (a, b)
    ))  # fmt: skip
    assert len({schedule.revision for schedule in recorded}) == 1  # recorded made once
    (state,) = {schedule for schedule in recorded}
    assert (state.pending, state.run_count, state.spec_runs) == ((), 3, 3)
    assert state.last_run is not None and state.last_run.nominal == NOW + 3
    for store in (a, b):
        await store.changes_since(await store.revision(), TaskFilter())
        assert store.schedules.get(made.schedule_id) == state


async def test_task_watchers_see_no_schedule_change_and_resume_across_their_revisions(
    opened: Opener,
) -> None:
    a, b = await opened(), await opened()
    on_b: list[Change] = []
    b.feed.follow(on_b.append)
    task, _ = await create_one(a, new_task())  # revision 1
    schedule, _ = await a.schedules.create(new_schedule())  # 2
    await a.update(task.task_id, start)  # 3
    await a.schedules.update(schedule.schedule_id, lambda s: s.evolve(paused=True))  # 4, 5:
    await a.schedules.update(schedule.schedule_id, lambda s: s.evolve(paused=False))
    done = await a.update(task.task_id, complete)  # 6
    other, _ = await create_one(a, new_task())  # 7
    assert (done.revision, other.revision) == (6, 7)
    late = await opened()  # reads the history back from the database
    for store in (a, b, late):
        assert await store.revision() == 7
        assert [c.revision for c in await store.changes_since(0, TaskFilter())] == [1, 3, 6, 7]
        for since, expected in ((1, [3, 6, 7]), (2, [3, 6, 7]), (4, [6, 7]), (5, [6, 7])):
            changes = await store.changes_since(since, TaskFilter())
            assert [c.revision for c in changes] == expected
        one = await store.changes_since(2, TaskFilter(task_id=task.task_id))  # its chain
        assert [c.revision for c in one] == [3, 6]
        assert await store.changes_since(7, TaskFilter()) == []
    assert [c.revision for c in on_b] == [1, 3, 6, 7]
    assert b.feed.revision == 7  # what a heartbeat carries: a task change's revision
    assert {c.kind for c in on_b} == {ChangeKind.CHANGED}


def test_a_history_with_gaps_finds_each_change() -> None:
    history = ChangeHistory(3, 3600.0, lambda: NOW)
    tasks = [new_task(), new_task()]
    for revision, task in ((2, tasks[0]), (5, tasks[1]), (6, tasks[0]), (9, tasks[0])):
        previous = history.latest_revision(task.task_id)
        history.remember(Change(revision, ChangeKind.CHANGED, task, NOW, previous))
    history.trim()  # the size is 3: revision 2 leaves
    assert history.compacted == 2
    everything = TaskFilter()
    assert [c.revision for c in history.since(2, 9, everything)] == [5, 6, 9]
    assert [c.revision for c in history.since(3, 9, everything)] == [5, 6, 9]
    assert [c.revision for c in history.since(5, 9, everything)] == [6, 9]
    assert [c.revision for c in history.since(7, 9, everything)] == [9]
    assert history.since(9, 9, everything) == []
    first = TaskFilter(task_id=tasks[0].task_id)
    assert [c.revision for c in history.since(2, 9, first)] == [6, 9]
    assert [c.revision for c in history.since(6, 9, first)] == [9]
