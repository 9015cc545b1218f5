"""The schedule calls of both clients (`client.schedules`) against a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta

import pytest

from conveyor import InvalidArgument, NotFound, Overlap, Schedule, ScheduleEventKind
from tests.client_support import KINDS, Twin, open_twin
from tests.conftest import ServerThread


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def schedules(kind: str, server: ServerThread) -> AsyncIterator[Twin]:
    async with open_twin(kind, server.address) as client:
        yield Twin(client.client.schedules)  # type: ignore[arg-type]


async def test_a_schedule_is_made_shown_changed_and_deleted(schedules: Twin) -> None:
    made: Schedule = await schedules.create(
        "echo", {"n": 1}, daily="02:30", time_zone="Europe/Berlin", overlap=Overlap.BUFFER_ONE,
        labels={"team": "data"}, description="nightly", request_id="nightly-1",
    )  # fmt: skip
    assert (made.task_type, made.parameters, made.daily, made.time_zone) == (
        "echo",
        {"n": 1},
        time(2, 30),
        "Europe/Berlin",
    )
    assert made.overlap is Overlap.BUFFER_ONE and made.when == "daily at 02:30:00 Europe/Berlin"
    assert len(made.next_run_times) == 5 and made.next_run_times[0] > datetime.now(UTC)
    again = await schedules.create(
        "echo", {"n": 1}, daily="02:30", time_zone="Europe/Berlin", overlap=Overlap.BUFFER_ONE,
        labels={"team": "data"}, description="nightly", request_id="nightly-1",
    )  # fmt: skip
    assert again.schedule_id == made.schedule_id
    assert made.schedule_id in [s.schedule_id for s in await schedules.list()]
    updated = await schedules.update(made.schedule_id, "echo", every=timedelta(hours=1))
    assert (updated.every, updated.daily) == (timedelta(hours=1), None)
    paused = await schedules.pause(made.schedule_id, note="holidays")
    assert (paused.paused, paused.note, paused.next_run_times) == (True, "holidays", [])
    assert not (await schedules.unpause(made.schedule_id)).paused
    await schedules.delete(made.schedule_id)
    with pytest.raises(NotFound):
        await schedules.get(made.schedule_id)


async def test_trigger_and_backfill_make_runs_once(schedules: Twin) -> None:
    made = await schedules.create("echo", cron="0 * * * *")
    task = await schedules.trigger(made.schedule_id, request_id="now-1")
    assert task is not None and task.labels["conveyor/schedule"] == made.schedule_id
    assert (await schedules.trigger(made.schedule_id, request_id="now-1")).task_id == task.task_id
    end = datetime(2026, 1, 1, 3, tzinfo=UTC)
    filled = await schedules.backfill(made.schedule_id, end - timedelta(hours=3), end)
    assert [t.labels["conveyor/nominal-time"] for t in filled] == [
        "2026-01-01T00:00:00Z",
        "2026-01-01T01:00:00Z",
        "2026-01-01T02:00:00Z",
    ]
    assert (await schedules.get(made.schedule_id)).run_count == 4


async def test_a_schedule_every_second_makes_its_runs_and_the_watch_shows_them(
    schedules: Twin,
) -> None:
    made = await schedules.create("echo", every=1, max_runs=2)
    seen = await schedules.collect(
        "watch",
        each=lambda event: (
            event.schedule.schedule_id == made.schedule_id and event.schedule.run_count == 2
        ),
    )
    assert seen[-1].kind is ScheduleEventKind.CHANGED and seen[-1].schedule.ended
    assert seen[-1].schedule.next_run_times == []


async def test_bad_input_is_refused_before_or_by_the_server(schedules: Twin) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        await schedules.create("echo", every=60, cron="* * * * *")
    with pytest.raises(ValueError, match="time of day"):
        await schedules.create("echo", daily="half past two")
    with pytest.raises(InvalidArgument) as refused:
        await schedules.create("echo", cron="* * *", time_zone="Nowhere/Town")
    assert "schedule.spec.time_zone" in {v.field for v in refused.value.field_violations}
