"""Schedules through a real server with a controllable clock: interval, daily and cron
schedules fire at their times (across a daylight-saving change), every overlap policy,
catch-up after a restart inside and outside its window, no double run with two runners on
one store or across restarts, pause, unpause, trigger, backfill, the counters, the watch,
and the refusal of bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from conveyor.v1 import schedule_service_pb2 as spb
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.schedule_service_pb2_grpc import ScheduleServiceStub
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.schedules.runner import ScheduleRunner
from tests.conftest import ManualClock, ServerThread
from tests.support import CANCELLED, COMPLETED, RUNNING, field_violations, final, wait_until

if TYPE_CHECKING:
    from conveyor.v1.schedule_service_pb2_grpc import ScheduleServiceAsyncStub
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

StartServer = Callable[..., ServerThread]
BERLIN = ZoneInfo("Europe/Berlin")
START = datetime(2026, 3, 28, 12, 0, tzinfo=BERLIN).timestamp()  # the day before summer time
SCHEDULE = "conveyor/schedule"
NOMINAL = "conveyor/nominal-time"


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.tasks: TaskServiceAsyncStub = TaskServiceStub(channel)
        self.schedules: ScheduleServiceAsyncStub = ScheduleServiceStub(channel)


@pytest.fixture
def clocked(start_server: StartServer) -> ServerThread:
    return start_server(clock=ManualClock(START))


@pytest.fixture
async def stubs(clocked: ServerThread) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(clocked.address) as channel:
        yield Stubs(channel)


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def stamp(value: float) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromNanoseconds(int(value * 1e9))
    return timestamp


def local(timestamp: timestamp_pb2.Timestamp) -> str:
    return datetime.fromtimestamp(timestamp.seconds, BERLIN).strftime("%m-%d %H:%M%z")


def every(value: float, task_type: str = "echo", **policy: Any) -> spb.ScheduleRequest:
    return spb.ScheduleRequest(
        spec=spb.ScheduleSpec(interval=spb.IntervalSpec(every=seconds(value))),
        task=task_pb2.TaskRequest(task_type=task_type),
        policy=spb.SchedulePolicy(**policy),
    )


async def make(stubs: Stubs, request: spb.ScheduleRequest, request_id: str = "") -> spb.Schedule:
    answer = await stubs.schedules.CreateSchedule(
        spb.CreateScheduleRequest(schedule=request, request_id=request_id)
    )
    return answer.schedule


async def get(stubs: Stubs, schedule_id: str) -> spb.Schedule:
    return (
        await stubs.schedules.GetSchedule(spb.GetScheduleRequest(schedule_id=schedule_id))
    ).schedule


async def runs(stubs: Stubs, schedule_id: str) -> list[task_pb2.TaskResponse]:
    """The schedule's runs, in the order they were made."""
    listed = await stubs.tasks.List(
        pb.ListRequest(filter=task_pb2.TaskFilter(labels={SCHEDULE: schedule_id}))
    )
    return list(listed.tasks)


async def until(
    stubs: Stubs, schedule_id: str, condition: Callable[[spb.Schedule], bool]
) -> spb.Schedule:
    """Watch the schedules until this one meets `condition`; that state."""
    async for event in stubs.schedules.WatchSchedules(spb.WatchSchedulesRequest()):
        if event.schedule.schedule_id == schedule_id and condition(event.schedule):
            return event.schedule
    raise AssertionError("the schedule watch ended")


async def runs_made(stubs: Stubs, schedule_id: str, count: int) -> spb.Schedule:
    return await until(stubs, schedule_id, lambda s: s.info.run_count >= count)


# -- when they fire ------------------------------------------------------------------------


async def test_an_interval_schedule_makes_a_run_at_each_time(
    clocked: ServerThread, stubs: Stubs
) -> None:
    schedule = await make(stubs, every(60))
    assert [local(t) for t in schedule.info.next_run_times][:2] == [
        "03-28 12:01+0100",
        "03-28 12:02+0100",
    ]
    clocked.advance(59)
    clocked.advance(1)
    await runs_made(stubs, schedule.schedule_id, 1)
    clocked.advance(60)
    shown = await runs_made(stubs, schedule.schedule_id, 2)
    made = await runs(stubs, schedule.schedule_id)
    assert [task.labels[NOMINAL] for task in made] == [
        "2026-03-28T11:01:00Z",
        "2026-03-28T11:02:00Z",
    ]
    assert shown.info.last_run.task_id == made[-1].task_id
    assert (await final(stubs.tasks, made[-1].task_id)).status == COMPLETED


async def test_a_daily_schedule_runs_after_the_gap_on_the_day_clocks_go_forward(
    clocked: ServerThread, stubs: Stubs
) -> None:
    request = spb.ScheduleRequest(
        spec=spb.ScheduleSpec(daily=spb.DailySpec(hour=2, minute=30), time_zone="Europe/Berlin"),
        task=task_pb2.TaskRequest(task_type="echo"),
    )
    schedule = await make(stubs, request)
    assert [local(t) for t in schedule.info.next_run_times][:2] == [
        "03-29 03:00+0200",  # 02:30 does not exist that day
        "03-30 02:30+0200",
    ]
    clocked.advance(86400)  # to 03-29 13:00 (summer time)
    await runs_made(stubs, schedule.schedule_id, 1)
    clocked.advance(86400)
    await runs_made(stubs, schedule.schedule_id, 2)
    made = await runs(stubs, schedule.schedule_id)
    assert [task.labels[NOMINAL] for task in made] == [
        "2026-03-29T01:00:00Z",
        "2026-03-30T00:30:00Z",
    ]


async def test_a_cron_schedule_in_a_zone(clocked: ServerThread, stubs: Stubs) -> None:
    request = spb.ScheduleRequest(
        spec=spb.ScheduleSpec(cron="0 9 * * MON-FRI", time_zone="Europe/Berlin"),
        task=task_pb2.TaskRequest(task_type="echo"),
    )
    schedule = await make(stubs, request)  # on Saturday 03-28
    assert [local(t) for t in schedule.info.next_run_times][:2] == [
        "03-30 09:00+0200",
        "03-31 09:00+0200",
    ]
    clocked.advance(45 * 3600)  # to Monday 09:00: none on Sunday
    await runs_made(stubs, schedule.schedule_id, 1)
    monday = (await runs(stubs, schedule.schedule_id))[0]
    assert (await final(stubs.tasks, monday.task_id)).status == COMPLETED
    clocked.advance(24 * 3600)
    shown = await runs_made(stubs, schedule.schedule_id, 2)
    made = await runs(stubs, schedule.schedule_id)
    assert [task.labels[NOMINAL] for task in made] == [
        "2026-03-30T07:00:00Z",
        "2026-03-31T07:00:00Z",
    ]
    assert shown.info.skipped == 0


# -- overlap -----------------------------------------------------------------------------


async def _busy(clocked: ServerThread, stubs: Stubs, overlap: int) -> tuple[str, str]:
    """A schedule every minute of a task that runs until cancelled, with its first run going."""
    schedule = await make(stubs, every(60, "cooperative_blocking", overlap=overlap))
    clocked.advance(60)
    await runs_made(stubs, schedule.schedule_id, 1)
    first = (await runs(stubs, schedule.schedule_id))[0]
    await wait_until(stubs.tasks, first.task_id, lambda t: t.status == RUNNING)
    return schedule.schedule_id, first.task_id


async def test_skip_counts_the_run_it_did_not_make(clocked: ServerThread, stubs: Stubs) -> None:
    schedule_id, first = await _busy(clocked, stubs, spb.OVERLAP_POLICY_SKIP)
    clocked.advance(60)
    shown = await until(stubs, schedule_id, lambda s: s.info.skipped == 1)
    assert shown.info.run_count == 1 and list(shown.info.running_task_ids) == [first]
    await stubs.tasks.Cancel(pb.CancelRequest(task_id=first))


@pytest.mark.parametrize(
    ("overlap", "dropped"),
    [(spb.OVERLAP_POLICY_BUFFER_ONE, 1), (spb.OVERLAP_POLICY_BUFFER_ALL, 0)],
)
async def test_a_buffered_run_is_made_when_the_previous_one_ends(
    clocked: ServerThread, stubs: Stubs, overlap: int, dropped: int
) -> None:
    schedule_id, first = await _busy(clocked, stubs, overlap)
    clocked.advance(60)
    clocked.advance(60)
    shown = await until(stubs, schedule_id, lambda s: s.info.buffered + s.info.buffer_dropped == 2)
    assert (shown.info.buffered, shown.info.buffer_dropped) == (2 - dropped, dropped)
    await stubs.tasks.Cancel(pb.CancelRequest(task_id=first))
    after = await runs_made(stubs, schedule_id, 2)
    made = await runs(stubs, schedule_id)
    assert made[1].labels[NOMINAL] == "2026-03-28T11:02:00Z"  # the buffered one, in order
    assert after.info.buffered == 1 - dropped
    for task in made[1:]:
        await stubs.tasks.Cancel(pb.CancelRequest(task_id=task.task_id))


async def test_cancel_other_cancels_the_previous_run(clocked: ServerThread, stubs: Stubs) -> None:
    schedule_id, first = await _busy(clocked, stubs, spb.OVERLAP_POLICY_CANCEL_OTHER)
    clocked.advance(60)
    await runs_made(stubs, schedule_id, 2)
    ended = await final(stubs.tasks, first)
    assert ended.status == CANCELLED and "CANCEL_OTHER" in ended.error.message
    second = (await runs(stubs, schedule_id))[1]
    await stubs.tasks.Cancel(pb.CancelRequest(task_id=second.task_id))


async def test_allow_all_runs_them_side_by_side(clocked: ServerThread, stubs: Stubs) -> None:
    schedule_id, _ = await _busy(clocked, stubs, spb.OVERLAP_POLICY_ALLOW_ALL)
    clocked.advance(60)
    shown = await runs_made(stubs, schedule_id, 2)
    made = await runs(stubs, schedule_id)
    await wait_until(stubs.tasks, made[1].task_id, lambda t: t.status == RUNNING)
    assert (await get(stubs, schedule_id)).info.running_task_ids == [t.task_id for t in made]
    assert shown.info.skipped == 0
    for task in made:
        await stubs.tasks.Cancel(pb.CancelRequest(task_id=task.task_id))


# -- restarts, and two runners ------------------------------------------------------------------


async def test_catch_up_after_a_restart_makes_the_latest_runs_within_the_window(
    start_server: StartServer, tmp_path: Any
) -> None:
    store = f"sqlite:{tmp_path / 'tasks.db'}"
    first = start_server(store=store, clock=ManualClock(START))
    async with grpc.aio.insecure_channel(first.address) as channel:
        request = every(60, overlap=spb.OVERLAP_POLICY_ALLOW_ALL, catchup_window=seconds(300))
        request.policy.catchup_limit = 2
        schedule = await make(Stubs(channel), request)
    first.stop()
    # Down for 20 minutes: 20 runs fell due; the 5 within the window may run, 2 of them do.
    again = start_server(store=store, clock=ManualClock(START + 1200 + 1))
    async with grpc.aio.insecure_channel(again.address) as channel:
        stubs = Stubs(channel)
        shown = await runs_made(stubs, schedule.schedule_id, 2)
        assert (shown.info.run_count, shown.info.missed) == (2, 18)
        made = await runs(stubs, schedule.schedule_id)
        assert [t.labels[NOMINAL] for t in made] == [
            "2026-03-28T11:19:00Z",
            "2026-03-28T11:20:00Z",
        ]
    again.stop()
    # The same moment again (a restart at once): nothing is made twice.
    third = start_server(store=store, clock=ManualClock(START + 1200 + 1))
    async with grpc.aio.insecure_channel(third.address) as channel:
        stubs = Stubs(channel)
        assert len(await runs(stubs, schedule.schedule_id)) == 2
        assert (await get(stubs, schedule.schedule_id)).info.run_count == 2


async def test_two_runners_on_one_store_make_each_run_once(
    clocked: ServerThread, stubs: Stubs
) -> None:
    server = clocked.server
    other = ScheduleRunner(server.store, server._make_runs, server.scheduler.clock)
    clocked.call(_start(other))
    try:
        request = every(60, overlap=spb.OVERLAP_POLICY_ALLOW_ALL)
        schedules = [await make(stubs, request) for _ in range(5)]
        for _ in range(3):
            clocked.advance(60)
        for schedule in schedules:
            await runs_made(stubs, schedule.schedule_id, 3)
            made = await runs(stubs, schedule.schedule_id)
            assert len(made) == len({t.labels[NOMINAL] for t in made}) == 3
    finally:
        clocked.call(_stop(other))


async def _start(runner: ScheduleRunner) -> None:
    runner.start()


async def _stop(runner: ScheduleRunner) -> None:
    runner.stop()


# -- pause, trigger, backfill ----------------------------------------------------------------


async def test_pause_counts_missed_runs_and_unpause_runs_from_now(
    clocked: ServerThread, stubs: Stubs
) -> None:
    schedule = await make(stubs, every(60))
    paused = await stubs.schedules.PauseSchedule(
        spb.PauseScheduleRequest(schedule_id=schedule.schedule_id, note="maintenance")
    )
    assert paused.schedule.paused and paused.schedule.note == "maintenance"
    assert not paused.schedule.info.next_run_times
    clocked.advance(180)
    shown = await until(stubs, schedule.schedule_id, lambda s: s.info.missed == 3)
    assert shown.info.run_count == 0
    unpaused = await stubs.schedules.UnpauseSchedule(
        spb.UnpauseScheduleRequest(schedule_id=schedule.schedule_id)
    )
    assert not unpaused.schedule.paused and unpaused.schedule.info.next_run_times
    clocked.advance(60)
    await runs_made(stubs, schedule.schedule_id, 1)


async def test_trigger_runs_once_now_and_backfill_makes_a_window_s_runs(
    clocked: ServerThread, stubs: Stubs
) -> None:
    schedule = await make(stubs, every(3600))
    trigger = spb.TriggerScheduleRequest(schedule_id=schedule.schedule_id, request_id="t-1")
    first = await stubs.schedules.TriggerSchedule(trigger)
    again = await stubs.schedules.TriggerSchedule(trigger)
    assert first.task.task_id == again.task.task_id  # one run per request id
    assert first.task.labels[SCHEDULE] == schedule.schedule_id
    backfill = spb.BackfillScheduleRequest(
        schedule_id=schedule.schedule_id,
        start_at=stamp(START - 3 * 3600),
        end_at=stamp(START),
    )
    filled = await stubs.schedules.BackfillSchedule(backfill)
    assert [t.labels[NOMINAL] for t in filled.tasks] == [
        "2026-03-28T08:00:00Z",
        "2026-03-28T09:00:00Z",
        "2026-03-28T10:00:00Z",
    ]
    refilled = await stubs.schedules.BackfillSchedule(backfill)
    assert [t.task_id for t in refilled.tasks] == [t.task_id for t in filled.tasks]
    assert refilled.schedule.info.run_count == 4  # the trigger and three runs, each once


# -- the API ---------------------------------------------------------------------------------


async def test_create_is_idempotent_and_list_get_delete_work(stubs: Stubs) -> None:
    one = await make(stubs, every(60), request_id="r-1")
    assert (await make(stubs, every(60), request_id="r-1")).schedule_id == one.schedule_id
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await make(stubs, every(120), request_id="r-1")
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    two = await make(stubs, every(120))
    page = await stubs.schedules.ListSchedules(spb.ListSchedulesRequest(page_size=1))
    assert [s.schedule_id for s in page.schedules] == [one.schedule_id]
    rest = await stubs.schedules.ListSchedules(
        spb.ListSchedulesRequest(page_size=1, page_token=page.next_page_token)
    )
    assert [s.schedule_id for s in rest.schedules] == [two.schedule_id]
    assert not rest.next_page_token
    labelled = every(60)
    labelled.task.labels["team"] = "data"
    three = await make(stubs, labelled)
    mine = await stubs.schedules.ListSchedules(
        spb.ListSchedulesRequest(labels={"team": "data"}, page_size=1)
    )
    assert [s.schedule_id for s in mine.schedules] == [three.schedule_id]
    with pytest.raises(grpc.aio.AioRpcError) as other_filter:
        await stubs.schedules.ListSchedules(
            spb.ListSchedulesRequest(task_type="echo", page_token=page.next_page_token)
        )
    assert "page_token" in field_violations(other_filter.value)
    await stubs.schedules.DeleteSchedule(spb.DeleteScheduleRequest(schedule_id=one.schedule_id))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await get(stubs, one.schedule_id)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_update_follows_the_new_spec_from_now(clocked: ServerThread, stubs: Stubs) -> None:
    schedule = await make(stubs, every(3600))
    updated = await stubs.schedules.UpdateSchedule(
        spb.UpdateScheduleRequest(schedule_id=schedule.schedule_id, schedule=every(60))
    )
    assert local(updated.schedule.info.next_run_times[0]) == "03-28 12:01+0100"
    clocked.advance(60)
    await runs_made(stubs, schedule.schedule_id, 1)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cron": "61 * * * *"}, "schedule.spec.cron"),
        ({"cron": "* * * * *", "time_zone": "Mars/Olympus"}, "schedule.spec.time_zone"),
        ({"cron": "* * * * *", "time_zone": "x" * 5000}, "schedule.spec.time_zone"),
        ({"interval": spb.IntervalSpec(every=seconds(0.5))}, "schedule.spec.interval.every"),
        ({}, "schedule.spec.when"),
    ],
)
async def test_a_bad_spec_is_refused_naming_its_field(
    stubs: Stubs, change: dict[str, Any], field: str
) -> None:
    request = spb.ScheduleRequest(
        spec=spb.ScheduleSpec(**change), task=task_pb2.TaskRequest(task_type="echo")
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await make(stubs, request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(refused.value)
    listed = await stubs.schedules.ListSchedules(spb.ListSchedulesRequest())
    assert not listed.schedules


async def test_a_template_that_create_would_refuse_is_refused(stubs: Stubs) -> None:
    request = every(60, "no.such.type")
    request.task.priority = 11
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await make(stubs, request)
    assert set(field_violations(refused.value)) >= {
        "schedule.task.task_type",
        "schedule.task.priority",
    }


async def test_the_watch_shows_every_schedule_then_each_change(
    clocked: ServerThread, stubs: Stubs
) -> None:
    schedule = await make(stubs, every(60))
    stream = stubs.schedules.WatchSchedules(spb.WatchSchedulesRequest())
    first = await stream.read()
    assert isinstance(first, spb.WatchSchedulesResponse)
    assert (first.type, first.schedule.schedule_id) == (
        spb.SCHEDULE_EVENT_TYPE_CURRENT,
        schedule.schedule_id,
    )
    clocked.advance(60)
    changed = await stream.read()
    assert isinstance(changed, spb.WatchSchedulesResponse)
    assert changed.type == spb.SCHEDULE_EVENT_TYPE_CHANGED and changed.schedule.info.run_count == 1
    stream.cancel()


def test_nominal_labels_are_utc() -> None:
    assert datetime(2026, 3, 28, 11, 1, tzinfo=UTC).timestamp() == START + 60
