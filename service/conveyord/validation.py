"""Checks of every request field, before anything changes.

Each check names the field it refuses, so that the caller gets a google.rpc.BadRequest
listing every bad field at once.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import re
import types
import uuid
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from conveyor.protojson import struct_to_dict
from conveyor.v1 import task_pb2, task_service_pb2
from conveyord.errors import ConveyorError
from conveyord.limits import (
    MAX_INPUT_BYTES,
    MAX_JSON_DEPTH,
    MAX_PARAMETERS_BYTES,
    MAX_WAIT_SECONDS,
)
from conveyord.model import UNFINISHED, Task, TaskFilter, TaskStatus

DEFAULT_PRIORITY = 5
MAX_DESCRIPTION = 4096
MAX_ATTEMPTS = 100
MAX_LABELS = 64
MAX_LABEL_VALUE = 255
MAX_REQUEST_ID = 128
MAX_REASON = 1024
MAX_BATCH = 1000
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
DEFAULT_HEARTBEAT = 15.0
MIN_HEARTBEAT = 0.1
MAX_HEARTBEAT = 3600.0
_STATUS_VALUES = frozenset(int(status) for status in TaskStatus)
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9._/-]{1,63}")


# An error names at most this many bad fields (and how many more there were), each in at
# most MAX_VIOLATION_TEXT characters, so that it fits gRPC's default 8 KiB metadata limit
# however bad the request.
MAX_VIOLATIONS_SHOWN = 10
MAX_VIOLATION_TEXT = 200


# The task types Create accepts: those of the server's handlers and those declared as run by
# workers elsewhere.
KnownTypes = AbstractSet[str]
NO_DEFAULTS: Mapping[str, int] = types.MappingProxyType({})


class InvalidArgument(ConveyorError):
    """One or more fields of a request are bad: (field path, what is wrong) pairs.

    `violations` holds the first MAX_VIOLATIONS_SHOWN of them, cut to a readable length;
    `total` counts them all. Its status carries them as a google.rpc.BadRequest.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = ""  # no ErrorInfo: the BadRequest says it all

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.total = len(violations)
        self.violations = [
            (_cut(field), _cut(description))
            for field, description in violations[:MAX_VIOLATIONS_SHOWN]
        ]
        text = "; ".join(f"{field}: {description}" for field, description in self.violations)
        if self.total > len(self.violations):
            text += f"; and {self.total - len(self.violations)} more"
        super().__init__(text)

    def details(self) -> list[Message]:
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in self.violations
        ]
        return [error_details_pb2.BadRequest(field_violations=violations)]


def _cut(text: str) -> str:
    return text if len(text) <= MAX_VIOLATION_TEXT else text[: MAX_VIOLATION_TEXT - 3] + "..."


class Checker:
    """Collects violations so that one error names every bad field."""

    def __init__(self) -> None:
        self.violations: list[tuple[str, str]] = []

    def fail(self, field: str, description: str) -> None:
        self.violations.append((field, description))

    def done(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)


def task_id(value: str, field: str = "task_id") -> str:
    """The task id in its canonical form (a lowercase UUID)."""
    checker = Checker()
    result = task_id_in(checker, value, field)
    checker.done()
    return result


def task_id_in(checker: Checker, value: str, field: str) -> str:
    if _CANONICAL_UUID.fullmatch(value):
        return value  # the form ids are given out in: no need to parse it
    if not value:
        checker.fail(field, "is required")
        return ""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        checker.fail(field, f"{value[:64]!r} is not a UUID")
        return ""


class NewTask:
    """A validated TaskRequest, with the defaults applied."""

    __slots__ = (
        "description",
        "labels",
        "max_attempts",
        "parameters",
        "priority",
        "queue_timeout",
        "request_hash",
        "request_id",
        "start_after",
        "start_at",
        "task_type",
        "timeout_seconds",
    )

    def __init__(
        self,
        request: task_service_pb2.CreateRequest,
        default_timeout: float,
        default_attempts: Mapping[str, int] = NO_DEFAULTS,
    ) -> None:
        """`default_attempts`: the attempts of a task whose request leaves them unset, by
        task type (1 for a type not named)."""
        task = request.task
        self.task_type = task.task_type
        self.description = task.description
        # (Protobuf maps iterate slowly; most tasks have no labels, many no parameters.)
        self.parameters: dict[str, Any] = (
            struct_to_dict(task.parameters) if task.parameters.fields else {}
        )
        self.priority = task.priority if task.HasField("priority") else DEFAULT_PRIORITY
        self.timeout_seconds = (
            task.timeout_seconds if task.HasField("timeout_seconds") else default_timeout
        )
        self.max_attempts = (
            task.max_attempts
            if task.HasField("max_attempts")
            else default_attempts.get(task.task_type, 1)
        )
        self.labels = dict(task.labels) if task.labels else {}
        self.request_id = request.request_id
        self.request_hash = hashlib.sha256(task.SerializeToString(deterministic=True)).digest()
        self.start_at = _seconds(task.start_at) if task.HasField("start_at") else None
        self.start_after = task.start_after_seconds  # 0.0 when unset
        self.queue_timeout = (
            task.queue_timeout_seconds if task.HasField("queue_timeout_seconds") else None
        )

    def to_task(self, task_id: str, now: float, tenant: str = "", trace_parent: str = "") -> Task:
        """The record of the new task, queued (or waiting for its start) on its first attempt;
        `trace_parent`: the span of the Create that made it (tracing only)."""
        start = self.start_at if self.start_at is not None else now + self.start_after
        runnable_at = start if start > now else None
        deadline = None
        if self.queue_timeout is not None:
            deadline = (runnable_at or now) + self.queue_timeout
        return Task(
            task_id=task_id,
            seq=0,
            task_type=self.task_type,
            description=self.description,
            parameters=self.parameters,
            priority=self.priority,
            timeout_seconds=self.timeout_seconds,
            max_attempts=self.max_attempts,
            labels=self.labels,
            created_at=now,
            updated_at=now,
            tenant=tenant,
            trace_parent=trace_parent,
            request_id=self.request_id,
            request_hash=self.request_hash,
            message="queued",
            next_attempt_at=runnable_at,
            start_deadline=deadline,
            queue_timeout=self.queue_timeout,
        )


def create_request(
    request: task_service_pb2.CreateRequest,
    known: KnownTypes,
    default_timeout: float,
    now: float,
    default_attempts: Mapping[str, int] = NO_DEFAULTS,
) -> NewTask:
    checker = Checker()
    _create(checker, request, known, "", now)
    checker.done()
    return NewTask(request, default_timeout, default_attempts)


def batch_create_request(
    request: task_service_pb2.BatchCreateRequest,
    known: KnownTypes,
    default_timeout: float,
    now: float,
    default_attempts: Mapping[str, int] = NO_DEFAULTS,
) -> list[NewTask]:
    checker = Checker()
    count = len(request.requests)
    if not 1 <= count <= MAX_BATCH:
        checker.fail("requests", f"must hold 1 to {MAX_BATCH} requests, not {count}")
        checker.done()
    first_index: dict[str, int] = {}
    for index, create in enumerate(request.requests):
        _create(checker, create, known, f"requests[{index}].", now)
        if create.request_id:
            earlier = first_index.setdefault(create.request_id, index)
            if earlier != index:
                checker.fail(
                    f"requests[{index}].request_id", f"is the request_id of requests[{earlier}]"
                )
    checker.done()
    return [NewTask(create, default_timeout, default_attempts) for create in request.requests]


def check_create(
    checker: Checker,
    request: task_service_pb2.CreateRequest,
    known: KnownTypes,
    prefix: str,
    now: float,
) -> None:
    """Check a CreateRequest made elsewhere (a schedule's template), naming its fields
    after `prefix`; the violations go to `checker`."""
    _create(checker, request, known, prefix, now)


def page_token(after_seq: int, task_filter: TaskFilter) -> str:
    """A page token of another list (schedules), after `after_seq`, for `task_filter`."""
    return _encode_token(after_seq, task_filter)


def after_page_token(checker: Checker, token: str, task_filter: TaskFilter) -> int:
    """Where a page token of another list continues from (0 for none)."""
    if not token:
        return 0
    decoded = _decode_token(token, task_filter)
    if isinstance(decoded, str):
        checker.fail("page_token", decoded)
        return 0
    return decoded


def _create(
    checker: Checker,
    request: task_service_pb2.CreateRequest,
    known: KnownTypes,
    prefix: str,
    now: float,
) -> None:
    """Check one CreateRequest; its fields are named after `prefix`."""
    if not request.HasField("task"):
        checker.fail(f"{prefix}task", "is required")
        return
    task = request.task
    field = f"{prefix}task."
    if not task.task_type:
        checker.fail(f"{field}task_type", "is required")
    elif task.task_type not in known:
        names = ", ".join(sorted(known)) or "none"
        checker.fail(
            f"{field}task_type",
            f"{task.task_type[:64]!r} is not a registered task type (known: {names})",
        )
    if task.parameters.fields:
        _parameters(checker, task.parameters, f"{field}parameters")
    if len(task.description) > MAX_DESCRIPTION:
        checker.fail(f"{field}description", f"is longer than {MAX_DESCRIPTION} characters")
    if task.HasField("priority") and not 1 <= task.priority <= 10:
        checker.fail(f"{field}priority", f"must be between 1 and 10, not {task.priority}")
    if task.HasField("timeout_seconds") and not (
        math.isfinite(task.timeout_seconds) and task.timeout_seconds > 0
    ):
        checker.fail(f"{field}timeout_seconds", f"must be positive, not {task.timeout_seconds}")
    if task.HasField("max_attempts") and not 1 <= task.max_attempts <= MAX_ATTEMPTS:
        checker.fail(
            f"{field}max_attempts", f"must be between 1 and {MAX_ATTEMPTS}, not {task.max_attempts}"
        )
    _labels(checker, task.labels, f"{field}labels")
    _start(checker, task, field, now)
    check_request_id(checker, request.request_id, f"{prefix}request_id")


def check_request_id(checker: Checker, value: str, field: str = "request_id") -> None:
    """A request id: at most MAX_REQUEST_ID characters, and no NUL (which a database's text
    cannot hold)."""
    if len(value) > MAX_REQUEST_ID:
        checker.fail(field, f"is longer than {MAX_REQUEST_ID} characters")
    elif "\x00" in value:
        checker.fail(field, "holds a NUL character")


_MAX_WAIT = f"{MAX_WAIT_SECONDS:.0f} seconds (366 days)"


def _start(checker: Checker, task: task_pb2.TaskRequest, field: str, now: float) -> None:
    """A delayed start within MAX_WAIT_SECONDS (a time already past is fine: at once), and a
    positive queue timeout within it."""
    which = task.WhichOneof("start")
    if which == "start_at":
        if not 0 <= task.start_at.nanos < 1_000_000_000:
            checker.fail(
                f"{field}start_at", f"has nanos {task.start_at.nanos} outside 0..999999999"
            )
        elif _seconds(task.start_at) > now + MAX_WAIT_SECONDS:
            checker.fail(f"{field}start_at", f"is more than {_MAX_WAIT} from now")
    elif which == "start_after_seconds":
        delay = task.start_after_seconds
        if not (math.isfinite(delay) and 0 <= delay <= MAX_WAIT_SECONDS):
            checker.fail(f"{field}start_after_seconds", f"must be 0 to {_MAX_WAIT}, not {delay}")
    if task.HasField("queue_timeout_seconds"):
        limit = task.queue_timeout_seconds
        if not (math.isfinite(limit) and 0 < limit <= MAX_WAIT_SECONDS):
            checker.fail(
                f"{field}queue_timeout_seconds",
                f"must be positive, at most {_MAX_WAIT}, not {limit}",
            )


def _parameters(checker: Checker, parameters: struct_pb2.Struct, field: str) -> None:
    size = parameters.ByteSize()
    if size > MAX_PARAMETERS_BYTES:
        checker.fail(field, f"are {size} bytes encoded; at most {MAX_PARAMETERS_BYTES} are allowed")
    elif _depth(parameters) > MAX_JSON_DEPTH:
        checker.fail(field, f"nest deeper than {MAX_JSON_DEPTH} levels")


def _depth(struct: struct_pb2.Struct) -> int:
    """How deep a Struct nests: 1 for a flat one (protobuf parsing bounds the recursion)."""
    deepest = 0
    for value in struct.fields.values():
        deepest = max(deepest, _value_depth(value))
    return 1 + deepest


def _value_depth(value: struct_pb2.Value) -> int:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _depth(value.struct_value)
    if kind == "list_value":
        return 1 + max((_value_depth(item) for item in value.list_value.values), default=0)
    return 0


def check_labels(checker: Checker, labels: Any, field: str) -> None:
    """Labels as a TaskRequest takes them (a filter of another list, say)."""
    _labels(checker, labels, field)


def _labels(checker: Checker, labels: Any, field: str) -> None:
    if not labels:
        return
    if len(labels) > MAX_LABELS:
        checker.fail(field, f"has {len(labels)} labels; at most {MAX_LABELS} are allowed")
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            checker.fail(
                f"{field}[{key[:64]!r}]",
                "a label key is 1 to 63 letters, digits, '-', '_', '.' or '/'",
            )
        if len(value) > MAX_LABEL_VALUE:
            checker.fail(f"{field}[{key[:64]!r}]", f"is longer than {MAX_LABEL_VALUE} characters")


_ID_PREFIX = re.compile(r"[0-9a-f-]{1,36}")  # the start of a canonical id (lower case)


def _filter(checker: Checker, message: task_pb2.TaskFilter, field: str) -> TaskFilter:
    statuses: set[TaskStatus] = set()
    for index, status in enumerate(message.statuses):
        if status in _STATUS_VALUES:
            statuses.add(TaskStatus(status))
        else:
            checker.fail(f"{field}.statuses[{index}]", f"{status} is not a task status")
    _labels(checker, message.labels, f"{field}.labels")
    prefix = message.task_id_prefix.lower()
    if prefix and not _ID_PREFIX.fullmatch(prefix):
        checker.fail(
            f"{field}.task_id_prefix",
            f"{message.task_id_prefix[:64]!r} is not the start of a task id "
            "(at most 36 hex digits and '-')",
        )
    return TaskFilter(
        statuses=frozenset(statuses),
        task_type=message.task_type,
        labels=dict(message.labels),
        task_id_prefix=prefix,
    )


class ListQuery:
    """A validated ListRequest: the filter, where the page starts, and its size."""

    def __init__(
        self, task_filter: TaskFilter, after_seq: int, page_size: int, *, newest_first: bool
    ) -> None:
        self.filter = task_filter
        self.after_seq = after_seq  # newest first: the page holds tasks created before it
        self.page_size = page_size
        self.newest_first = newest_first

    def next_token(self, last_seq: int) -> str:
        return _encode_token(last_seq, self.filter, newest_first=self.newest_first)


def list_request(request: task_service_pb2.ListRequest) -> ListQuery:
    checker = Checker()
    task_filter = _filter(checker, request.filter, "filter")
    page_size = request.page_size or DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        checker.fail("page_size", f"must be between 0 and {MAX_PAGE_SIZE}, not {request.page_size}")
    after_seq = 0
    newest_first = request.newest_first
    if request.page_token:
        decoded = _decode_token(request.page_token, task_filter, newest_first=newest_first)
        if isinstance(decoded, str):
            checker.fail("page_token", decoded)
        else:
            after_seq = decoded
    checker.done()
    return ListQuery(task_filter, after_seq, page_size, newest_first=newest_first)


def _fingerprint(task_filter: TaskFilter, *, newest_first: bool = False) -> str:
    """What a page token is bound to: the filter, and the order of the listing."""
    parts: list[Any] = [
        sorted(int(s) for s in task_filter.statuses),
        task_filter.task_type,
        task_filter.labels,
    ]
    # Each only when set: tokens issued before it existed still hold.
    if task_filter.task_id_prefix:
        parts.append(task_filter.task_id_prefix)
    if newest_first:
        parts.append({"order": "newest_first"})
    canonical = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# A page token is base64url of "<after_seq>.<filter fingerprint>": plain text, parsed by a
# pattern, so that no token a client makes up can reach a general-purpose decoder.
_TOKEN = re.compile(r"([0-9]{1,19})\.([0-9a-f]{16})")
MAX_PAGE_TOKEN = 64


def _encode_token(after_seq: int, task_filter: TaskFilter, *, newest_first: bool = False) -> str:
    payload = f"{after_seq}.{_fingerprint(task_filter, newest_first=newest_first)}"
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_token(token: str, task_filter: TaskFilter, *, newest_first: bool = False) -> int | str:
    """The sequence number a page token continues after, or what is wrong with the token."""
    if len(token) > MAX_PAGE_TOKEN:
        return "is not a page token that this server issued"
    try:
        payload = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        return "is not a page token that this server issued"
    if (match := _TOKEN.fullmatch(payload)) is None:
        return "is not a page token that this server issued"
    if match.group(2) != _fingerprint(task_filter, newest_first=newest_first):
        return (
            "was issued for a different filter or order; keep the filter and the order "
            "the same while paging"
        )
    return int(match.group(1))


class WatchQuery:
    """A validated WatchRequest."""

    def __init__(
        self, task_filter: TaskFilter, since_revision: int | None, heartbeat: float
    ) -> None:
        self.filter = task_filter
        self.since_revision = since_revision
        self.heartbeat = heartbeat


def watch_request(request: task_service_pb2.WatchRequest) -> WatchQuery:
    checker = Checker()
    if request.task_id:
        watched = task_id_in(checker, request.task_id, "task_id")
        if request.HasField("filter"):
            checker.fail("filter", "must be unset when task_id is set")
        task_filter = TaskFilter(task_id=watched)
    else:
        task_filter = _filter(checker, request.filter, "filter")
    since = request.since_revision if request.HasField("since_revision") else None
    if since is not None and since < 0:
        checker.fail("since_revision", f"must not be negative, not {since}")
    heartbeat = DEFAULT_HEARTBEAT
    if request.HasField("heartbeat_interval"):
        heartbeat = _seconds(request.heartbeat_interval)
        if not MIN_HEARTBEAT <= heartbeat <= MAX_HEARTBEAT:
            checker.fail(
                "heartbeat_interval",
                f"must be between {MIN_HEARTBEAT:g} s and {MAX_HEARTBEAT:g} s, not {heartbeat:g} s",
            )
    checker.done()
    return WatchQuery(task_filter, since, heartbeat)


def _seconds(time: duration_pb2.Duration | timestamp_pb2.Timestamp) -> float:
    """A Duration's length, or a Timestamp's epoch seconds."""
    return time.seconds + time.nanos / 1e9


def cancel_matching_request(
    request: task_service_pb2.CancelMatchingRequest,
) -> tuple[TaskFilter, str, bool]:
    """The filter (of unfinished tasks), the reason and whether it is a dry run."""
    checker = Checker()
    task_filter = _filter(checker, request.filter, "filter")
    if not (task_filter.labels or task_filter.task_type or task_filter.task_id_prefix):
        checker.fail(
            "filter",
            "must set labels, task_type or task_id_prefix: a filter of statuses alone, or an "
            "empty one, would cancel every task",
        )
    if len(request.reason) > MAX_REASON:
        checker.fail("reason", f"is longer than {MAX_REASON} characters")
    checker.done()
    statuses = (task_filter.statuses or UNFINISHED) & UNFINISHED
    return dataclasses.replace(task_filter, statuses=statuses), request.reason, request.dry_run


def task_and_reason(
    request: task_service_pb2.CancelRequest | task_service_pb2.PauseRequest,
) -> tuple[str, str]:
    """The task id and the reason of a Cancel or a Pause."""
    checker = Checker()
    task = task_id_in(checker, request.task_id, "task_id")
    if len(request.reason) > MAX_REASON:
        checker.fail("reason", f"is longer than {MAX_REASON} characters")
    checker.done()
    return task, request.reason


@dataclasses.dataclass(frozen=True)
class InputQuery:
    """A SendInput, checked: the task, the request id, and the input with its size."""

    task_id: str
    request_id: str
    data: dict[str, Any]
    size: int


def send_input_request(request: task_service_pb2.SendInputRequest) -> InputQuery:
    checker = Checker()
    task = task_id_in(checker, request.task_id, "task_id")
    check_request_id(checker, request.request_id)
    size = request.input.ByteSize()
    if size > MAX_INPUT_BYTES:
        checker.fail("input", f"is {size} bytes encoded; at most {MAX_INPUT_BYTES} are allowed")
    elif _depth(request.input) > MAX_JSON_DEPTH:
        checker.fail("input", f"nests deeper than {MAX_JSON_DEPTH} levels")
    checker.done()
    return InputQuery(task, request.request_id, struct_to_dict(request.input), size)


def rerun_request(request: task_service_pb2.RerunRequest) -> tuple[str, str]:
    """The id of the task to rerun, and the request id of the rerun."""
    checker = Checker()
    task = task_id_in(checker, request.task_id, "task_id")
    check_request_id(checker, request.request_id)
    checker.done()
    return task, request.request_id


def count_tasks_request(request: task_service_pb2.CountTasksRequest) -> TaskFilter:
    """The filter of the tasks to count: by statuses and task type only."""
    checker = Checker()
    task_filter = _filter(checker, request.filter, "filter")
    for field, value in (
        ("labels", task_filter.labels),
        ("task_id_prefix", request.filter.task_id_prefix),
    ):
        if value:
            checker.fail(
                f"filter.{field}",
                "is not counted by: CountTasks counts by task type and status (List the "
                "tasks to narrow them further)",
            )
    checker.done()
    return task_filter
