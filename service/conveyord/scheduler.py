"""The scheduler: what the API asks of the server's task machinery, in one place.

It admits new tasks (within the queue's limit) and stores them, cancels tasks, and
removes the ended ones once their retention is over. Running them is dispatch's
(dispatch.py: leases within the concurrency limits, timeouts, cancel, expiry) and the
local worker's (worker/local.py: the handlers); the store is the only authority on a task,
and every change goes through it and out on its change feed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from conveyord import lifecycle
from conveyord.dispatch import RECORDING_TIME, Dispatcher, Limits
from conveyord.errors import ConveyorError
from conveyord.errors import ShuttingDown as ShuttingDown  # re-exported: it was defined here
from conveyord.handlers import HandlerRegistry
from conveyord.lifecycle import RetryPolicy, TypeRetry
from conveyord.lifecycle import TaskAlreadyEnded as TaskAlreadyEnded  # re-exported
from conveyord.limits import INPUT_LIMITS
from conveyord.model import Task, TaskFilter, TaskInput, TaskStatus
from conveyord.store.base import StoreFailed, TaskStore
from conveyord.tenants import Tenants
from conveyord.worker.local import LocalWorker, shared_holder

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The limits and timings of the scheduler; `conveyord --help` documents each."""

    concurrency: int = 8  # attempts the handlers in this server run at once
    max_running: int | None = None  # attempts running at once on all workers (None: no cap)
    type_concurrency: Mapping[str, int] = dataclasses.field(default_factory=dict)
    max_queued: int = 100_000
    default_timeout: float = 300.0
    cancel_grace: float = 10.0
    aging_per_minute: float = 1.0
    retry_initial: float = 1.0
    retry_multiplier: float = 2.0
    retry_max: float = 300.0
    retention: float = 24 * 3600.0
    sweep_interval: float = 60.0
    sweep_batch: int = 500
    worker_types: frozenset[str] = frozenset()  # run by workers elsewhere: see --task-type
    max_interruptions: int = 3
    # On a store shared with other servers: how long a lease of the local worker lasts
    # unless renewed (it renews every third of it), so that a server that dies leaves its
    # attempts to be retried this soon.
    local_lease: float = 15.0
    # Retry defaults by task type: the attempts of a task whose request does not say, and
    # the backoff of its retries (see --type-retry).
    type_retry: Mapping[str, TypeRetry] = dataclasses.field(default_factory=dict)

    @property
    def retry_policy(self) -> RetryPolicy:
        policy = RetryPolicy(
            self.retry_initial, self.retry_multiplier, self.retry_max, self.max_interruptions
        )
        return policy.with_types(self.type_retry)

    @property
    def default_attempts(self) -> Mapping[str, int]:
        """The attempts of a task whose request leaves them unset, by task type (1 for a
        type not named)."""
        return {task_type: retry.max_attempts for task_type, retry in self.type_retry.items()}

    def retry_delay(self, failed_attempt: int) -> float:
        """Seconds before the attempt after `failed_attempt` (1 s, 2 s, 4 s ... by default)."""
        return self.retry_policy.delay(failed_attempt)


class QueueFull(ConveyorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUEUE_FULL"

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(
            f"the queue has no room for {count} more tasks (it holds at most {limit}); "
            "try again later"
        )
        self.limit = limit

    def details(self) -> list[Message]:
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))
        return [*super().details(), retry]


class Scheduler:
    """Admits, cancels and retires tasks; runs them through dispatch and the local worker.
    Use as an async context manager, or `start` and `shutdown`."""

    def __init__(
        self,
        store: TaskStore,
        registry: HandlerRegistry,
        config: SchedulerConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        tenants: Tenants | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.config = config or SchedulerConfig()
        self.clock = clock
        self.tenants = tenants or Tenants()
        limits = Limits(
            self.config.max_running or sys.maxsize,
            self.config.type_concurrency,
            self.config.cancel_grace,
        )
        self.dispatcher = Dispatcher(store, limits, self.config.retry_policy, clock)
        self.worker = LocalWorker(registry, self.dispatcher, self.config.concurrency)
        if store.shared:  # its leases are its own, and run out unless renewed
            self.worker.holder = shared_holder()
            self.worker.lease_seconds = self.config.local_lease
        # What Create accepts: the local handlers' types, those declared in the
        # configuration, and those that remote workers declared when they connected.
        self.task_types = frozenset(registry.task_types) | self.config.worker_types
        self.default_attempts = self.config.default_attempts  # by task type, for Create
        self._accepting = False
        self._refusal: Exception | None = None  # why new tasks are refused, if not a shutdown
        self._sweeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown(grace=0)

    async def start(self) -> None:
        """Settle what the last run left, then take work."""
        self._accepting = True
        self.task_types |= await self.store.declared_task_types()
        await self.dispatcher.start([self.worker])
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="conveyor-sweeper")

    async def shutdown(self, grace: float) -> None:
        """Take no more work; running handlers are told to stop at once and get `grace`
        seconds, and the attempts they give up go back to the queue without using an
        attempt (see lifecycle.finish). Safe to call twice; queued tasks stay CREATED."""
        if not self._accepting and self._sweeper is None:
            return
        self._accepting = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        log.info("shutting down: %d running, %d queued", self.running, self.queued)
        # With a failed store no end can be recorded: waiting for them would be in vain.
        await self.dispatcher.shutdown(grace, record=not isinstance(self._refusal, StoreFailed))
        await self.worker.close()

    async def declare_types(self, task_types: frozenset[str]) -> None:
        """Task types that a worker runs: Create accepts them from now on, and after a
        restart (the store remembers them)."""
        if not task_types <= self.task_types:
            await self.store.declare_task_types(task_types)
            self.task_types = self.task_types | task_types

    @property
    def queued(self) -> int:
        """Tasks waiting to run, including retries waiting for their time."""
        return self.store.queued

    @property
    def running(self) -> int:
        return self.dispatcher.running

    def refuse(self, reason: Exception) -> None:
        """Take no new tasks from now on, answering `reason` (the store failed: nothing more
        can be acknowledged); the server's shutdown follows."""
        self._refusal = reason
        self._accepting = False

    def _admit(self, tasks: Sequence[Task]) -> None:
        """Raise unless the queue, and each tenant's, has room for `tasks` (the store asks
        before storing, with the new tasks only: a replayed request_id costs nothing)."""
        if not self._accepting:
            raise self._refusal or ShuttingDown()
        if self.queued + len(tasks) > self.config.max_queued:
            raise QueueFull(len(tasks), self.config.max_queued)
        # One tenant, but for schedules' runs.
        for tenant, count in collections.Counter(task.tenant for task in tasks).items():
            self.tenants.check_queue(tenant, count, self.store.queued_of(tenant))

    async def create(self, tasks: Sequence[Task], charge: bool = True) -> list[tuple[Task, bool]]:
        """Store new tasks, all or none, for dispatch to run; each comes back with False if
        its request_id was known already (it is then the task first created with it). The
        new ones count against their tenant's rate if `charge` (not a schedule's runs): the
        store charges those it stores, last (a refused call costs nothing), and a shared
        store charges every server's in one bucket."""
        if not self._accepting:
            raise self._refusal or ShuttingDown()
        rates = self.tenants if charge else None
        return await self.store.create(tasks, admit=self._admit, rates=rates)

    async def cancel(self, task_id: str, reason: str) -> Task:
        """Cancel a task: at once if queued; if running, its holder is told (by dispatch,
        which follows the store) and the attempt ends CANCELLED."""
        now, reason = self.clock(), reason or "cancelled by request"
        return await self.store.update(task_id, lambda task: lifecycle.cancel(task, reason, now))

    async def pause(self, task_id: str, reason: str) -> tuple[Task, bool]:
        """Pause a task: a queued one at once, a running one at its handler's next pause
        point (dispatch tells the holder); the task, and whether it is PAUSED or will be
        (false: its handler cannot park)."""
        now, reason = self.clock(), reason or "paused by request"
        task = await self.store.update(task_id, lambda task: lifecycle.pause(task, reason, now))
        return task, task.status is TaskStatus.PAUSED or task.pause_requested_at is not None

    async def resume(self, task_id: str) -> Task:
        """Queue a PAUSED task again where it stood, or let a parked attempt run on."""
        now, margin = self.clock(), self.config.cancel_grace + RECORDING_TIME
        return await self.store.update(task_id, lambda task: lifecycle.resume(task, now, margin))

    async def send_input(self, task_id: str, sent: TaskInput) -> tuple[Task, int]:
        """Keep an input with a task (dispatch gives it to a running attempt's holder); the
        task, and the input's place among its inputs (the first one's, for a repeated
        request id)."""

        def deliver(task: Task) -> Task | None:
            return lifecycle.deliver_input(task, sent, INPUT_LIMITS, sent.received_at)

        task = await self.store.update(task_id, deliver)
        if sent.request_id:
            for number, kept in enumerate(task.inputs, 1):
                if kept.request_id == sent.request_id:
                    return task, number
        return task, len(task.inputs)

    async def cancel_matching(self, task_filter: TaskFilter, reason: str, dry_run: bool) -> int:
        """Cancel every unfinished task that matches, each as `cancel` would (one that ended
        meanwhile is left alone); how many were cancelled, or with `dry_run`, would be."""
        if dry_run:
            return await self.store.count(task_filter)
        now, reason = self.clock(), reason or "cancelled by request"

        def cancel(task: Task) -> Task | None:
            return None if task.terminal else lifecycle.cancel(task, reason, now)

        return len(await self.store.update_where(task_filter, cancel))

    # -- retention ---------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("removing expired tasks failed; trying again later")

    async def sweep(self) -> int:
        """Remove terminal tasks older than the retention period, in small batches."""
        cutoff = self.clock() - self.config.retention
        total = 0
        while removed := await self.store.remove_finished(cutoff, self.config.sweep_batch):
            total += removed
            await asyncio.sleep(0)  # let requests in between batches
        if total:
            log.info("removed %d tasks past their retention period", total)
        return total
