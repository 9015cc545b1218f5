"""What a store keeps beside its tasks so that dispatch and List never scan them all.

`DispatchIndex` follows every staged change of the working view and answers, in time
that grows with the answer rather than with the store: the best runnable tasks (the ready
queue, by aged priority per task type), the next time a waiting task becomes runnable (a
heap of runnable times: a task waiting for its start or its next attempt is an entry, not
a timer), the leases that have run out and the tasks past the deadline of what they wait
for, a start or an input (each a `Deadlines` heap, the size of what is live), and the tasks
of each active status.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

from conveyord.model import LEASED, UNFINISHED, Task, TaskFilter, TaskStatus
from conveyord.queue import ReadyQueue


class DispatchIndex:
    """The ready queue, the waiting tasks, the leases and the active tasks of a store."""

    def __init__(self, aging_rate: float, *, ready_queue: bool = True) -> None:
        """`aging_rate` is in priority levels per second of waiting (0: strict priority).
        Without a `ready_queue` (a store whose claims the database makes), nothing is kept
        to `pick` from: only `pick` would ever take its entries out again."""
        self.ready: ReadyQueue | _NoReadyQueue = (
            ReadyQueue(aging_rate) if ready_queue else _NoReadyQueue()
        )
        self._waiting: list[tuple[float, str]] = []  # (runnable at, task_id)
        self._leases = Deadlines()  # of attempts that hold one, tagged with the lease id
        self._waits = Deadlines()  # of queued tasks' start deadlines, and input deadlines
        self.active: dict[TaskStatus, set[str]] = {status: set() for status in UNFINISHED}
        self.queued_by_tenant: dict[str, int] = {}  # CREATED and PAUSED tasks of each tenant

    @property
    def queued(self) -> int:
        """CREATED tasks, runnable or waiting for their time, and PAUSED ones."""
        return len(self.active[TaskStatus.CREATED]) + len(self.active[TaskStatus.PAUSED])

    def changed(self, old: Task | None, new: Task | None) -> None:
        """Follow one staged change: `old` became `new` (None: created, or removed)."""
        # (Most tasks have neither deadline: two attribute reads each settle it.)
        due = None
        if new is not None and (new.start_deadline or new.input_deadline) is not None:
            due = _wait_deadline(new)
        if new is not None and due is not None:
            self._waits.set(new.task_id, due)
        elif old is not None and (old.start_deadline or old.input_deadline) is not None:
            self._waits.drop(old.task_id)
        if new is not None and new.lease_expires_at is not None and new.status in LEASED:
            self._leases.set(new.task_id, new.lease_expires_at, new.lease_id)
        elif old is not None and old.lease_expires_at is not None:
            self._leases.drop(old.task_id)
        if old is not None and old.status in self.active:
            self.active[old.status].discard(old.task_id)
            if old.status in _QUEUED:
                self.queued_by_tenant[old.tenant] -= 1
        if new is not None and new.status in _QUEUED:
            counts = self.queued_by_tenant
            counts[new.tenant] = counts.get(new.tenant, 0) + 1
        if new is None or new.status not in self.active:
            if old is not None and old.status is TaskStatus.CREATED:
                self.ready.discard(old.task_id)
            return
        self.active[new.status].add(new.task_id)
        if new.status is TaskStatus.CREATED and (
            old is None or old.status is not TaskStatus.CREATED or _requeue(old, new)
        ):
            self._queue(new)
        if old is not None and old.status is TaskStatus.CREATED and new.status is not old.status:
            self.ready.discard(old.task_id)

    def _queue(self, task: Task) -> None:
        """A task with a runnable time waits for it (`promote` moves it on); one without is
        runnable since it was queued (before a pause), or since it was last changed."""
        if task.next_attempt_at is not None:
            heapq.heappush(self._waiting, (task.next_attempt_at, task.task_id))
        else:
            self.ready.push(
                task.task_id, task.task_type, task.priority, task.queued_since, task.tenant
            )

    def promote(self, now: float, working: Mapping[str, Task]) -> None:
        """Move the waiting tasks whose time has come into the ready queue."""
        waiting = self._waiting
        while waiting and waiting[0][0] <= now:
            runnable_at, task_id = heapq.heappop(waiting)
            task = working.get(task_id)
            if (
                task is not None
                and task.status is TaskStatus.CREATED
                and task.next_attempt_at == runnable_at
                and task_id not in self.ready
            ):
                self.ready.push(task_id, task.task_type, task.priority, runnable_at, task.tenant)

    def next_runnable_at(self) -> float | None:
        """When the earliest waiting task becomes runnable (an entry may be stale: early)."""
        return self._waiting[0][0] if self._waiting else None

    def expired(self, now: float, working: Mapping[str, Task]) -> list[Task]:
        """The tasks whose attempt's lease ran out by `now`."""
        found: list[Task] = []
        for task_id, lease_id in self._leases.due(now):
            task = working.get(task_id)
            if task is not None and task.status in LEASED and task.lease_id == lease_id:
                found.append(task)
        return found

    def overdue(self, now: float, working: Mapping[str, Task]) -> list[Task]:
        """The tasks whose start or input deadline passed by `now`."""
        found: list[Task] = []
        for task_id, _ in self._waits.due(now):
            task = working.get(task_id)
            if task is not None and _wait_deadline(task) is not None:
                found.append(task)
        return found

    def next_deadline(self) -> float | None:
        """When the earliest live lease runs out or start or input deadline passes."""
        times = [t for t in (self._leases.next(), self._waits.next()) if t is not None]
        return min(times, default=None)

    def pick(
        self,
        count: int,
        types: AbstractSet[str] | None,
        limits: Mapping[str, int],
        tenant: str | None = None,
    ) -> list[str]:
        """Up to `count` runnable task ids, best first, of `types` (None: any) and of
        `tenant` (None: any, in turns), at most `limits[type]` of a limited type."""
        taken: dict[str, int] = {}

        def room(task_type: str) -> bool:
            if types is not None and task_type not in types:
                return False
            limit = limits.get(task_type)
            return limit is None or taken.get(task_type, 0) < limit

        picked: list[str] = []
        while len(picked) < count and (found := self.ready.pop(room, tenant)) is not None:
            task_id, task_type = found
            picked.append(task_id)
            taken[task_type] = taken.get(task_type, 0) + 1
        return picked

    def candidates(self, task_filter: TaskFilter, working: Mapping[str, Task]) -> list[str]:
        """The ids of the tasks a filter may match: by id, by active status, or all."""
        if task_filter.task_id:
            return [task_filter.task_id] if task_filter.task_id in working else []
        if task_filter.statuses and task_filter.statuses <= self.active.keys():
            return list(set().union(*(self.active[s] for s in task_filter.statuses)))
        return list(working)


class Deadlines:
    """When each task's one pending deadline falls due (a lease's expiry, a start deadline):
    a heap with one live entry per task. An entry replaced or dropped since is skipped when
    it comes up, and the heap is rebuilt from the live entries once the stale ones are most
    of it, so that it stays the size of what is live."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str, str]] = []  # (when, task_id, tag)
        self._live: dict[str, tuple[float, str, str]] = {}  # task_id: its heap entry

    def set(self, task_id: str, when: float, tag: str = "") -> None:
        entry = (when, task_id, tag)
        if self._live.get(task_id) == entry:
            return
        self._live[task_id] = entry
        if len(self._heap) > 2 * len(self._live) + 1024:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)
        else:
            heapq.heappush(self._heap, entry)

    def drop(self, task_id: str) -> None:
        self._live.pop(task_id, None)

    def due(self, now: float) -> list[tuple[str, str]]:
        """The live entries due by `now`, as (task_id, tag), taken out."""
        found: list[tuple[str, str]] = []
        heap, live = self._heap, self._live
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if live.get(entry[1]) == entry:
                del live[entry[1]]
                found.append((entry[1], entry[2]))
        return found

    def next(self) -> float | None:
        """When the earliest live entry falls due (the stale ones before it are dropped)."""
        heap, live = self._heap, self._live
        while heap and live.get(heap[0][1]) != heap[0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None


_QUEUED = frozenset({TaskStatus.CREATED, TaskStatus.PAUSED})


def _wait_deadline(task: Task) -> float | None:
    """When a task fails unless what it waits for comes: a queued task's start deadline,
    or a waiting task's input deadline."""
    if task.status is TaskStatus.CREATED:
        return task.start_deadline
    if task.status is TaskStatus.WAITING_INPUT:
        return task.input_deadline
    return None


def _requeue(old: Task, new: Task) -> bool:
    """A CREATED task's place in the queue changed (its runnable time or its priority)."""
    return old.next_attempt_at != new.next_attempt_at or old.priority != new.priority


class ListIndex:
    """Task ids in creation order, for List to page through: all of them, and those of each
    task type and each label, so that a selective filter reads what it returns (and the
    tasks of its most selective part) rather than every task."""

    def __init__(self) -> None:
        self._all = CreationOrder()
        self._by_type: dict[str, CreationOrder] = {}
        self._by_label: dict[tuple[str, str], CreationOrder] = {}

    def added(self, task: Task) -> None:
        seq, task_id = task.seq, task.task_id
        self._all.append(seq, task_id)
        _order_of(self._by_type, task.task_type).append(seq, task_id)
        for label in task.labels.items():
            _order_of(self._by_label, label).append(seq, task_id)

    def removed(self, task: Task, alive: Mapping[str, object]) -> None:
        self._all.removed(alive)
        self._by_type[task.task_type].removed(alive)
        for label in task.labels.items():
            self._by_label[label].removed(alive)

    def after(self, seq: int, task_filter: TaskFilter) -> Iterator[str]:
        """The ids of tasks created after `seq`, oldest first, that the filter may match
        (removed ones included): those of its most selective type or label."""
        return self._narrowest(task_filter).after(seq)

    def before(self, seq: int, task_filter: TaskFilter) -> Iterator[str]:
        """As `after`, newest first: the ids of tasks created before `seq` (0: every task)."""
        return self._narrowest(task_filter).before(seq)

    def ids(self, task_filter: TaskFilter) -> list[str]:
        """The ids the filter may match, as `after(0, ...)` gives them, in a list."""
        return self._narrowest(task_filter).ids()

    def _narrowest(self, task_filter: TaskFilter) -> CreationOrder:
        orders = [self._all]
        if task_filter.task_type:
            orders.append(self._by_type.get(task_filter.task_type, _NONE))
        orders.extend(self._by_label.get(label, _NONE) for label in task_filter.labels.items())
        return min(orders, key=len)


class CreationOrder:
    """Task ids in the order the tasks were created, for List to page through.

    Appending and finding where a page starts (by `seq`) are cheap; a removed task leaves
    a gap, skipped when paging, and the gaps are swept out once they are half the index.
    """

    def __init__(self) -> None:
        self._seqs: list[int] = []
        self._ids: list[str] = []
        self._gaps = 0

    def append(self, seq: int, task_id: str) -> None:
        self._seqs.append(seq)
        self._ids.append(task_id)

    def after(self, seq: int) -> Iterator[str]:
        """The ids of the tasks created after `seq`, oldest first (removed ones included)."""
        ids = self._ids
        for index in range(bisect.bisect_right(self._seqs, seq), len(ids)):
            yield ids[index]

    def before(self, seq: int) -> Iterator[str]:
        """The ids of the tasks created before `seq` (0: all), newest first (removed ones
        included)."""
        ids = self._ids
        end = len(ids) if seq == 0 else bisect.bisect_left(self._seqs, seq)
        for index in range(end - 1, -1, -1):
            yield ids[index]

    def ids(self) -> list[str]:
        """Every id, oldest first (removed ones included), in a list of its own."""
        return list(self._ids)

    def removed(self, alive: Mapping[str, object]) -> None:
        """Note that a task was removed; sweep the gaps out when there are many."""
        self._gaps += 1
        if self._gaps * 2 > len(self._ids):
            kept = [(s, i) for s, i in zip(self._seqs, self._ids, strict=True) if i in alive]
            self._seqs = [s for s, _ in kept]
            self._ids = [i for _, i in kept]
            self._gaps = 0

    def __len__(self) -> int:
        return len(self._ids)


_NONE = CreationOrder()  # what a type or label that no task has holds


def _order_of(orders: dict[Any, CreationOrder], key: Any) -> CreationOrder:
    """The creation order of `key`, made the first time (setdefault would make one each time)."""
    order = orders.get(key)
    if order is None:
        order = orders[key] = CreationOrder()
    return order


class TaskCounts:
    """How many tasks each tenant has of each task type in each status, kept up to date at
    every committed change, so that CountTasks answers without going through the tasks."""

    def __init__(self) -> None:
        self._by_tenant: dict[str, dict[tuple[str, TaskStatus], int]] = {}

    def changed(self, old: Task | None, new: Task | None) -> None:
        """Follow one committed change: `old` became `new` (None: created, or removed). Most
        changes keep the status and the type, and cost one comparison."""
        if old is not None and new is not None and old.status is new.status:
            return
        if old is not None:
            counts = self._by_tenant[old.tenant]
            key = (old.task_type, old.status)
            counts[key] -= 1
            if not counts[key]:
                del counts[key]
        if new is not None:
            counts = self._by_tenant.setdefault(new.tenant, {})
            key = (new.task_type, new.status)
            counts[key] = counts.get(key, 0) + 1

    def of(self, task_filter: TaskFilter) -> dict[tuple[str, TaskStatus], int]:
        """The counts of the filter's tenant (every tenant's, summed, for None), narrowed to
        its statuses and task type (its labels and id prefix are not looked at)."""
        if task_filter.tenant is not None:
            tenants = [self._by_tenant.get(task_filter.tenant, {})]
        else:
            tenants = list(self._by_tenant.values())
        found: dict[tuple[str, TaskStatus], int] = {}
        for counts in tenants:
            for (task_type, status), count in counts.items():
                if task_filter.statuses and status not in task_filter.statuses:
                    continue
                if task_filter.task_type and task_type != task_filter.task_type:
                    continue
                found[(task_type, status)] = found.get((task_type, status), 0) + count
        return found


class _NoReadyQueue:
    """The ready queue of a store that does not pick in memory: it keeps nothing."""

    def __len__(self) -> int:
        return 0

    def __contains__(self, task_id: object) -> bool:
        return False

    def push(
        self, task_id: str, task_type: str, priority: int, queued_at: float, tenant: str = ""
    ) -> None:
        pass

    def discard(self, task_id: str) -> bool:
        return False

    def pop(
        self, has_room: Callable[[str], bool], tenant: str | None = None
    ) -> tuple[str, str] | None:
        return None
