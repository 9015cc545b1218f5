"""Watches that resume by themselves, apart from their I/O: both clients drive these.

A watch remembers the last revision the server sent (heartbeats included), re-opens a
broken stream from it with backoff, and passes nothing on twice. When the server's
history no longer reaches that revision (OUT_OF_RANGE), a watch of one task asks again
without a revision, which makes the server send the task's current state first, read
together with the start of the new watch: the fallback Get, with no gap between it and
the watch that follows (a plain Get, then a watch from the task's own revision, would
hit OUT_OF_RANGE again whenever that revision is older than the history too). A watch of
many tasks lists them again instead, like a Kubernetes informer.

An event of a type the client does not know (a newer server's) is skipped, but its
revision counts as seen, as a heartbeat's does: the watch has read past it, and resuming
from before it would only have it sent again. A task in a status the client does not know
(TaskStatus.UNKNOWN) is passed on, and is not terminal: the watch goes on.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Generic, TypeVar

import grpc
from google.protobuf import duration_pb2

from conveyor._deadline import Deadline
from conveyor._polling import Polling, PollingPolicy
from conveyor._requests import RELIST_PAGE_SIZE
from conveyor._retry import STREAM_RETRY, Backoff, refused
from conveyor.errors import (
    ConveyorError,
    DeadlineExceeded,
    RpcError,
    Unavailable,
    WaitTimeout,
    from_rpc_error,
)
from conveyor.tasks import EventKind, Task, TaskEvent, TaskStatus
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb

Item = TypeVar("Item")

_TERMINAL = frozenset(
    {task_pb2.TASK_STATUS_COMPLETED, task_pb2.TASK_STATUS_FAILED, task_pb2.TASK_STATUS_CANCELLED}
)
# The event types that carry a state of the task, for a watch of one task.
_STATES = frozenset(
    {pb.WATCH_EVENT_TYPE_CURRENT, pb.WATCH_EVENT_TYPE_CHANGED, pb.WATCH_EVENT_TYPE_REMOVED}
)
# What a watch of many tasks passes on, by event type.
_EVENT_KINDS = {
    pb.WATCH_EVENT_TYPE_CHANGED: EventKind.CHANGED,
    pb.WATCH_EVENT_TYPE_REMOVED: EventKind.REMOVED,
}
# A server that refuses Watch this way may still answer Get: a wait then polls instead.
WATCH_REFUSALS = frozenset(
    {
        grpc.StatusCode.UNIMPLEMENTED,  # an older server, or a gateway without streams
        grpc.StatusCode.PERMISSION_DENIED,  # allowed to Get but not to Watch
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # too many watchers: polling spares the server
    }
)


@dataclasses.dataclass(frozen=True)
class WatchSettings:
    """How a watch runs: the quiet time before a heartbeat, how long it may keep trying to
    reconnect after a break (None: forever), how long it may last in all (None: no limit),
    and whether a first try that was refused is tried again."""

    heartbeat_interval: float
    reconnect_timeout: float | None
    timeout: float | None
    retry_refused: bool = True


class Watch(abc.ABC, Generic[Item]):
    """What every watch shares: its deadline, the last revision seen, and reconnecting."""

    def __init__(self, settings: WatchSettings) -> None:
        self.deadline = Deadline(settings.timeout)
        self.revision: int | None = None
        self.done = False
        self._heartbeat = duration_pb2.Duration()
        self._heartbeat.FromNanoseconds(round(settings.heartbeat_interval * 1e9))
        self._reconnect_timeout = settings.reconnect_timeout
        self._backoff = self._new_backoff()
        self._heard = settings.retry_refused  # from the server (or need not have been)

    @abc.abstractmethod
    def request(self) -> pb.WatchRequest:
        """The request that (re-)opens the stream."""

    @abc.abstractmethod
    def receive(self, response: pb.WatchResponse) -> Item | None:
        """What to pass on for a response: None for a heartbeat or something passed on before."""

    def relist_request(self) -> pb.ListRequest | None:
        """The List to page through before the stream re-opens, if one is needed."""
        return None

    def relisted(self, page: pb.ListResponse) -> list[Item]:
        """What a page of that List makes the watch pass on."""
        return []

    def broken(self, error: grpc.RpcError | None) -> float:
        """The stream ended early (`error` None: it ended cleanly though it should not have).

        Returns how long to wait before re-opening it, or raises the error that ends the watch.
        A watch the server let go because it read too slowly resumes like a broken one.
        """
        if error is not None and not self._heard and refused(error):
            raise from_rpc_error(error) from error  # nothing listens: say so at once
        if error is None or _too_slow(error):
            delay = self._backoff.next_delay()
        else:
            delay = self._backoff.delay_after(error)
        if delay is None:
            if error is None:
                raise Unavailable("the server kept ending the watch early")
            raise from_rpc_error(error) from error
        return self.deadline.cap(delay)

    def _advance(self, revision: int) -> int | None:
        """Note a revision from the server; returns the last one seen before it.

        A newer revision is progress: the next break starts its backoff afresh. 0 is no
        revision (the server's start at 1): an event of a type not known may carry none.
        """
        self._heard = True
        seen = self.revision
        if revision > 0 and (seen is None or revision > seen):
            self.revision = revision
            self._backoff = self._new_backoff()
        return seen

    def _new_backoff(self) -> Backoff:
        return Backoff(STREAM_RETRY, Deadline(self._reconnect_timeout))


def _too_slow(error: grpc.RpcError) -> bool:
    """The server ended the watch because it fell too far behind (it may resume at once)."""
    return (
        error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and from_rpc_error(error).reason == "WATCHER_TOO_SLOW"
    )


class TaskWatch(Watch[Task]):
    """A watch of one task: its states, until the terminal one."""

    def __init__(self, task_id: str, settings: WatchSettings) -> None:
        super().__init__(settings)
        self.task_id = task_id
        self.last: Task | None = None
        self._resume = True

    def request(self) -> pb.WatchRequest:
        request = pb.WatchRequest(task_id=self.task_id, heartbeat_interval=self._heartbeat)
        if self._resume and self.revision is not None:
            request.since_revision = self.revision
        return request

    def receive(self, response: pb.WatchResponse) -> Task | None:
        self._resume = True
        seen = self._advance(response.revision)
        if response.type not in _STATES:  # a heartbeat, or a type of event not known
            return None
        state = response.task  # for REMOVED, the last state, at a revision of its own
        self.done = response.type == pb.WATCH_EVENT_TYPE_REMOVED or state.status in _TERMINAL
        if seen is not None and state.revision <= seen:
            return None
        self.last = Task._from_proto(state)
        return self.last

    def broken(self, error: grpc.RpcError | None) -> float:
        if error is not None and error.code() == grpc.StatusCode.OUT_OF_RANGE:
            self._resume = False
            return 0.0
        if error is None:  # the server did not end with the terminal state: ask it for that
            self._resume = False
        try:
            return super().broken(error)
        except Unavailable as gave_up:
            if error is None and self.last is not None and self.last.status is TaskStatus.UNKNOWN:
                # The server ends a watch at the task's end: one in a status not known here.
                raise ConveyorError(
                    f"the server kept ending the watch of task {self.task_id}, which is in "
                    f"status {self.last.raw_status}, a status this client does not know: "
                    "a newer server's, maybe an end; upgrade the client"
                ) from gave_up
            raise

    def final(self) -> Task:
        """The terminal state the watch ended with."""
        if self.last is None or not self.last.status.terminal:
            raise ConveyorError(f"the watch of task {self.task_id} ended before the task did")
        return self.last

    def fallback(self, error: RpcError, call_timeout: float | None) -> Polling:
        """How a wait goes on after this watch failed with `error`.

        WaitTimeout when the wait's deadline passed; polling when the server refused the
        watch; any other error stands.
        """
        if isinstance(error, DeadlineExceeded):
            raise WaitTimeout(self.task_id, self.deadline.timeout, self.last) from error
        if error.code not in WATCH_REFUSALS:
            raise error
        return Polling(self.task_id, self.deadline, PollingPolicy(), call_timeout, self.last)


class AllTasksWatch(Watch[TaskEvent]):
    """A watch of every task that matches a filter; it never ends on its own.

    It starts after `since_revision`, or with a `start` filter: first the tasks that match
    it, listed (as CURRENT events), then every change after that List's first page.
    """

    def __init__(
        self,
        task_filter: task_pb2.TaskFilter,
        since_revision: int | None,
        settings: WatchSettings,
        start: task_pb2.TaskFilter | None = None,
    ) -> None:
        super().__init__(settings)
        if (since_revision is None) == (start is None):
            raise ValueError("a watch of many tasks starts at a revision or with a List")
        self.revision = since_revision
        self._filter = task_filter
        self._start = start
        self._relisting = start is not None
        self._listed_at: int | None = None

    def request(self) -> pb.WatchRequest:
        return pb.WatchRequest(
            filter=self._filter,
            since_revision=self.revision,
            heartbeat_interval=self._heartbeat,
        )

    def receive(self, response: pb.WatchResponse) -> TaskEvent | None:
        seen = self._advance(response.revision)
        kind = _EVENT_KINDS.get(response.type)  # None: a heartbeat, or a type of event not known
        if kind is None or (seen is not None and response.revision <= seen):
            return None
        return TaskEvent(kind, Task._from_proto(response.task), response.revision)

    def broken(self, error: grpc.RpcError | None) -> float:
        if error is not None and error.code() == grpc.StatusCode.OUT_OF_RANGE:
            self._relisting = True
            return 0.0
        return super().broken(error)

    def relist_request(self) -> pb.ListRequest | None:
        """After OUT_OF_RANGE, the first page of a List of the matching tasks."""
        if not self._relisting:
            return None
        self._listed_at = None
        return pb.ListRequest(filter=self._start or self._filter, page_size=RELIST_PAGE_SIZE)

    def relisted(self, page: pb.ListResponse) -> list[TaskEvent]:
        """The events a page of the relist makes: tasks changed since the last revision seen.

        The watch resumes from the first page's revision, so a task changed after that
        comes with the watch's replay instead. A server whose revisions went back (an
        in-memory one that restarted) has nothing in common with what was seen: all counts.
        """
        if self._listed_at is None:
            self._listed_at = page.revision
        listed_at = self._listed_at
        seen = self.revision if self.revision is not None and self.revision <= listed_at else -1
        kind = EventKind.CHANGED if self._start is None else EventKind.CURRENT
        events = [
            TaskEvent(kind, Task._from_proto(task), task.revision)
            for task in page.tasks
            if seen < task.revision <= listed_at
        ]
        if not page.next_page_token:
            self._relisting = False
            self._start = None  # a later relist (after OUT_OF_RANGE) is of the changes
            self.revision = listed_at
            self._backoff = self._new_backoff()
        return events
