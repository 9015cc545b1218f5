"""The ready queue: which queued task runs next.

Order: the highest effective priority first, the earliest among equals. A task's
effective priority is `priority + aging_rate * seconds_waited`, so a task that has
waited long enough overtakes newer, more urgent ones and no task waits forever.
Because every queued task ages at the same rate, the order between two tasks never
changes while they wait, and the key `aging_rate * queued_at - priority` can be
fixed when the task is queued: a heap keeps the order, and taking the next task
costs O(log n).

Tasks are kept in one heap per tenant and task type (a lane), so that a type at its
concurrency limit is passed over without disturbing the others (the number of lanes is
small and does not grow with the queue).

Between tenants, dispatch is fair: the next task is the best head among the lanes of the
tenant served least recently, so that one tenant's million queued tasks do not starve
another's ten (each tenant with runnable work gets every n-th start, n the tenants with
runnable work). Priority and aging order the tasks within a tenant.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

# A heap entry: (key, arrival, task_id); tuples compare in C, which keeps the heap cheap.
_Entry = tuple[float, int, str]
_Lane = tuple[str, str]  # (tenant, task type)


class ReadyQueue:
    """Queued tasks by tenant and type, each lane a heap ordered by aged priority, then
    arrival; tenants take turns."""

    def __init__(self, aging_rate: float) -> None:
        """`aging_rate` is in priority levels per second of waiting (0 means strict priority)."""
        self._aging_rate = aging_rate
        self._heaps: dict[_Lane, list[_Entry]] = {}
        self._arrivals: dict[str, int] = {}  # queued task -> the arrival of its live entry
        self._next_arrival = itertools.count()
        self._served: dict[str, int] = {}  # tenant -> the turn it was last served at
        self._turns = itertools.count(1)

    def __len__(self) -> int:
        return len(self._arrivals)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._arrivals

    def push(
        self, task_id: str, task_type: str, priority: int, queued_at: float, tenant: str = ""
    ) -> None:
        """Queue a task; `queued_at` is a monotonic time in seconds."""
        arrival = next(self._next_arrival)
        self._arrivals[task_id] = arrival
        entry = (self._aging_rate * queued_at - priority, arrival, task_id)
        heapq.heappush(self._heaps.setdefault((tenant, task_type), []), entry)

    def discard(self, task_id: str) -> bool:
        """Take a task out of the queue; False if it was not queued. Its entry stays in its
        heap, dead, until it reaches the top."""
        return self._arrivals.pop(task_id, None) is not None

    def pop(
        self, has_room: Callable[[str], bool], tenant: str | None = None
    ) -> tuple[str, str] | None:
        """The next (task_id, type) among the types for which `has_room(type)`, of `tenant`
        (None: of any, in turns), or None."""
        best: dict[str, tuple[list[_Entry], str]] = {}  # tenant: its best lane, and its type
        for lane, heap in list(self._heaps.items()):
            while heap and self._arrivals.get(heap[0][2]) != heap[0][1]:
                heapq.heappop(heap)  # a dead entry
            if not heap:
                del self._heaps[lane]
                continue
            lane_tenant, task_type = lane
            if (tenant is not None and lane_tenant != tenant) or not has_room(task_type):
                continue
            current = best.get(lane_tenant)
            if current is None or heap[0] < current[0][0]:
                best[lane_tenant] = heap, task_type
        if not best:
            return None
        served = self._served
        chosen = min(best, key=lambda t: served.get(t, 0)) if len(best) > 1 else next(iter(best))
        served[chosen] = next(self._turns)
        heap, task_type = best[chosen]
        _, _, task_id = heapq.heappop(heap)
        del self._arrivals[task_id]
        return task_id, task_type
