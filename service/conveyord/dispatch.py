"""Dispatch: grants leases on runnable tasks to workers, within the limits, and keeps them honest.

It follows the store's change feed. A task that becomes runnable wakes it, and it claims
tasks from the store for the workers that have free slots, within the concurrency limits
(in all, and per task type), each under a lease. It enforces each attempt's timeout (the
holder is told to stop, and after the grace the attempt ends regardless; a parked attempt's
timeout waits), passes a Cancel, a Pause, a Resume and each input on to the holder, and
reaps leases that ran out, so that a holder that died never leaves a task RUNNING. Holders
speak to it with the lease id: report, park, finish; a holder whose lease is gone is
refused (lifecycle.StaleLease) and changes nothing.

One timer serves every waiting task, every lease and every start deadline (the store's next
wake-up: timing.Timekeeper); a timer per held attempt serves its timeout and its grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from conveyord import lifecycle
from conveyord.lifecycle import Outcome, RetryPolicy, StaleLease
from conveyord.model import LEASED, Change, ErrorCode, Task, TaskError, TaskStatus
from conveyord.store.base import Claim, StoreFailed, TaskStore
from conveyord.timing import ClaimLoop, Timekeeper, settle_leases_of

log = logging.getLogger(__name__)

# Seconds a lease outlives its attempt's timeout and grace: room to record how it ended.
RECORDING_TIME = 5.0


class Worker(Protocol):
    """What dispatch hands attempts to and signals: the local worker (worker/local.py),
    and remote workers through their connection."""

    holder: str  # who holds its leases; stable across restarts of the same worker
    tenant: str | None  # the tenant whose tasks it runs (None: any tenant's, in turns)
    types: frozenset[str] | None  # the task types it runs (None: any)
    pausable: frozenset[str]  # the task types whose handlers can park at a pause point
    # How long a lease lasts unless renewed; None: the attempt's timeout and grace, with
    # room to record the end (a holder in this process, which never needs to renew).
    lease_seconds: float | None

    @property
    def free_slots(self) -> int: ...

    def start(self, task: Task) -> None:
        """Run an attempt of `task`, under `task.lease_id`."""

    def stop(self, task: Task, why: TaskError, grace: float) -> None:
        """Tell the attempt's handler to stop within `grace` (cancelled, timed out, or
        shutting down, as `why.code` says)."""

    def abandon(self, task_id: str, lease_id: str) -> None:
        """The attempt is over without its holder: drop it, and whatever it returns."""

    def pause(self, task: Task) -> None:
        """Ask the attempt's handler to park at its next pause point."""

    def resume(self, task: Task) -> None:
        """Let the parked attempt run on (or withdraw a pause it has not reached)."""

    def give_inputs(self, task: Task, first: int) -> None:
        """Give the attempt's handler the task's inputs from index `first` on."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """How many attempts run at once, in all and per task type; how long a stop may take."""

    concurrency: int
    type_concurrency: Mapping[str, int]
    cancel_grace: float


class _Held:
    """An attempt this dispatcher granted: its lease, its timer, and how it was stopped."""

    def __init__(self, task: Task, worker: Worker) -> None:
        self.task = task
        self.worker = worker
        self.lease_id = task.lease_id
        self.stopped: Outcome | None = None  # the outcome a stop imposes, once asked
        self.timer: asyncio.TimerHandle | None = None
        self.pausing = False  # the holder was asked to park it
        self.parked = False  # it is parked: its timeout waits
        self.inputs = len(task.inputs)  # how many of the task's inputs the holder was given

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def stop(self, outcome: Outcome, grace: float, force: Callable[[_Held], None]) -> None:
        """Tell the holder to stop within `grace`, then `force` the end (sooner stays)."""
        if self.stopped is None:
            self.stopped = outcome
            self.worker.stop(self.task, outcome.error or TaskError(ErrorCode.CANCELLED, ""), grace)
        elif (
            self.timer is not None
            and self.timer.when() <= asyncio.get_running_loop().time() + grace
        ):
            return  # already stopping, and sooner
        self.cancel_timer()
        self.timer = asyncio.get_running_loop().call_later(grace, force, self)


def _lease_until(worker: Worker, now: float, extra: float) -> Callable[[Task], float]:
    """When a lease granted to `worker` now runs out: after the attempt's timeout and
    `extra` for a holder that never renews, else after the worker's lease time."""
    lease_seconds = worker.lease_seconds
    if lease_seconds is None:
        return lambda task: now + task.timeout_seconds + extra
    return lambda task: now + lease_seconds


class Dispatcher:
    """Grants, watches and ends the attempts of one server's workers."""

    def __init__(
        self,
        store: TaskStore,
        limits: Limits,
        policy: RetryPolicy,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.limits = limits
        self.policy = policy
        self.clock = clock
        self._workers: list[Worker] = []
        self._held: dict[str, _Held] = {}
        self._by_type: dict[str, int] = {}
        self._claims = ClaimLoop(self._claim_round)
        self._turn = 0  # the worker a claim round starts with
        self._timer = Timekeeper(store, policy, clock, due=self._pump)
        self._unfollow: Callable[[], None] | None = None
        self._drained = asyncio.Event()

    @property
    def running(self) -> int:
        return len(self._held)

    def occupancy(self) -> dict[str, tuple[int, int]]:
        """Each worker's attempts held and free slots, by holder (for metrics)."""
        held: dict[str, int] = {}
        for attempt in self._held.values():
            held[attempt.worker.holder] = held.get(attempt.worker.holder, 0) + 1
        return {w.holder: (held.get(w.holder, 0), w.free_slots) for w in self._workers}

    # -- life --------------------------------------------------------------------

    async def start(self, workers: list[Worker]) -> None:
        """Settle the attempts this server's workers held when it stopped, then grant."""
        self._workers = workers
        self._unfollow = self.store.feed.follow(self._on_change)
        for worker in workers:
            await settle_leases_of(self.store, worker.holder, self.policy, self.clock())
        self._claims.start()
        self._timer.start()
        self._pump()

    async def shutdown(self, grace: float, *, record: bool = True) -> None:
        """Grant no more; tell every held attempt to stop, as an interruption that uses no
        attempt; wait up to `grace` for their holders, then end them regardless (unless
        not `record`: the store failed, and their leases end with the server)."""
        self._claims.stop()
        self._timer.stop()
        for held in list(self._held.values()):
            self._stop(held, _INTERRUPTED, grace)
        if self._held and record:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), grace + RECORDING_TIME)
            except TimeoutError:
                log.warning("the end of %d attempts could not be recorded", len(self._held))
        if self._unfollow is not None:
            self._unfollow()

    def clock_moved(self) -> None:
        """The clock jumped (a test's clock): what fell due by the new time is done now."""
        self._timer.rearm()
        self._pump()

    # -- workers that come and go ---------------------------------------------------

    def join(self, worker: Worker) -> None:
        """A worker connected: it is granted attempts from now on."""
        if worker not in self._workers:
            self._workers.append(worker)
        self._pump()

    def leave(self, worker: Worker) -> None:
        """A worker is gone for good: it is granted nothing more (end what it held first)."""
        if worker in self._workers:
            self._workers.remove(worker)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` on its own (kept referenced until it ends)."""
        self._timer.in_background(work)

    def adopt(self, task: Task, worker: Worker) -> None:
        """Hold an attempt that `worker` runs under a lease granted before this server
        started (it reconnected with it): its timeout and signals are this server's again."""
        if task.task_id not in self._held:
            held = self._hold(task, worker, self._time_left(task))
            held.pausing = task.pause_requested_at is not None or task.status is TaskStatus.PAUSED
            held.parked = task.status is TaskStatus.PAUSED
            if held.parked:
                held.cancel_timer()
        self.replay_signals(task.task_id)

    def replay_signals(self, task_id: str) -> None:
        """Tell a holder again where its attempt stands (paused or not, and every input): it
        reconnected, and what was sent meanwhile may be lost. Each is harmless twice."""
        held = self._held.get(task_id)
        if held is None:
            return
        task = held.task
        if held.pausing:
            held.worker.pause(task)
        elif task.pausable:
            held.worker.resume(task)
        if task.inputs:
            held.worker.give_inputs(task, 0)

    def stopping(self, task_id: str, lease_id: str) -> bool:
        """Whether the attempt under `lease_id` was asked to stop."""
        held = self._held.get(task_id)
        return held is not None and held.lease_id == lease_id and held.stopped is not None

    # -- granting ----------------------------------------------------------------

    def _pump(self, task_type: str | None = None) -> None:
        """Ask for a claim for the free slots (cheap: many asks make one claim); not while
        every slot is taken, or, for a task of `task_type`, while its type is at its limit."""
        if self._claims.asked or not self._claims.running:
            return  # asked already, or over
        if len(self._held) >= self.limits.concurrency:
            return
        if task_type is not None:
            limit = self.limits.type_concurrency.get(task_type)
            if limit is not None and self._by_type.get(task_type, 0) >= limit:
                return
        if any(worker.free_slots > 0 for worker in self._workers):
            self._claims.ask()

    async def _claim_round(self) -> None:
        """Claim for each worker with free slots, starting one further on each round, so
        that the workers take turns at the best tasks."""
        workers = self._workers
        if len(workers) > 1:
            self._turn = (self._turn + 1) % len(workers)
            workers = workers[self._turn :] + workers[: self._turn]
        try:
            for worker in workers:
                await self._claim_for(worker)
        except StoreFailed:
            return  # the server stops, and says why
        except Exception:
            log.exception("claiming tasks failed")

    async def _claim_for(self, worker: Worker) -> None:
        count = min(worker.free_slots, self.limits.concurrency - len(self._held))
        if count <= 0:
            return
        limits = {
            task_type: limit - self._by_type.get(task_type, 0)
            for task_type, limit in self.limits.type_concurrency.items()
        }
        now = self.clock()
        lease_until = _lease_until(worker, now, self.limits.cancel_grace + RECORDING_TIME)
        claim = Claim(
            worker.holder, count, worker.types, limits, lease_until, now, worker.pausable,
            worker.tenant, self.limits.type_concurrency,
        )  # fmt: skip
        for task in await self.store.claim(claim):
            self._grant(task, worker)

    def _grant(self, task: Task, worker: Worker) -> None:
        held = self._hold(task, worker, task.timeout_seconds)
        worker.start(task)
        if task.cancel_requested_at is not None:  # cancelled as it was claimed
            self._cancel_requested(held)

    def _hold(self, task: Task, worker: Worker, timeout: float) -> _Held:
        """Count an attempt against the limits, and time it out after `timeout` seconds."""
        held = _Held(task, worker)
        self._held[task.task_id] = held
        self._by_type[task.task_type] = self._by_type.get(task.task_type, 0) + 1
        held.timer = asyncio.get_running_loop().call_later(timeout, self._timed_out, held)
        return held

    # -- following the store -------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        task = change.task
        held = self._held.get(task.task_id)
        if held is not None:
            if task.lease_id != held.lease_id or task.status not in LEASED:
                self._release(held)
            else:
                held.task = task  # the attempt as it stands (a Cancel's reason, say)
                if task.cancel_requested_at is not None and held.stopped is None:
                    self._cancel_requested(held)
                # (Rare: most attempts are never paused, nor sent input.)
                if held.pausing or task.pause_requested_at is not None or task.inputs:
                    self._signal(held, task)
        if task.status is TaskStatus.CREATED:
            if task.next_attempt_at is None or task.next_attempt_at <= self.clock():
                self._pump(task.task_type)
            else:
                self._timer.hint(task.next_attempt_at)
            if task.start_deadline is not None:
                self._timer.hint(task.start_deadline)  # failed if not started by then
        elif task.status is TaskStatus.RUNNING and task.lease_expires_at is not None:
            self._timer.hint(task.lease_expires_at)  # reaped if it runs out

    def _signal(self, held: _Held, task: Task) -> None:
        """Pass on to the holder what changed of its attempt: a Pause asked or withdrawn,
        a Resume, new inputs; and stop or restart its timeout as it parks or runs on."""
        pausing = task.pause_requested_at is not None or task.status is TaskStatus.PAUSED
        if pausing != held.pausing:
            held.pausing = pausing
            (held.worker.pause if pausing else held.worker.resume)(task)
        parked = task.status is TaskStatus.PAUSED
        if parked != held.parked:
            held.parked = parked
            if held.stopped is None:  # a stop's grace runs on, parked or not
                held.cancel_timer()
                if not parked:
                    loop = asyncio.get_running_loop()
                    held.timer = loop.call_later(self._time_left(task), self._timed_out, held)
        if len(task.inputs) > held.inputs:
            held.worker.give_inputs(task, held.inputs)
            held.inputs = len(task.inputs)

    def _time_left(self, task: Task) -> float:
        """Seconds until the attempt's timeout runs out (its time parked not counted)."""
        started = task.started_at if task.started_at is not None else self.clock()
        return max(0.0, started + task.timeout_seconds + task.paused_seconds - self.clock())

    async def park(self, task_id: str, lease_id: str) -> Task:
        """A holder's handler parked at a pause point; StaleLease if the attempt is no
        longer its. Its lease is kept: renewed by a holder that renews, else without end
        while parked (this server settles its own leases at a restart)."""
        now = self.clock()
        held = self._held.get(task_id)
        renews = held is None or held.worker.lease_seconds is not None

        def park(task: Task) -> Task | None:
            until = task.lease_expires_at if renews else None
            return lifecycle.park(task, lease_id, now, until)

        return await self.store.update(task_id, park)

    def _release(self, held: _Held) -> None:
        """The attempt is over in the store: free its slot, and drop it if still running."""
        del self._held[held.task.task_id]
        self._by_type[held.task.task_type] -= 1
        held.cancel_timer()
        held.worker.abandon(held.task.task_id, held.lease_id)
        if not self._held:
            self._drained.set()
        self._pump()

    # -- stopping attempts -----------------------------------------------------------

    def _cancel_requested(self, held: _Held) -> None:
        reason = held.task.cancel_reason or "cancelled"
        self._stop(held, Outcome(error=TaskError(ErrorCode.CANCELLED, reason)), None)

    def _timed_out(self, held: _Held) -> None:
        task = held.task
        message = (
            f"attempt {task.attempt} ran longer than its timeout of {task.timeout_seconds:g} s"
        )
        self._stop(held, Outcome(error=TaskError(ErrorCode.DEADLINE_EXCEEDED, message)), None)

    def _stop(self, held: _Held, outcome: Outcome, grace: float | None) -> None:
        """Tell the holder to stop; after the grace, end the attempt with `outcome`."""
        held.stop(outcome, self.limits.cancel_grace if grace is None else grace, self._force)

    def _force(self, held: _Held) -> None:
        """The holder did not end the attempt within the grace: end it without it."""
        held.timer = None
        self._timer.in_background(self._end_without_holder(held))

    async def _end_without_holder(self, held: _Held) -> None:
        with contextlib.suppress(StaleLease, StoreFailed):  # ended meanwhile, or stopping
            await self._end(held.task.task_id, held.lease_id, held.stopped or Outcome())

    # -- what holders say ----------------------------------------------------------

    async def renew(self, task_id: str, lease_id: str, seconds: float) -> Task:
        """Extend a holder's lease by `seconds` from now; StaleLease if it is not its."""
        expires_at = self.clock() + seconds
        return await self.store.update(
            task_id, lambda task: lifecycle.renew(task, lease_id, expires_at), quiet=True
        )

    async def report(self, task_id: str, lease_id: str, changes: Mapping[str, Any]) -> None:
        """A holder's progress report; StaleLease if the attempt is no longer its."""
        now = self.clock()
        await self.store.update(
            task_id, lambda task: lifecycle.report(task, lease_id, changes, now)
        )

    async def finish(self, task_id: str, lease_id: str, outcome: Outcome) -> Task:
        """A holder's end of an attempt; StaleLease if it is no longer its."""
        ended = await self._end(task_id, lease_id, self._standing(task_id, lease_id, outcome))
        await self._claims.soon()
        return ended

    async def finish_many(
        self, ends: Sequence[tuple[str, str, Outcome]]
    ) -> list[Task | BaseException]:
        """A holder's ends of several attempts, written together (one transaction of a
        durable store), then one claim for the slots they freed: each end's task, or why it
        was refused (StaleLease, TaskNotFound)."""
        ended = await asyncio.gather(
            *(
                self._end(task, lease, self._standing(task, lease, outcome))
                for task, lease, outcome in ends
            ),
            return_exceptions=True,
        )
        await self._claims.soon()
        return ended

    def _standing(self, task_id: str, lease_id: str, outcome: Outcome) -> Outcome:
        """Once an attempt was asked to stop, the stop's outcome stands, whatever the
        holder returned."""
        held = self._held.get(task_id)
        if held is not None and held.lease_id == lease_id and held.stopped is not None:
            return held.stopped
        return outcome

    async def _end(self, task_id: str, lease_id: str, outcome: Outcome) -> Task:
        now, policy = self.clock(), self.policy
        return await self.store.update(
            task_id, lambda task: lifecycle.finish(task, lease_id, outcome, policy, now)
        )


_INTERRUPTED = Outcome(
    error=TaskError(ErrorCode.INTERRUPTED, "the server stopped while the attempt ran"),
    interrupted=True,
)
