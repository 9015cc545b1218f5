"""`AsyncSchedules`: the schedule calls of `AsyncClient` (`client.schedules`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, time
from typing import TYPE_CHECKING, Any

import grpc

from conveyor.errors import from_rpc_error
from conveyor.schedules import (
    Overlap,
    Schedule,
    ScheduleEvent,
    ScheduleEventKind,
    Seconds,
    schedule_request,
)
from conveyor.tasks import Task
from conveyor.v1 import schedule_service_pb2 as pb
from conveyor.v1.schedule_service_pb2_grpc import ScheduleServiceStub

if TYPE_CHECKING:
    from conveyor._async_client import AsyncClient

_EVENTS = frozenset(kind.value for kind in ScheduleEventKind)


class AsyncSchedules:
    """Recurring runs of a task: every interval, daily at a time, or on a cron expression.

    Each run is a task like any other, labelled `conveyor/schedule` (the schedule's id) and
    `conveyor/nominal-time`; a schedule makes each run once, however many servers run it.
    Calls that change nothing are retried on UNAVAILABLE, as is `create` (it gives itself a
    request_id); `timeout` bounds each call, retries included (default: the client's).
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._stub = ScheduleServiceStub(client._channel)

    async def create(
        self,
        task_type: str,
        parameters: Mapping[str, Any] | None = None,
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
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Schedule:
        """Make a schedule of `task_type` runs: exactly one of `every` (seconds or a
        timedelta, from `phase` past the epoch), `daily` ("02:30") and `cron`, read in
        `time_zone` (IANA; default UTC). `overlap` (default SKIP) decides what happens when
        a run falls due while the previous one runs; runs missed while no server ran are
        made within `catchup_window` (default 1 h), at most `catchup_limit` (default 1).
        The task fields are those of `AsyncClient.create`."""
        request = pb.CreateScheduleRequest(
            schedule=schedule_request(
                task_type,
                parameters,
                every=every,
                phase=phase,
                daily=daily,
                cron=cron,
                time_zone=time_zone,
                start_at=start_at,
                end_at=end_at,
                jitter=jitter,
                max_runs=max_runs,
                overlap=overlap,
                catchup_window=catchup_window,
                catchup_limit=catchup_limit,
                priority=priority,
                timeout_seconds=timeout_seconds,
                max_attempts=max_attempts,
                labels=labels,
                description=description,
            ),
            request_id=_request_id(request_id),
        )
        call = self._stub.CreateSchedule
        response = await self._client._call(call, request, timeout, retry=bool(request.request_id))
        return Schedule._from_proto(response.schedule)

    async def get(self, schedule_id: str, *, timeout: float | None = None) -> Schedule:
        """The schedule as it stands: its next run times, last run and counters."""
        request = pb.GetScheduleRequest(schedule_id=schedule_id)
        response = await self._client._call(self._stub.GetSchedule, request, timeout, retry=True)
        return Schedule._from_proto(response.schedule)

    async def list(
        self,
        *,
        task_type: str | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Schedule]:
        """Every schedule (whose runs have `task_type` and carry all of `labels`, if given),
        oldest first, a page at a time as you iterate."""
        request = pb.ListSchedulesRequest(page_size=1000, task_type=task_type or "", labels=labels)
        while True:
            page = await self._client._call(self._stub.ListSchedules, request, timeout, retry=True)
            for schedule in page.schedules:
                yield Schedule._from_proto(schedule)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def update(
        self,
        schedule_id: str,
        task_type: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **spec: Any,
    ) -> Schedule:
        """Replace a schedule's spec, task and policy (the arguments of `create`); its
        counters and runs stay, and its next runs follow the new spec from now on."""
        request = pb.UpdateScheduleRequest(
            schedule_id=schedule_id, schedule=schedule_request(task_type, parameters, **spec)
        )
        call = self._stub.UpdateSchedule
        response = await self._client._call(call, request, timeout, retry=False)
        return Schedule._from_proto(response.schedule)

    async def delete(self, schedule_id: str, *, timeout: float | None = None) -> None:
        """Delete a schedule; the runs it made stay, as tasks."""
        request = pb.DeleteScheduleRequest(schedule_id=schedule_id)
        await self._client._call(self._stub.DeleteSchedule, request, timeout, retry=False)

    async def pause(
        self, schedule_id: str, *, note: str = "", timeout: float | None = None
    ) -> Schedule:
        """Make no runs until `unpause` (those that fall due meanwhile count as missed)."""
        request = pb.PauseScheduleRequest(schedule_id=schedule_id, note=note)
        response = await self._client._call(self._stub.PauseSchedule, request, timeout, retry=True)
        return Schedule._from_proto(response.schedule)

    async def unpause(self, schedule_id: str, *, timeout: float | None = None) -> Schedule:
        """Run again, from the first time that falls due from now on."""
        request = pb.UnpauseScheduleRequest(schedule_id=schedule_id)
        call = self._stub.UnpauseSchedule
        response = await self._client._call(call, request, timeout, retry=True)
        return Schedule._from_proto(response.schedule)

    async def trigger(
        self,
        schedule_id: str,
        *,
        overlap: Overlap | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Task | None:
        """Make one run now (under `overlap`, default ALLOW_ALL); its task, or None if the
        policy made none (skipped, or buffered behind a run that goes)."""
        request = pb.TriggerScheduleRequest(
            schedule_id=schedule_id,
            overlap=_overlap(overlap),
            request_id=_request_id(request_id),
        )
        call = self._stub.TriggerSchedule
        response = await self._client._call(call, request, timeout, retry=True)
        return Task._from_proto(response.task) if response.HasField("task") else None

    async def backfill(
        self,
        schedule_id: str,
        start_at: datetime,
        end_at: datetime,
        *,
        overlap: Overlap | None = None,
        timeout: float | None = None,
    ) -> Tasks:
        """Make the runs the schedule's spec would have made from `start_at` up to `end_at`
        (at most 1,000), under `overlap` (default ALLOW_ALL); runs made before for the same
        times are not made again (they are among the tasks returned)."""
        request = pb.BackfillScheduleRequest(schedule_id=schedule_id, overlap=_overlap(overlap))
        request.start_at.FromDatetime(start_at)
        request.end_at.FromDatetime(end_at)
        call = self._stub.BackfillSchedule
        response = await self._client._call(call, request, timeout, retry=True)
        return [Task._from_proto(task) for task in response.tasks]

    async def watch(self) -> AsyncIterator[ScheduleEvent]:
        """Every schedule as it stands, then each change, until you stop iterating."""
        call = self._stub.WatchSchedules(
            pb.WatchSchedulesRequest(), metadata=self._client._metadata
        )
        try:
            async for response in call:
                if response.type in (
                    pb.SCHEDULE_EVENT_TYPE_CURRENT,
                    pb.SCHEDULE_EVENT_TYPE_CHANGED,
                    pb.SCHEDULE_EVENT_TYPE_REMOVED,
                ):
                    kind = ScheduleEventKind(response.type)
                    yield ScheduleEvent(kind, Schedule._from_proto(response.schedule))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        finally:
            call.cancel()


Tasks = list[Task]


def _request_id(given: str | None) -> str:
    """The request id to send: the one given, or a new one (which makes a retry safe)."""
    return str(uuid.uuid4()) if given is None else given


def _overlap(overlap: Overlap | None) -> pb.OverlapPolicy.ValueType:
    return pb.OverlapPolicy.ValueType(int(overlap or 0))
