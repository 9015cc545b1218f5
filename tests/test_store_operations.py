"""The store's part of the operator actions, on every store: removing one task at once (a
Delete), and the counts by tenant, type and status that it keeps at every change, also
across a reopening of a durable store."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyord.model import Change, ChangeKind, Task, TaskFilter, TaskStatus
from conveyord.store.base import TaskNotFound, TaskStore
from conveyord.store.sqlite import SqliteStore
from tests.test_store import complete, create_one, new_task, start
from tests.test_store import open_store as open_store  # the fixture, for every store
from tests.test_store import store as store

CREATED, RUNNING, COMPLETED = TaskStatus.CREATED, TaskStatus.RUNNING, TaskStatus.COMPLETED


class Refused(Exception):
    """What the test's check raises to refuse a removal."""


def ended_only(task: Task) -> None:
    if not task.terminal:
        raise Refused(task.status.name)


async def test_remove_takes_an_ended_task_away_as_a_change(store: TaskStore) -> None:
    task, _ = await create_one(store, new_task(request_id="r-1", request_hash=b"a"))
    await store.update(task.task_id, start)
    ended = await store.update(task.task_id, complete)
    seen: list[Change] = []
    store.feed.follow(seen.append)
    removal = await store.remove(task.task_id, ended_only)
    assert (removal.kind, removal.task.status) == (ChangeKind.REMOVED, COMPLETED)
    assert removal.revision == ended.revision + 1 == await store.revision()
    assert seen == [removal]
    assert await store.get(task.task_id) is None
    assert (await store.list(TaskFilter(), 0, 10))[0] == []
    again, created = await create_one(store, new_task(request_id="r-1", request_hash=b"b"))
    assert created and again.task_id != task.task_id  # the request id is free again


async def test_a_refused_removal_changes_nothing(store: TaskStore) -> None:
    task, _ = await create_one(store, new_task())
    running = await store.update(task.task_id, start)
    with pytest.raises(Refused, match="RUNNING"):
        await store.remove(task.task_id, ended_only)
    assert await store.get(task.task_id) == running
    assert await store.revision() == running.revision
    with pytest.raises(TaskNotFound):
        await store.remove("00000000-0000-4000-8000-000000000000", ended_only)


async def test_counts_follow_each_task_s_life_by_tenant_type_and_status(
    store: TaskStore,
) -> None:
    a, _ = await create_one(store, new_task(tenant="a"))
    await create_one(store, new_task(tenant="a", task_type="sleep"))
    await create_one(store, new_task(tenant="b"))
    assert (await store.counts(TaskFilter(tenant="a")))[0] == {
        ("echo", CREATED): 1,
        ("sleep", CREATED): 1,
    }
    await store.update(a.task_id, start)
    await store.update(a.task_id, lambda task: task.evolve(progress=0.5))  # no status change
    counts, revision = await store.counts(TaskFilter(tenant="a"))
    assert counts == {("echo", RUNNING): 1, ("sleep", CREATED): 1}
    assert revision == await store.revision()
    await store.update(a.task_id, complete)
    narrowed = TaskFilter(tenant="a", statuses=frozenset({COMPLETED}), task_type="echo")
    assert (await store.counts(narrowed))[0] == {("echo", COMPLETED): 1}
    assert (await store.counts(TaskFilter(tenant="b")))[0] == {("echo", CREATED): 1}
    assert (await store.counts(TaskFilter()))[0] == {
        ("echo", COMPLETED): 1,
        ("echo", CREATED): 1,
        ("sleep", CREATED): 1,
    }  # every tenant's, for the server's own use
    await store.remove(a.task_id, ended_only)
    assert (await store.counts(TaskFilter(tenant="a")))[0] == {("sleep", CREATED): 1}


async def test_a_removal_and_the_counts_outlast_a_reopening(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    first = SqliteStore(path)
    await first.open()
    kept, _ = await create_one(first, new_task(tenant="a"))
    gone, _ = await create_one(first, new_task(tenant="a", request_id="r", request_hash=b"x"))
    await first.update(gone.task_id, start)
    await first.update(gone.task_id, complete)
    await first.remove(gone.task_id, ended_only)
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.get(gone.task_id) is None
        assert await second.get(kept.task_id) is not None
        assert (await second.counts(TaskFilter(tenant="a")))[0] == {("echo", CREATED): 1}
        again, created = await create_one(
            second, new_task(tenant="a", request_id="r", request_hash=b"y")
        )
        assert created and again.task_id != gone.task_id
    finally:
        await second.close()
