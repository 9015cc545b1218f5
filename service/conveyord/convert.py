"""Between the server's task records and the messages of the conveyor.v1 contract."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import timestamp_pb2

from conveyor.protojson import dict_to_struct, to_value
from conveyor.v1 import task_pb2, task_service_pb2
from conveyord.lifecycle import checkpoint_of
from conveyord.model import Attempt, Change, ChangeKind, Task, TaskError, TaskInput


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
    if task.start_deadline is not None:
        _stamp(message.start_deadline, task.start_deadline)
    if task.paused_at is not None:
        _stamp(message.paused_at, task.paused_at)
    if task.pause_reason:
        message.pause_reason = task.pause_reason
    if task.pause_requested_at is not None:
        _stamp(message.pause_requested_at, task.pause_requested_at)
    if task.inputs:
        message.input_count = len(task.inputs)
    if task.input_prompt or task.input_label:
        message.input_prompt, message.input_label = task.input_prompt, task.input_label
    if task.input_deadline is not None:
        _stamp(message.input_deadline, task.input_deadline)
    if task.parameters:
        message.parameters.update(task.parameters)
    if task.progress_detail is not None:
        message.progress_detail.update(task.progress_detail)
    if task.result is not None:
        message.result.CopyFrom(to_value(task.result))
    if task.error is not None:
        _error(message.error, task.error)
    if task.last_attempt_error is not None:
        _error(message.last_attempt_error, task.last_attempt_error)
    if task.rerun_of:
        message.rerun_of = task.rerun_of
    if task.checkpoint is not None:
        message.checkpoint.update(task.checkpoint)
    return message


def _error(message: task_pb2.TaskError, error: TaskError) -> None:
    message.code, message.message = error.code, error.message
    if error.error_type:
        message.error_type = error.error_type
    if error.traceback:
        message.traceback = error.traceback
    if error.non_retryable:
        message.non_retryable = True


def attempt_to_proto(attempt: Attempt) -> task_pb2.TaskAttempt:
    """An ended attempt as the contract's TaskAttempt."""
    message = task_pb2.TaskAttempt(
        number=attempt.number,
        worker=attempt.holder,
        outcome=task_pb2.AttemptOutcome.ValueType(attempt.outcome),
    )
    _stamp(message.started_at, attempt.started_at)
    _stamp(message.ended_at, attempt.ended_at)
    if attempt.error is not None:
        _error(message.error, attempt.error)
    return message


def task_with_attempts(task: Task, attempts: Iterable[Attempt]) -> bytes:
    """A GetResponse whose task carries its history of attempts: the task's shared encoding,
    with the attempts (its repeated field 33) after it (a message's encoding may go on with
    more fields, which merge into it)."""
    history = b"".join(
        _length_delimited(33, attempt_to_proto(attempt).SerializeToString()) for attempt in attempts
    )
    return _length_delimited(1, encode_task(task) + history)


def _stamp(timestamp: timestamp_pb2.Timestamp, seconds: float) -> None:
    timestamp.seconds, timestamp.nanos = divmod(round(seconds * 1e9), 1_000_000_000)


def encode_task(task: Task) -> bytes:
    """The task's TaskResponse, serialized: made once per state and kept with it, so that
    every reader of a state (answers, List pages, watchers) shares one encoding."""
    if task.wire is None:
        task.wire = task_to_proto(task).SerializeToString()
    return task.wire


# The responses are put together from encoded tasks rather than built as messages and
# serialized: a protobuf message is a run of fields, each a key (field number and wire
# type) and a value, and a sub-message is its encoding prefixed with its length.


def task_message(task: Task) -> bytes:
    """A response whose field 1 is the task: Create-, Get- and CancelResponse."""
    return _length_delimited(1, encode_task(task))


def pause_message(task: Task, paused: bool) -> bytes:
    """A PauseResponse: task (1), paused (2)."""
    return task_message(task) + _varint_field(2, int(paused))


def tasks_message(tasks: Iterable[Task]) -> bytes:
    """A response whose repeated field 1 is the tasks: BatchCreateResponse."""
    return b"".join(_length_delimited(1, encode_task(task)) for task in tasks)


def list_message(tasks: Iterable[Task], next_page_token: str, revision: int) -> bytes:
    """A ListResponse: tasks (1), next_page_token (2), revision (3)."""
    token = _length_delimited(2, next_page_token.encode()) if next_page_token else b""
    return tasks_message(tasks) + token + _varint_field(3, revision)


def watch_message(kind: int, task: Task | None, revision: int) -> bytes:
    """A WatchResponse: type (1), task (2), revision (3)."""
    encoded = _length_delimited(2, encode_task(task)) if task is not None else b""
    return _varint_field(1, kind) + encoded + _varint_field(3, revision)


def change_message(change: Change) -> bytes:
    """The WatchResponse that reports a change."""
    return watch_message(_EVENT_TYPES[change.kind], change.task, change.revision)


def assignment(task: Task, deadline: float, lease_expires_at: float) -> bytes:
    """A worker's Assignment of the task's attempt: task (1), lease_id (2), deadline (3),
    lease_expires_at (4), inputs (5), checkpoint (6), traceparent (10). The task's encoding
    is the one its watchers share."""
    encoded = (
        _length_delimited(1, encode_task(task))
        + _length_delimited(2, task.lease_id.encode())
        + _length_delimited(3, _timestamp(deadline))
        + _length_delimited(4, _timestamp(lease_expires_at))
        + b"".join(
            _length_delimited(5, input_to_proto(sent, number).SerializeToString())
            for number, sent in enumerate(task.inputs, 1)
        )
    )
    checkpoint = checkpoint_of(task)
    if checkpoint is not None:
        encoded += _length_delimited(6, dict_to_struct(checkpoint).SerializeToString())
    if task.trace_parent:
        encoded += _length_delimited(10, task.trace_parent.encode())
    return encoded


def input_to_proto(sent: TaskInput, sequence: int) -> task_pb2.TaskInput:
    """An input as the contract's TaskInput, with its place among the task's inputs."""
    message = task_pb2.TaskInput(sequence=sequence, request_id=sent.request_id)
    message.data.update(sent.data)
    _stamp(message.received_at, sent.received_at)
    return message


def assignment_message(encoded: bytes) -> bytes:
    """A ConnectResponse whose `assignment` (2) is one encoded Assignment."""
    return _length_delimited(2, encoded)


def assignments_message(assignments: Iterable[bytes]) -> bytes:
    """A ConnectResponse whose `assignments` (5) holds encoded Assignments (each in the
    repeated field 1 of Assignments)."""
    return _length_delimited(5, b"".join(_length_delimited(1, one) for one in assignments))


def _timestamp(seconds: float) -> bytes:
    """A google.protobuf.Timestamp: seconds (1), nanos (2)."""
    whole, nanos = divmod(round(seconds * 1e9), 1_000_000_000)
    return _varint_field(1, whole) + _varint_field(2, nanos)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""  # zero is left out


def _varint(value: int) -> bytes:
    """A non-negative integer in protobuf's base-128 varint encoding."""
    if value < 0x80:
        return _SMALL[value]
    encoded = bytearray()
    while value >= 0x80:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


_SMALL = [bytes([value]) for value in range(0x80)]

_EVENT_TYPES = {
    ChangeKind.CHANGED: task_service_pb2.WATCH_EVENT_TYPE_CHANGED,
    ChangeKind.REMOVED: task_service_pb2.WATCH_EVENT_TYPE_REMOVED,
}
