"""One suite for every store: the memory, SQLite and PostgreSQL stores behave the same."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from conveyord.model import (
    AttemptOutcome,
    Change,
    ChangeKind,
    Task,
    TaskError,
    TaskFilter,
    TaskStatus,
)
from conveyord.schedules.model import Policy, RunOrder, Schedule
from conveyord.schedules.spec import Spec
from conveyord.store.base import (
    Claim,
    RequestIdReused,
    RevisionOutOfRange,
    TaskNotFound,
    TaskStore,
)
from conveyord.store.memory import MAX_KEPT_ATTEMPTS, MemoryStore
from conveyord.store.postgres import PostgresStore
from conveyord.store.sqlite import SqliteStore
from conveyord.tenants import TenantLimitReached, TenantLimits, Tenants

Opener = Callable[..., TaskStore]
# Two tokens, and one more every 100 s: none comes back during a test.
SLOW_RATE = TenantLimits(rate=0.01, burst=2)
DurableStore = (SqliteStore, PostgresStore)


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]
)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Makes stores of the kind under test; SQLite ones share one file, one at a time, and
    PostgreSQL ones one new database."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else ""

    def make(**options: Any) -> TaskStore:
        if request.param == "memory":
            return MemoryStore(**options)
        if request.param == "postgresql":
            return PostgresStore(url, **options)
        return SqliteStore(tmp_path / "tasks.db", **options)

    return make


@pytest.fixture
async def store(open_store: Opener) -> AsyncIterator[TaskStore]:
    opened = open_store()
    await opened.open()
    yield opened
    await opened.close()


def new_task(request_id: str = "", request_hash: bytes = b"h", **fields: object) -> Task:
    base: dict[str, Any] = {
        "task_id": str(uuid.uuid4()), "seq": 0, "task_type": "echo", "description": "",
        "parameters": {"n": 1}, "priority": 5, "timeout_seconds": 10.0, "max_attempts": 1,
        "labels": {}, "created_at": 1.0, "updated_at": 1.0, "request_id": request_id,
        "request_hash": request_hash,
    }  # fmt: skip
    return Task(**{**base, **fields})


def admit(tasks: Sequence[Task]) -> None:
    pass


async def create_one(
    store: TaskStore, task: Task, admit: Callable[[Sequence[Task]], None] = admit
) -> tuple[Task, bool]:
    (result,) = await store.create([task], admit)
    return result


def start(task: Task) -> Task:
    return task.evolve(status=TaskStatus.RUNNING, started_at=2.0, updated_at=2.0)


def complete(task: Task) -> Task:
    return task.evolve(status=TaskStatus.COMPLETED, result={"ok": True}, finished_at=3.0)


async def test_create_assigns_revision_and_creation_order(store: TaskStore) -> None:
    first, created = await create_one(store, new_task())
    second, _ = await create_one(store, new_task())
    assert created
    assert (first.revision, second.revision) == (1, 2)
    assert first.seq < second.seq
    assert (await store.revision()) == 2
    assert await store.get(first.task_id) == first


async def test_a_known_request_id_returns_the_first_task(store: TaskStore) -> None:
    first, _ = await create_one(store, new_task("r1"))
    again, created = await create_one(store, new_task("r1"))
    assert (again, created) == (first, False)
    with pytest.raises(RequestIdReused):
        await create_one(store, new_task("r1", request_hash=b"other"))
    assert (await store.revision()) == 1


async def test_a_task_is_found_by_its_tenant_and_request_id(store: TaskStore) -> None:
    first, _ = await create_one(store, new_task("r1", tenant="acme"))
    assert await store.get_by_request("acme", "r1") == first
    assert await store.get_by_request("", "r1") is None  # another tenant's request id
    assert await store.get_by_request("acme", "r2") is None


async def test_concurrent_creates_with_one_request_id_make_one_task(store: TaskStore) -> None:
    results = await asyncio.gather(*(create_one(store, new_task("same")) for _ in range(20)))
    assert len({task.task_id for task, _ in results}) == 1
    assert [created for _, created in results].count(True) == 1


async def test_a_refused_admission_stores_nothing(store: TaskStore) -> None:
    def full(tasks: Sequence[Task]) -> None:
        raise RuntimeError("full")

    with pytest.raises(RuntimeError):
        await create_one(store, new_task(), full)
    assert (await store.revision()) == 0
    assert (await store.list(TaskFilter(), 0, 10))[0] == []


async def test_a_create_is_charged_the_tasks_it_makes_and_a_refused_one_makes_none(
    store: TaskStore,
) -> None:
    rates = Tenants(SLOW_RATE)
    first, _ = (await store.create([new_task("r1")], admit, rates))[0]
    for _ in range(3):  # a known request id makes no task, and costs no token
        assert (await store.create([new_task("r1")], admit, rates))[0] == (first, False)
    await store.create([new_task()], admit, rates)  # the second token
    with pytest.raises(TenantLimitReached) as refused:
        await store.create([new_task(), new_task()], admit, rates)
    assert refused.value.limit == "rate"
    assert refused.value.retry_after == pytest.approx(200, abs=1)  # two tokens, 100 s each
    await store.create([new_task(tenant="other")], admit, rates)  # its bucket is its own
    assert (await store.revision()) == 3
    assert [task.tenant for task in (await store.list(TaskFilter(), 0, 10))[0]] == [
        "", "", "other",
    ]  # fmt: skip


async def test_update_applies_the_mutation_to_the_latest_state(store: TaskStore) -> None:
    task, _ = await create_one(store, new_task())
    running = await store.update(task.task_id, start)
    assert (running.status, running.revision) == (TaskStatus.RUNNING, 2)
    assert await store.update(task.task_id, lambda t: None) == running
    assert (await store.revision()) == 2

    def refuse(t: Task) -> Task:
        raise ValueError("no")

    with pytest.raises(ValueError):
        await store.update(task.task_id, refuse)
    assert await store.get(task.task_id) == running
    with pytest.raises(TaskNotFound):
        await store.update(str(uuid.uuid4()), start)


async def test_concurrent_updates_chain(store: TaskStore) -> None:
    task, _ = await create_one(store, new_task(parameters={"n": 0}))

    def bump(t: Task) -> Task:
        return t.evolve(progress=t.progress + 0.01)

    await asyncio.gather(*(store.update(task.task_id, bump) for _ in range(50)))
    final = await store.get(task.task_id)
    assert final is not None and final.progress == pytest.approx(0.5)
    assert final.revision == 51


async def test_list_pages_by_creation_order_with_filters(store: TaskStore) -> None:
    tasks = [(await create_one(store, new_task(labels={"i": str(i % 2)})))[0] for i in range(7)]
    await store.update(tasks[3].task_id, start)
    page, revision = await store.list(TaskFilter(), 0, 3)
    assert [t.task_id for t in page] == [t.task_id for t in tasks[:3]]
    assert revision == (await store.revision())
    rest, _ = await store.list(TaskFilter(), page[-1].seq, 10)
    assert [t.task_id for t in rest] == [t.task_id for t in tasks[3:]]
    odd, _ = await store.list(TaskFilter(labels={"i": "1"}), 0, 10)
    assert [t.task_id for t in odd] == [t.task_id for t in tasks[1::2]]
    running, _ = await store.list(TaskFilter(statuses=frozenset({TaskStatus.RUNNING})), 0, 10)
    assert [t.task_id for t in running] == [tasks[3].task_id]


async def test_every_change_reaches_the_listener_in_order(store: TaskStore) -> None:
    seen: list[Change] = []
    store.feed.follow(seen.append)
    task, _ = await create_one(store, new_task())
    await store.update(task.task_id, start)
    await store.update(task.task_id, complete)
    assert [c.revision for c in seen] == [1, 2, 3]
    assert [c.task.status for c in seen] == [
        TaskStatus.CREATED, TaskStatus.RUNNING, TaskStatus.COMPLETED,
    ]  # fmt: skip


async def test_a_step_follower_gets_each_change_with_the_task_before_it(
    store: TaskStore,
) -> None:
    seen: list[tuple[TaskStatus, TaskStatus | None]] = []

    def follow(change: Change, before: Task | None) -> None:
        seen.append((change.task.status, before.status if before is not None else None))

    store.feed.follow_steps(follow)
    task, _ = await create_one(store, new_task())
    await store.update(task.task_id, start)
    await store.update(task.task_id, complete)
    assert seen == [
        (TaskStatus.CREATED, None),
        (TaskStatus.RUNNING, TaskStatus.CREATED),
        (TaskStatus.COMPLETED, TaskStatus.RUNNING),
    ]
    assert store.feed.followers == 1


async def test_changes_since_replays_the_history(store: TaskStore) -> None:
    a, _ = await create_one(store, new_task())
    b, _ = await create_one(store, new_task())
    await store.update(a.task_id, start)
    changes = await store.changes_since(1, TaskFilter())
    assert [c.revision for c in changes] == [2, 3]
    only_a = await store.changes_since(0, TaskFilter(task_id=a.task_id))
    assert [c.revision for c in only_a] == [1, 3]
    assert await store.changes_since(3, TaskFilter()) == []
    with pytest.raises(RevisionOutOfRange):
        await store.changes_since(4, TaskFilter())
    assert b.revision == 2


async def test_a_schedule_s_runs_pending_are_kept(open_store: Opener) -> None:
    store = open_store()
    await store.open()
    schedule = Schedule(
        schedule_id=str(uuid.uuid4()), seq=0, request=b"", spec=Spec(every=60.0),
        policy=Policy(), created_at=1.0, updated_at=1.0, cursor=1.0,
    )  # fmt: skip
    made, _ = await store.schedules.create(schedule)
    orders = (RunOrder(61.0, "schedule:a:61"), RunOrder(121.0, "schedule:a:121"))
    pending = await store.schedules.update(
        made.schedule_id, lambda s: s.evolve(pending=orders, cancelling=True)
    )
    await store.close()
    if isinstance(store, DurableStore):
        store = open_store()
        await store.open()
        assert store.schedules.get(made.schedule_id) == pending
        await store.close()


async def test_the_history_is_bounded(open_store: Opener) -> None:
    store = open_store(history_size=3)
    await store.open()
    for _ in range(5):
        await create_one(store, new_task())
    with pytest.raises(RevisionOutOfRange):
        await store.changes_since(1, TaskFilter())
    assert [c.revision for c in await store.changes_since(2, TaskFilter())] == [3, 4, 5]
    await store.close()


async def test_the_history_is_bounded_by_age(open_store: Opener) -> None:
    now = [100.0]
    store = open_store(history_age=10.0, clock=lambda: now[0])
    await store.open()
    await create_one(store, new_task())
    now[0] += 5
    await create_one(store, new_task())
    now[0] += 6  # the first change is 11 s old now
    with pytest.raises(RevisionOutOfRange):
        await store.changes_since(0, TaskFilter())
    assert [c.revision for c in await store.changes_since(1, TaskFilter())] == [2]
    await store.close()


async def test_finished_tasks_are_removed_in_batches(store: TaskStore) -> None:
    tasks = [(await create_one(store, new_task()))[0] for _ in range(5)]
    for task in tasks[:4]:
        await store.update(task.task_id, start)
        await store.update(task.task_id, complete)
    seen: list[Change] = []
    store.feed.follow(seen.append)
    assert await store.remove_finished(finished_before=2.0, limit=10) == 0  # they ended at 3.0
    assert await store.remove_finished(finished_before=4.0, limit=3) == 3
    assert await store.remove_finished(finished_before=4.0, limit=3) == 1
    assert [c.kind for c in seen] == [ChangeKind.REMOVED] * 4
    assert await store.get(tasks[0].task_id) is None
    assert await store.get(tasks[4].task_id) is not None
    listed, _ = await store.list(TaskFilter(), 0, 10)
    assert [t.task_id for t in listed] == [tasks[4].task_id]


async def test_a_removed_task_frees_its_request_id(store: TaskStore) -> None:
    task, _ = await create_one(store, new_task("again"))
    await store.update(task.task_id, start)
    await store.update(task.task_id, complete)
    await store.remove_finished(finished_before=10.0, limit=10)
    fresh, created = await create_one(store, new_task("again"))
    assert created and fresh.task_id != task.task_id


def _claim(count: int = 10, now: float = 5.0, **fields: Any) -> Claim:
    options: dict[str, Any] = {"types": None, "limits": {}, **fields}
    return Claim("worker-1", count, lease_until=lambda task: now + 60, now=now, **options)


async def test_claim_takes_the_best_runnable_tasks_under_leases(store: TaskStore) -> None:
    low = (await create_one(store, new_task(priority=2)))[0]
    high = (await create_one(store, new_task(priority=9)))[0]
    later = (await create_one(store, new_task(priority=9, next_attempt_at=50.0)))[0]
    assert store.queued == 3
    claimed = await store.claim(_claim(count=1))
    assert [t.task_id for t in claimed] == [high.task_id]
    (task,) = claimed
    assert (task.status, task.lease_holder, task.lease_expires_at) == (
        TaskStatus.RUNNING,
        "worker-1",
        65.0,
    )
    assert task.lease_id and await store.get(task.task_id) == task
    assert [t.task_id for t in await store.claim(_claim())] == [low.task_id]  # never twice
    assert await store.claim(_claim()) == []  # the third waits for its next attempt
    assert store.next_wakeup() == 50.0
    assert [t.task_id for t in await store.claim(_claim(now=50.0))] == [later.task_id]
    assert store.queued == 0


async def test_claim_keeps_to_the_types_and_limits_asked(store: TaskStore) -> None:
    for task_type in ("a", "a", "b", "c"):
        await create_one(store, new_task(task_type=task_type))
    claimed = await store.claim(_claim(types=frozenset({"a", "b"}), limits={"a": 1}))
    assert sorted(t.task_type for t in claimed) == ["a", "b"]
    assert sorted(t.task_type for t in await store.claim(_claim())) == ["a", "c"]


async def test_a_claim_of_several_types_takes_the_best_of_them_all_in_order(
    store: TaskStore,
) -> None:
    priorities = {"a": (1, 7), "b": (9, 3), "c": (5,), "full": (10,)}
    made = {
        (task_type, priority): (await create_one(store, new_task(task_type=task_type,
                                                                 priority=priority)))[0]
        for task_type, each in priorities.items() for priority in each
    }  # fmt: skip
    asked = frozenset({"a", "b", "c", "full"})
    claimed = await store.claim(_claim(count=4, types=asked, limits={"full": 0}))
    # The best four of a, b and c across the types, in dispatch order; none of the full type.
    best = [("b", 9), ("a", 7), ("c", 5), ("b", 3)]
    assert [t.task_id for t in claimed] == [made[key].task_id for key in best]
    assert await store.claim(_claim(types=frozenset({"full"}), limits={"full": 0})) == []


async def test_update_where_changes_every_match_at_once(store: TaskStore) -> None:
    tasks = [(await create_one(store, new_task()))[0] for _ in range(3)]
    await store.claim(_claim(count=2))
    running = TaskFilter(statuses=frozenset({TaskStatus.RUNNING}))
    changed = await store.update_where(running, complete)
    assert sorted(t.task_id for t in changed) == sorted(t.task_id for t in tasks[:2])
    assert all(t.status is TaskStatus.COMPLETED for t in changed)
    assert (await store.get(tasks[2].task_id)) == tasks[2]


async def test_a_large_update_where_takes_the_tasks_that_matched_when_it_began(
    store: TaskStore,
) -> None:
    labelled = TaskFilter(labels={"group": "g"})
    batch = [new_task(labels={"group": "g"}) for _ in range(2500)]  # three chunks
    await store.create(batch, admit)
    assert await store.count(labelled) == 2500
    late: list[Task] = []

    async def create_meanwhile() -> None:  # runs between two chunks of the update
        late.append((await create_one(store, new_task(labels={"group": "g"})))[0])

    creating = asyncio.get_running_loop().create_task(create_meanwhile())
    changed = await store.update_where(labelled, start)
    await creating
    assert len(changed) == 2500 and all(t.status is TaskStatus.RUNNING for t in changed)
    assert (await store.get(late[0].task_id)) == late[0]  # created meanwhile: untouched
    assert await store.count(labelled) == 2501


async def test_a_missed_start_deadline_is_found_once(store: TaskStore) -> None:
    waiting, _ = await create_one(store, new_task(start_deadline=30.0))
    started, _ = await create_one(store, new_task(start_deadline=20.0))
    await store.update(started.task_id, start)
    assert store.next_wakeup() == 30.0  # the started task's deadline is gone
    assert await store.overdue(29.0) == []
    assert [t.task_id for t in await store.overdue(30.0)] == [waiting.task_id]
    assert await store.overdue(31.0) == []


async def test_a_lease_that_ran_out_is_found(store: TaskStore) -> None:
    await create_one(store, new_task())
    (task,) = await store.claim(_claim(now=5.0))
    assert await store.expired_leases(64.0) == []
    assert store.next_wakeup() == 65.0
    assert [t.task_id for t in await store.expired_leases(65.0)] == [task.task_id]


async def test_a_batch_is_stored_whole_in_order(store: TaskStore) -> None:
    known, _ = await create_one(store, new_task("known"))
    batch = [new_task("a"), new_task("known"), new_task(), new_task("b")]
    admitted: list[int] = []
    results = await store.create(batch, lambda new: admitted.append(len(new)))
    assert admitted == [3]  # the replayed request is not a new task
    assert [created for _, created in results] == [True, False, True, True]
    assert results[1][0] == known
    new = [task for task, created in results if created]
    assert [t.revision for t in new] == [2, 3, 4]
    assert [t.seq for t in new] == sorted(t.seq for t in new)


async def test_a_batch_with_a_reused_request_id_stores_nothing(store: TaskStore) -> None:
    await create_one(store, new_task("known"))
    batch = [new_task("fresh"), new_task("known", request_hash=b"different")]
    with pytest.raises(RequestIdReused):
        await store.create(batch, admit)
    assert (await store.revision()) == 1
    _, created = await create_one(store, new_task("fresh"))
    assert created  # "fresh" was not taken by the refused batch


async def test_list_by_type_and_label_pages_through_removals(store: TaskStore) -> None:
    made = [
        (await create_one(store, new_task(task_type=kind, labels={"team": team})))[0]
        for kind, team in [("a", "x"), ("b", "x"), ("a", "y"), ("b", "y"), ("a", "x")]
    ]
    await store.update(made[0].task_id, start)
    await store.update(made[0].task_id, complete)
    await store.remove_finished(finished_before=10.0, limit=10)
    of_a, _ = await store.list(TaskFilter(task_type="a"), 0, 10)
    assert [t.task_id for t in of_a] == [made[2].task_id, made[4].task_id]
    team_x = TaskFilter(labels={"team": "x"})
    first, _ = await store.list(team_x, 0, 1)
    rest, _ = await store.list(team_x, first[0].seq, 10)
    assert [t.task_id for t in [*first, *rest]] == [made[1].task_id, made[4].task_id]
    assert (await store.list(TaskFilter(task_type="none"), 0, 10))[0] == []
    assert (await store.list(TaskFilter(task_type="a", labels={"team": "y"}), 0, 10))[0] == [
        made[2]
    ]


async def test_list_newest_first_pages_back_through_filters_and_removals(
    store: TaskStore,
) -> None:
    made = [
        (await create_one(store, new_task(task_type=kind, labels={"team": team})))[0]
        for kind, team in [("a", "x"), ("b", "x"), ("a", "y"), ("b", "y"), ("a", "x")]
    ]
    await store.update(made[4].task_id, start)
    await store.update(made[4].task_id, complete)
    await store.remove_finished(finished_before=10.0, limit=10)  # the newest is gone
    every, revision = await store.list(TaskFilter(), 0, 10, newest_first=True)
    assert [t.task_id for t in every] == [t.task_id for t in reversed(made[:4])]
    assert revision == (await store.revision())
    first, _ = await store.list(TaskFilter(), 0, 2, newest_first=True)
    rest, _ = await store.list(TaskFilter(), first[-1].seq, 10, newest_first=True)
    assert [t.task_id for t in [*first, *rest]] == [t.task_id for t in every]
    of_a, _ = await store.list(TaskFilter(task_type="a"), 0, 10, newest_first=True)
    assert [t.task_id for t in of_a] == [made[2].task_id, made[0].task_id]
    team_x = TaskFilter(labels={"team": "x"})
    newest_x, _ = await store.list(team_x, 0, 1, newest_first=True)
    older_x, _ = await store.list(team_x, newest_x[0].seq, 10, newest_first=True)
    assert [t.task_id for t in [*newest_x, *older_x]] == [made[1].task_id, made[0].task_id]
    assert (await store.list(team_x, made[0].seq, 10, newest_first=True))[0] == []


async def test_one_tasks_changes_come_from_its_own_history(open_store: Opener) -> None:
    store = open_store(history_size=3)
    await store.open()
    watched, _ = await create_one(store, new_task())
    await store.update(watched.task_id, start)
    for _ in range(2):
        await create_one(store, new_task())  # the history keeps the last 3 changes only
    own = await store.changes_since(2, TaskFilter(task_id=watched.task_id))
    assert own == []
    everything = await store.changes_since(2, TaskFilter())
    assert [c.revision for c in everything] == [3, 4]
    with pytest.raises(RevisionOutOfRange):
        await store.changes_since(0, TaskFilter(task_id=watched.task_id))
    await store.update(watched.task_id, complete)
    (done,) = await store.changes_since(4, TaskFilter(task_id=watched.task_id))
    assert (done.revision, done.task.status) == (5, TaskStatus.COMPLETED)
    await store.close()


async def _interleave_two_tasks(store: TaskStore) -> tuple[Task, Task]:
    """Revisions 1-5: create a, create b, start a, start b, complete a."""
    a, _ = await create_one(store, new_task())
    b, _ = await create_one(store, new_task())
    await store.update(a.task_id, start)
    await store.update(b.task_id, start)
    await store.update(a.task_id, complete)
    return a, b


async def test_one_tasks_changes_interleaved_with_others_replay_in_order(
    open_store: Opener,
) -> None:
    store = open_store(history_size=4)  # revision 1, a's creation, has left the history
    await store.open()
    a, b = await _interleave_two_tasks(store)
    a_changes = await store.changes_since(1, TaskFilter(task_id=a.task_id))
    assert [(c.revision, c.task.status) for c in a_changes] == [
        (3, TaskStatus.RUNNING),
        (5, TaskStatus.COMPLETED),
    ]
    b_changes = await store.changes_since(2, TaskFilter(task_id=b.task_id))
    assert [c.revision for c in b_changes] == [4]
    assert [c.revision for c in await store.changes_since(3, TaskFilter(task_id=a.task_id))] == [5]
    await store.close()


async def test_ended_leases_do_not_pile_up_before_a_live_one(store: TaskStore) -> None:
    """The leases of attempts that ended leave the expiry heap (it is rebuilt once they are
    most of it): the next wake-up is the live lease's, not a long-ended one's."""
    batch = [new_task() for _ in range(1100)]
    await store.create(batch, admit)
    for _ in batch:
        (claimed,) = await store.claim(_claim(count=1, now=5.0))
        await store.update(claimed.task_id, complete)
    live, _ = await create_one(store, new_task())
    (running,) = await store.claim(Claim("worker-1", 1, None, {}, lambda task: 5000.0, now=6.0))
    assert running.task_id == live.task_id
    assert store.next_wakeup() == 5000.0
    assert [t.task_id for t in await store.expired_leases(5000.0)] == [live.task_id]


async def test_declared_task_types_are_remembered(store: TaskStore) -> None:
    assert await store.declared_task_types() == frozenset()
    await store.declare_task_types({"resize", "encode"})
    await store.declare_task_types({"resize"})
    assert await store.declared_task_types() == {"resize", "encode"}


# -- the history of attempts ---------------------------------------------------------


def _claimed(task: Task, holder: str = "w-1") -> Task:
    return task.evolve(
        status=TaskStatus.RUNNING, lease_id=uuid.uuid4().hex, lease_holder=holder,
        started_at=task.updated_at + 1, updated_at=task.updated_at + 1,
    )  # fmt: skip


def _failed_once(task: Task) -> Task:
    error = TaskError("HANDLER_ERROR", "KeyError: 'k'", "KeyError", "Traceback ...")
    return task.evolve(
        status=TaskStatus.CREATED, attempt=task.attempt + 1, error=error,
        last_attempt_error=error, lease_id="", lease_holder="", updated_at=task.updated_at + 2,
    )  # fmt: skip


async def test_each_ended_attempt_is_kept_apart_from_the_task(store: TaskStore) -> None:
    task, _ = await create_one(store, new_task(max_attempts=3))
    await store.update(task.task_id, _claimed)
    await store.update(task.task_id, lambda t: t.evolve(progress=0.5))  # no end: not kept
    retried = await store.update(task.task_id, _failed_once)
    await store.update(task.task_id, lambda t: _claimed(t, "w-2"))
    done = await store.update(task.task_id, lambda t: complete(t).evolve(lease_id=""))
    attempts = await store.attempts(task.task_id)
    assert [(a.number, a.holder, a.outcome) for a in attempts] == [
        (1, "w-1", AttemptOutcome.FAILED), (2, "w-2", AttemptOutcome.COMPLETED),
    ]  # fmt: skip
    assert attempts[0].error == retried.error and attempts[1].error is None
    assert (attempts[0].started_at, attempts[0].ended_at) == (2.0, 4.0)
    assert done.progress == 0.5 and not hasattr(done, "attempts")  # not in the task's record
    assert await store.attempts(str(uuid.uuid4())) == ()


async def test_a_task_s_attempts_go_with_it(open_store: Opener) -> None:
    store = open_store()
    await store.open()
    task, _ = await create_one(store, new_task())
    await store.update(task.task_id, _claimed)
    await store.update(task.task_id, lambda t: complete(t).evolve(lease_id="", finished_at=3.0))
    assert len(await store.attempts(task.task_id)) == 1
    assert await store.remove_finished(finished_before=10, limit=10) == 1
    assert await store.attempts(task.task_id) == ()
    await store.close()
    if isinstance(store, SqliteStore):  # gone from the file too, not only from memory
        assert _attempt_rows(store, task.task_id) == 0


def _attempt_rows(store: SqliteStore, task_id: str) -> int:
    """How many attempts of the task the (closed) store's file holds."""
    with contextlib.closing(sqlite3.connect(store.path)) as file:
        query = "SELECT count(*) FROM attempts WHERE task_id = ?"
        (count,) = file.execute(query, (task_id,)).fetchone()
    return int(count)


async def test_a_task_keeps_its_latest_hundred_attempts(open_store: Opener) -> None:
    store = open_store()
    await store.open()
    task, _ = await create_one(store, new_task(max_attempts=100))
    for _ in range(MAX_KEPT_ATTEMPTS + 5):  # (a count that interruptions or waits can reach)
        await store.update(task.task_id, _claimed)
        await store.update(task.task_id, _failed_once)
    kept = await store.attempts(task.task_id)
    assert [a.number for a in kept] == list(range(6, MAX_KEPT_ATTEMPTS + 6))
    await store.close()
    store = open_store()  # a durable store reads back the same
    await store.open()
    if isinstance(store, DurableStore):
        assert await store.attempts(task.task_id) == kept
    await store.close()
    if isinstance(store, SqliteStore):  # the file trimmed too, not only what was read back
        assert _attempt_rows(store, task.task_id) == MAX_KEPT_ATTEMPTS
