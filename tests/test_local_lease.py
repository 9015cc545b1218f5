"""The local worker on a store shared with other servers: its leases are its own (a holder
name of this process) and last `local_lease` unless renewed; it renews them while the
attempts run, so that only a server that died leaves leases that run out."""

from __future__ import annotations

import asyncio

from conveyord.handlers import HandlerRegistry, TaskContext
from conveyord.model import Change, ChangeKind, Task, TaskStatus
from conveyord.scheduler import Scheduler, SchedulerConfig
from conveyord.store.memory import MemoryStore
from conveyord.worker.local import LOCAL_HOLDER
from tests.test_store import new_task


class SharedMemoryStore(MemoryStore):
    """A memory store that says it is shared: what the local worker does then is what is
    tested here (a PostgreSQL store says the same)."""

    shared = True


async def test_on_a_shared_store_the_local_worker_holds_leases_of_its_own_and_renews_them() -> None:
    release = asyncio.Event()

    async def held(ctx: TaskContext) -> str:
        await release.wait()
        return "done"

    store = SharedMemoryStore()
    registry = HandlerRegistry({"held": held})
    renewed: list[Change] = []
    two_renewals = asyncio.Event()

    def follow(change: Change) -> None:
        if change.kind is ChangeKind.RENEWED:
            renewed.append(change)
            if len(renewed) == 2:
                two_renewals.set()

    store.feed.follow(follow)
    async with Scheduler(store, registry, SchedulerConfig(local_lease=0.3)) as scheduler:
        ((task, _),) = await scheduler.create([new_task(task_type="held")])
        await asyncio.wait_for(two_renewals.wait(), 10)
        first, second = (change.task for change in renewed[:2])
        assert first.lease_holder.startswith(f"{LOCAL_HOLDER}/") and first.lease_holder != (
            LOCAL_HOLDER
        )
        assert second.lease_id == first.lease_id  # the same attempt, its lease pushed on
        assert second.lease_expires_at is not None and first.lease_expires_at is not None
        assert second.lease_expires_at > first.lease_expires_at
        assert second.lease_expires_at - renewed[1].at <= 0.3 + 1e-6  # from the renewal
        release.set()
        ended = await _ended(store, task.task_id)
    assert ended.status is TaskStatus.COMPLETED and ended.attempt == 1


async def test_on_a_store_of_its_own_the_local_worker_s_lease_lasts_the_attempt() -> None:
    async def quick(ctx: TaskContext) -> str:
        return "done"

    store = MemoryStore()
    started = asyncio.get_running_loop().create_future()

    def follow(change: Change) -> None:
        if change.task.status is TaskStatus.RUNNING and not started.done():
            started.set_result(change.task)

    store.feed.follow(follow)
    async with Scheduler(store, HandlerRegistry({"quick": quick})) as scheduler:
        await scheduler.create([new_task(task_type="quick", timeout_seconds=100.0)])
        running = await asyncio.wait_for(started, 10)
    assert running.lease_holder == LOCAL_HOLDER
    assert running.lease_expires_at is not None
    assert running.lease_expires_at - running.updated_at > 100.0  # its timeout, and the grace


async def _ended(store: MemoryStore, task_id: str) -> Task:
    ended: asyncio.Future[Task] = asyncio.get_running_loop().create_future()

    def follow(change: Change) -> None:
        if change.task.task_id == task_id and change.task.terminal and not ended.done():
            ended.set_result(change.task)

    stop = store.feed.follow(follow)
    try:
        current = await store.get(task_id)
        if current is not None and current.terminal:
            return current
        return await asyncio.wait_for(ended, 10)
    finally:
        stop()
