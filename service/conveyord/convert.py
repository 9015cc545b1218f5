"""Between the server's task records and the messages of the conveyor.v1 contract."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from conveyor.protojson import to_value
from conveyor.v1 import task_pb2, task_service_pb2
from conveyord.model import Change, ChangeKind, Task


def task_to_proto(task: Task) -> task_pb2.TaskResponse:
    """The task as a TaskResponse; unset optional parts stay unset.

    This runs for every answer and every change a watcher gets, so it sets fields in
    place rather than building and copying sub-messages.
    """
    message = task_pb2.TaskResponse(
        task_id=task.task_id,
        task_type=task.task_type,
        description=task.description,
        status=task_pb2.TaskStatus.ValueType(task.status),
        priority=task.priority,
        progress=task.progress,
        message=task.message,
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        revision=task.revision,
        timeout_seconds=task.timeout_seconds,
    )
    if task.labels:
        message.labels.update(task.labels)
    _stamp(message.created_at, task.created_at)
    _stamp(message.updated_at, task.updated_at)
    if task.started_at is not None:
        _stamp(message.started_at, task.started_at)
    if task.finished_at is not None:
        _stamp(message.finished_at, task.finished_at)
    if task.next_attempt_at is not None:
        _stamp(message.next_attempt_at, task.next_attempt_at)
    if task.cancel_requested_at is not None:
        _stamp(message.cancel_requested_at, task.cancel_requested_at)
    if task.parameters:
        message.parameters.update(task.parameters)
    if task.progress_detail is not None:
        message.progress_detail.update(task.progress_detail)
    if task.result is not None:
        message.result.CopyFrom(to_value(task.result))
    if task.error is not None:
        message.error.code = task.error.code
        message.error.message = task.error.message
    return message


def _stamp(timestamp: timestamp_pb2.Timestamp, seconds: float) -> None:
    timestamp.seconds, timestamp.nanos = divmod(round(seconds * 1e9), 1_000_000_000)


_EVENT_TYPES = {
    ChangeKind.CHANGED: task_service_pb2.WATCH_EVENT_TYPE_CHANGED,
    ChangeKind.REMOVED: task_service_pb2.WATCH_EVENT_TYPE_REMOVED,
}


def change_to_proto(change: Change) -> task_service_pb2.WatchResponse:
    return task_service_pb2.WatchResponse(
        type=_EVENT_TYPES[change.kind], task=task_to_proto(change.task), revision=change.revision
    )
