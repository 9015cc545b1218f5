"""What both clients send: requests built from plain Python arguments, and checks on those."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from conveyor.protojson import dict_to_struct
from conveyor.tasks import TaskStatus
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "CONVEYOR_SERVER"
DEFAULT_TIMEOUT = 30.0
DEFAULT_HEARTBEAT = 10.0
MIN_HEARTBEAT, MAX_HEARTBEAT = 0.1, 3600.0  # what the server accepts
RELIST_PAGE_SIZE = 1000  # the largest page the server gives
MAX_BATCH = 1000  # the most tasks one BatchCreate takes
# Keep quiet connections alive through proxies, at the pace the server accepts (see README).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# The options of each client's own channel (scripts/unasync.py turns ASYNC_X into X).
ASYNC_CHANNEL_OPTIONS = KEEPALIVE_OPTIONS
# grpc.experimental.ChannelOptions.SingleThreadedUnaryStream: streams are driven by the
# thread that reads them rather than by a thread of grpc's own, which fails (a TypeError)
# when the channel is closed while it still finishes a stream (a watch left early, Ctrl-C).
CHANNEL_OPTIONS = [("SingleThreadedUnaryStream", 1), *KEEPALIVE_OPTIONS]
CREATE_KEYS = frozenset(
    {"task_type", "parameters", "priority", "timeout_seconds", "max_attempts", "labels"}
    | {"description", "request_id", "start_at", "start_after_seconds", "queue_timeout_seconds"}
)

# The store's revision comes with every List page; one task is the least a page can hold.
REVISION_REQUEST = pb.ListRequest(page_size=1)


TOKEN_ENV = "CONVEYOR_TOKEN"


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries a bearer token (the one given, else $CONVEYOR_TOKEN)."""
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    return (("authorization", f"Bearer {token}"),) if token else ()


def target(given: str | None) -> str:
    """The server to talk to: the one given, else $CONVEYOR_SERVER, else the default."""
    return given or os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def check_timeout(timeout: float | None) -> None:
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout}")


def check_heartbeat(seconds: float) -> None:
    if not MIN_HEARTBEAT <= seconds <= MAX_HEARTBEAT:
        raise ValueError(
            f"heartbeat_interval must be {MIN_HEARTBEAT} to {MAX_HEARTBEAT} seconds, not {seconds}"
        )


def create_request(
    task_type: str,
    parameters: Mapping[str, Any] | None,
    *,
    priority: int | None,
    timeout_seconds: float | None,
    max_attempts: int | None,
    labels: Mapping[str, str] | None,
    description: str,
    request_id: str | None,
    start_at: datetime | None = None,
    start_after_seconds: float | None = None,
    queue_timeout_seconds: float | None = None,
) -> pb.CreateRequest:
    """The CreateRequest; a request_id is made up when none is given, so that a retry is safe."""
    if start_at is not None and start_after_seconds is not None:
        raise ValueError("give start_at or start_after_seconds, not both")
    task = task_pb2.TaskRequest(
        task_type=task_type,
        description=description,
        priority=priority,
        timeout_seconds=timeout_seconds,
        max_attempts=max_attempts,
        labels=labels,
        queue_timeout_seconds=queue_timeout_seconds,
    )
    if start_at is not None:
        if start_at.tzinfo is None:
            raise ValueError("start_at must be an aware datetime (with a time zone)")
        task.start_at.FromDatetime(start_at)
    elif start_after_seconds is not None:
        task.start_after_seconds = start_after_seconds
    if parameters:
        try:
            task.parameters.CopyFrom(dict_to_struct(parameters))
        except (ValueError, TypeError, AttributeError) as error:
            raise TypeError(f"parameters must be a dict of JSON values: {error}") from error
    return pb.CreateRequest(
        task=task, request_id=str(uuid.uuid4()) if request_id is None else request_id
    )


def send_input_request(
    task_id: str, data: Mapping[str, Any], request_id: str | None
) -> pb.SendInputRequest:
    """The SendInputRequest; a request_id is made up when none is given, so that a retry
    is safe."""
    try:
        encoded = dict_to_struct(data)
    except (ValueError, TypeError, AttributeError) as error:
        raise TypeError(f"an input must be a dict of JSON values: {error}") from error
    return pb.SendInputRequest(
        task_id=task_id,
        input=encoded,
        request_id=str(uuid.uuid4()) if request_id is None else request_id,
    )


def batch_requests(tasks: Iterable[Mapping[str, Any]]) -> list[pb.BatchCreateRequest]:
    """BatchCreateRequests of at most MAX_BATCH tasks each, from mappings of `create`'s
    arguments (`task_type` required); each task gets a request_id unless it has one."""
    requests = [_create_request_of(index, spec) for index, spec in enumerate(tasks)]
    return [
        pb.BatchCreateRequest(requests=requests[start : start + MAX_BATCH])
        for start in range(0, len(requests), MAX_BATCH)
    ]


def _create_request_of(index: int, spec: Mapping[str, Any]) -> pb.CreateRequest:
    unknown = set(spec) - CREATE_KEYS
    if unknown or "task_type" not in spec:
        problem = f"unknown keys {sorted(unknown)}" if unknown else "no task_type"
        raise TypeError(f"task {index}: {problem}; the keys are those of create()")
    return create_request(
        spec["task_type"],
        spec.get("parameters"),
        priority=spec.get("priority"),
        timeout_seconds=spec.get("timeout_seconds"),
        max_attempts=spec.get("max_attempts"),
        labels=spec.get("labels"),
        description=spec.get("description", ""),
        request_id=spec.get("request_id"),
        start_at=_time(index, spec.get("start_at")),
        start_after_seconds=spec.get("start_after_seconds"),
        queue_timeout_seconds=spec.get("queue_timeout_seconds"),
    )


def _time(index: int, value: Any) -> datetime | None:
    """A start_at as given: a datetime, or an ISO 8601 string (from a JSON line)."""
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise TypeError(f"task {index}: start_at {value!r} is not an ISO 8601 time") from None


def task_filter(
    statuses: Iterable[TaskStatus] | None,
    task_type: str | None,
    labels: Mapping[str, str] | None,
    task_id_prefix: str | None = None,
) -> task_pb2.TaskFilter:
    return task_pb2.TaskFilter(
        statuses=[task_pb2.TaskStatus.ValueType(TaskStatus(s)) for s in statuses or ()],
        task_type=task_type or "",
        labels=labels,
        task_id_prefix=task_id_prefix or "",
    )


def cancel_matching_request(
    task_type: str | None,
    labels: Mapping[str, str] | None,
    task_id_prefix: str | None,
    statuses: Iterable[TaskStatus] | None,
    reason: str,
    dry_run: bool,
) -> pb.CancelMatchingRequest:
    if not (labels or task_type or task_id_prefix):
        raise ValueError(
            "cancel_matching needs labels, task_type or task_id_prefix: it would cancel everything"
        )
    return pb.CancelMatchingRequest(
        filter=task_filter(statuses, task_type, labels, task_id_prefix),
        reason=reason,
        dry_run=dry_run,
    )


def list_request(
    task_filter: task_pb2.TaskFilter, page_size: int | None, newest_first: bool
) -> pb.ListRequest:
    return pb.ListRequest(filter=task_filter, page_size=page_size or 0, newest_first=newest_first)


def start_statuses(
    statuses: Iterable[TaskStatus] | None,
    start_with: Iterable[TaskStatus] | None,
    since_revision: int | None,
) -> list[TaskStatus] | None:
    """The statuses of the tasks a `watch_all` starts with: those of `start_with` that the
    watch's `statuses` let through; None for none (then it starts at a revision)."""
    if start_with is None:
        return None
    if since_revision is not None:
        raise ValueError("give start_with or since_revision, not both")
    wanted = set(start_with)
    if statuses is not None:
        wanted &= set(statuses)
    return sorted(wanted) or None


def rerun_request(task_id: str, request_id: str | None) -> pb.RerunRequest:
    """The RerunRequest; a request_id is made up when none is given, so that a retry is safe."""
    return pb.RerunRequest(
        task_id=task_id, request_id=str(uuid.uuid4()) if request_id is None else request_id
    )
