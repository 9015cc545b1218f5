"""The gRPC face of the server: conveyor.v1.TaskService on top of the scheduler, store and hub.

Each RPC validates its request (nothing changes for a bad one), calls the layer below,
and turns the known failures into canonical status codes with google.rpc details.
Answers are put together from tasks encoded once (convert.py) and sent as bytes; rpc.py
builds the method handlers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import message

from conveyor.v1 import task_service_pb2 as pb
from conveyord import operations, validation
from conveyord.auth import Permission, current_tenant, require_types
from conveyord.convert import (
    change_message,
    encode_task,
    list_message,
    pause_message,
    task_message,
    task_with_attempts,
    tasks_message,
    watch_message,
)
from conveyord.hub import EventHub, WatcherTooSlow
from conveyord.limits import MAX_PAGE_BYTES, RECEIVE_LIMITS
from conveyord.model import Change, ChangeKind, Task, TaskFilter, TaskInput
from conveyord.rpc import stream_method, unary_method
from conveyord.scheduler import Scheduler
from conveyord.store.base import TaskNotFound
from conveyord.tracing import create_trace
from conveyord.validation import WatchQuery
from conveyord.worker.remote import WorkerSessions

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TaskService"].full_name
Request = TypeVar("Request", bound=message.Message)


class TaskServiceApi:
    """The RPCs of conveyor.v1.TaskService."""

    def __init__(
        self, scheduler: Scheduler, hub: EventHub, sessions: WorkerSessions | None = None
    ) -> None:
        self.scheduler = scheduler
        self.store = scheduler.store
        self.hub = hub
        self.sessions = sessions  # the remote workers, for ListTaskTypes

    async def create(self, request: pb.CreateRequest) -> bytes:
        """A CreateResponse."""
        now = self.scheduler.clock()
        require_types(Permission.SUBMIT, (request.task.task_type,))
        scheduler = self.scheduler
        new = validation.create_request(
            request, scheduler.task_types, scheduler.config.default_timeout, now,
            scheduler.default_attempts,
        )  # fmt: skip
        made = new.to_task(new_task_id(), now, current_tenant(), create_trace.get())
        ((task, _),) = await self.scheduler.create([made])
        return task_message(task)

    async def batch_create(self, request: pb.BatchCreateRequest) -> bytes:
        """A BatchCreateResponse."""
        now = self.scheduler.clock()
        require_types(Permission.SUBMIT, {one.task.task_type for one in request.requests})
        scheduler = self.scheduler
        batch = validation.batch_create_request(
            request, scheduler.task_types, scheduler.config.default_timeout, now,
            scheduler.default_attempts,
        )  # fmt: skip
        tenant, trace = current_tenant(), create_trace.get()
        ids = new_task_ids(len(batch))
        tasks = [new.to_task(id_, now, tenant, trace) for new, id_ in zip(batch, ids, strict=True)]
        created = await self.scheduler.create(tasks)
        return tasks_message(task for task, _ in created)

    async def get(self, request: pb.GetRequest) -> bytes:
        """A GetResponse; with the task's history of attempts if asked."""
        task = await self._own(validation.task_id(request.task_id))
        if not request.include_attempts:
            return task_message(task)
        return task_with_attempts(task, await self.store.attempts(task.task_id))

    async def list(self, request: pb.ListRequest) -> bytes:
        """A ListResponse."""
        query = validation.list_request(request)
        scope = _scoped(query.filter)
        tasks, revision = await self.store.list(
            scope, query.after_seq, query.page_size, newest_first=query.newest_first
        )
        page = _fitting(tasks)
        more = len(page) < len(tasks) or len(tasks) == query.page_size
        token = query.next_token(page[-1].seq) if more else ""
        return list_message(page, token, revision)

    async def cancel(self, request: pb.CancelRequest) -> bytes:
        """A CancelResponse."""
        task_id, reason = validation.task_and_reason(request)
        await self._own(task_id)
        task = await self.scheduler.cancel(task_id, reason)
        return task_message(task)

    async def pause(self, request: pb.PauseRequest) -> bytes:
        """A PauseResponse."""
        task_id, reason = validation.task_and_reason(request)
        await self._own(task_id)
        task, paused = await self.scheduler.pause(task_id, reason)
        return pause_message(task, paused)

    async def resume(self, request: pb.ResumeRequest) -> bytes:
        """A ResumeResponse."""
        task_id = validation.task_id(request.task_id)
        await self._own(task_id)
        task = await self.scheduler.resume(task_id)
        return task_message(task)

    async def send_input(self, request: pb.SendInputRequest) -> bytes:
        """A SendInputResponse."""
        query = validation.send_input_request(request)
        await self._own(query.task_id)
        sent = TaskInput(query.request_id, query.data, self.scheduler.clock(), query.size)
        task, sequence = await self.scheduler.send_input(query.task_id, sent)
        return task_message(task) + pb.SendInputResponse(sequence=sequence).SerializeToString()

    async def cancel_matching(self, request: pb.CancelMatchingRequest) -> bytes:
        """A CancelMatchingResponse."""
        task_filter, reason, dry_run = validation.cancel_matching_request(request)
        count = await self.scheduler.cancel_matching(_scoped(task_filter), reason, dry_run)
        return pb.CancelMatchingResponse(count=count).SerializeToString()

    # -- operator actions (operations.py) ------------------------------------------

    async def rerun(self, request: pb.RerunRequest) -> bytes:
        """A RerunResponse: a new task from an ended one's request, admitted as a Create."""
        task_id, request_id = validation.rerun_request(request)
        ended = await self._own(task_id)
        require_types(Permission.SUBMIT, (ended.task_type,))
        operations.require_ended(ended, "rerun")
        if ended.task_type not in self.scheduler.task_types:
            raise operations.TaskTypeUnknown(ended)
        new = operations.rerun(ended, new_task_id(), self.scheduler.clock(), request_id)
        ((task, _),) = await self.scheduler.create([new])
        return task_message(task)

    async def delete(self, request: pb.DeleteRequest) -> bytes:
        """A DeleteResponse: the task's last state and the revision of its removal."""
        task_id = validation.task_id(request.task_id)
        await self._own(task_id)
        removal = await self.store.remove(
            task_id, lambda task: operations.require_ended(task, "deleted")
        )
        revision = pb.DeleteResponse(revision=removal.revision).SerializeToString()
        return task_message(removal.task) + revision

    async def list_task_types(self, request: pb.ListTaskTypesRequest) -> bytes:
        """A ListTaskTypesResponse: the caller's known types, and who serves each."""
        tenant = current_tenant()
        kept, _ = await self.store.counts(TaskFilter(tenant=tenant))
        config = self.scheduler.config
        known = {*self.scheduler.registry.task_types, *config.worker_types}
        known.update(task_type for task_type, _ in kept)
        workers = [operations.local_worker(self.scheduler.worker)]
        if self.sessions is not None:
            workers += map(operations.remote_worker, self.sessions.connected(tenant))
        answer = operations.task_types_message(known, self.scheduler.task_types, workers)
        return answer.SerializeToString()

    async def count_tasks(self, request: pb.CountTasksRequest) -> bytes:
        """A CountTasksResponse: the caller's tasks counted by type and status."""
        task_filter = validation.count_tasks_request(request)
        counts, revision = await self.store.counts(_scoped(task_filter))
        return operations.counts_message(counts, revision).SerializeToString()

    async def _owned(self, task_id: str) -> Task | None:
        """The task, if it exists for the caller: another tenant's task does not."""
        task = await self.store.get(task_id)
        return task if task is not None and task.tenant == current_tenant() else None

    async def _own(self, task_id: str) -> Task:
        """The task, or NOT_FOUND (for another tenant's task as for one that never was)."""
        task = await self._owned(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def watch(self, request: pb.WatchRequest) -> AsyncIterator[bytes]:
        """See the Watch RPC in task_service.proto: replay or current state first, then live.

        Yields encoded WatchResponses: a live change is encoded once for all its watchers.
        """
        query = validation.watch_request(request)
        query.filter = _scoped(query.filter)
        task_id = query.filter.task_id
        with (
            self.scheduler.tenants.watching(query.filter.tenant or ""),
            self.hub.subscribe(query.filter) as subscription,
        ):
            last = self.hub.revision
            if task_id and query.since_revision is None:
                current = await self._own(task_id)
                yield watch_message(pb.WATCH_EVENT_TYPE_CURRENT, current, current.revision)
                if current.terminal:
                    return
                last = current.revision
            elif query.since_revision is not None:
                task = await self._owned(task_id) if task_id else None
                changes = await self.store.changes_since(query.since_revision, query.filter)
                if task_id and task is None and not changes:
                    raise TaskNotFound(task_id)
                last = query.since_revision
                for change in changes:
                    if change.kind is ChangeKind.RENEWED:
                        continue  # nothing a watcher sees changed
                    yield change_message(change)
                    last = change.revision
                    if _ends_watch(query, change):
                        return
                if task is not None and task.terminal:
                    return  # it ended at or before since_revision: the caller has seen the end
            while True:
                try:
                    delivery = await subscription.next(query.heartbeat)
                except WatcherTooSlow as too_slow:
                    raise WatcherTooSlow(too_slow.limit, last) from None
                if delivery is None:
                    revision = max(last, self.hub.revision)
                    yield watch_message(pb.WATCH_EVENT_TYPE_HEARTBEAT, None, revision)
                elif delivery.change.revision > last:  # not already sent from the history
                    yield delivery.encoded(change_message)
                    last = delivery.change.revision
                    if _ends_watch(query, delivery.change):
                        return


def _scoped(task_filter: TaskFilter) -> TaskFilter:
    """`task_filter`, of the caller's tenant's tasks only."""
    return dataclasses.replace(task_filter, tenant=current_tenant())


def _fitting(tasks: Sequence[Task]) -> Sequence[Task]:
    """The first tasks whose answer stays within MAX_PAGE_BYTES (always at least one): a
    page of large tasks holds fewer of them rather than exceed a client's message limit."""
    total = 0
    for index, task in enumerate(tasks):
        total += len(encode_task(task)) + 8  # its key and length prefix
        if total > MAX_PAGE_BYTES and index:
            return tasks[:index]
    return tasks


def new_task_id() -> str:
    """A random (version 4) UUID in canonical form, made without the uuid module's
    general-purpose UUID object, which costs several times more on every Create."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    digits = raw.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def new_task_ids(count: int) -> list[str]:
    """`count` new_task_id()s, from one read of the system's randomness: a BatchCreate's
    ids cost 1 µs each rather than 2."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes(byte & 0x0F | 0x40 for byte in raw[6::16])  # version 4
    raw[8::16] = bytes(byte & 0x3F | 0x80 for byte in raw[8::16])  # the RFC 4122 variant
    hexed = raw.hex()
    return [
        f"{hexed[i : i + 8]}-{hexed[i + 8 : i + 12]}-{hexed[i + 12 : i + 16]}-"
        f"{hexed[i + 16 : i + 20]}-{hexed[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


def _ends_watch(query: WatchQuery, change: Change) -> bool:
    """A watch of one task ends after the task's terminal state (or its removal)."""
    return bool(query.filter.task_id) and (
        change.kind is ChangeKind.REMOVED or change.task.terminal
    )


def method_handlers(api: TaskServiceApi) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The RPC method handlers of TaskService, by method name."""
    return {
        "Create": unary_method(api.create, pb.CreateRequest, RECEIVE_LIMITS["Create"]),
        "BatchCreate": unary_method(
            api.batch_create, pb.BatchCreateRequest, RECEIVE_LIMITS["BatchCreate"]
        ),
        "Get": unary_method(api.get, pb.GetRequest, RECEIVE_LIMITS["Get"]),
        "List": unary_method(api.list, pb.ListRequest, RECEIVE_LIMITS["List"]),
        "Cancel": unary_method(api.cancel, pb.CancelRequest, RECEIVE_LIMITS["Cancel"]),
        "Pause": unary_method(api.pause, pb.PauseRequest, RECEIVE_LIMITS["Pause"]),
        "Resume": unary_method(api.resume, pb.ResumeRequest, RECEIVE_LIMITS["Resume"]),
        "SendInput": unary_method(api.send_input, pb.SendInputRequest, RECEIVE_LIMITS["SendInput"]),
        "CancelMatching": unary_method(
            api.cancel_matching, pb.CancelMatchingRequest, RECEIVE_LIMITS["CancelMatching"]
        ),
        "Watch": stream_method(api.watch, pb.WatchRequest, RECEIVE_LIMITS["Watch"]),
        "Rerun": unary_method(api.rerun, pb.RerunRequest, RECEIVE_LIMITS["Rerun"]),
        "Delete": unary_method(api.delete, pb.DeleteRequest, RECEIVE_LIMITS["Delete"]),
        "ListTaskTypes": unary_method(
            api.list_task_types, pb.ListTaskTypesRequest, RECEIVE_LIMITS["ListTaskTypes"]
        ),
        "CountTasks": unary_method(
            api.count_tasks, pb.CountTasksRequest, RECEIVE_LIMITS["CountTasks"]
        ),
    }
