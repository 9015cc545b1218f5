"""What a store keeps beside its tasks so that dispatch never scans them.

`DispatchIndex` follows every staged change of the working view and answers, in time
that grows with the answer rather than with the store: the best runnable tasks (the ready
queue, by aged priority per task type), the next time a waiting task becomes runnable (a
heap of runnable times: a task waiting for its next attempt is an entry, not a timer),
the leases that have run out (a heap of expiry times), and the tasks of each active status.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping

from conveyord.model import Task, TaskStatus
from conveyord.queue import ReadyQueue


class DispatchIndex:
    """The ready queue, the waiting tasks, the leases and the active tasks of a store."""

    def __init__(self, aging_rate: float) -> None:
        """`aging_rate` is in priority levels per second of waiting (0: strict priority)."""
        self.ready = ReadyQueue(aging_rate)
        self._waiting: list[tuple[float, str]] = []  # (runnable at, task_id)
        self._leases: list[tuple[float, str, str]] = []  # (expires at, task_id, lease_id)
        self.active: dict[TaskStatus, set[str]] = {
            TaskStatus.CREATED: set(),
            TaskStatus.RUNNING: set(),
        }

    @property
    def queued(self) -> int:
        """CREATED tasks, runnable or waiting for their time."""
        return len(self.active[TaskStatus.CREATED])

    def changed(self, old: Task | None, new: Task | None) -> None:
        """Follow one staged change: `old` became `new` (None: created, or removed)."""
        if old is not None and old.status in self.active:
            self.active[old.status].discard(old.task_id)
        if new is None or new.status not in self.active:
            if old is not None and old.status is TaskStatus.CREATED:
                self.ready.discard(old.task_id)
            return
        self.active[new.status].add(new.task_id)
        if new.status is TaskStatus.CREATED:
            if old is None or old.status is not TaskStatus.CREATED or _requeue(old, new):
                self._queue(new)
        elif new.lease_expires_at is not None and (
            old is None or old.lease_expires_at != new.lease_expires_at
        ):
            heapq.heappush(self._leases, (new.lease_expires_at, new.task_id, new.lease_id))
        if old is not None and old.status is TaskStatus.CREATED and new.status is not old.status:
            self.ready.discard(old.task_id)

    def _queue(self, task: Task) -> None:
        """A task with a runnable time waits for it (`promote` moves it on); one without is
        runnable since it was last changed."""
        if task.next_attempt_at is not None:
            heapq.heappush(self._waiting, (task.next_attempt_at, task.task_id))
        else:
            self.ready.push(task.task_id, task.task_type, task.priority, task.updated_at)

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
                self.ready.push(task_id, task.task_type, task.priority, runnable_at)

    def next_runnable_at(self) -> float | None:
        """When the earliest waiting task becomes runnable (an entry may be stale: early)."""
        return self._waiting[0][0] if self._waiting else None

    def expired(self, now: float, working: Mapping[str, Task]) -> list[Task]:
        """The RUNNING tasks whose lease ran out by `now`."""
        found: list[Task] = []
        leases = self._leases
        while leases and leases[0][0] <= now:
            _, task_id, lease_id = heapq.heappop(leases)
            task = working.get(task_id)
            if (
                task is not None
                and task.status is TaskStatus.RUNNING
                and task.lease_id == lease_id
                and task.lease_expires_at is not None
                and task.lease_expires_at <= now
            ):
                found.append(task)
        return found

    def next_expiry(self) -> float | None:
        """When the earliest lease runs out (an entry may be stale: early)."""
        return self._leases[0][0] if self._leases else None

    def pick(
        self, count: int, room: Callable[[str], bool], taken: Callable[[str], None]
    ) -> list[str]:
        """Up to `count` runnable task ids, best first, of types for which `room(type)`;
        `taken(type)` is told of each, so that `room` can count them."""
        picked: list[str] = []
        while len(picked) < count and (found := self.ready.pop(room)) is not None:
            task_id, task_type = found
            picked.append(task_id)
            taken(task_type)
        return picked


def _requeue(old: Task, new: Task) -> bool:
    """A CREATED task's place in the queue changed (its runnable time or its priority)."""
    return old.next_attempt_at != new.next_attempt_at or old.priority != new.priority
