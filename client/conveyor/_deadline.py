"""A deadline on the monotonic clock, shared by retries, polling and watches."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import overload


class Deadline:
    """The moment by which something must be done, `timeout` seconds from now (None: never)."""

    def __init__(
        self, timeout: float | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.timeout = timeout
        self._clock = clock
        self._at = None if timeout is None else clock() + timeout

    def remaining(self) -> float | None:
        """Seconds left (0 once passed), or None for no deadline."""
        return None if self._at is None else max(0.0, self._at - self._clock())

    @property
    def expired(self) -> bool:
        return self._at is not None and self._clock() >= self._at

    @overload
    def cap(self, seconds: float) -> float: ...
    @overload
    def cap(self, seconds: float | None) -> float | None: ...
    def cap(self, seconds: float | None) -> float | None:
        """The smaller of `seconds` and the time left, None meaning no limit on either side."""
        remaining = self.remaining()
        if seconds is None or remaining is None:
            return remaining if seconds is None else seconds
        return min(seconds, remaining)
