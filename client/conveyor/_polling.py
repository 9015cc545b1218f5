"""Polling a task until it ends: when to look again, kept apart from RPC retry.

Retry recovers one call from a failure that lasts a moment; polling waits, politely, for
work that may take minutes, so it starts slower and backs off further (python-api-core
keeps the two apart for the same reason). The pauses are counted from the start of each
look, so the time a Get takes is subtracted from the pause after it, and no pause runs
past the deadline of the wait.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from conveyor._deadline import Deadline
from conveyor.errors import DeadlineExceeded, WaitTimeout
from conveyor.tasks import Task


@dataclasses.dataclass(frozen=True)
class PollingPolicy:
    """Pauses of `initial` seconds, then `multiplier` times longer each time, at most `maximum`."""

    initial: float = 1.0
    multiplier: float = 1.5
    maximum: float = 30.0

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum and self.multiplier >= 1):
            raise ValueError(
                "polling needs 0 < initial <= maximum and multiplier >= 1, not "
                f"initial={self.initial}, multiplier={self.multiplier}, maximum={self.maximum}"
            )


class Polling:
    """One wait by polling, apart from its I/O: each look's timeout, the pauses, the deadline."""

    def __init__(
        self,
        task_id: str,
        deadline: Deadline,
        policy: PollingPolicy,
        call_timeout: float | None,
        last: Task | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.task_id = task_id
        self.last = last
        self._deadline = deadline
        self._policy = policy
        self._call_timeout = call_timeout
        self._clock = clock
        self._pause = policy.initial
        self._started = clock()
        self._cut_by_deadline = False

    def start(self) -> float | None:
        """Begin a look; returns its Get's timeout. WaitTimeout once the deadline has passed."""
        if self._deadline.expired:
            raise WaitTimeout(self.task_id, self._deadline.timeout, self.last)
        self._started = self._clock()
        timeout = self._deadline.cap(self._call_timeout)
        self._cut_by_deadline = timeout != self._call_timeout
        return timeout

    def timed_out(self, error: DeadlineExceeded) -> None:
        """Raise WaitTimeout if it was the wait's deadline, not the call's own, that cut the Get."""
        if self._cut_by_deadline:
            raise WaitTimeout(self.task_id, self._deadline.timeout, self.last) from error

    def ended(self, task: Task) -> bool:
        """Note what a look saw; True once the task has ended."""
        self.last = task
        return task.status.terminal

    def pause(self) -> float:
        """Seconds to sleep before the next look."""
        pause = self._pause - (self._clock() - self._started)
        self._pause = min(self._pause * self._policy.multiplier, self._policy.maximum)
        return self._deadline.cap(max(0.0, pause))
