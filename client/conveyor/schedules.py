"""Schedules as the client shows them, and the ScheduleRequests it builds from Python values."""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from datetime import datetime, time, timedelta
from typing import Any

from google.protobuf import duration_pb2

from conveyor.protojson import dict_to_struct, struct_to_dict, timestamp_to_datetime
from conveyor.v1 import schedule_service_pb2 as pb
from conveyor.v1 import task_pb2

Seconds = float | timedelta


class Overlap(enum.IntEnum):
    """What a schedule does with a run that falls due while the previous one runs; mirrors
    conveyor.v1.OverlapPolicy without the prefix."""

    SKIP = 1
    BUFFER_ONE = 2
    BUFFER_ALL = 3
    CANCEL_OTHER = 4
    ALLOW_ALL = 5


@dataclasses.dataclass(frozen=True)
class ScheduleRun:
    """A run a schedule made: the time it stands for, when it was made, and its task."""

    nominal_time: datetime
    made_at: datetime
    task_id: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """A schedule as the server reported it (times are aware datetimes in UTC)."""

    schedule_id: str
    task_type: str
    parameters: dict[str, Any]
    every: timedelta | None  # one of every, daily and cron is set
    daily: time | None
    cron: str
    time_zone: str  # empty: UTC
    overlap: Overlap
    description: str
    paused: bool
    note: str
    next_run_times: list[datetime]
    last_run: ScheduleRun | None
    run_count: int
    running_task_ids: list[str]
    skipped: int
    buffer_dropped: int
    missed: int
    buffered: int
    ended: bool
    created_at: datetime
    updated_at: datetime
    proto: pb.Schedule = dataclasses.field(compare=False, repr=False)

    @property
    def when(self) -> str:
        """The spec in words: "every 0:01:00", "daily at 02:30:00 Europe/Berlin", "cron ..."."""
        zone = f" {self.time_zone}" if self.time_zone else ""
        if self.every is not None:
            return f"every {self.every}"
        if self.daily is not None:
            return f"daily at {self.daily.isoformat()}{zone or ' UTC'}"
        return f"cron {self.cron}{zone or ' UTC'}"

    @classmethod
    def _from_proto(cls, message: pb.Schedule) -> Schedule:
        spec, info = message.schedule.spec, message.info
        which = spec.WhichOneof("when")
        daily = spec.daily
        last = info.last_run if info.HasField("last_run") else None
        return cls(
            schedule_id=message.schedule_id,
            task_type=message.schedule.task.task_type,
            parameters=struct_to_dict(message.schedule.task.parameters),
            every=spec.interval.every.ToTimedelta() if which == "interval" else None,
            daily=time(daily.hour, daily.minute, daily.second) if which == "daily" else None,
            cron=spec.cron,
            time_zone=spec.time_zone,
            overlap=Overlap(message.schedule.policy.overlap or Overlap.SKIP),
            description=message.schedule.description,
            paused=message.paused,
            note=message.note,
            next_run_times=[timestamp_to_datetime(t) for t in info.next_run_times],
            last_run=None
            if last is None
            else ScheduleRun(
                timestamp_to_datetime(last.nominal_time),
                timestamp_to_datetime(last.made_at),
                last.task_id,
            ),
            run_count=info.run_count,
            running_task_ids=list(info.running_task_ids),
            skipped=info.skipped,
            buffer_dropped=info.buffer_dropped,
            missed=info.missed,
            buffered=info.buffered,
            ended=info.ended,
            created_at=timestamp_to_datetime(message.created_at),
            updated_at=timestamp_to_datetime(message.updated_at),
            proto=message,
        )


class ScheduleEventKind(enum.IntEnum):
    """What a schedule watch reports; mirrors conveyor.v1.ScheduleEventType."""

    CURRENT = 1
    CHANGED = 2
    REMOVED = 3


@dataclasses.dataclass(frozen=True)
class ScheduleEvent:
    """One report of a schedule watch: a schedule as it stood, changed, or was deleted."""

    kind: ScheduleEventKind
    schedule: Schedule


_DAILY = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")


def schedule_request(
    task_type: str,
    parameters: Mapping[str, Any] | None,
    *,
    every: Seconds | None = None,
    phase: Seconds | None = None,
    daily: str | time | None = None,
    cron: str | None = None,
    time_zone: str = "",
    start_at: datetime | None = None,
    end_at: datetime | None = None,
    jitter: Seconds | None = None,
    max_runs: int | None = None,
    overlap: Overlap | None = None,
    catchup_window: Seconds | None = None,
    catchup_limit: int | None = None,
    priority: int | None = None,
    timeout_seconds: float | None = None,
    max_attempts: int | None = None,
    labels: Mapping[str, str] | None = None,
    description: str = "",
) -> pb.ScheduleRequest:
    """A ScheduleRequest: a task (as `create` takes it) run `every` interval, `daily` at a
    time ("02:30" or a datetime.time) or on `cron`, in `time_zone`. Exactly one of them."""
    if sum(x is not None for x in (every, daily, cron)) != 1:
        raise ValueError("give exactly one of every, daily and cron")
    spec = pb.ScheduleSpec(time_zone=time_zone, max_runs=max_runs)
    if every is not None:
        spec.interval.every.CopyFrom(_duration(every))
        if phase is not None:
            spec.interval.phase.CopyFrom(_duration(phase))
    elif daily is not None:
        spec.daily.CopyFrom(_daily(daily))
    else:
        spec.cron = str(cron)
    for name, moment in (("start_at", start_at), ("end_at", end_at)):
        if moment is not None:
            if moment.tzinfo is None:
                raise ValueError(f"{name} must be an aware datetime (with a time zone)")
            getattr(spec, name).FromDatetime(moment)
    if jitter is not None:
        spec.jitter.CopyFrom(_duration(jitter))
    task = task_pb2.TaskRequest(
        task_type=task_type,
        priority=priority,
        timeout_seconds=timeout_seconds,
        max_attempts=max_attempts,
        labels=labels,
        description=description,
    )
    if parameters:
        task.parameters.CopyFrom(dict_to_struct(parameters))
    policy = pb.SchedulePolicy(
        overlap=pb.OverlapPolicy.ValueType(int(overlap or 0)), catchup_limit=catchup_limit
    )
    if catchup_window is not None:
        policy.catchup_window.CopyFrom(_duration(catchup_window))
    return pb.ScheduleRequest(spec=spec, task=task, policy=policy, description=description)


def _duration(value: Seconds) -> duration_pb2.Duration:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _daily(value: str | time) -> pb.DailySpec:
    if isinstance(value, time):
        return pb.DailySpec(hour=value.hour, minute=value.minute, second=value.second)
    match = _DAILY.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"daily must be a time of day such as 02:30 or 02:30:15, not {value!r}")
    hour, minute, second = match.groups()
    return pb.DailySpec(hour=int(hour), minute=int(minute), second=int(second or 0))
