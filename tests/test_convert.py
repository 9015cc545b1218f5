"""Answers put together from encoded tasks are exactly what protobuf would have serialized."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from conveyor.protojson import dict_to_struct, seconds_to_timestamp
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1 import worker_service_pb2 as wpb
from conveyord.convert import (
    _varint,
    assignment,
    assignment_message,
    assignments_message,
    change_message,
    encode_task,
    list_message,
    task_message,
    task_to_proto,
    task_with_attempts,
    tasks_message,
    watch_message,
)
from conveyord.lifecycle import checkpoint_of
from conveyord.model import Attempt, AttemptOutcome, Change, ChangeKind, Task, TaskError, TaskStatus
from tests.test_store import new_task

FAILURE = TaskError(
    "HANDLER_ERROR", "KeyError: 'k'", "KeyError", "Traceback ...\nKeyError: 'k'\n", True
)
TASKS = [
    new_task(),
    new_task(
        parameters={"deep": {"list": [1, "two", None]}},
        labels={"a": "b"},
        revision=2**40,
        status=TaskStatus.FAILED,
        error=TaskError("HANDLER_ERROR", "boom"),
        started_at=2.5,
        finished_at=3.25,
        progress=0.5,
        progress_detail={"step": 3},
        attempt=2,
        max_attempts=3,
        description="x" * 300,
    ),
    new_task(status=TaskStatus.COMPLETED, result=[1, {"a": True}], revision=127),
    new_task(
        status=TaskStatus.CREATED,
        attempt=2,
        error=FAILURE,
        last_attempt_error=FAILURE,
        checkpoint={"cursor": "c-9"},  # one key: a map's order is not fixed
    ),
]


@pytest.mark.parametrize("task", TASKS)
def test_a_task_answer_is_the_serialized_response(task: Task) -> None:
    proto = task_to_proto(task)
    assert task_message(task) == pb.GetResponse(task=proto).SerializeToString()
    assert task_message(task) == pb.CreateResponse(task=proto).SerializeToString()


def test_a_batch_answer_is_the_serialized_response() -> None:
    expected = pb.BatchCreateResponse(tasks=[task_to_proto(t) for t in TASKS])
    assert tasks_message(TASKS) == expected.SerializeToString()


@pytest.mark.parametrize(("token", "revision"), [("", 0), ("eyJhZnRlciI6IDN9", 300), ("t", 1)])
def test_a_list_page_is_the_serialized_response(token: str, revision: int) -> None:
    expected = pb.ListResponse(
        tasks=[task_to_proto(t) for t in TASKS], next_page_token=token, revision=revision
    )
    assert list_message(TASKS, token, revision) == expected.SerializeToString()


def test_watch_responses_are_the_serialized_responses() -> None:
    task = TASKS[1]
    change = Change(2**40, ChangeKind.CHANGED, task, 0.0)
    removed = Change(2**40 + 1, ChangeKind.REMOVED, task, 0.0)
    for message, expected in [
        (
            change_message(change),
            pb.WatchResponse(
                type=pb.WatchEventType.ValueType(2), task=task_to_proto(task), revision=2**40
            ),
        ),
        (
            change_message(removed),
            pb.WatchResponse(
                type=pb.WatchEventType.ValueType(3), task=task_to_proto(task), revision=2**40 + 1
            ),
        ),
        (
            watch_message(pb.WATCH_EVENT_TYPE_HEARTBEAT, None, 5),
            pb.WatchResponse(type=pb.WatchEventType.ValueType(4), revision=5),
        ),
    ]:
        assert message == expected.SerializeToString()


def test_a_task_state_is_encoded_once_and_a_new_state_anew() -> None:
    task = new_task()
    first = encode_task(task)
    assert encode_task(task) is first
    changed = task.evolve(progress=0.5)
    assert changed.wire is None
    assert pb.GetResponse.FromString(task_message(changed)).task.progress == 0.5


@pytest.mark.parametrize("value", [1, 127, 128, 300, 2**31, 2**63 - 1])
def test_varints_are_protobufs(value: int) -> None:
    revision_key = b"\x18"  # field 3, varint
    assert revision_key + _varint(value) == pb.ListResponse(revision=value).SerializeToString()


@pytest.mark.parametrize("deadline", [0.0, 1.5, 1_700_000_000.123456789])
def test_assignments_are_the_serialized_response(deadline: float) -> None:
    tasks = [task.evolve(lease_id="ab" * 16) for task in TASKS]
    expected = wpb.ConnectResponse(
        assignments=wpb.Assignments(
            assignments=[
                wpb.Assignment(
                    task=task_to_proto(task),
                    lease_id=task.lease_id,
                    deadline=seconds_to_timestamp(deadline),
                    lease_expires_at=seconds_to_timestamp(deadline + 15),
                    checkpoint=_checkpoint(task),
                )
                for task in tasks
            ]
        )
    )
    encoded = [assignment(task, deadline, deadline + 15) for task in tasks]
    assert assignments_message(encoded) == expected.SerializeToString()


def test_an_assignment_alone_is_the_serialized_response() -> None:
    task = TASKS[1].evolve(lease_id="cd" * 16)
    expected = wpb.ConnectResponse(
        assignment=wpb.Assignment(
            task=task_to_proto(task),
            lease_id=task.lease_id,
            deadline=seconds_to_timestamp(10.5),
            lease_expires_at=seconds_to_timestamp(25.0),
            checkpoint=_checkpoint(task),
        )
    )
    assert assignment_message(assignment(task, 10.5, 25.0)) == expected.SerializeToString()


def _attempt_proto(attempt: Attempt) -> task_pb2.TaskAttempt:
    message = task_pb2.TaskAttempt(
        number=attempt.number,
        started_at=seconds_to_timestamp(attempt.started_at),
        ended_at=seconds_to_timestamp(attempt.ended_at),
        worker=attempt.holder,
        outcome=task_pb2.AttemptOutcome.ValueType(attempt.outcome),
    )
    if attempt.error is not None:
        error = attempt.error
        message.error.CopyFrom(
            task_pb2.TaskError(
                code=error.code,
                message=error.message,
                error_type=error.error_type,
                traceback=error.traceback,
                non_retryable=error.non_retryable,
            )
        )
    return message


def _checkpoint(task: Task) -> struct_pb2.Struct | None:
    """The Assignment's checkpoint of a task: what it resumes from, or unset."""
    checkpoint = checkpoint_of(task)
    return None if checkpoint is None else dict_to_struct(checkpoint)


def test_a_task_with_its_attempts_is_the_serialized_response() -> None:
    task = TASKS[-1]
    attempts = [
        Attempt(1, 10.25, 12.5, "conveyord/local", AttemptOutcome.FAILED, FAILURE),
        Attempt(2, 13.0, 14.0, "t#w-1", AttemptOutcome.COMPLETED),
    ]
    proto = task_to_proto(task)
    proto.attempts.extend(_attempt_proto(attempt) for attempt in attempts)
    assert task_with_attempts(task, attempts) == pb.GetResponse(task=proto).SerializeToString()
    assert proto.error.error_type == "KeyError" and proto.checkpoint["cursor"] == "c-9"
