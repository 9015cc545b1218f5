"""When dispatch acts: the one timer for everything in the store that falls due (a waiting
task that becomes runnable, a lease that runs out, a start deadline that passes), and the
loop that claims tasks for free slots; and how a lease ends without its holder.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from conveyord import lifecycle
from conveyord.lifecycle import RetryPolicy
from conveyord.model import LEASED, ErrorCode, Task, TaskError, TaskFilter
from conveyord.store.base import StoreFailed, TaskStore

log = logging.getLogger(__name__)


class Timekeeper:
    """One timer for the store's next wake-up: a waiting task that becomes runnable (then
    `due` is called, to claim it) or a lease that runs out (its attempt is ended: its holder
    is gone, and the task is retried per the policy)."""

    def __init__(
        self,
        store: TaskStore,
        policy: RetryPolicy,
        clock: Callable[[], float],
        due: Callable[[], None],
    ) -> None:
        self.store, self.policy, self.clock, self.due = store, policy, clock, due
        self._timer: asyncio.TimerHandle | None = None
        self._at: float | None = None
        self._active = False
        self._background: set[asyncio.Task[None]] = set()  # reaping, and forced ends

    def start(self) -> None:
        """Ring at the store's next wake-up, and follow hints of later ones from now on."""
        self._active = True
        self._set(self.store.next_wakeup())

    def stop(self) -> None:
        self._active = False
        self._set(None)

    def hint(self, when: float) -> None:
        """Something in the store falls due at `when` (a waiting task, a lease): ring by then.
        Cheap when the timer already rings sooner, which is the common case."""
        if self._active and (self._at is None or when < self._at):
            self._set(when)

    def _set(self, when: float | None) -> None:
        if when == self._at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._at = when
        if when is not None:
            delay = max(0.0, when - self.clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._woken)

    def rearm(self) -> None:
        """Set the timer afresh from the store's next wake-up (the clock jumped)."""
        if self._active:
            self._set(None)
            self._set(self.store.next_wakeup())

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` on its own, keeping it referenced until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _woken(self) -> None:
        self._timer, self._at = None, None
        self.in_background(self._reap())
        self.due()

    async def _reap(self) -> None:
        """End the attempts whose lease ran out (their holder is gone), and fail the tasks
        not started by their start deadline or not given input by their input deadline."""
        now = self.clock()
        try:
            for task in await self.store.expired_leases(now):
                await self.store.update(task.task_id, self._expiry(task.lease_id))
            for task in await self.store.overdue(now):
                await self.store.update(task.task_id, lambda t: lifecycle.overdue(t, now))
        except StoreFailed:
            return
        if self._active:
            self._set(self.store.next_wakeup())

    def _expiry(self, lease_id: str) -> Callable[[Task], Task | None]:
        """The end of an attempt under `lease_id` whose lease ran out, retried per policy."""
        now, policy = self.clock(), self.policy

        def expire(task: Task) -> Task | None:
            if task.lease_id != lease_id:
                return None  # ended or renewed meanwhile
            error = TaskError(
                ErrorCode.LEASE_EXPIRED,
                f"the lease of attempt {task.attempt} ran out: its holder {task.lease_holder} "
                "is gone",
            )
            delay = policy.delay(task.attempt, task.task_type)
            return lifecycle.expire(task, error, policy, now, delay)

        return expire


async def settle_leases_of(store: TaskStore, holder: str, policy: RetryPolicy, now: float) -> None:
    """Recovery: a lease of `holder` (this server's own worker) that outlived the server.
    It died while the attempt ran, which counts as a failed attempt, retried at once while
    attempts remain; another holder's lease is left to run out on its own."""

    def expire(task: Task) -> Task | None:
        if task.lease_holder not in (holder, ""):
            return None
        error = TaskError(
            ErrorCode.INTERRUPTED, f"the server stopped while attempt {task.attempt} ran"
        )
        return lifecycle.expire(task, error, policy, now, delay=0.0)

    running = TaskFilter(statuses=LEASED)
    settled = await store.update_where(running, expire)
    if settled:
        log.info("%d tasks were running when the server stopped: settled", len(settled))


def holder_lost(
    lease_id: str, error: TaskError, policy: RetryPolicy, now: float
) -> Callable[[Task], Task | None]:
    """The end of an attempt whose holder is gone and did not come back (a remote worker):
    a failed attempt, retried at once while attempts remain; nothing if it ended meanwhile."""

    def lost(task: Task) -> Task | None:
        if task.lease_id != lease_id:
            return None
        return lifecycle.expire(task, error, policy, now, delay=0.0)

    return lost


class ClaimLoop:
    """When to claim: many asks make one claim, and one claim runs at a time, in the
    loop's own task or (right after an attempt ended) in the task of its holder."""

    def __init__(self, claim_round: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._round = claim_round
        self._wanted = asyncio.Event()  # set: claim for free slots
        self._lock = asyncio.Lock()  # one claim at a time
        self._task: asyncio.Task[None] | None = None
        self.running = False

    @property
    def asked(self) -> bool:
        return self._wanted.is_set()

    def ask(self) -> None:
        self._wanted.set()

    def start(self) -> None:
        self.running = True
        self._task = asyncio.create_task(self._forever(), name="conveyor-dispatch")

    def stop(self) -> None:
        self.running = False
        self._wanted.set()  # the loop sees it is over

    async def _forever(self) -> None:
        """Claim for free slots whenever asked, one claim at a time."""
        while self.running:
            await self._wanted.wait()
            if not self._wanted.is_set():
                continue  # a holder claimed meanwhile (soon)
            self._wanted.clear()
            async with self._lock:
                await self._round()

    async def soon(self) -> None:
        """Claim at once, in the caller's task, if a claim is wanted and none is under way:
        a holder that just ended an attempt takes the next one for the slot it freed,
        without waking the claim loop (one turn of the event loop fewer per task)."""
        if self._wanted.is_set() and self.running and not self._lock.locked():
            self._wanted.clear()
            async with self._lock:
                await self._round()
