"""`conveyor rerun`, `delete`, `types` and `count` through the command's entry point, against
a real server: what they print for people and with --json, and their exit codes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from conveyor import Client, TaskStatus
from conveyor.cli import main
from tests.conftest import ServerThread
from tests.test_cli import Run

MISSING = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
def conveyor(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """Run `conveyor --server <the test server> ARGS...` in this process."""

    def run(*args: str) -> Run:
        code = main(["--server", server.address, *args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return Run(code, captured.out, captured.err)

    return run


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.address, timeout=10) as opened:
        yield opened


@pytest.mark.parametrize(
    ("command", "options"),
    [("rerun", ["ID", "--request-id"]), ("delete", ["ID"]), ("types", []),
     ("count", ["--status", "--type"])],
)  # fmt: skip
def test_each_command_has_help_with_its_options(
    command: str, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for option in [*options, "--server", "--json", "exit codes"]:
        assert option in text


def test_rerun_shows_the_new_task(conveyor: Callable[..., Run], client: Client) -> None:
    ended = client.wait(client.create("echo", {"n": 2}).task_id)
    run = conveyor("rerun", ended.task_id[:8])  # the start of an id will do
    assert run.code == 0
    assert f"reruns task {ended.task_id}" in run.out
    assert "echo" in run.out and "CREATED" in run.out
    scripted = conveyor("--json", "rerun", ended.task_id, "--request-id", "r-1")
    (task,) = scripted.json_lines()
    assert (task["rerunOf"], task["status"], task["parameters"]) == (
        ended.task_id, "CREATED", {"n": 2},
    )  # fmt: skip
    again = conveyor("--json", "rerun", ended.task_id, "--request-id", "r-1").json_lines()
    assert again[0]["taskId"] == task["taskId"]


def test_delete_says_what_it_deleted(conveyor: Callable[..., Run], client: Client) -> None:
    first = client.wait(client.create("echo").task_id)
    second = client.wait(client.create("echo").task_id)
    run = conveyor("delete", first.task_id)
    assert (run.code, run.out.strip()) == (0, f"deleted task {first.task_id} (echo, COMPLETED)")
    (deleted,) = conveyor("--json", "delete", second.task_id).json_lines()
    assert (deleted["deleted"], deleted["taskId"], deleted["status"]) == (
        True, second.task_id, "COMPLETED",
    )  # fmt: skip
    gone = conveyor("delete", first.task_id)
    assert gone.code == 4 and "not found" in gone.err


def test_rerun_and_delete_of_a_task_not_ended_fail_saying_why(
    conveyor: Callable[..., Run], client: Client
) -> None:
    waiting = client.create("echo", start_after_seconds=600)
    for command in ("rerun", "delete"):
        run = conveyor(command, waiting.task_id)
        assert run.code == 7
        assert f"task {waiting.task_id} is CREATED" in run.err
    assert conveyor("delete", "xyz").code == 2  # not an id, nor the start of one


def test_types_shows_each_type_and_its_workers(conveyor: Callable[..., Run]) -> None:
    run = conveyor("types")
    assert run.code == 0
    lines = {line.split()[0]: line for line in run.out.splitlines()[1:]}
    assert "yes" in lines["echo"] and "conveyord/local (8 of 8 slots free)" in lines["echo"]
    assert "pausable" in lines["pausable"]
    scripted = {t["taskType"]: t for t in conveyor("--json", "types").json_lines()}
    assert scripted["echo"] == {
        "taskType": "echo",
        "accepted": True,
        "workers": [
            {"workerId": "conveyord/local", "local": True, "slots": 8, "freeSlots": 8,
             "pausable": False, "draining": False},
        ],
    }  # fmt: skip


def test_count_shows_a_table_of_types_by_status(
    conveyor: Callable[..., Run], client: Client
) -> None:
    client.wait(client.create("echo").task_id)
    client.wait(client.create("echo").task_id)
    client.create("sleep", start_after_seconds=600)
    run = conveyor("count")
    assert run.code == 0
    rows = [line.split() for line in run.out.splitlines()]
    assert rows == [
        ["TYPE", "CREATED", "COMPLETED", "TOTAL"],
        ["echo", "0", "2", "2"],
        ["sleep", "1", "0", "1"],
        ["TOTAL", "1", "2", "3"],
    ]
    (scripted,) = conveyor("--json", "count", "--status", "completed").json_lines()
    assert scripted["counts"] == [{"taskType": "echo", "status": "COMPLETED", "count": 2}]
    assert scripted["total"] == 2 and scripted["revision"] == client.revision()
    narrowed = conveyor("count", "--type", "sleep").out.splitlines()
    assert narrowed[-1].split() == ["TOTAL", "1", "1"]
    assert client.count_tasks(statuses=[TaskStatus.CREATED]).total == 1
