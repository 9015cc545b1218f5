"""The ready queue: which queued task runs next.

Order: the highest effective priority first, the earliest among equals. A task's
effective priority is `priority + aging_rate * seconds_waited`, so a task that has
waited long enough overtakes newer, more urgent ones and no task waits forever.
Because every queued task ages at the same rate, the order between two tasks never
changes while they wait, and the key `aging_rate * queued_at - priority` can be
fixed when the task is queued: a heap keeps the order, and taking the next task
costs O(log n).

Tasks are kept in one heap per task type, so that a type at its concurrency limit is
passed over without disturbing the others; the next task is the best head among the
types that have room (the number of types is small and does not grow with the queue).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable


@dataclasses.dataclass(order=True, slots=True)
class _Entry:
    key: float
    order: int
    task_id: str = dataclasses.field(compare=False)
    task_type: str = dataclasses.field(compare=False)
    live: bool = dataclasses.field(default=True, compare=False)


class ReadyQueue:
    """Queued tasks by type, each type a heap ordered by aged priority, then arrival."""

    def __init__(self, aging_rate: float) -> None:
        """`aging_rate` is in priority levels per second of waiting (0 means strict priority)."""
        self._aging_rate = aging_rate
        self._heaps: dict[str, list[_Entry]] = {}
        self._entries: dict[str, _Entry] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._entries

    def push(self, task_id: str, task_type: str, priority: int, queued_at: float) -> None:
        """Queue a task; `queued_at` is a monotonic time in seconds."""
        entry = _Entry(
            self._aging_rate * queued_at - priority, next(self._order), task_id, task_type
        )
        self._entries[task_id] = entry
        heapq.heappush(self._heaps.setdefault(task_type, []), entry)

    def discard(self, task_id: str) -> bool:
        """Take a task out of the queue; False if it was not queued."""
        entry = self._entries.pop(task_id, None)
        if entry is None:
            return False
        entry.live = False  # removed from its heap lazily, when it reaches the top
        return True

    def pop(self, has_room: Callable[[str], bool]) -> tuple[str, str] | None:
        """The next (task_id, type) among the types for which `has_room(type)`, or None."""
        best: list[_Entry] | None = None
        for task_type, heap in list(self._heaps.items()):
            while heap and not heap[0].live:
                heapq.heappop(heap)
            if not heap:
                del self._heaps[task_type]
                continue
            if has_room(task_type) and (best is None or heap[0] < best[0]):
                best = heap
        if best is None:
            return None
        entry = heapq.heappop(best)
        del self._entries[entry.task_id]
        return entry.task_id, entry.task_type
