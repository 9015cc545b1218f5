"""Every ConveyorError answers with its own status code, ErrorInfo reason and metadata;
anything else is no known failure (the RPC fails with UNKNOWN, logged)."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from conveyord.auth import Permission, PermissionDenied, Unauthenticated
from conveyord.errors import ERROR_DOMAIN, ConveyorError, ShuttingDown
from conveyord.handlers import HandlerLoadError
from conveyord.hub import HubClosed, WatcherTooSlow
from conveyord.lifecycle import InputLimits, InputsFull, StaleLease
from conveyord.model import Task, TaskStatus
from conveyord.operations import TaskNotEnded, TaskTypeUnknown
from conveyord.rpc import MalformedRequest, RequestTooLarge, status_of
from conveyord.scheduler import QueueFull, TaskAlreadyEnded
from conveyord.store.base import (
    RequestIdReused,
    RevisionOutOfRange,
    StoreError,
    StoreFailed,
    TaskNotFound,
)
from conveyord.store.schedules import ScheduleNotFound
from conveyord.store.sqlite import StoreLocked, StoreOpenError
from conveyord.tenants import TenantLimitReached
from conveyord.validation import InvalidArgument
from conveyord.worker.remote import WorkerNotConnected, WorkerReplaced

# Bases that are never raised themselves, so need no code of their own.
ABSTRACT: set[type[ConveyorError]] = {StoreError}

ENDED = Task(
    task_id="0f0e0d0c-0b0a-4908-8706-050403020100", seq=1, task_type="echo", description="",
    parameters={}, priority=5, timeout_seconds=10.0, max_attempts=1, labels={},
    created_at=1.0, updated_at=2.0, status=TaskStatus.COMPLETED,
)  # fmt: skip

# An instance of every error, with the ErrorInfo metadata its status carries
# (None: no ErrorInfo at all).
EXAMPLES: list[tuple[ConveyorError, dict[str, str] | None]] = [
    (InvalidArgument([("task.priority", "must be between 1 and 10")]), None),
    (MalformedRequest("conveyor.v1.GetRequest"), None),
    (RequestTooLarge("conveyor.v1.CreateRequest", 2000, 1000), {"limit_bytes": "1000"}),
    (TaskNotFound("t1"), {"task_id": "t1"}),
    (RequestIdReused("r1", "t1"), {"request_id": "r1", "task_id": "t1"}),
    (TaskAlreadyEnded(ENDED), {"status": "COMPLETED"}),
    (QueueFull(3, 10), {}),
    (RevisionOutOfRange(3, 10, 20), {"oldest": "10", "latest": "20"}),
    (WatcherTooSlow(100, 42), {"resume_revision": "42"}),
    (ShuttingDown(), {}),
    (HubClosed(), {}),
    (StoreFailed("writing to the store failed: disk I/O error"), {}),
    (StaleLease(ENDED, "l1"), {"task_id": ENDED.task_id, "lease_id": "l1"}),
    (InputsFull(ENDED, InputLimits(count=10, total_bytes=100)), {"task_id": ENDED.task_id}),
    (WorkerReplaced("w-1"), {"worker_id": "w-1"}),
    (WorkerNotConnected("w-1"), {"worker_id": "w-1"}),
    (ScheduleNotFound("s-1"), {"schedule_id": "s-1"}),
    (Unauthenticated("no token"), {}),
    (PermissionDenied("may not", Permission.CONTROL), {"permission": "control"}),
    (TenantLimitReached("at most 5 a second", "rate", 0.2), {"limit": "rate"}),
    (
        TaskNotEnded(dataclasses.replace(ENDED, status=TaskStatus.RUNNING), "deleted"),
        {"task_id": ENDED.task_id, "status": "RUNNING"},
    ),
    (TaskTypeUnknown(ENDED), {"task_id": ENDED.task_id, "task_type": "echo"}),
]


def _subclasses(cls: type[ConveyorError]) -> set[type[ConveyorError]]:
    found: set[type[ConveyorError]] = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


ERROR_CLASSES = sorted(_subclasses(ConveyorError) - ABSTRACT, key=lambda cls: cls.__name__)


def _status_proto(status: grpc.Status) -> status_pb2.Status:
    (encoded,) = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    return status_pb2.Status.FromString(encoded)


def _unpacked(status: status_pb2.Status, kind: Any) -> list[Any]:
    found = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            item = kind()
            detail.Unpack(item)
            found.append(item)
    return found


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_class_has_a_code_and_a_reason(cls: type[ConveyorError]) -> None:
    assert isinstance(getattr(cls, "code", None), grpc.StatusCode), f"{cls} sets no code"
    assert cls.code is not grpc.StatusCode.OK
    assert isinstance(getattr(cls, "reason", None), str), f"{cls} sets no reason"
    assert cls.reason == cls.reason.upper(), "a reason is UPPER_SNAKE_CASE"
    assert cls in {type(error) for error, _ in EXAMPLES}, f"add an example of {cls} here"


@pytest.mark.parametrize(
    ("error", "metadata"), EXAMPLES, ids=[type(error).__name__ for error, _ in EXAMPLES]
)
def test_an_error_maps_to_its_code_reason_and_message(
    error: ConveyorError, metadata: dict[str, str] | None
) -> None:
    status = status_of(error)
    assert status is not None
    assert status.code is type(error).code
    assert status.details == str(error)
    proto = _status_proto(status)
    assert proto.code == type(error).code.value[0]
    assert proto.message == str(error)
    infos = _unpacked(proto, error_details_pb2.ErrorInfo)
    if metadata is None:
        assert infos == []
    else:
        (info,) = infos
        assert info.reason == type(error).reason
        assert info.domain == ERROR_DOMAIN
        assert dict(info.metadata) == metadata


def test_the_details_besides_error_info() -> None:
    invalid = _status_proto(_known(InvalidArgument([("f", "is bad")])))
    (bad,) = _unpacked(invalid, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [("f", "is bad")]
    (retry,) = _unpacked(_status_proto(_known(QueueFull(1, 1))), error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 1
    assert not _status_proto(_known(MalformedRequest("conveyor.v1.GetRequest"))).details


def test_a_closed_hub_answers_as_a_shutdown() -> None:
    closed, shutdown = _known(HubClosed()), _known(ShuttingDown())
    assert (closed.code, closed.details) == (shutdown.code, shutdown.details)
    assert closed.code is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "error",
    [
        ValueError("boom"),
        RuntimeError(),
        KeyError("task_id"),
        # Failures at start, which set conveyord's exit code, are not RPC errors.
        StoreOpenError("cannot open store file"),
        StoreLocked("locked"),
        HandlerLoadError("cannot import handler module"),
    ],
    ids=repr,
)
def test_an_unexpected_exception_maps_to_none(error: Exception) -> None:
    assert status_of(error) is None


def _known(error: ConveyorError) -> grpc.Status:
    status = status_of(error)
    assert status is not None
    return status
