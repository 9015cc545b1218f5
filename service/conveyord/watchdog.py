"""The loop watchdog: notices when something blocks the server's event loop, and says what.

An `async def` handler that blocks (`time.sleep`, a long computation, blocking I/O) stalls
every call of the server while health still says SERVING. `LoopWatchdog` makes that visible:
the loop refreshes a timestamp a few times per threshold, and a daemon thread warns once the
timestamp is older than the threshold, naming the task whose handler is on the loop (`track`
wraps each async handler to record it), then logs how long the whole stall lasted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import types
import weakref
from collections.abc import Awaitable, Generator
from typing import Any, TypeVar

log = logging.getLogger(__name__)

DEFAULT_BLOCKED_LOOP_WARNING = 1.0  # seconds

T = TypeVar("T")


class _Beacon:
    """Which handler is stepping on one loop: written by `track`, read by the watchdogs."""

    __slots__ = ("stepping",)

    def __init__(self) -> None:
        # (task id, task type, when the step began on the monotonic clock), or None.
        self.stepping: tuple[str, str, float] | None = None


# One beacon per loop that has (or had) a watchdog; `track` leaves other loops alone.
_beacons: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Beacon] = (
    weakref.WeakKeyDictionary()
)


def track(awaitable: Awaitable[T], task_id: str, task_type: str) -> Awaitable[T]:
    """Wrap an async handler's awaitable so that a watchdog can tell when it blocks the loop.

    Call on the loop that will run it; with no watchdog on that loop, returns it unchanged.
    """
    beacon = _beacons.get(asyncio.get_running_loop())
    if beacon is None:
        return awaitable
    return _tracked(awaitable, beacon, task_id, task_type)


async def _tracked(awaitable: Awaitable[T], beacon: _Beacon, task_id: str, task_type: str) -> T:
    return await _steps(awaitable.__await__(), beacon, task_id, task_type)


@types.coroutine
def _steps(
    steps: Generator[Any, Any, T], beacon: _Beacon, task_id: str, task_type: str
) -> Generator[Any, Any, T]:
    """Drive a handler as `await` would (send, throw, close), marking each step on the beacon."""
    value: Any = None
    error: BaseException | None = None
    while True:
        beacon.stepping = (task_id, task_type, time.monotonic())
        try:
            yielded = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            beacon.stepping = None
        try:
            value, error = (yield yielded), None
        except GeneratorExit:
            steps.close()
            raise
        except BaseException as thrown:  # cancellation, mostly: the handler decides
            value, error = None, thrown


@dataclasses.dataclass(frozen=True, slots=True)
class _Stall:
    ticked: float  # the loop's last tick before it stalled
    since: float  # when the stall began
    culprit: str


class LoopWatchdog:
    """Warns when the running loop has not run for over `threshold` seconds (0: never).

    The warning names the task whose handler holds the loop (or blames the server's own
    code); once the loop runs again, a second line says how long the whole stall lasted.
    Cheap: the loop runs one timer callback every threshold/4, and a daemon thread wakes as
    often to compare clocks.
    """

    def __init__(self, threshold: float = DEFAULT_BLOCKED_LOOP_WARNING) -> None:
        self.threshold = threshold
        self._interval = threshold / 4
        self._beacon = _Beacon()
        self._ticked = 0.0  # when the loop last ran `_tick`, on the monotonic clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stall: _Stall | None = None

    def start(self) -> None:
        """Start watching the running loop (call on it)."""
        if self.threshold <= 0 or self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._beacon = _beacons.setdefault(self._loop, _Beacon())
        self._tick()
        self._thread = threading.Thread(
            target=self._watch, name="conveyord-loop-watchdog", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        """Stop watching; a stall that has just ended is still reported first."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._ticked = time.monotonic()  # this runs on the loop, so the loop runs
        self._stopping.set()
        await asyncio.to_thread(thread.join)

    def _tick(self) -> None:
        assert self._loop is not None
        self._ticked = time.monotonic()
        self._timer = self._loop.call_later(self._interval, self._tick)

    def _watch(self) -> None:
        while not self._stopping.wait(self._interval):
            self._check(time.monotonic())
        self._check(time.monotonic())

    def _check(self, now: float) -> None:
        """On the watchdog's thread: report a stall once it passes the threshold, and its end."""
        ticked = self._ticked
        stall = self._stall
        if stall is not None:
            if ticked == stall.ticked:
                return  # still stalled, and said so already
            self._stall = None
            log.warning(
                "the event loop ran again after being blocked for %.1f s by %s",
                ticked - stall.since,
                stall.culprit,
            )
        since = ticked + self._interval  # when the loop was due to tick again
        stepping = self._beacon.stepping
        if stepping is not None:
            since = min(since, stepping[2])
        if now - since <= self.threshold:
            return
        if stepping is None:
            culprit, advice = "the server's own code", ""
        else:
            culprit = f"the handler of task {stepping[0]} (type {stepping[1]})"
            advice = (
                "; an async handler must await instead of blocking, "
                "or be a plain def to run on a thread of its own"
            )
        self._stall = _Stall(ticked, since, culprit)
        log.warning(
            "the event loop has been blocked for %.1f s by %s; every call waits%s",
            now - since,
            culprit,
            advice,
        )
