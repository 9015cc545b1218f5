"""A worker process: runs task handlers for a conveyor server, outside it.

    from conveyor.handlers import HandlerRegistry
    from conveyor.worker import Worker

    registry = HandlerRegistry.from_modules(["myteam.handlers"], builtins=False)
    asyncio.run(Worker("conveyor:50051", registry, concurrency=8).run_until_signal())

or `conveyor worker --handlers myteam.handlers --concurrency 8`. The handlers are the same
as conveyord's own (`--handlers`), with the same `TaskContext`: an `async def` runs on this
process's event loop, a plain `def` on a thread of its own.

It speaks conveyor.v1.WorkerService: it keeps one session stream open, runs what it is
assigned, reports progress, renews its leases every `renew_interval`, and ends each
attempt with Finish (the ends of a busy worker go together, in one FinishMany, each at
most FINISH_LINGER late). It passes a Pause, a Resume and each input on to the handler's
context, tells the server when a handler parks, and ends an attempt whose handler waits for
input with that wait. A broken connection is retried with backoff (0.1 s growing to 5 s,
with jitter), and the attempts still running are listed on the next Connect so that the
server keeps them while it holds their leases (`reconnect_grace`). A Finish that cannot
get through is retried until the server answers. SIGTERM or SIGINT drains: nothing new is
taken, what runs finishes, then `run` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import signal
import socket
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, cast

import grpc

from conveyor._requests import token_metadata
from conveyor._tracing import attempt_span
from conveyor.handlers import (
    Failure,
    HandlerRegistry,
    Refusal,
    TaskContext,
    WaitForInput,
    failure_of,
    is_async,
    result_problem,
    run_on_thread,
)
from conveyor.logs import attempt_scope
from conveyor.protojson import dict_to_struct, struct_to_dict, to_value
from conveyor.tls import Tls, credentials
from conveyor.v1 import worker_service_pb2 as pb
from conveyor.v1.worker_service_pb2_grpc import WorkerServiceStub

if TYPE_CHECKING:
    from conveyor.v1.worker_service_pb2_grpc import WorkerServiceAsyncStub

log = logging.getLogger(__name__)

RECONNECT_INITIAL = 0.1  # seconds before the first reconnect, at most (full jitter)
RECONNECT_MAXIMUM = 5.0
HEARTBEATS_MISSED = 3  # a stream silent this many heartbeat intervals is taken as dead
_LEASE_LOST = "LEASE_NOT_HELD"
# A call that did not get through: the server is unreachable, or its channel was replaced.
_TRY_AGAIN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
FINISH_BATCH = 1000  # attempts' ends in one FinishMany, at most
# While other attempts still run, an end waits this long for theirs to go with it: a busy
# worker makes one call for several ends (each call costs the server far more than an end),
# and an end is late by at most this (an idle worker's end goes at once).
FINISH_LINGER = 0.002
FINISH_BATCH_BYTES = 3 * 1024 * 1024  # and their size: within the server's 4 MiB


class WorkerRefused(Exception):
    """The server refused this worker for good (a bad request, or the same worker id
    connected elsewhere): reconnecting cannot help."""


@dataclasses.dataclass(eq=False)
class _Attempt:
    ref: pb.LeaseRef
    context: TaskContext
    runner: asyncio.Task[None] | None = None
    progress: dict[str, Any] = dataclasses.field(default_factory=dict)
    reporter: asyncio.Task[None] | None = None
    refusal: Refusal | None = None  # a report over a cap: the attempt fails with it
    traceparent: str = ""  # the span of the task's Create, when the server traces


def default_worker_id() -> str:
    """host/pid/random: unique to this process, kept across its reconnects."""
    return f"{socket.gethostname()[:64]}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class Worker:
    """Runs the handlers of `registry` for the server at `target`, `concurrency` at once."""

    def __init__(
        self,
        target: str,
        registry: HandlerRegistry,
        *,
        concurrency: int = 8,
        worker_id: str | None = None,
        options: tuple[tuple[str, Any], ...] = (),
        tls: Tls | bool | None = None,
        token: str | None = None,
    ) -> None:
        if not registry.task_types:
            raise ValueError("a worker needs at least one handler")
        self.target = target
        self.registry = registry
        self.concurrency = concurrency
        self.worker_id = worker_id or default_worker_id()
        self._options = options
        self._tls = tls  # read again for each new channel: a rotated file is picked up
        self._metadata = token_metadata(token)  # the bearer token, else $CONVEYOR_TOKEN
        self._attempts: dict[str, _Attempt] = {}
        self._draining = asyncio.Event()
        self._finishing: list[tuple[pb.FinishRequest, asyncio.Future[None]]] = []
        self._finisher: asyncio.Task[None] | None = None
        self._stub: WorkerServiceAsyncStub | None = None  # the latest session's
        self._renew_every = 5.0
        self._heartbeat = 5.0
        self._heard = 0.0  # when the session's stream last said something (loop time)

    @property
    def running(self) -> int:
        return len(self._attempts)

    def drain(self) -> None:
        """Take nothing more; `run` returns once what runs has finished."""
        self._draining.set()

    async def run_until_signal(self) -> None:
        """`run`, draining on SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.drain)
        try:
            await self.run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    async def run(self) -> None:
        """Work until drained; reconnect after every broken connection (on a new channel
        after a silent one: its TCP connection may be dead without anyone knowing)."""
        ceiling = RECONNECT_INITIAL
        while True:
            async with self._channel() as channel:
                stub: WorkerServiceAsyncStub = WorkerServiceStub(channel)
                while True:
                    try:
                        if await self._session(stub):
                            return  # drained
                        ceiling = RECONNECT_INITIAL  # the session ran: start the backoff afresh
                    except grpc.aio.AioRpcError as error:
                        self._refused(error)
                        log.warning(
                            "worker %s: connection lost (%s)", self.worker_id, error.code().name
                        )
                    except TimeoutError:
                        log.warning("worker %s: the server went silent", self.worker_id)
                        break  # a new channel
                    await asyncio.sleep(random.random() * ceiling)
                    ceiling = min(ceiling * 2, RECONNECT_MAXIMUM)

    def _channel(self) -> grpc.aio.Channel:
        """A new channel to the server, with TLS credentials read from their files now."""
        secure = credentials(self._tls)
        if secure is None:
            return grpc.aio.insecure_channel(self.target, options=self._options)
        return grpc.aio.secure_channel(self.target, secure, options=self._options)

    def _refused(self, error: grpc.aio.AioRpcError) -> None:
        """Raise WorkerRefused for a refusal that reconnecting cannot help."""
        if error.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
        ):
            raise WorkerRefused(f"{error.code().name}: {error.details()}") from error

    async def _session(self, stub: WorkerServiceAsyncStub) -> bool:
        """One Connect stream, read to its end; True if it ended because the worker drained."""
        request = pb.ConnectRequest(
            worker_id=self.worker_id,
            task_types=self.registry.task_types,
            slots=self.concurrency,
            held=[attempt.ref for attempt in self._attempts.values()],
            batch_assignments=True,
            pausable_types=self.registry.pausable_types,
        )
        call = stub.Connect(request, metadata=self._metadata)
        loop = asyncio.get_running_loop()
        self._heard = loop.time()
        helpers = [asyncio.create_task(self._watch_silence(call))]
        try:
            while True:
                try:
                    message = await call.read()
                except asyncio.CancelledError:
                    if call.cancelled() and loop.time() - self._heard > self._silence:
                        raise TimeoutError() from None  # _watch_silence gave up on it
                    raise
                if message is grpc.aio.EOF:
                    return self._draining.is_set()
                self._heard = loop.time()
                assert isinstance(message, pb.ConnectResponse)
                which = message.WhichOneof("message")
                if which == "assignments":
                    for assignment in message.assignments.assignments:
                        self._start(assignment, stub)
                elif which == "assignment":  # a server that does not batch
                    self._start(message.assignment, stub)
                elif which == "stop":
                    self._stop(message.stop)
                elif which in ("pause", "resume", "input"):
                    self._signal(message)
                elif which == "welcome":
                    helpers.append(self._welcomed(message.welcome, stub))
                    helpers.append(asyncio.create_task(self._drain_when_asked(stub)))
        finally:
            call.cancel()
            for helper in helpers:
                helper.cancel()

    @property
    def _silence(self) -> float:
        """How long a stream may say nothing before it is taken as dead."""
        return self._heartbeat * HEARTBEATS_MISSED

    async def _watch_silence(self, call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
        """End a stream that has said nothing, not even a heartbeat, for too long (one
        timer for the session, rather than one for every message read)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._heartbeat)
            if loop.time() - self._heard > self._silence:
                call.cancel()
                return

    async def _drain_when_asked(self, stub: WorkerServiceAsyncStub) -> None:
        await self._draining.wait()
        await stub.Drain(pb.DrainRequest(worker_id=self.worker_id), metadata=self._metadata)
        log.info("worker %s: draining, %d attempts to finish", self.worker_id, self.running)

    def _welcomed(self, welcome: pb.Welcome, stub: WorkerServiceAsyncStub) -> asyncio.Task[None]:
        self._renew_every = welcome.renew_interval.ToTimedelta().total_seconds() or 5.0
        self._heartbeat = welcome.heartbeat_interval.ToTimedelta().total_seconds() or 5.0
        kept = {ref.task_id for ref in welcome.kept}
        log.info("worker %s: connected, %d running attempts kept", self.worker_id, len(kept))
        for task_id in list(self._attempts):
            if task_id not in kept:
                self._drop(task_id, "its lease was not kept across the reconnect")
        return asyncio.create_task(self._renew_forever(stub))

    async def _renew_forever(self, stub: WorkerServiceAsyncStub) -> None:
        while True:
            await asyncio.sleep(self._renew_every)
            if not self._attempts:
                continue
            refs = [attempt.ref for attempt in self._attempts.values()]
            with contextlib.suppress(grpc.aio.AioRpcError):  # the session's end says why
                answer = await stub.Renew(pb.RenewRequest(leases=refs), metadata=self._metadata)
                for ref in answer.lost:
                    self._drop(ref.task_id, "its lease was lost")

    def _drop(self, task_id: str, why: str) -> None:
        """An attempt this worker no longer holds: stop its handler, discard what it returns."""
        attempt = self._attempts.pop(task_id, None)
        if attempt is not None:
            log.warning("worker %s: task %s dropped: %s", self.worker_id, task_id, why)
            attempt.context._request_stop(why)
            attempt.context._close()
            if attempt.runner is not None:
                attempt.runner.cancel()

    # -- attempts ----------------------------------------------------------------

    def _start(self, assignment: pb.Assignment, stub: WorkerServiceAsyncStub) -> None:
        task = assignment.task
        ref = pb.LeaseRef(task_id=task.task_id, lease_id=assignment.lease_id)
        loop = asyncio.get_running_loop()
        context = TaskContext(
            task_id=task.task_id,
            task_type=task.task_type,
            parameters=struct_to_dict(task.parameters),
            labels=dict(task.labels),
            attempt=task.attempt,
            max_attempts=task.max_attempts,
            loop=loop,
            sink=lambda changes: self._report(attempt, changes, stub),  # made just below
            inputs=[struct_to_dict(sent.data) for sent in assignment.inputs],
            on_park=lambda: self._park(attempt, stub),
            checkpoint=(
                struct_to_dict(assignment.checkpoint) if assignment.HasField("checkpoint") else None
            ),
        )
        attempt = _Attempt(ref, context, traceparent=assignment.traceparent)
        self._attempts[task.task_id] = attempt
        attempt.runner = loop.create_task(self._run(attempt, stub))

    def _stop(self, stop: pb.Stop) -> None:
        attempt = self._attempts.get(stop.task_id)
        if attempt is not None and attempt.ref.lease_id == stop.lease_id:
            attempt.context._request_stop(stop.reason)

    def _signal(self, message: pb.ConnectResponse) -> None:
        """A pause, a resume or an input for an attempt this worker runs."""
        signal = getattr(message, message.WhichOneof("message") or "")
        attempt = self._attempts.get(signal.task_id)
        if attempt is None or attempt.ref.lease_id != signal.lease_id:
            return
        context = attempt.context
        if isinstance(signal, pb.PauseAttempt):
            context._request_pause(signal.reason)
        elif isinstance(signal, pb.ResumeAttempt):
            context._resume()
        elif signal.input.sequence == len(context.inputs) + 1:  # not one it has already
            context._give_inputs([struct_to_dict(signal.input.data)])

    def _park(self, attempt: _Attempt, stub: WorkerServiceAsyncStub) -> None:
        """The handler parked at a pause point: tell the server (after what it reported)."""
        previous = attempt.reporter

        async def park() -> None:
            if previous is not None:
                await previous
            with contextlib.suppress(grpc.aio.AioRpcError):  # the attempt is over, or lost
                parked = pb.ReportRequest(lease=attempt.ref, parked=True)
                await stub.Report(parked, metadata=self._metadata)
            await self._send_reports(attempt, stub)  # reported since, if the pause was withdrawn

        attempt.reporter = asyncio.create_task(park())

    async def _run(self, attempt: _Attempt, stub: WorkerServiceAsyncStub) -> None:
        """Run the handler, then Finish with how it went (retried until the server answers)."""
        try:
            request = await self._outcome(attempt)
            attempt.context._close()
            if attempt.reporter is not None:
                await attempt.reporter  # what was reported lands before the end
            await self._finish(stub, request)
        finally:
            if self._attempts.get(attempt.ref.task_id) is attempt:
                del self._attempts[attempt.ref.task_id]

    async def _outcome(self, attempt: _Attempt) -> pb.FinishRequest:
        context = attempt.context
        request = pb.FinishRequest(lease=attempt.ref)
        function = self.registry.get(context.task_type)
        try:
            if function is None:
                raise LookupError(f"no handler for task type {context.task_type!r}")
            with attempt_scope(context.task_id, context.attempt), self._span(attempt):
                if is_async(function):
                    result = await cast(Awaitable[Any], function(context))
                else:
                    result = await run_on_thread(function, context)
        except WaitForInput as wait:
            request.wait_for_input.CopyFrom(
                pb.InputWait(prompt=wait.prompt, label=wait.label, inputs_seen=wait.seen)
            )
            if wait.timeout is not None:
                request.wait_for_input.timeout.FromNanoseconds(int(wait.timeout * 1e9))
            return request
        except Exception as error:
            log.exception("task %s: the handler raised", context.task_id)
            request.error.CopyFrom(_attempt_error(failure_of(error)))
            return request
        if (refusal := attempt.refusal or result_problem(result)) is not None:
            request.error.CopyFrom(
                pb.AttemptError(code=refusal.code, message=refusal.message, no_retry=True)
            )
        else:
            request.result.CopyFrom(to_value(result))
        return request

    def _span(self, attempt: _Attempt) -> contextlib.AbstractContextManager[None]:
        """The span of the attempt's run, the child of its Create's, when the server traces
        and opentelemetry is installed here."""
        if not attempt.traceparent:
            return contextlib.nullcontext()
        context = attempt.context
        return attempt_span(
            attempt.traceparent,
            task_id=context.task_id,
            task_type=context.task_type,
            attempt=context.attempt,
            worker=self.worker_id,
        )

    async def _finish(self, stub: WorkerServiceAsyncStub, request: pb.FinishRequest) -> None:
        """End the attempt: its Finish goes out with those of the attempts that ended at the
        same time (one FinishMany), and is retried until the server answers."""
        done = asyncio.get_running_loop().create_future()
        self._finishing.append((request, done))
        self._stub = stub
        if self._finisher is None or self._finisher.done():
            self._finisher = asyncio.create_task(self._send_finishes())
        await done

    async def _send_finishes(self) -> None:
        while self._finishing:
            if len(self._attempts) > len(self._finishing):
                await asyncio.sleep(FINISH_LINGER)
            batch: list[tuple[pb.FinishRequest, asyncio.Future[None]]] = []
            size = 0
            while self._finishing and len(batch) < FINISH_BATCH and size < FINISH_BATCH_BYTES:
                batch.append(self._finishing.pop(0))
                size += batch[-1][0].ByteSize()
            request = pb.FinishManyRequest(
                finishes=[finish for finish, _ in batch], refusals_only=True
            )
            ceiling = RECONNECT_INITIAL
            while True:
                try:
                    assert self._stub is not None
                    answer = await self._stub.FinishMany(request, metadata=self._metadata)
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() not in _TRY_AGAIN:
                        log.error("FinishMany refused: %s", error.details())
                        answer = None
                        break
                await asyncio.sleep(random.random() * ceiling)
                ceiling = min(ceiling * 2, RECONNECT_MAXIMUM)
            for refusal in answer.refused if answer is not None else ():
                if refusal.reason != _LEASE_LOST:  # a lost lease: the attempt is over
                    log.error("task %s: Finish refused: %s", refusal.lease.task_id, refusal.message)
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    def _report(
        self, attempt: _Attempt, changes: dict[str, Any] | Refusal, stub: WorkerServiceAsyncStub
    ) -> None:
        """Merge a handler's report and send it unless a Report is already on its way."""
        if isinstance(changes, Refusal):
            attempt.refusal = attempt.refusal or changes
            attempt.context._request_stop(changes.message)
            return  # the handler is told to stop, and the attempt fails with the refusal
        attempt.progress.update(changes)
        if attempt.reporter is None or attempt.reporter.done():
            attempt.reporter = asyncio.create_task(self._send_reports(attempt, stub))

    async def _send_reports(self, attempt: _Attempt, stub: WorkerServiceAsyncStub) -> None:
        while attempt.progress:
            changes, attempt.progress = attempt.progress, {}
            request = pb.ReportRequest(lease=attempt.ref)
            if "progress" in changes:
                request.progress = changes["progress"]
            if "message" in changes:
                request.message = changes["message"]
            if changes.get("progress_detail") is not None:
                request.detail.CopyFrom(dict_to_struct(changes["progress_detail"]))
            if changes.get("checkpoint") is not None:
                request.checkpoint.CopyFrom(dict_to_struct(changes["checkpoint"]))
            try:
                answer = await stub.Report(request, metadata=self._metadata)
            except grpc.aio.AioRpcError:
                return  # lost or refused: progress is best effort; the result is what counts
            if answer.stop_requested:
                attempt.context._request_stop("the server asked the attempt to stop")


def _attempt_error(failure: Failure) -> pb.AttemptError:
    """A handler's failure as the AttemptError of its Finish."""
    error = pb.AttemptError(
        code="HANDLER_ERROR",
        message=failure.message,
        no_retry=not failure.retryable,
        error_type=failure.error_type,
        traceback=failure.traceback,
    )
    if failure.retry_delay is not None:
        error.retry_delay.FromNanoseconds(round(failure.retry_delay * 1e9))
    if failure.checkpoint is not None:
        error.checkpoint.CopyFrom(dict_to_struct(failure.checkpoint))
    return error
