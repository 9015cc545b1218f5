"""The gRPC face of schedules: conveyor.v1.ScheduleService on top of the schedule book and
the runner."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from conveyor.v1 import schedule_service_pb2 as pb
from conveyord.auth import current_tenant
from conveyord.convert import task_to_proto
from conveyord.errors import ShuttingDown
from conveyord.hub import WatcherTooSlow
from conveyord.model import UNFINISHED, TaskFilter
from conveyord.rpc import stream_method, unary_method
from conveyord.schedules import requests, rules
from conveyord.schedules.model import SCHEDULE_LABEL, Overlap, Schedule
from conveyord.schedules.runner import ScheduleRunner
from conveyord.store.base import TaskStore
from conveyord.store.schedules import ScheduleNotFound
from conveyord.validation import Checker, KnownTypes, page_token

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ScheduleService"].full_name
HEARTBEAT = 15.0
WATCH_BUFFER = 1000
SHOWN_RUNNING = 100  # running task ids shown per schedule, at most
RECEIVE_LIMITS = {
    "CreateSchedule": 1536 * 1024,
    "GetSchedule": 4 * 1024,
    "ListSchedules": 8 * 1024,
    "UpdateSchedule": 1536 * 1024,
    "DeleteSchedule": 4 * 1024,
    "PauseSchedule": 8 * 1024,
    "UnpauseSchedule": 4 * 1024,
    "TriggerSchedule": 8 * 1024,
    "BackfillSchedule": 8 * 1024,
    "WatchSchedules": 1024,
}


class ScheduleServiceApi:
    """The RPCs of conveyor.v1.ScheduleService."""

    def __init__(
        self,
        store: TaskStore,
        runner: ScheduleRunner,
        known: Callable[[], KnownTypes],
        clock: Callable[[], float],
    ) -> None:
        self.store, self.book, self.runner = store, store.schedules, runner
        self.known, self.clock = known, clock
        self._watchers: set[asyncio.Queue[tuple[Schedule, bool] | None]] = set()

    def close(self) -> None:
        """The server stops: end every WatchSchedules stream (UNAVAILABLE)."""
        for changes in self._watchers:
            with contextlib.suppress(asyncio.QueueFull):
                changes.put_nowait(None)

    async def create(self, request: pb.CreateScheduleRequest) -> bytes:
        now = self.clock()
        checker = Checker()
        request_id = requests.request_id(checker, request.request_id)
        checker.done()
        new = requests.schedule_request(request.schedule, self.known(), now)
        schedule = Schedule(
            schedule_id=str(uuid.uuid4()), seq=0, request=new.request, spec=new.spec,
            policy=new.policy, created_at=now, updated_at=now, cursor=now,
            tenant=current_tenant(), request_id=request_id, request_hash=new.request_hash,
        )  # fmt: skip
        made, _ = await self.book.create(schedule)
        return pb.CreateScheduleResponse(schedule=await self.message(made)).SerializeToString()

    async def get(self, request: pb.GetScheduleRequest) -> bytes:
        schedule = await self._get(requests.schedule_id(request.schedule_id))
        return pb.GetScheduleResponse(schedule=await self.message(schedule)).SerializeToString()

    async def list(self, request: pb.ListSchedulesRequest) -> bytes:
        after, size, wanted = requests.page(request)
        tenant = current_tenant()

        def matches(schedule: Schedule) -> bool:
            if schedule.tenant != tenant:
                return False
            if not (wanted.task_type or wanted.labels):
                return True
            task = schedule.template.task
            if wanted.task_type and task.task_type != wanted.task_type:
                return False
            return all(task.labels.get(k) == v for k, v in wanted.labels.items())

        found = self.book.page(after, size + 1, matches)
        page = found[:size]
        answer = pb.ListSchedulesResponse(schedules=[await self.message(s) for s in page])
        if len(found) > size:
            answer.next_page_token = page_token(page[-1].seq, wanted)
        return answer.SerializeToString()

    async def update(self, request: pb.UpdateScheduleRequest) -> bytes:
        schedule_id = (await self._get(requests.schedule_id(request.schedule_id))).schedule_id
        now = self.clock()
        new = requests.schedule_request(request.schedule, self.known(), now)

        def update(current: Schedule) -> Schedule:
            return current.evolve(
                request=new.request, spec=new.spec, policy=new.policy, cursor=now,
                spec_runs=0, buffer=(), updated_at=now,
            )  # fmt: skip

        updated = await self.book.update(schedule_id, update)
        return pb.UpdateScheduleResponse(schedule=await self.message(updated)).SerializeToString()

    async def delete(self, request: pb.DeleteScheduleRequest) -> bytes:
        schedule = await self._get(requests.schedule_id(request.schedule_id))
        await self.book.delete(schedule.schedule_id)
        return pb.DeleteScheduleResponse().SerializeToString()

    async def pause(self, request: pb.PauseScheduleRequest) -> bytes:
        schedule_id = (await self._get(requests.schedule_id(request.schedule_id))).schedule_id
        note, now = requests.note(request.note) or "paused by request", self.clock()
        await self.runner.fire(schedule_id)  # what fell due before the pause is made
        paused = await self.book.update(
            schedule_id, lambda s: s.evolve(paused=True, note=note, updated_at=now)
        )
        return pb.PauseScheduleResponse(schedule=await self.message(paused)).SerializeToString()

    async def unpause(self, request: pb.UnpauseScheduleRequest) -> bytes:
        schedule_id = (await self._get(requests.schedule_id(request.schedule_id))).schedule_id
        await self.runner.fire(schedule_id)  # what fell due while paused is counted missed
        now = self.clock()
        running = await self.book.update(
            schedule_id, lambda s: s.evolve(paused=False, note="", updated_at=now)
        )
        return pb.UnpauseScheduleResponse(schedule=await self.message(running)).SerializeToString()

    async def trigger(self, request: pb.TriggerScheduleRequest) -> bytes:
        schedule = await self._get(requests.schedule_id(request.schedule_id))
        checker = Checker()
        overlap = requests.overlap_of(checker, request.overlap, Overlap.ALLOW_ALL)
        request_id = requests.request_id(checker, request.request_id)
        checker.done()
        now = self.clock()
        key = (
            f"schedule:{schedule.schedule_id}:trigger:{request_id}"
            if request_id
            else rules.run_key(schedule.schedule_id, now)
        )
        after, made = await self.runner.extra(schedule, [now], [key], overlap)
        answer = pb.TriggerScheduleResponse(schedule=await self.message(after))
        if made:
            answer.task.CopyFrom(task_to_proto(made[0]))
        return answer.SerializeToString()

    async def backfill(self, request: pb.BackfillScheduleRequest) -> bytes:
        schedule = await self._get(requests.schedule_id(request.schedule_id))
        start, end = requests.window(request)
        checker = Checker()
        overlap = requests.overlap_of(checker, request.overlap, Overlap.ALLOW_ALL)
        times = [t for t in schedule.spec.times(math.nextafter(start, -math.inf), end) if t < end]
        if len(times) > requests.MAX_BACKFILL:
            checker.fail("end_at", f"the window holds {len(times)} runs; at most 1000 at once")
        checker.done()
        keys = [rules.run_key(schedule.schedule_id, t) for t in times]
        after, made = await self.runner.extra(schedule, times, keys, overlap)
        answer = pb.BackfillScheduleResponse(
            tasks=[task_to_proto(task) for task in made], schedule=await self.message(after)
        )
        return answer.SerializeToString()

    async def watch(self, request: pb.WatchSchedulesRequest) -> AsyncIterator[bytes]:
        """Every schedule as it stands, then each change, with heartbeats. A state whose
        runs are decided but not made yet is not shown: its runs show when they are made."""
        changes: asyncio.Queue[tuple[Schedule, bool] | None] = asyncio.Queue(WATCH_BUFFER)
        overflowed = False
        tenant = current_tenant()

        def listen(schedule: Schedule, removed: bool) -> None:
            nonlocal overflowed
            if schedule.tenant != tenant or (schedule.pending and not removed):
                return
            try:
                changes.put_nowait((schedule, removed))
            except asyncio.QueueFull:
                overflowed = True

        unfollow = self.book.follow(listen)
        self._watchers.add(changes)
        try:
            for schedule in self.book.all():
                if schedule.tenant != tenant:
                    continue
                yield _event(pb.SCHEDULE_EVENT_TYPE_CURRENT, await self.message(schedule))
            while not overflowed:
                try:
                    change = await asyncio.wait_for(changes.get(), HEARTBEAT)
                except TimeoutError:
                    yield _event(pb.SCHEDULE_EVENT_TYPE_HEARTBEAT, None)
                    continue
                if change is None:
                    raise ShuttingDown()
                schedule, removed = change
                kind = pb.SCHEDULE_EVENT_TYPE_REMOVED if removed else pb.SCHEDULE_EVENT_TYPE_CHANGED
                yield _event(kind, await self.message(schedule))
            raise WatcherTooSlow(WATCH_BUFFER, 0)
        finally:
            unfollow()
            self._watchers.discard(changes)

    async def _get(self, schedule_id: str) -> Schedule:
        """The schedule, or NOT_FOUND (for another tenant's as for one that never was); one
        just made on another server of a shared store is found."""
        schedule = await self.book.find(schedule_id)
        if schedule is None or schedule.tenant != current_tenant():
            raise ScheduleNotFound(schedule_id)
        return schedule

    async def message(self, schedule: Schedule) -> pb.Schedule:
        """The schedule as the contract shows it, with its next times and running runs."""
        runs = TaskFilter(labels={SCHEDULE_LABEL: schedule.schedule_id}, statuses=UNFINISHED)
        running, _ = await self.store.list(runs, 0, SHOWN_RUNNING)
        info = pb.ScheduleInfo(
            next_run_times=[_stamp(t) for t in rules.next_times(schedule)],
            run_count=schedule.run_count,
            running_task_ids=[task.task_id for task in running],
            skipped=schedule.skipped,
            buffer_dropped=schedule.buffer_dropped,
            missed=schedule.missed,
            buffered=len(schedule.buffer),
            ended=schedule.ended,
        )
        if schedule.last_run is not None:
            last = schedule.last_run
            info.last_run.CopyFrom(
                pb.ScheduleRun(
                    nominal_time=_stamp(last.nominal),
                    made_at=_stamp(last.made_at),
                    task_id=last.task_id,
                )
            )
        return pb.Schedule(
            schedule_id=schedule.schedule_id,
            schedule=schedule.template,
            paused=schedule.paused,
            note=schedule.note,
            info=info,
            created_at=_stamp(schedule.created_at),
            updated_at=_stamp(schedule.updated_at),
        )


def _event(kind: int, schedule: pb.Schedule | None) -> bytes:
    event = pb.WatchSchedulesResponse(type=kind)  # type: ignore[arg-type]
    if schedule is not None:
        event.schedule.CopyFrom(schedule)
    return event.SerializeToString()


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.seconds, stamp.nanos = divmod(round(seconds * 1e9), 1_000_000_000)
    return stamp


def method_handlers(api: ScheduleServiceApi) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The RPC method handlers of ScheduleService, by method name."""
    methods: dict[str, tuple[Any, Any]] = {
        "CreateSchedule": (api.create, pb.CreateScheduleRequest),
        "GetSchedule": (api.get, pb.GetScheduleRequest),
        "ListSchedules": (api.list, pb.ListSchedulesRequest),
        "UpdateSchedule": (api.update, pb.UpdateScheduleRequest),
        "DeleteSchedule": (api.delete, pb.DeleteScheduleRequest),
        "PauseSchedule": (api.pause, pb.PauseScheduleRequest),
        "UnpauseSchedule": (api.unpause, pb.UnpauseScheduleRequest),
        "TriggerSchedule": (api.trigger, pb.TriggerScheduleRequest),
        "BackfillSchedule": (api.backfill, pb.BackfillScheduleRequest),
    }
    handlers = {
        name: unary_method(behaviour, kind, RECEIVE_LIMITS[name])
        for name, (behaviour, kind) in methods.items()
    }
    handlers["WatchSchedules"] = stream_method(
        api.watch, pb.WatchSchedulesRequest, RECEIVE_LIMITS["WatchSchedules"]
    )
    return handlers
