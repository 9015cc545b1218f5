"""The queue's high-water mark: above it, the health of TaskService says NOT_SERVING, so
that a load balancer that checks it sends new work to another server; below the low-water
mark it says SERVING again (two marks, so that a queue at the mark does not flap).

Only TaskService's health changes: the server's own ("") and WorkerService's stay SERVING,
because workers must still reach it to take the queue down.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from conveyord.model import Change

DEFAULT_HIGH_WATER = 0.9  # of the queue's cap
LOW_WATER = 0.8  # of the high-water mark


class QueueMarks:
    """Follows the store's changes; calls `set_serving(False)` when the queue reaches the
    high-water mark and `set_serving(True)` when it falls below the low-water mark."""

    def __init__(
        self, queued: Callable[[], int], cap: int, share: float, set_serving: Callable[[bool], None]
    ) -> None:
        self.queued = queued
        self.high = max(1, math.ceil(cap * share))
        self.low = math.floor(self.high * LOW_WATER)
        self.set_serving = set_serving
        self.serving = True

    def changed(self, _change: Change | None = None) -> None:
        queued = self.queued()
        if self.serving and queued >= self.high:
            self.serving = False
            self.set_serving(False)
        elif not self.serving and queued < self.low:
            self.serving = True
            self.set_serving(True)
