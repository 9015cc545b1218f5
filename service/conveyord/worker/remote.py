"""Remote workers: the attempts of a worker connected over WorkerService, and its sessions.

A `RemoteWorker` is what dispatch grants attempts to for one worker process: it turns
grants into `assignments`, and a stop, a pause, a resume and an input into messages of
their own on the worker's stream (its `Outbox`:
the attempts granted in one claim round go out as one message), and counts the worker's
free slots. `WorkerSessions` keeps them by worker id across
connections: a worker whose stream breaks keeps its leases for the reconnect grace, and
one that connects again within it keeps the attempts it still runs; the others, and all of
them once the grace is over, end with WORKER_LOST and are retried at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Iterable

import grpc
from google.protobuf import duration_pb2

from conveyor.v1 import worker_service_pb2 as pb
from conveyord.convert import (
    assignment,
    assignment_message,
    assignments_message,
    input_to_proto,
)
from conveyord.dispatch import Dispatcher
from conveyord.errors import ConveyorError, ShuttingDown
from conveyord.model import LEASED, ErrorCode, Task, TaskError
from conveyord.store.base import StoreFailed, TaskNotFound, TaskStore
from conveyord.timing import holder_lost

log = logging.getLogger(__name__)

# What a stream sends: an encoded ConnectResponse; or its end: None ends it with OK, an
# error with that error's status.
Outgoing = bytes | ConveyorError | None
ASSIGNMENTS_BYTES = 1024 * 1024  # in one message, about: well within a client's 4 MiB

_STOP_CAUSES = {
    ErrorCode.CANCELLED: pb.STOP_CAUSE_CANCELLED,
    ErrorCode.DEADLINE_EXCEEDED: pb.STOP_CAUSE_TIMED_OUT,
    ErrorCode.INTERRUPTED: pb.STOP_CAUSE_SHUTTING_DOWN,
}


@dataclasses.dataclass(frozen=True)
class SessionTimings:
    """How long leases last, how often the stream speaks, how long a lost worker is waited for."""

    lease_duration: float = 15.0
    heartbeat_interval: float = 5.0
    reconnect_grace: float = 2.0

    def welcome(self, worker_id: str, kept: Iterable[tuple[str, str]]) -> bytes:
        welcome = pb.Welcome(
            worker_id=worker_id,
            lease_duration=_duration(self.lease_duration),
            renew_interval=_duration(self.lease_duration / 3),
            heartbeat_interval=_duration(self.heartbeat_interval),
            reconnect_grace=_duration(self.reconnect_grace),
            kept=[pb.LeaseRef(task_id=task_id, lease_id=lease_id) for task_id, lease_id in kept],
        )
        return pb.ConnectResponse(welcome=welcome).SerializeToString()


class WorkerReplaced(ConveyorError):
    """Ends a session's stream: the same worker connected again on another stream."""

    code = grpc.StatusCode.ABORTED
    reason = "WORKER_REPLACED"

    def __init__(self, worker_id: str) -> None:
        super().__init__(f"worker {worker_id} connected again on another stream")
        self.worker_id = worker_id

    def metadata(self) -> dict[str, str]:
        return {"worker_id": self.worker_id}


class WorkerNotConnected(ConveyorError):
    """A Drain for a worker id that has no open session."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "WORKER_NOT_CONNECTED"

    def __init__(self, worker_id: str) -> None:
        super().__init__(f"no open session has worker id {worker_id!r}")
        self.worker_id = worker_id

    def metadata(self) -> dict[str, str]:
        return {"worker_id": self.worker_id}


class _AssignmentsMark:
    """Where, among an outbox's messages, its pending assignments go out."""


_ASSIGNMENTS = _AssignmentsMark()


class Outbox:
    """What goes out on one stream of a worker, in order. To a worker that asked for
    batches, the assignments granted while the stream was busy go out together, as one
    `assignments` message (one write, one read, one wake-up of the worker for a claim
    round's worth of attempts); to another, one `assignment` message each."""

    def __init__(self, batch: bool = True) -> None:
        self._batch = batch
        self._items: collections.deque[Outgoing | _AssignmentsMark] = collections.deque()
        self._assigned: list[bytes] = []  # encoded Assignments, sent at _ASSIGNMENTS
        self._ready = asyncio.Event()

    def put(self, item: Outgoing) -> None:
        self._items.append(item)
        self._ready.set()

    def assign(self, assignment: bytes) -> None:
        if not self._assigned:
            self._items.append(_ASSIGNMENTS)
            self._ready.set()
        self._assigned.append(assignment)

    async def get(self, wait: float) -> Outgoing:
        """The next item; TimeoutError after `wait` seconds with nothing to send."""
        if not self._items:  # a timer only when there is something to wait for
            self._ready.clear()
            async with asyncio.timeout(wait):
                await self._ready.wait()
        head = self._items[0]
        if isinstance(head, _AssignmentsMark):
            return self._take_assignments()
        self._items.popleft()
        return head

    def _take_assignments(self) -> bytes:
        """Assignments in order, as many as fit in one message (at least one), or one."""
        if not self._batch:
            message = assignment_message(self._assigned.pop(0))
            if not self._assigned:
                self._items.popleft()
            return message
        count, size = 0, 0
        for encoded in self._assigned:
            if count and size + len(encoded) > ASSIGNMENTS_BYTES:
                break
            count, size = count + 1, size + len(encoded)
        message = assignments_message(self._assigned[:count])
        del self._assigned[:count]
        if not self._assigned:
            self._items.popleft()
        return message


@dataclasses.dataclass(frozen=True)
class Hello:
    """What a worker says when it connects (a ConnectRequest, checked)."""

    worker_id: str
    types: frozenset[str]
    slots: int
    held: dict[str, str]  # task_id: lease_id, of the attempts it still runs
    batch: bool  # it takes the assignments of a claim round in one message
    pausable: frozenset[str] = frozenset()  # task types whose handlers can park
    tenant: str = ""  # the caller's: the worker takes only this tenant's tasks


def holder_name(tenant: str, worker_id: str) -> str:
    """Who holds a worker's leases: its id, within its tenant (a worker id has no '#')."""
    return f"{tenant}#{worker_id}" if tenant else worker_id


class RemoteWorker:
    """One worker process, as dispatch sees it: its types, slots and held attempts."""

    def __init__(self, hello: Hello, lease: float) -> None:
        self.holder = holder_name(hello.tenant, hello.worker_id)
        self.worker_id = hello.worker_id
        self.tenant: str | None = hello.tenant
        self.types: frozenset[str] | None = hello.types
        self.pausable = hello.pausable
        self.slots = hello.slots
        self.batch = hello.batch
        self.lease_seconds: float | None = lease
        self.held: dict[str, str] = {}  # task_id: lease_id
        self.outbox = Outbox(self.batch)
        self.connected = True
        self.draining = False
        self.grace: asyncio.TimerHandle | None = None  # runs out: the worker is lost

    @property
    def free_slots(self) -> int:
        if not self.connected or self.draining:
            return 0
        return self.slots - len(self.held)

    def start(self, task: Task) -> None:
        self.held[task.task_id] = task.lease_id
        deadline = (task.started_at or task.updated_at) + task.timeout_seconds
        self.outbox.assign(assignment(task, deadline, task.lease_expires_at or 0.0))

    def stop(self, task: Task, why: TaskError, grace: float) -> None:
        stop = pb.Stop(
            task_id=task.task_id,
            lease_id=task.lease_id,
            cause=_STOP_CAUSES.get(why.code, pb.STOP_CAUSE_CANCELLED),
            reason=why.message,
            grace=_duration(grace),
        )
        self.outbox.put(pb.ConnectResponse(stop=stop).SerializeToString())

    def pause(self, task: Task) -> None:
        pause = pb.PauseAttempt(
            task_id=task.task_id, lease_id=task.lease_id, reason=task.pause_reason
        )
        self.outbox.put(pb.ConnectResponse(pause=pause).SerializeToString())

    def resume(self, task: Task) -> None:
        resume = pb.ResumeAttempt(task_id=task.task_id, lease_id=task.lease_id)
        self.outbox.put(pb.ConnectResponse(resume=resume).SerializeToString())

    def give_inputs(self, task: Task, first: int) -> None:
        for number in range(first, len(task.inputs)):
            sent = pb.AttemptInput(
                task_id=task.task_id,
                lease_id=task.lease_id,
                input=input_to_proto(task.inputs[number], number + 1),
            )
            self.outbox.put(pb.ConnectResponse(input=sent).SerializeToString())

    def abandon(self, task_id: str, lease_id: str) -> None:
        if self.held.get(task_id) == lease_id:
            del self.held[task_id]
            if self.draining and not self.held:
                self.outbox.put(None)  # drained: the stream ends with OK

    def replace_stream(self, hello: Hello) -> None:
        """Give the worker a fresh outbox for a new stream, ending the old one."""
        if self.connected:
            self.outbox.put(WorkerReplaced(self.holder))
        self.types, self.slots, self.batch = hello.types, hello.slots, hello.batch
        self.pausable = hello.pausable
        self.outbox = Outbox(self.batch)
        self.connected = True
        self.draining = False


class WorkerSessions:
    """The remote workers by id, across their connections."""

    def __init__(self, dispatcher: Dispatcher, store: TaskStore, timings: SessionTimings) -> None:
        self.dispatcher = dispatcher
        self.store = store
        self.timings = timings
        self._workers: dict[str, RemoteWorker] = {}
        self._closing = False

    async def connect(self, hello: Hello) -> tuple[RemoteWorker, list[tuple[str, str]]]:
        """Open a session; the worker, and the attempts of `hello.held` it keeps."""
        if self._closing:
            raise ShuttingDown()
        worker = self._workers.get(holder_name(hello.tenant, hello.worker_id))
        if worker is None:
            worker = RemoteWorker(hello, self.timings.lease_duration)
            self._workers[worker.holder] = worker
        else:
            if worker.grace is not None:
                worker.grace.cancel()
                worker.grace = None
            worker.replace_stream(hello)
        kept = await self._keep(worker, hello.held)
        self.dispatcher.join(worker)
        return worker, kept

    async def _keep(self, worker: RemoteWorker, held: dict[str, str]) -> list[tuple[str, str]]:
        """Keep the attempts the worker says it runs whose leases are still its own (some
        may come from before this server started); end the others it was granted."""
        for task_id, lease_id in list(worker.held.items()):
            if held.get(task_id) != lease_id:
                del worker.held[task_id]
                await self._lose(task_id, lease_id, worker.holder)
        kept: list[tuple[str, str]] = []
        for task_id, lease_id in held.items():
            if worker.held.get(task_id) == lease_id:
                kept.append((task_id, lease_id))
                self.dispatcher.replay_signals(task_id)
                continue
            task = await self.store.get(task_id)
            if (
                task is not None
                and task.status in LEASED
                and task.lease_id == lease_id
                and task.lease_holder == worker.holder
            ):
                worker.held[task_id] = lease_id
                self.dispatcher.adopt(task, worker)
                kept.append((task_id, lease_id))
        return kept

    def disconnected(self, worker: RemoteWorker, outbox: Outbox) -> None:
        """A stream ended. If it was the worker's current one, hold its leases for the
        reconnect grace, then end them."""
        if worker.outbox is not outbox or not worker.connected:
            return  # an older stream of a worker that connected again
        worker.connected = False
        if not worker.held or self._closing:
            self._forget(worker)
            return
        loop = asyncio.get_running_loop()
        worker.grace = loop.call_later(
            self.timings.reconnect_grace,
            lambda: self.dispatcher.in_background(self._lost(worker)),
        )

    async def _lost(self, worker: RemoteWorker) -> None:
        """The grace ran out: the worker did not come back; its attempts end WORKER_LOST."""
        worker.grace = None
        if worker.connected:
            return
        self._forget(worker)
        log.warning(
            "worker %s did not come back within %g s: its %d attempts are retried",
            worker.holder, self.timings.reconnect_grace, len(worker.held),
        )  # fmt: skip
        for task_id, lease_id in list(worker.held.items()):
            await self._lose(task_id, lease_id, worker.holder)
        worker.held.clear()

    async def _lose(self, task_id: str, lease_id: str, holder: str) -> None:
        error = TaskError(
            ErrorCode.WORKER_LOST, f"worker {holder} was lost while it ran the attempt"
        )
        lost = holder_lost(lease_id, error, self.dispatcher.policy, self.dispatcher.clock())
        with contextlib.suppress(TaskNotFound, StoreFailed):
            await self.store.update(task_id, lost)

    def _forget(self, worker: RemoteWorker) -> None:
        self.dispatcher.leave(worker)
        if self._workers.get(worker.holder) is worker:
            del self._workers[worker.holder]

    def connected(self, tenant: str) -> list[RemoteWorker]:
        """The workers of `tenant` whose stream is open now."""
        return [w for w in self._workers.values() if w.connected and w.tenant == tenant]

    def drain(self, holder: str) -> None:
        """The worker takes nothing more; its stream ends once it holds nothing."""
        worker = self._workers.get(holder)
        if worker is None or not worker.connected:
            raise WorkerNotConnected(holder.rpartition("#")[2])
        worker.draining = True
        if not worker.held:
            worker.outbox.put(None)

    def close(self) -> None:
        """The server stops: end every stream with UNAVAILABLE."""
        self._closing = True
        for worker in list(self._workers.values()):
            if worker.grace is not None:
                worker.grace.cancel()
            if worker.connected:
                worker.outbox.put(ShuttingDown())


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration
