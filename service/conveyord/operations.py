"""Operator actions on tasks: rerun or delete one that ended, the task types known with
the workers that serve them, and counts by type and status.

The API (api.py) checks the caller and its tenant; what is decided here is what a rerun
repeats of the ended task, when a task may be rerun or deleted, and how the workers that
serve each task type are described.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Set

import grpc

from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyord.errors import ConveyorError
from conveyord.model import TERMINAL, Task, TaskStatus
from conveyord.worker.local import LocalWorker
from conveyord.worker.remote import RemoteWorker

_ENDED = ", ".join(status.name for status in sorted(TERMINAL))


class TaskNotEnded(ConveyorError):
    """A Rerun or a Delete of a task that has not ended."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "TASK_NOT_ENDED"

    def __init__(self, task: Task, action: str) -> None:
        super().__init__(
            f"task {task.task_id} is {task.status.name}: only a task that ended ({_ENDED}) "
            f"can be {action}"
        )
        self.task = task

    def metadata(self) -> dict[str, str]:
        return {"task_id": self.task.task_id, "status": self.task.status.name}


class TaskTypeUnknown(ConveyorError):
    """A Rerun of a task whose type the server no longer takes (its handler is gone)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "TASK_TYPE_UNKNOWN"

    def __init__(self, task: Task) -> None:
        super().__init__(
            f"task {task.task_id} cannot be rerun: the server no longer takes task type "
            f"{task.task_type!r}"
        )
        self.task = task

    def metadata(self) -> dict[str, str]:
        return {"task_id": self.task.task_id, "task_type": self.task.task_type}


def require_ended(task: Task, action: str) -> None:
    """Refuse (TaskNotEnded) an action on a task that has not ended."""
    if not task.terminal:
        raise TaskNotEnded(task, action)


def rerun(ended: Task, task_id: str, now: float, request_id: str) -> Task:
    """A new task from the request of `ended`: its type, description, parameters, priority,
    timeout, attempts, labels and queue timeout, queued at once on its first attempt, in
    the same tenant. Its request fingerprint is that of a rerun of `ended`, so that a
    request_id reused for anything else is refused as Create refuses it."""
    return Task(
        task_id=task_id,
        seq=0,
        task_type=ended.task_type,
        description=ended.description,
        parameters=ended.parameters,
        priority=ended.priority,
        timeout_seconds=ended.timeout_seconds,
        max_attempts=ended.max_attempts,
        labels=ended.labels,
        created_at=now,
        updated_at=now,
        tenant=ended.tenant,
        request_id=request_id,
        request_hash=hashlib.sha256(f"rerun:{ended.task_id}".encode()).digest(),
        message="queued",
        start_deadline=None if ended.queue_timeout is None else now + ended.queue_timeout,
        queue_timeout=ended.queue_timeout,
        rerun_of=ended.task_id,
    )


@dataclasses.dataclass(frozen=True)
class ServingWorker:
    """A worker as ListTaskTypes shows it: who it is, its slots, and the types it runs."""

    worker_id: str
    local: bool
    slots: int
    free_slots: int
    types: frozenset[str]
    pausable: frozenset[str]
    draining: bool = False


def local_worker(worker: LocalWorker) -> ServingWorker:
    """The server's own handlers, as a worker."""
    return ServingWorker(
        worker.holder, True, worker.slots, worker.free_slots, worker.types or frozenset(),
        worker.pausable,
    )  # fmt: skip


def remote_worker(worker: RemoteWorker) -> ServingWorker:
    """A connected remote worker."""
    return ServingWorker(
        worker.worker_id, False, worker.slots, worker.free_slots, worker.types or frozenset(),
        worker.pausable, worker.draining,
    )  # fmt: skip


def task_types_message(
    known: Iterable[str], accepted: Set[str], workers: Iterable[ServingWorker]
) -> pb.ListTaskTypesResponse:
    """Every known type (and each type a worker runs), by name, each with its workers: the
    local one first, then the others by id."""
    ordered = sorted(workers, key=lambda worker: (not worker.local, worker.worker_id))
    names = set(known).union(*(worker.types for worker in ordered))
    answer = pb.ListTaskTypesResponse()
    for name in sorted(names):
        entry = answer.task_types.add(task_type=name, accepted=name in accepted)
        for worker in ordered:
            if name in worker.types:
                entry.workers.add(
                    worker_id=worker.worker_id,
                    local=worker.local,
                    slots=worker.slots,
                    free_slots=max(0, worker.free_slots),
                    pausable=name in worker.pausable,
                    draining=worker.draining,
                )
    return answer


def counts_message(
    counts: dict[tuple[str, TaskStatus], int], revision: int
) -> pb.CountTasksResponse:
    """The counts by task type, then status, with their total and revision."""
    answer = pb.CountTasksResponse(total=sum(counts.values()), revision=revision)
    for (task_type, status), count in sorted(counts.items()):
        answer.counts.add(
            task_type=task_type, status=task_pb2.TaskStatus.ValueType(status), count=count
        )
    return answer
