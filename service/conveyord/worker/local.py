"""The local worker: runs attempts with the handlers loaded into this server (`--handlers`).

It takes attempts through the same protocol as a remote worker: dispatch hands it a task
under a lease (`start`), it reports progress and ends the attempt with the lease id
(`Dispatcher.report`, `Dispatcher.finish`), and dispatch tells it to stop a handler (a
Cancel, a timeout, the server's shutdown) or to drop an attempt that ended without it
(`abandon`: an async handler is cancelled, a blocking one is left to finish alone and
whatever it returns is discarded). Timeouts and grace periods are dispatch's, not its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable
from typing import Any, cast

from conveyor._tracing import attempt_span
from conveyor.logs import attempt_scope
from conveyord.dispatch import Dispatcher
from conveyord.handlers import (
    HandlerRegistry,
    Refusal,
    TaskContext,
    WaitForInput,
    failure_of,
    is_async,
    result_problem,
    run_on_thread,
)
from conveyord.lifecycle import InputWait, Outcome, StaleLease, checkpoint_of
from conveyord.model import ErrorCode, Task, TaskError
from conveyord.store.base import StoreFailed
from conveyord.watchdog import track

log = logging.getLogger(__name__)

_CANCELLED = "the handler was cancelled"
_NO_RESULT = Outcome()

# Who holds the local worker's leases: the same across restarts, so that a server that
# starts again on its store knows the attempts it was running when it stopped. (On a store
# that other servers share, each server's local worker is a holder of its own, whose leases
# run out unless renewed: see `shared_holder`.)
LOCAL_HOLDER = "conveyord/local"


def shared_holder() -> str:
    """A local worker's holder name on a shared store: this process's own (host and pid,
    and a random part for a pid used again), so that no other server takes its leases for
    its own, and a server that died leaves leases that simply run out."""
    return f"{LOCAL_HOLDER}/{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class _Attempt:
    """One attempt of one task on this worker: its handler, its context, its reports."""

    def __init__(self, task: Task, context: TaskContext) -> None:
        self.task = task
        self.lease_id = task.lease_id
        self.context = context
        self.runner: asyncio.Task[None] | None = None
        self.finishing = False  # the handler is done: what is left is to record it
        self.abandoned = False  # the attempt ended without it: the runner was cancelled
        self.progress: dict[str, Any] = {}  # reported by the handler, not yet written
        self.flusher: asyncio.Task[None] | None = None  # writes `progress`, one write at a time
        self.failing: asyncio.Future[None] | None = None  # ends it for a report over its caps


class LocalWorker:
    """Runs up to `slots` attempts at once with the registered handlers.

    Its leases last as long as their attempts (it never needs to renew one: it lives in the
    server), unless `lease_seconds` is given: then they run out unless renewed, and it
    renews them every third of that (a server that shares its store with others and dies
    leaves leases that run out soon, for another server to retry the tasks).
    """

    tenant: str | None = None  # the server's own handlers run every tenant's tasks
    tracing = False  # a span for each attempt's run (the server's --tracing)

    def __init__(
        self,
        registry: HandlerRegistry,
        dispatcher: Dispatcher,
        slots: int,
        holder: str = LOCAL_HOLDER,
        lease_seconds: float | None = None,
    ) -> None:
        self.holder = holder
        self.lease_seconds = lease_seconds
        self._renewing: asyncio.Task[None] | None = None
        self.registry = registry
        # It takes only the tasks it has a handler for: the others wait for their workers.
        self.types: frozenset[str] | None = frozenset(registry.task_types)
        self.pausable = frozenset(registry.pausable_types)
        self.dispatcher = dispatcher
        self.slots = slots
        self._attempts: dict[str, _Attempt] = {}
        self._closing = False

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._attempts)

    def start(self, task: Task) -> None:
        loop = asyncio.get_running_loop()
        context = TaskContext(
            task_id=task.task_id,
            task_type=task.task_type,
            parameters=task.parameters,
            labels=task.labels,
            attempt=task.attempt,
            max_attempts=task.max_attempts,
            loop=loop,
            sink=lambda changes: self._report(attempt, changes),
            inputs=[sent.data for sent in task.inputs] if task.inputs else (),
            on_park=lambda: self._park(attempt),
            checkpoint=checkpoint_of(task),
        )
        attempt = _Attempt(task, context)
        self._attempts[task.task_id] = attempt
        attempt.runner = loop.create_task(self._run(attempt), name=f"conveyor-task-{task.task_id}")
        if self.lease_seconds is not None and self._renewing is None:
            self._renewing = loop.create_task(self._renew(self.lease_seconds))

    async def _renew(self, lease_seconds: float) -> None:
        """Renew the leases of the attempts that run, every third of their time."""
        while not self._closing:
            await asyncio.sleep(lease_seconds / 3)
            renewals = [
                self.dispatcher.renew(task_id, attempt.lease_id, lease_seconds)
                for task_id, attempt in list(self._attempts.items())
                if not attempt.finishing
            ]
            # A lease gone (the attempt ended meanwhile), or a store that stops: dispatch
            # drops the attempt, or the server stops.
            await asyncio.gather(*renewals, return_exceptions=True)

    def stop(self, task: Task, why: TaskError, grace: float) -> None:
        if (attempt := self._attempt_of(task)) is not None:
            attempt.context._request_stop(why.message)

    def abandon(self, task_id: str, lease_id: str) -> None:
        attempt = self._attempts.get(task_id)
        if attempt is None or attempt.lease_id != lease_id:
            return
        del self._attempts[task_id]
        attempt.context._request_stop("the attempt ended without its handler")
        attempt.context._close()
        if not attempt.finishing and attempt.runner is not None:
            # An async handler is cancelled; a blocking one is left to finish on its thread,
            # and what it returns is discarded.
            attempt.abandoned = True
            attempt.runner.cancel()

    def pause(self, task: Task) -> None:
        if (attempt := self._attempt_of(task)) is not None:
            attempt.context._request_pause(task.pause_reason)

    def resume(self, task: Task) -> None:
        if (attempt := self._attempt_of(task)) is not None:
            attempt.context._resume()

    def give_inputs(self, task: Task, first: int) -> None:
        if (attempt := self._attempt_of(task)) is not None:
            attempt.context._give_inputs(sent.data for sent in task.inputs[first:])

    def _attempt_of(self, task: Task) -> _Attempt | None:
        """The attempt this worker runs under the task's lease, if any."""
        attempt = self._attempts.get(task.task_id)
        return attempt if attempt is not None and attempt.lease_id == task.lease_id else None

    def _park(self, attempt: _Attempt) -> None:
        """The handler parked at a pause point: record it (what it reported lands first)."""
        previous = attempt.flusher

        async def park() -> None:
            if previous is not None:
                await previous
            with contextlib.suppress(StaleLease, StoreFailed):
                await self.dispatcher.park(attempt.task.task_id, attempt.lease_id)
            await self._flush(attempt)  # reported since, if the pause was withdrawn

        attempt.flusher = asyncio.create_task(park())

    async def close(self) -> None:
        """Stop what still runs (the server is going away)."""
        self._closing = True
        if self._renewing is not None:
            self._renewing.cancel()
        runners = [a.runner for a in self._attempts.values() if a.runner is not None]
        for runner in runners:
            runner.cancel()
        if runners:
            await asyncio.wait(runners)

    async def _run(self, attempt: _Attempt) -> None:
        """Run the handler, then end the attempt with how it went, unless it was dropped."""
        task = attempt.task
        try:
            try:
                outcome = await self._handle(attempt)
            except asyncio.CancelledError:
                if attempt.abandoned or self._closing:
                    return  # dispatch ended the attempt without it, or the server goes away
                outcome = Outcome(error=TaskError(ErrorCode.HANDLER_ERROR, _CANCELLED))
            attempt.finishing = True
            attempt.context._close()
            if attempt.flusher is not None:
                await attempt.flusher  # what was reported lands before the end
            await self.dispatcher.finish(task.task_id, attempt.lease_id, outcome)
        except (StaleLease, StoreFailed):
            pass  # the attempt ended without it meanwhile, or the server stops and says why
        except Exception:
            log.exception("the attempt of task %s broke the worker's bookkeeping", task.task_id)
        finally:
            attempt.context._close()
            if self._attempts.get(task.task_id) is attempt:
                del self._attempts[task.task_id]

    async def _handle(self, attempt: _Attempt) -> Outcome:
        """Run the handler in this task (an async one) or on a thread of its own (a blocking
        one), and say how it ended."""
        task, context = attempt.task, attempt.context
        function = self.registry.get(task.task_type)
        if function is None:
            message = f"no handler is registered for task type {task.task_type!r}"
            return Outcome(error=TaskError(ErrorCode.HANDLER_ERROR, message), retryable=False)
        try:
            with attempt_scope(task.task_id, task.attempt), self._span(task):
                if is_async(function):
                    handler = cast(Awaitable[Any], function(context))
                    result = await track(handler, task.task_id, task.task_type)
                else:
                    result = await run_on_thread(function, context)
        except asyncio.CancelledError:
            raise
        except WaitForInput as wait:
            return Outcome(wait=InputWait(wait.prompt, wait.label, wait.timeout, wait.seen))
        except Exception as error:
            return _failure(error, task)
        return result_outcome(result)

    def _span(self, task: Task) -> contextlib.AbstractContextManager[None]:
        """The span of the attempt's run when the server traces (a child of its Create's)."""
        if not self.tracing:
            return contextlib.nullcontext()
        return attempt_span(
            task.trace_parent,
            task_id=task.task_id,
            task_type=task.task_type,
            attempt=task.attempt,
            worker=self.holder,
        )

    def _report(self, attempt: _Attempt, changes: dict[str, Any] | Refusal) -> None:
        """Merge a handler's report and write it unless a write is already on its way; a
        report over its caps fails the attempt."""
        if isinstance(changes, Refusal):
            attempt.context._request_stop(changes.message)
            failed = Outcome(error=TaskError(changes.code, changes.message), retryable=False)
            attempt.failing = asyncio.ensure_future(self._fail(attempt, failed))
            return
        attempt.progress.update(changes)
        if attempt.flusher is None or attempt.flusher.done():
            attempt.flusher = asyncio.create_task(self._flush(attempt))

    async def _fail(self, attempt: _Attempt, outcome: Outcome) -> None:
        with contextlib.suppress(StaleLease, StoreFailed):
            await self.dispatcher.finish(attempt.task.task_id, attempt.lease_id, outcome)

    async def _flush(self, attempt: _Attempt) -> None:
        while attempt.progress:
            changes, attempt.progress = attempt.progress, {}
            try:
                await self.dispatcher.report(attempt.task.task_id, attempt.lease_id, changes)
            except (StaleLease, StoreFailed):
                return  # the attempt is over: a late report changes nothing


def _failure(error: Exception, task: Task) -> Outcome:
    """A handler's exception as HANDLER_ERROR, with its type and traceback (also logged with
    the task), and what an AttemptFailed asks of the retry and leaves for the next attempt."""
    log.error(
        "task %s (%s), attempt %d: the handler raised %s",
        task.task_id, task.task_type, task.attempt, type(error).__name__,
        exc_info=error,
        extra={"task_id": task.task_id, "task_type": task.task_type, "attempt": task.attempt},
    )  # fmt: skip
    failure = failure_of(error)
    kept = TaskError(
        ErrorCode.HANDLER_ERROR, failure.message, failure.error_type, failure.traceback
    )
    return Outcome(
        error=kept,
        retryable=failure.retryable,
        retry_delay=failure.retry_delay,
        checkpoint=failure.checkpoint,
    )


def result_outcome(result: Any) -> Outcome:
    """A handler's result, or the error that refuses it: not JSON, or over the size cap."""
    if result is None:
        return _NO_RESULT
    if (refusal := result_problem(result)) is not None:
        return Outcome(error=TaskError(refusal.code, refusal.message), retryable=False)
    return Outcome(result=result)
