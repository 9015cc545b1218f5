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

import heapq
import itertools
from collections.abc import Callable

# A heap entry: (key, arrival, task_id); tuples compare in C, which keeps the heap cheap.
_Entry = tuple[float, int, str]


class ReadyQueue:
    """Queued tasks by type, each type a heap ordered by aged priority, then arrival."""

    def __init__(self, aging_rate: float) -> None:
        """`aging_rate` is in priority levels per second of waiting (0 means strict priority)."""
        self._aging_rate = aging_rate
        self._heaps: dict[str, list[_Entry]] = {}
        self._arrivals: dict[str, int] = {}  # queued task -> the arrival of its live entry
        self._next_arrival = itertools.count()

    def __len__(self) -> int:
        return len(self._arrivals)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._arrivals

    def push(self, task_id: str, task_type: str, priority: int, queued_at: float) -> None:
        """Queue a task; `queued_at` is a monotonic time in seconds."""
        arrival = next(self._next_arrival)
        self._arrivals[task_id] = arrival
        entry = (self._aging_rate * queued_at - priority, arrival, task_id)
        heapq.heappush(self._heaps.setdefault(task_type, []), entry)

    def discard(self, task_id: str) -> bool:
        """Take a task out of the queue; False if it was not queued. Its entry stays in its
        heap, dead, until it reaches the top."""
        return self._arrivals.pop(task_id, None) is not None

    def pop(self, has_room: Callable[[str], bool]) -> tuple[str, str] | None:
        """The next (task_id, type) among the types for which `has_room(type)`, or None."""
        best: list[_Entry] | None = None
        best_type = ""
        for task_type, heap in list(self._heaps.items()):
            while heap and self._arrivals.get(heap[0][2]) != heap[0][1]:
                heapq.heappop(heap)  # a dead entry
            if not heap:
                del self._heaps[task_type]
            elif has_room(task_type) and (best is None or heap[0] < best[0]):
                best, best_type = heap, task_type
        if best is None:
            return None
        _, _, task_id = heapq.heappop(best)
        del self._arrivals[task_id]
        return task_id, best_type
