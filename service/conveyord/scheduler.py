"""The scheduler: runs queued tasks by priority within the concurrency limits, and ends them.

It owns the life of every task after Create: it queues it, starts an attempt when a
slot is free, stops an attempt that runs past its timeout or is cancelled (told first,
then, after a grace period, cancelled if async or abandoned if blocking), retries a
failed attempt with exponential backoff, and removes terminal tasks once their
retention period is over. Every change goes through the store, which tells the event hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from conveyor.protojson import to_value
from conveyord import lifecycle
from conveyord.errors import ConveyorError
from conveyord.errors import ShuttingDown as ShuttingDown  # re-exported: it was defined here
from conveyord.handlers import HandlerRegistry, TaskContext, is_async
from conveyord.lifecycle import Lease, Outcome, RetryPolicy, StaleLease
from conveyord.lifecycle import TaskAlreadyEnded as TaskAlreadyEnded  # re-exported
from conveyord.limits import MAX_MESSAGE, MAX_RESULT_BYTES
from conveyord.model import ErrorCode, Task, TaskError, TaskStatus, json_problem
from conveyord.queue import ReadyQueue
from conveyord.store.base import StoreFailed, TaskStore
from conveyord.watchdog import track

log = logging.getLogger(__name__)


# Seconds a shutdown waits for the attempts it stopped to be written to the store.
_RECORDING_TIME = 5.0


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The limits and timings of the scheduler; `conveyord --help` documents each."""

    concurrency: int = 8
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
    max_interruptions: int = 3

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            self.retry_initial, self.retry_multiplier, self.retry_max, self.max_interruptions
        )

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


class _Attempt:
    """One run of one task: the handler's future, its context, and the request to stop it."""

    def __init__(
        self, task_id: str, task_type: str, loop: asyncio.AbstractEventLoop, grace: float
    ) -> None:
        self.task_id = task_id
        self.task_type = task_type
        self.lease_id = new_lease_id()
        self.grace = grace  # seconds the handler has to stop once told to
        self.stop: asyncio.Future[Outcome] = loop.create_future()
        self.hurry: asyncio.Future[None] = loop.create_future()  # set: stop waiting for it
        self.context: TaskContext | None = None
        self.runner: asyncio.Task[None] | None = None
        self.progress: dict[str, Any] = {}  # reported by the handler, not yet written
        self.flusher: asyncio.Task[None] | None = None  # writes `progress`, one write at a time

    def request_stop(self, outcome: Outcome, grace: float | None = None) -> None:
        if not self.stop.done():
            if grace is not None:
                self.grace = grace
            self.stop.set_result(outcome)

    def give_up(self) -> None:
        """Stop waiting for a handler that was told to stop: end the attempt now."""
        if not self.hurry.done():
            self.hurry.set_result(None)


class Scheduler:
    """Queues, runs, retries and retires tasks; use as an async context manager."""

    def __init__(
        self,
        store: TaskStore,
        registry: HandlerRegistry,
        config: SchedulerConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.registry = registry
        self.config = config or SchedulerConfig()
        self.clock = clock
        self.holder = f"{socket.gethostname()}:{os.getpid()}/local"  # its leases' holder
        self._queue = ReadyQueue(self.config.aging_per_minute / 60.0)
        self._waiting: dict[str, asyncio.TimerHandle] = {}  # retries waiting for their time
        self._running: dict[str, _Attempt] = {}
        self._running_by_type: dict[str, int] = {}
        self._accepting = False
        self._refusal: Exception | None = None  # why new tasks are refused, if not a shutdown
        self._sweeper: asyncio.Task[None] | None = None

    # -- life --------------------------------------------------------------------

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown(grace=0)

    async def start(self) -> None:
        """Recover what the store holds, then take work."""
        self._accepting = True
        await self._recover()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="conveyor-sweeper")

    async def _recover(self) -> None:
        """Queue the store's CREATED tasks again, and settle the ones that were RUNNING when
        the server stopped: retried if attempts are left, FAILED (INTERRUPTED) otherwise, and
        CANCELLED if a Cancel had been accepted. No task stays RUNNING."""
        unfinished = await self.store.unfinished()
        interrupted = 0
        for task in unfinished:
            if task.status is TaskStatus.RUNNING:
                task = await self.store.update(task.task_id, self._interrupted_mutation())
                interrupted += 1
            if task.status is TaskStatus.CREATED:
                self._enqueue(task, dispatch=False)
        self._dispatch()  # only now, so that the best of them runs first
        if unfinished:
            log.info(
                "recovered %d tasks: %d queued, %d interrupted",
                len(unfinished),
                self.queued,
                interrupted,
            )

    def _interrupted_mutation(self) -> Callable[[Task], Task | None]:
        """A task RUNNING when the server died: its attempt counts, retried at once."""
        now = self.clock()

        def settle(task: Task) -> Task | None:
            message = f"the server stopped while attempt {task.attempt} ran"
            error = TaskError(ErrorCode.INTERRUPTED, message)
            return lifecycle.expire(task, error, self.config.retry_policy, now, delay=0.0)

        return settle

    async def shutdown(self, grace: float) -> None:
        """Stop taking work, tell running handlers to stop at once, give them `grace` seconds,
        then stop them regardless.

        The server's own shutdown is not the task's failure: an attempt it stops goes back to
        the queue without using an attempt (up to `max_interruptions` times per task). Safe to
        call twice. Tasks still queued stay CREATED in the store.
        """
        if not self._accepting and self._sweeper is None:
            return
        self._accepting = False
        for handle in self._waiting.values():
            handle.cancel()
        self._waiting.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        attempts = list(self._running.values())
        log.info("shutting down: %d running, %d queued", len(attempts), len(self._queue))
        for attempt in attempts:
            attempt.request_stop(_interrupted(), grace)
        runners = {a.runner: a for a in attempts if a.runner is not None}
        if not runners:
            return
        _, pending = await asyncio.wait(runners, timeout=grace)
        if pending:
            log.warning("%d handlers outlived the grace period and were stopped", len(pending))
            for runner in pending:
                runners[runner].give_up()  # its attempt ends as it was told to: recorded
            _, pending = await asyncio.wait(pending, timeout=_RECORDING_TIME)
        for runner in pending:
            runner.cancel()
        if pending:
            log.warning("the end of %d attempts could not be recorded", len(pending))
            await asyncio.wait(pending)

    # -- the requests ------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Tasks waiting to run, including retries waiting for their time."""
        return len(self._queue) + len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def refuse(self, reason: Exception) -> None:
        """Take no new tasks from now on, answering `reason` (the store failed: nothing more
        can be acknowledged); the server's shutdown follows."""
        self._refusal = reason
        self._accepting = False

    def _admit(self, count: int) -> None:
        """Raise unless there is room for `count` more tasks (the store asks before storing)."""
        if not self._accepting:
            raise self._refusal or ShuttingDown()
        if self.queued + count > self.config.max_queued:
            raise QueueFull(count, self.config.max_queued)

    async def create(self, tasks: Sequence[Task]) -> list[tuple[Task, bool]]:
        """Store and queue new tasks, all or none; each comes back with False if its
        request_id was known already (it is then the task first created with it)."""
        if not self._accepting:
            raise self._refusal or ShuttingDown()
        results = await self.store.create(tasks, admit=self._admit)
        for task, created in results:
            if created:
                self._enqueue(task, dispatch=False)
        self._dispatch()
        return results

    async def cancel(self, task_id: str, reason: str) -> Task:
        """Cancel a task: at once if queued; by telling, then stopping, its handler if running."""
        now = self.clock()
        reason = reason or "cancelled by request"

        def mutate(task: Task) -> Task | None:
            return lifecycle.cancel(task, reason, now)

        task = await self.store.update(task_id, mutate)
        if task.status is TaskStatus.CANCELLED:
            self._unqueue(task_id)
        elif (attempt := self._running.get(task_id)) is not None:
            attempt.request_stop(Outcome(error=TaskError(ErrorCode.CANCELLED, reason)))
        return task

    # -- queueing and dispatch ---------------------------------------------------

    def _enqueue(self, task: Task, *, dispatch: bool = True) -> None:
        """Queue a CREATED task now, or when its next attempt is due."""
        delay = (task.next_attempt_at or 0.0) - self.clock()
        if delay > 0:
            loop = asyncio.get_running_loop()
            self._waiting[task.task_id] = loop.call_later(delay, self._wake, task)
            return
        self._queue.push(task.task_id, task.task_type, task.priority, self._queued_at(task))
        if dispatch:
            self._dispatch()

    def _queued_at(self, task: Task) -> float:
        """When, on the monotonic clock, the task became runnable: its place in the queue
        and its aging survive a restart."""
        runnable_since = task.next_attempt_at or task.updated_at
        return time.monotonic() - max(0.0, self.clock() - runnable_since)

    def _wake(self, task: Task) -> None:
        self._waiting.pop(task.task_id, None)
        self._queue.push(task.task_id, task.task_type, task.priority, self._queued_at(task))
        self._dispatch()

    def _unqueue(self, task_id: str) -> None:
        self._queue.discard(task_id)
        handle = self._waiting.pop(task_id, None)
        if handle is not None:
            handle.cancel()

    def _has_room(self, task_type: str) -> bool:
        limit = self.config.type_concurrency.get(task_type)
        return limit is None or self._running_by_type.get(task_type, 0) < limit

    def _dispatch(self) -> None:
        """Start attempts while there are free slots and runnable tasks."""
        while self._accepting and len(self._running) < self.config.concurrency:
            picked = self._queue.pop(self._has_room)
            if picked is None:
                return
            task_id, task_type = picked
            attempt = _Attempt(
                task_id, task_type, asyncio.get_running_loop(), self.config.cancel_grace
            )
            self._running[task_id] = attempt
            self._running_by_type[task_type] = self._running_by_type.get(task_type, 0) + 1
            attempt.runner = asyncio.create_task(
                self._run(attempt), name=f"conveyor-task-{task_id}"
            )

    def _release(self, attempt: _Attempt) -> None:
        del self._running[attempt.task_id]
        self._running_by_type[attempt.task_type] -= 1
        self._dispatch()

    # -- one attempt -------------------------------------------------------------

    async def _run(self, attempt: _Attempt) -> None:
        """Start the attempt in the store, run the handler, record how it ended."""
        try:
            task = await self.store.update(attempt.task_id, self._start_mutation(attempt))
            if task.status is not TaskStatus.RUNNING:
                return  # cancelled while it was being picked
            outcome = await self._execute(task, attempt)
            if attempt.context is not None:
                attempt.context._close()
            if attempt.flusher is not None:
                await attempt.flusher  # what was reported lands before the end
            ended = await self.store.update(task.task_id, self._finish_mutation(attempt, outcome))
            if ended.status is TaskStatus.CREATED and self._accepting:
                self._enqueue(ended)
        except asyncio.CancelledError:
            raise
        except StoreFailed:
            pass  # the server stops, and says why; the store's file holds what was answered
        except StaleLease:
            log.debug("the attempt of task %s ended after it lost its lease", attempt.task_id)
        except Exception:
            log.exception(
                "the attempt of task %s broke the scheduler's bookkeeping", attempt.task_id
            )
        finally:
            if attempt.context is not None:
                attempt.context._close()
            self._release(attempt)

    def _start_mutation(self, attempt: _Attempt) -> Callable[[Task], Task | None]:
        now = self.clock()

        def start(task: Task) -> Task | None:
            # Held for the attempt's timeout and the grace to stop it, with room to record it.
            expires = now + task.timeout_seconds + self.config.cancel_grace + _RECORDING_TIME
            return lifecycle.claim(task, Lease(attempt.lease_id, self.holder, expires), now)

        return start

    async def _execute(self, task: Task, attempt: _Attempt) -> Outcome:
        """Run the handler until it returns, its timeout passes, or it is cancelled."""
        if attempt.stop.done():  # stopped while it was being started: nothing to run
            return attempt.stop.result()
        loop = asyncio.get_running_loop()
        function = self.registry.get(task.task_type)
        if function is None:
            message = f"no handler is registered for task type {task.task_type!r}"
            return Outcome(error=TaskError(ErrorCode.HANDLER_ERROR, message), retryable=False)
        context = TaskContext(
            task_id=task.task_id,
            task_type=task.task_type,
            parameters=task.parameters,
            labels=task.labels,
            attempt=task.attempt,
            max_attempts=task.max_attempts,
            loop=loop,
            sink=lambda changes: self._report(attempt, changes),
        )
        attempt.context = context
        work = _start_handler(function, context, loop)
        try:
            done, _ = await asyncio.wait(
                {work, attempt.stop},
                timeout=task.timeout_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:  # the server is stopping and the grace period is over
            context._request_stop("the server is shutting down")
            work.cancel()
            work.add_done_callback(_ignore_outcome)
            raise
        if work in done and not attempt.stop.done():
            return _outcome_of(work, task)
        if attempt.stop.done():
            stopped = attempt.stop.result()
        else:
            message = (
                f"attempt {task.attempt} ran longer than its timeout of {task.timeout_seconds:g} s"
            )
            stopped = Outcome(error=TaskError(ErrorCode.DEADLINE_EXCEEDED, message))
        reason = stopped.error.message if stopped.error else ""
        context._request_stop(reason)
        if not work.done():
            await asyncio.wait(
                {work, attempt.hurry}, timeout=attempt.grace, return_when=asyncio.FIRST_COMPLETED
            )
        if not work.done():
            # An async handler is cancelled; a blocking one cannot be, and is abandoned:
            # whatever it returns later is discarded.
            work.cancel()
        work.add_done_callback(_ignore_outcome)
        return stopped

    def _finish_mutation(self, attempt: _Attempt, outcome: Outcome) -> Callable[[Task], Task]:
        now, policy = self.clock(), self.config.retry_policy
        return lambda task: lifecycle.finish(task, attempt.lease_id, outcome, policy, now)

    # -- progress ----------------------------------------------------------------

    def _report(self, attempt: _Attempt, changes: dict[str, Any] | TaskError) -> None:
        """Merge a handler's report and write it unless a write is already on its way;
        a report over its caps fails the attempt."""
        if isinstance(changes, TaskError):
            attempt.request_stop(Outcome(error=changes, retryable=False))
            return
        attempt.progress.update(changes)
        if attempt.flusher is None or attempt.flusher.done():
            attempt.flusher = asyncio.create_task(self._flush(attempt))

    async def _flush(self, attempt: _Attempt) -> None:
        while attempt.progress and attempt.context is not None:
            changes, attempt.progress = attempt.progress, {}
            try:
                await self.store.update(attempt.task_id, self._report_mutation(attempt, changes))
            except StaleLease:
                return  # the attempt is over: a late report changes nothing

    def _report_mutation(
        self, attempt: _Attempt, changes: dict[str, Any]
    ) -> Callable[[Task], Task]:
        now, lease_id = self.clock(), attempt.lease_id
        return lambda task: lifecycle.report(task, lease_id, changes, now)

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


def _interrupted() -> Outcome:
    """What an attempt that the server's shutdown stopped comes to, whatever it returns."""
    error = TaskError(ErrorCode.INTERRUPTED, "the server stopped while the attempt ran")
    return Outcome(error=error, interrupted=True)


def new_lease_id() -> str:
    """A lease id: 128 random bits, hex."""
    return os.urandom(16).hex()


def _start_handler(
    function: Callable[[TaskContext], Any], context: TaskContext, loop: asyncio.AbstractEventLoop
) -> asyncio.Future[Any]:
    """Start a handler: an async one as a task on the loop, a blocking one on a thread of its own.

    A thread per blocking attempt (rather than a pool) means that an abandoned handler that
    never returns holds only its own thread, never a slot that other tasks need.
    """
    if is_async(function):
        handler = cast(Awaitable[Any], function(context))
        return asyncio.ensure_future(track(handler, context.task_id, context.task_type))
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = function(context), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=f"conveyor-{context.task_id}", daemon=True).start()
    return future


def _outcome_of(work: asyncio.Future[Any], task: Task) -> Outcome:
    """Turn a finished handler into an outcome: its result, or its exception as
    HANDLER_ERROR (its type kept in the message, its traceback logged with the task)."""
    if work.cancelled():
        return Outcome(error=TaskError(ErrorCode.HANDLER_ERROR, "the handler was cancelled"))
    error = work.exception()
    if error is not None:
        log.error(
            "task %s (%s), attempt %d: the handler raised %s",
            task.task_id, task.task_type, task.attempt, type(error).__name__,
            exc_info=error,
        )  # fmt: skip
        name = type(error).__qualname__
        message = f"{name}: {error}" if str(error) else name
        return Outcome(error=TaskError(ErrorCode.HANDLER_ERROR, message[:MAX_MESSAGE]))
    return result_outcome(work.result())


def result_outcome(result: Any) -> Outcome:
    """A handler's result, or the error that refuses it: not JSON, or over the size cap."""
    if (problem := json_problem(result)) is not None:
        return Outcome(error=TaskError(ErrorCode.INVALID_RESULT, problem), retryable=False)
    size = to_value(result).ByteSize()
    if size > MAX_RESULT_BYTES:
        message = f"the result is {size} bytes encoded; at most {MAX_RESULT_BYTES} are kept"
        return Outcome(error=TaskError(ErrorCode.RESULT_TOO_LARGE, message), retryable=False)
    return Outcome(result=result)


def _ignore_outcome(work: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned handler's outcome so that asyncio does not log it as lost."""
    if not work.cancelled():
        work.exception()
