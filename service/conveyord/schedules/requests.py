"""The ScheduleService requests, checked: every bad field named (INVALID_ARGUMENT), as for tasks."""

from __future__ import annotations

import dataclasses
import hashlib
import math

from google.protobuf import duration_pb2, timestamp_pb2

from conveyor.v1 import schedule_service_pb2 as spb
from conveyor.v1 import task_service_pb2 as tpb
from conveyord.limits import MAX_WAIT_SECONDS
from conveyord.model import TaskFilter
from conveyord.schedules.model import Overlap, Policy
from conveyord.schedules.spec import Spec, SpecError, daily_cron, zone
from conveyord.validation import (
    DEFAULT_PAGE_SIZE,
    MAX_DESCRIPTION,
    MAX_PAGE_SIZE,
    MAX_REASON,
    Checker,
    KnownTypes,
    after_page_token,
    check_create,
    check_labels,
    check_request_id,
    task_id_in,
)

MAX_JITTER = 3600.0
MAX_CATCHUP_LIMIT = 1000
MIN_CATCHUP_WINDOW = 10.0
MAX_BACKFILL = 1000


@dataclasses.dataclass(frozen=True)
class NewSchedule:
    """A checked ScheduleRequest: what runs it makes, when, and under which policy."""

    request: bytes
    request_hash: bytes
    spec: Spec
    policy: Policy


def schedule_request(
    request: spb.ScheduleRequest, known: KnownTypes, now: float, field: str = "schedule"
) -> NewSchedule:
    checker = Checker()
    spec = _spec(checker, request.spec, f"{field}.spec")
    template = tpb.CreateRequest(task=request.task)
    if not request.HasField("task"):
        checker.fail(f"{field}.task", "is required: the task each run creates")
    else:
        check_create(checker, template, known, f"{field}.", now)
        if request.task.WhichOneof("start") is not None:
            checker.fail(f"{field}.task.start", "must be unset: a run starts at its time")
    policy = _policy(checker, request.policy, f"{field}.policy")
    if len(request.description) > MAX_DESCRIPTION:
        checker.fail(f"{field}.description", f"is longer than {MAX_DESCRIPTION} characters")
    checker.done()
    assert spec is not None
    encoded = request.SerializeToString(deterministic=True)
    return NewSchedule(encoded, hashlib.sha256(encoded).digest(), spec, policy)


def _spec(checker: Checker, spec: spb.ScheduleSpec, field: str) -> Spec | None:
    which = spec.WhichOneof("when")
    fields: dict[str, object] = {}
    try:
        zone(spec.time_zone)
    except SpecError as error:
        checker.fail(f"{field}.time_zone", str(error))
        return None
    if which == "interval":
        every, phase = _seconds(spec.interval.every), _seconds(spec.interval.phase)
        if not 1 <= every <= MAX_WAIT_SECONDS:
            checker.fail(f"{field}.interval.every", f"must be 1 s to 366 days, not {every:g} s")
        elif not 0 <= phase < every:
            checker.fail(f"{field}.interval.phase", f"must be 0 up to `every`, not {phase:g} s")
        fields.update(every=every, phase=phase)
    elif which == "daily":
        daily = spec.daily
        if not (0 <= daily.hour <= 23 and 0 <= daily.minute <= 59 and 0 <= daily.second <= 59):
            checker.fail(
                f"{field}.daily", "must be a time of day: hour 0-23, minute and second 0-59"
            )
            return None
        fields.update(cron=daily_cron(daily.hour, daily.minute), second=daily.second)
    elif which == "cron":
        fields.update(cron=spec.cron.strip())
    else:
        checker.fail(f"{field}.when", "is required: an interval, a daily time or a cron expression")
        return None
    start = _stamp(spec.start_at) if spec.HasField("start_at") else None
    end = _stamp(spec.end_at) if spec.HasField("end_at") else None
    if start is not None and end is not None and end < start:
        checker.fail(f"{field}.end_at", "is before start_at")
    jitter = _seconds(spec.jitter)
    every = float(fields.get("every", 0.0))  # type: ignore[arg-type]
    if not 0 <= jitter <= min(MAX_JITTER, every or MAX_JITTER):
        checker.fail(f"{field}.jitter", "must be 0 up to the interval, and at most one hour")
    max_runs = spec.max_runs if spec.HasField("max_runs") else None
    if max_runs is not None and max_runs < 1:
        checker.fail(f"{field}.max_runs", f"must be at least 1, not {max_runs}")
    try:
        return Spec(
            **fields,  # type: ignore[arg-type]
            zone=spec.time_zone or "UTC",
            start_at=start,
            end_at=end,
            jitter=jitter,
            max_runs=max_runs,
        )
    except SpecError as error:
        checker.fail(f"{field}.{error.field}", str(error))
        return None


def _policy(checker: Checker, policy: spb.SchedulePolicy, field: str) -> Policy:
    overlap = Overlap.SKIP
    if policy.overlap:
        try:
            overlap = Overlap(policy.overlap)
        except ValueError:
            checker.fail(f"{field}.overlap", f"{policy.overlap} is not an overlap policy")
    window = _seconds(policy.catchup_window) if policy.HasField("catchup_window") else 3600.0
    if not MIN_CATCHUP_WINDOW <= window <= MAX_WAIT_SECONDS:
        checker.fail(f"{field}.catchup_window", f"must be 10 s to 366 days, not {window:g} s")
    limit = policy.catchup_limit if policy.HasField("catchup_limit") else 1
    if not 1 <= limit <= MAX_CATCHUP_LIMIT:
        checker.fail(f"{field}.catchup_limit", f"must be 1 to {MAX_CATCHUP_LIMIT}, not {limit}")
    return Policy(overlap, window, limit)


def overlap_of(checker: Checker, value: int, default: Overlap, field: str = "overlap") -> Overlap:
    if not value:
        return default
    try:
        return Overlap(value)
    except ValueError:
        checker.fail(field, f"{value} is not an overlap policy")
        return default


def schedule_id(value: str, field: str = "schedule_id") -> str:
    checker = Checker()
    found = task_id_in(checker, value, field)
    checker.done()
    return found


def request_id(checker: Checker, value: str) -> str:
    check_request_id(checker, value)
    return value


def note(value: str) -> str:
    checker = Checker()
    if len(value) > MAX_REASON:
        checker.fail("note", f"is longer than {MAX_REASON} characters")
    checker.done()
    return value


def page(request: spb.ListSchedulesRequest) -> tuple[int, int, TaskFilter]:
    """(after_seq, page_size, the filter of the runs' type and labels) of a
    ListSchedulesRequest."""
    checker = Checker()
    size = request.page_size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        checker.fail("page_size", f"must be between 0 and {MAX_PAGE_SIZE}, not {request.page_size}")
    check_labels(checker, request.labels, "labels")
    wanted = TaskFilter(task_type=request.task_type, labels=dict(request.labels))
    after = after_page_token(checker, request.page_token, wanted)
    checker.done()
    return after, size, wanted


def window(request: spb.BackfillScheduleRequest) -> tuple[float, float]:
    checker = Checker()
    if not request.HasField("start_at") or not request.HasField("end_at"):
        checker.fail("start_at", "and end_at are required: the window to backfill")
        checker.done()
    start, end = _stamp(request.start_at), _stamp(request.end_at)
    if end <= start:
        checker.fail("end_at", "must be after start_at")
    checker.done()
    return start, end


def _seconds(duration: duration_pb2.Duration) -> float:
    value = duration.seconds + duration.nanos / 1e9
    return value if math.isfinite(value) else -1.0


def _stamp(timestamp: timestamp_pb2.Timestamp) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9
