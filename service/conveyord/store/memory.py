"""The in-memory store, and the core that the durable store builds on.

Every change goes through two steps. It is *staged*: given the next revision and
applied to the working view, which later mutations and request_id look-ups see, so
that concurrent changes chain correctly. Then it is *persisted* (`_persist`), and only
then applied to the committed view that Get, List and Watch read and passed to the
feed. In memory, persisting is instant; the SQLite store writes staged changes in
batches (group commit) and applies them once they are on disk, so that nothing a
client has been told or shown can be lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

from conveyord import lifecycle
from conveyord.feed import ChangeFeed
from conveyord.lifecycle import Lease, new_lease_id
from conveyord.model import Attempt, Change, ChangeKind, Task, TaskFilter, TaskStatus
from conveyord.store.base import (
    Claim,
    Mutation,
    RequestIdReused,
    TaskNotFound,
)
from conveyord.store.history import ChangeHistory
from conveyord.store.index import DispatchIndex, ListIndex, TaskCounts
from conveyord.store.schedules import ScheduleBook

if TYPE_CHECKING:
    from conveyord.tenants import Tenants

DEFAULT_HISTORY_SIZE = 100_000
DEFAULT_HISTORY_AGE = 600.0
DEFAULT_AGING_RATE = 1 / 60  # priority levels per second of waiting: one a minute
# update_where and count go through this many tasks at once (a few ms of work), then pause
# this long, so that the calls that came meanwhile are served (a turn of the loop is not
# enough: a call takes several) rather than waiting for the whole of a large one.
SCAN_CHUNK = 128
SCAN_PAUSE = 0.001
# The ended attempts kept per task: every one of a task with 100 attempts (the most a
# request may ask) unless interruptions or waits for input added more; the oldest go first.
MAX_KEPT_ATTEMPTS = 100


class MemoryStore:
    """Tasks in dictionaries, a revision counter, and a bounded change history."""

    shared = False  # this server's alone
    claims_in_memory = True  # from its ready queue (a database's store claims in SQL)

    def __init__(
        self,
        *,
        history_size: int = DEFAULT_HISTORY_SIZE,
        history_age: float = DEFAULT_HISTORY_AGE,
        aging_rate: float = DEFAULT_AGING_RATE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._feed = ChangeFeed()
        self.on_failure: Callable[[Exception], None] = lambda error: None  # memory cannot fail
        # Told of each batch written to disk (changes, seconds): none in memory.
        self.on_commit: Callable[[int, float], None] | None = None
        # The working view: the latest staged state of every task.
        self._working: dict[str, Task] = {}
        self._request_ids: dict[tuple[str, str], str] = {}
        self._index = DispatchIndex(aging_rate, ready_queue=self.claims_in_memory)
        self._staged_revision = 0
        self._last_seq = 0  # creation order; never reused, so that page tokens stay right
        # The committed view: what readers see.
        self._tasks: dict[str, Task] = {}
        self._order = ListIndex()  # task ids in creation order: all, by type, by label
        self._counts = TaskCounts()  # by tenant, task type and status
        self._finished: deque[tuple[float, str]] = deque()  # (finished_at, task_id), oldest first
        self._history = ChangeHistory(history_size, history_age, clock)
        self._revision = 0
        self._declared: set[str] = set()  # task types that workers declared
        # Each task's ended attempts, oldest first (the latest MAX_KEPT_ATTEMPTS): apart from
        # its record, so that the changes, watchers and List pages do not carry them.
        self._attempts: dict[str, list[Attempt]] = {}
        self.schedules = ScheduleBook()

    async def revision(self) -> int:
        return self._revision

    async def declare_task_types(self, task_types: AbstractSet[str]) -> None:
        new = task_types - self._declared
        if new:
            await self._persist_task_types(new)
            self._declared |= new

    async def declared_task_types(self) -> frozenset[str]:
        return frozenset(self._declared)

    async def _persist_task_types(self, task_types: AbstractSet[str]) -> None:
        """Make declared task types durable. In memory: they are."""

    @property
    def feed(self) -> ChangeFeed:
        return self._feed

    @property
    def queued(self) -> int:
        return self._index.queued

    def queued_of(self, tenant: str) -> int:
        return self._index.queued_by_tenant.get(tenant, 0)

    # -- writes ------------------------------------------------------------------

    async def create(
        self,
        tasks: Sequence[Task],
        admit: Callable[[Sequence[Task]], None],
        rates: Tenants | None = None,
    ) -> list[tuple[Task, bool]]:
        known = [self._known_request(task) for task in tasks]
        unknown = [task for task, first in zip(tasks, known, strict=True) if first is None]
        admit(unknown)
        if rates is not None:  # the last check: the tokens taken are spent on tasks made
            rates.charge(unknown)
        changes: list[Change] = []
        for task, first in zip(tasks, known, strict=True):
            if first is None:
                self._last_seq += 1
                task.seq = self._last_seq
                changes.append(self._stage(ChangeKind.CHANGED, task))
        for first in known:
            if first is not None:
                await self._settled(first.task_id)
        if changes:
            await self._persist(changes)
        new = iter(changes)
        return [(next(new).task, True) if first is None else (first, False) for first in known]

    async def get_by_request(self, tenant: str, request_id: str) -> Task | None:
        task_id = self._request_ids.get((tenant, request_id))
        return None if task_id is None else self._working.get(task_id)

    def _known_request(self, task: Task) -> Task | None:
        """The task first created with this task's request_id, if any (RequestIdReused if
        it came from a different request)."""
        if not task.request_id:
            return None
        first_id = self._request_ids.get((task.tenant, task.request_id))
        if first_id is None:
            return None
        first = self._working[first_id]
        if first.request_hash != task.request_hash:
            raise RequestIdReused(task.request_id, first_id)
        return first

    async def update(self, task_id: str, mutation: Mutation, *, quiet: bool = False) -> Task:
        current = self._working.get(task_id)
        if current is None:
            raise TaskNotFound(task_id)
        new = mutation(current)
        if new is None or new is current:
            await self._settled(task_id)
            return current
        change = self._stage(ChangeKind.RENEWED if quiet else ChangeKind.CHANGED, new)
        await self._persist([change])
        return change.task

    async def remove_finished(self, finished_before: float, limit: int) -> int:
        changes: list[Change] = []
        while self._finished and len(changes) < limit and self._finished[0][0] < finished_before:
            _, task_id = self._finished.popleft()
            task = self._working.get(task_id)
            if task is None or not task.terminal:
                continue
            changes.append(self._stage(ChangeKind.REMOVED, task))
        if changes:
            await self._persist(changes)
        return len(changes)

    async def remove(self, task_id: str, check: Callable[[Task], None]) -> Change:
        current = self._working.get(task_id)
        if current is None:
            raise TaskNotFound(task_id)
        check(current)
        change = self._stage(ChangeKind.REMOVED, current)
        await self._persist([change])
        return change

    async def claim(self, request: Claim) -> list[Task]:
        self._index.promote(request.now, self._working)
        changes: list[Change] = []
        picked = self._index.pick(request.count, request.types, request.limits, request.tenant)
        for task_id in picked:
            task = self._working[task_id]
            pausable = task.task_type in request.pausable
            lease = Lease(new_lease_id(), request.holder, request.lease_until(task), pausable)
            started = lifecycle.claim(task, lease, request.now)
            if started is not None:
                changes.append(self._stage(ChangeKind.CHANGED, started))
        if changes:
            await self._persist(changes)
        return [change.task for change in changes]

    async def update_where(self, task_filter: TaskFilter, mutation: Mutation) -> list[Task]:
        changed: list[Task] = []
        async for chunk in self._scan(task_filter):
            changes: list[Change] = []
            for task in chunk:
                new = mutation(task)
                if new is not None and new is not task:  # identity: comparing is costly
                    changes.append(self._stage(ChangeKind.CHANGED, new))
            if changes:
                await self._persist(changes)
                changed.extend(change.task for change in changes)
        return changed

    async def count(self, task_filter: TaskFilter) -> int:
        return sum([len(chunk) async for chunk in self._scan(task_filter)])

    async def _scan(self, task_filter: TaskFilter) -> AsyncIterator[list[Task]]:
        """The tasks that the filter matches, of those there when the scan began (their ids
        are taken at once; a task created later is not among them), each as it stands when
        its chunk comes, SCAN_CHUNK at a time, with a pause between two chunks."""
        ids = self._index.candidates(task_filter, self._working)
        if len(ids) > 1 and (task_filter.labels or task_filter.task_type):
            ids = min(ids, self._order.ids(task_filter), key=len)  # a label's may be fewer
        for start in range(0, len(ids), SCAN_CHUNK):
            if start:
                await asyncio.sleep(SCAN_PAUSE)
            chunk = [self._working.get(task_id) for task_id in ids[start : start + SCAN_CHUNK]]
            yield [task for task in chunk if task is not None and task_filter.matches(task)]

    async def expired_leases(self, now: float) -> list[Task]:
        return self._index.expired(now, self._working)

    async def overdue(self, now: float) -> list[Task]:
        return self._index.overdue(now, self._working)

    def next_wakeup(self) -> float | None:
        times = [t for t in (self._index.next_runnable_at(), self._index.next_deadline()) if t]
        return min(times, default=None)

    def _stage(self, kind: ChangeKind, task: Task) -> Change:
        """Give a change the next revision and apply it to the working view.

        A CHANGED task is a new record that no one else holds yet (from `create`, or made by a
        mutation with `evolve`): it is stamped with its revision in place, rather than copied.
        """
        self._staged_revision += 1
        if kind is not ChangeKind.REMOVED:
            task.revision = self._staged_revision
        old = self._set_working(kind, task)
        previous = 0 if old is None else old.revision
        ended = None
        if old is not None and old.lease_id and kind is not ChangeKind.REMOVED:
            ended = lifecycle.ended_attempt(old, task)
        return Change(self._staged_revision, kind, task, self._clock(), previous, ended)

    def _set_working(self, kind: ChangeKind, task: Task) -> Task | None:
        """Apply a change to the working view, its dispatch index and its request ids; the
        task's state before it (None: new)."""
        old = self._working.get(task.task_id)
        if kind is not ChangeKind.REMOVED:
            self._index.changed(old, task)
            self._working[task.task_id] = task
            if old is None and task.request_id:
                self._request_ids[(task.tenant, task.request_id)] = task.task_id
        elif old is not None:
            del self._working[task.task_id]
            self._index.changed(old, None)
            if old.request_id:
                self._request_ids.pop((old.tenant, old.request_id), None)
        return old

    async def _persist(self, changes: list[Change]) -> None:
        """Make staged changes durable, then commit them. In memory: at once."""
        self._commit(changes)

    async def _settled(self, task_id: str) -> None:
        """Wait until the task's latest staged change is committed. In memory: it is."""

    def _commit(self, changes: Iterable[Change]) -> None:
        """Apply persisted changes to the committed view and publish them, in order."""
        for change in changes:
            self._commit_one(change)
        self._history.trim()

    def _commit_one(self, change: Change) -> None:
        """Apply one persisted change to the committed view, its history and its counts, and
        publish it with the task's committed state before it (the history is trimmed apart)."""
        task = change.task
        if change.kind is ChangeKind.REMOVED:
            previous = self._tasks.pop(task.task_id, None)
            self._order.removed(task, self._tasks)
            self._counts.changed(previous, None)
            self._attempts.pop(task.task_id, None)
        else:
            if change.ended is not None:
                self._keep_attempt(task.task_id, change.ended)
            previous = self._tasks.get(task.task_id)
            self._tasks[task.task_id] = task
            self._counts.changed(previous, task)
            if previous is None:
                self._order.added(task)
            if task.terminal and (previous is None or not previous.terminal):
                self._finished.append((task.finished_at or task.updated_at, task.task_id))
        self._revision = change.revision
        self._history.remember(change)
        self._feed.publish(change, previous)

    def _keep_attempt(self, task_id: str, attempt: Attempt) -> None:
        """Add an ended attempt to the task's history, dropping the oldest past the cap."""
        kept = self._attempts.setdefault(task_id, [])
        kept.append(attempt)
        if len(kept) > MAX_KEPT_ATTEMPTS:
            del kept[: len(kept) - MAX_KEPT_ATTEMPTS]

    # -- reads -------------------------------------------------------------------

    async def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    async def attempts(self, task_id: str) -> Sequence[Attempt]:
        return tuple(self._attempts.get(task_id, ()))

    async def list(
        self, task_filter: TaskFilter, after_seq: int, limit: int, *, newest_first: bool = False
    ) -> tuple[Sequence[Task], int]:
        page: list[Task] = []
        order = self._order.before if newest_first else self._order.after
        for task_id in order(after_seq, task_filter):
            task = self._tasks.get(task_id)
            if task is not None and task_filter.matches(task):
                page.append(task)
                if len(page) == limit:
                    break
        return page, self._revision

    async def changes_since(self, revision: int, task_filter: TaskFilter) -> Sequence[Change]:
        return self._history.since(revision, self._revision, task_filter)

    async def counts(
        self, task_filter: TaskFilter
    ) -> tuple[dict[tuple[str, TaskStatus], int], int]:
        return self._counts.of(task_filter), self._revision

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _restore(
        self,
        tasks: Iterable[Task],
        history: Iterable[Change],
        revision: int,
        last_seq: int,
        attempts: Iterable[tuple[str, Attempt]] = (),
    ) -> None:
        """Fill both views from what a durable store read back at start (the attempts,
        each with its task's id, oldest first)."""
        for task_id, attempt in attempts:
            self._keep_attempt(task_id, attempt)
        for task in sorted(tasks, key=lambda t: t.seq):
            self._working[task.task_id] = self._tasks[task.task_id] = task
            self._index.changed(None, task)
            self._order.added(task)
            self._counts.changed(None, task)
            if task.request_id:
                self._request_ids[(task.tenant, task.request_id)] = task.task_id
            if task.terminal:
                self._finished.append((task.finished_at or task.updated_at, task.task_id))
        self._finished = deque(sorted(self._finished))
        self._history.restore(history, revision)
        self._revision = self._staged_revision = self._feed.revision = revision
        self._last_seq = last_seq
