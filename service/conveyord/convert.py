"""Between the server's task records and the messages of the conveyor.v1 contract."""

from __future__ import annotations

from conveyor.protojson import dict_to_struct, seconds_to_timestamp, to_value
from conveyor.v1 import task_pb2, task_service_pb2
from conveyord.model import Change, ChangeKind, Task


def task_to_proto(task: Task) -> task_pb2.TaskResponse:
    """The task as a TaskResponse; unset optional parts stay unset."""
    message = task_pb2.TaskResponse(
        task_id=task.task_id,
        task_type=task.task_type,
        description=task.description,
        status=task_pb2.TaskStatus.ValueType(task.status),
        priority=task.priority,
        progress=task.progress,
        message=task.message,
        labels=task.labels,
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        created_at=seconds_to_timestamp(task.created_at),
        updated_at=seconds_to_timestamp(task.updated_at),
        revision=task.revision,
        timeout_seconds=task.timeout_seconds,
    )
    if task.parameters:
        message.parameters.CopyFrom(dict_to_struct(task.parameters))
    if task.progress_detail is not None:
        message.progress_detail.CopyFrom(dict_to_struct(task.progress_detail))
    if task.result is not None:
        message.result.CopyFrom(to_value(task.result))
    if task.error is not None:
        message.error.code = task.error.code
        message.error.message = task.error.message
    for field in ("next_attempt_at", "started_at", "finished_at", "cancel_requested_at"):
        seconds = getattr(task, field)
        if seconds is not None:
            getattr(message, field).CopyFrom(seconds_to_timestamp(seconds))
    return message


_EVENT_TYPES = {
    ChangeKind.CHANGED: task_service_pb2.WATCH_EVENT_TYPE_CHANGED,
    ChangeKind.REMOVED: task_service_pb2.WATCH_EVENT_TYPE_REMOVED,
}


def change_to_proto(change: Change) -> task_service_pb2.WatchResponse:
    return task_service_pb2.WatchResponse(
        type=_EVENT_TYPES[change.kind], task=task_to_proto(change.task), revision=change.revision
    )
