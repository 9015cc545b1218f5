"""`conveyor schedule ...` against a real server, run in this process."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from conveyor import Client
from conveyor.cli import main
from tests.conftest import ServerThread
from tests.test_cli import Run


@pytest.fixture
def conveyor(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    def run(*args: str) -> Run:
        code = main(["--server", server.address, *args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return Run(code, captured.out, captured.err)

    return run


def test_help_lists_every_action(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "--help"]) == 0
    text = capsys.readouterr().out
    for action in ("create", "list", "get", "update", "pause", "unpause", "trigger"):
        assert action in text
    assert "backfill" in text and "delete" in text


def test_a_schedule_from_create_to_delete(
    conveyor: Callable[..., Run], server: ServerThread
) -> None:
    made = conveyor(
        "--json", "schedule", "create", "echo", "--daily", "02:30", "--zone", "Europe/Berlin",
        "-p", "n=1", "--overlap", "buffer-one", "--label", "team=data",
    )  # fmt: skip
    assert made.code == 0, made.err
    shown = json.loads(made.out)
    schedule_id = shown["scheduleId"]
    assert {"taskType", "timeZone", "nextRunTimes", "runCount", "runningTaskIds"} <= set(shown)
    assert not [key for key in shown if "_" in key]  # named as the proto's JSON names fields
    assert shown["when"] == "daily at 02:30:00 Europe/Berlin" and shown["overlap"] == "BUFFER_ONE"
    got = conveyor("schedule", "get", schedule_id[:8])
    assert "next run" in got.out and ("CET" in got.out or "CEST" in got.out)
    assert schedule_id[:8] in conveyor("schedule", "list").out
    assert schedule_id[:8] in conveyor("schedule", "list", "--label", "team=data").out
    assert schedule_id[:8] not in conveyor("schedule", "list", "--type", "sleep").out
    paused = conveyor("schedule", "pause", schedule_id, "--note", "holidays")
    assert "paused: holidays" in paused.out
    assert "active" in conveyor("schedule", "unpause", schedule_id).out
    trigger = conveyor("schedule", "trigger", schedule_id)
    assert trigger.code == 0 and "conveyor/schedule" in trigger.out
    filled = conveyor(
        "--json", "schedule", "backfill", schedule_id,
        "--from", "2026-01-01T00:00:00+01:00", "--to", "2026-01-03T00:00:00+01:00",
    )  # fmt: skip
    assert len(filled.out.splitlines()) == 2  # two days at 02:30
    updated = conveyor("schedule", "update", schedule_id, "echo", "--cron", "0 9 * * MON-FRI")
    assert "cron 0 9 * * MON-FRI" in updated.out
    assert conveyor("schedule", "delete", schedule_id).code == 0
    with Client(server.address) as client:
        assert schedule_id not in [s.schedule_id for s in client.schedules.list()]


def test_bad_input_is_a_usage_error(conveyor: Callable[..., Run]) -> None:
    bad = conveyor("schedule", "create", "echo", "--cron", "not a cron")
    assert bad.code == 2 and "schedule.spec.cron" in bad.err
    neither = conveyor("schedule", "create", "echo")
    assert neither.code == 2
    missing = conveyor("schedule", "get", "0f0e0d0c")
    assert missing.code == 4
