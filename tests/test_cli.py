"""The `conveyor` command through its entry point: what it prints, and its exit codes.

Most tests call `main` in the test process; the live views, Ctrl-C and a closed pipe are
tried on real processes, the live views in a pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from conveyor import Client, TaskStatus, _views
from conveyor.cli import main
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyord import api
from tests.client_support import Calls, ScriptedServer, closed_port_address
from tests.conftest import ServerThread
from tests.processes import SOURCE_PATH

ROOT = Path(__file__).resolve().parent.parent
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours, cursor moves, clearing lines
StartServer = Callable[..., ServerThread]


class Run:
    """What one run of the command printed, and how it exited."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines()]


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
    with Client(server.address) as running:
        yield running


# -- help ---------------------------------------------------------------------------


def test_help_documents_the_commands_and_the_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    commands = ("create", "get", "list", "cancel", "pause", "resume", "send", "watch", "wait")
    for command in commands:
        assert command in text
    for code, meaning in [
        ("0", "COMPLETED"),
        ("1", "FAILED"),
        ("2", "bad usage"),
        ("3", "CANCELLED"),
        ("4", "no such task"),
        ("5", "cannot reach the server"),
        ("6", "timed out"),
        ("7", "any other error"),
    ]:
        assert any(line.split()[:1] == [code] and meaning in line for line in text.splitlines())


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("create", ["-p", "--json-params", "--priority", "--timeout", "--label", "--wait"]),
        ("create", ["--watch", "--max-attempts", "--request-id", "--wait-timeout"]),
        ("create", ["--start-after", "--start-at", "--queue-timeout"]),
        ("get", []),
        ("list", ["--status", "--type", "--label", "--limit"]),
        ("cancel", ["--reason", "--label", "--type", "--dry-run", "--yes"]),
        ("pause", ["--reason"]),
        ("resume", []),
        ("send", ["-p", "--json-input", "--request-id"]),
        ("watch", ["--all", "--status", "--type", "--label", "--timeout"]),
        ("wait", ["--timeout"]),
    ],
)
def test_every_command_has_help_with_its_options(
    command: str, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for option in [*options, "--server", "--json", "--rpc-timeout", "exit codes"]:
        assert option in text


# -- create -------------------------------------------------------------------------


def test_create_shows_the_new_task(conveyor: Callable[..., Run]) -> None:
    run = conveyor("create", "sleep", "-p", "seconds=0.01", "--label", "team=data")
    assert run.code == 0
    assert "CREATED" in run.out and "sleep" in run.out and "team=data" in run.out


def test_parameters_are_json_when_they_parse_and_strings_otherwise(
    conveyor: Callable[..., Run], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_file = tmp_path / "params.json"
    from_file.write_text('{"from_file": 1, "n": 0}')
    run = conveyor(
        "--json",
        "create",
        "echo",
        "--json-params",
        str(from_file),
        "-p",
        "n=2",
        "-p",
        "ratio=0.5",
        "-p",
        "flag=true",
        "-p",
        "none=null",
        "-p",
        "list=[1, 2]",
        "-p",
        'object={"a": "b"}',
        "-p",
        "word=hello",
        "-p",
        "spaced=two words",
        "-p",
        'quoted="7"',
        "-p",
        "equation=a=b",
    )
    assert run.code == 0
    assert run.json_lines()[0]["parameters"] == {
        "from_file": 1,
        "n": 2,
        "ratio": 0.5,
        "flag": True,
        "none": None,
        "list": [1, 2],
        "object": {"a": "b"},
        "word": "hello",
        "spaced": "two words",
        "quoted": "7",
        "equation": "a=b",
    }
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"piped": [true]}'))
    run = conveyor("--json", "create", "echo", "--json-params", "-")
    assert run.json_lines()[0]["parameters"] == {"piped": [True]}


@pytest.mark.parametrize("bad", ["novalue", "=1"])
def test_a_malformed_parameter_is_a_usage_error(conveyor: Callable[..., Run], bad: str) -> None:
    run = conveyor("create", "echo", "-p", bad)
    assert run.code == 2
    assert "KEY=VALUE" in run.err


def test_bad_json_parameters_are_a_usage_error(
    conveyor: Callable[..., Run], tmp_path: Path
) -> None:
    not_an_object = tmp_path / "list.json"
    not_an_object.write_text("[1, 2]")
    for source, message in [
        (str(not_an_object), "expected a JSON object"),
        (str(tmp_path / "missing.json"), "No such file"),
    ]:
        run = conveyor("create", "echo", "--json-params", source)
        assert (run.code, run.out) == (2, "")
        assert message in run.err


def test_a_request_the_server_calls_invalid_is_a_usage_error(conveyor: Callable[..., Run]) -> None:
    run = conveyor("create", "no_such_type", "--priority", "11")
    assert run.code == 2
    assert "invalid request" in run.err
    assert "task.task_type" in run.err and "task.priority" in run.err


def test_create_wait_exits_with_how_the_task_ended(conveyor: Callable[..., Run]) -> None:
    completed = conveyor("--json", "create", "echo", "-p", "x=1", "--wait")
    assert completed.code == 0
    created, ended = completed.json_lines()
    assert (created["status"], ended["status"]) == ("CREATED", "COMPLETED")
    assert created["taskId"] == ended["taskId"]
    assert ended["result"] == {"x": 1}
    failed = conveyor("create", "fail", "-p", "message=disk full", "--wait")
    assert failed.code == 1
    assert "FAILED" in failed.out and "HANDLER_ERROR: RuntimeError: disk full" in failed.out


def test_create_from_a_file_creates_every_task_in_order(
    conveyor: Callable[..., Run], client: Client, tmp_path: Path
) -> None:
    label = uuid.uuid4().hex
    lines = [
        json.dumps({"task_type": "echo", "parameters": {"i": i}, "labels": {"batch": label}})
        for i in range(3)
    ]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join([lines[0], "", *lines[1:]]) + "\n")
    run = conveyor("--json", "create", "--from-file", str(tasks))
    assert run.code == 0
    created = run.json_lines()
    assert [t["parameters"] for t in created] == [{"i": 0}, {"i": 1}, {"i": 2}]
    listed = [t.task_id for t in client.list(labels={"batch": label})]
    assert listed == [t["taskId"] for t in created]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"task_type": "echo"}\n[1, 2]\n', "line 2: expected a JSON object"),
        ('{"task_type": "echo"}\n{oops\n', "line 2:"),
        ('{"task_type": "echo", "colour": "red"}\n', "unknown keys ['colour']"),
    ],
)
def test_a_bad_task_file_is_a_usage_error_and_creates_nothing(
    conveyor: Callable[..., Run], client: Client, tmp_path: Path, content: str, message: str
) -> None:
    before = client.revision()
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(content)
    run = conveyor("create", "--from-file", str(tasks))
    assert run.code == 2
    assert message in run.err
    assert client.revision() == before


def test_a_task_file_that_is_not_there_is_a_usage_error(
    conveyor: Callable[..., Run], tmp_path: Path
) -> None:
    run = conveyor("create", "--from-file", str(tmp_path / "missing.jsonl"))
    assert run.code == 2
    assert "missing.jsonl" in run.err


def test_create_with_a_request_id_twice_gives_one_task(conveyor: Callable[..., Run]) -> None:
    request_id = str(uuid.uuid4())
    first = conveyor("--json", "create", "echo", "--request-id", request_id).json_lines()[0]
    again = conveyor("--json", "create", "echo", "--request-id", request_id).json_lines()[0]
    assert first["taskId"] == again["taskId"]


def test_create_watch_without_a_terminal_shows_a_line_per_state(
    conveyor: Callable[..., Run],
) -> None:
    run = conveyor("create", "sleep", "-p", "seconds=0.2", "-p", "steps=2", "--watch")
    assert run.code == 0
    lines = run.out.splitlines()
    created = lines[0].split()
    assert created[:2] == ["created", "task"] and len(created[2]) == 36  # the id, in full
    assert any("step 2 of 2" in line for line in lines)
    assert lines[-1].startswith("COMPLETED in") and '"slept": 0.2' in lines[-1]


# -- get, list, cancel --------------------------------------------------------------


def test_get_shows_the_task_or_says_there_is_none(
    conveyor: Callable[..., Run], client: Client
) -> None:
    task = client.create("echo", {"k": "v"}, description="for get")
    client.wait(task.task_id)
    run = conveyor("get", task.task_id)
    assert run.code == 0
    assert task.task_id in run.out and "COMPLETED" in run.out and "for get" in run.out
    data = conveyor("--json", "get", task.task_id).json_lines()
    assert [(d["taskId"], d["status"]) for d in data] == [(task.task_id, "COMPLETED")]
    assert data[0]["result"] == {"k": "v"}
    assert data[0]["finishedAt"].endswith("Z")
    missing = conveyor("get", str(uuid.uuid4()))
    assert (missing.code, missing.out) == (4, "")
    assert "not found" in missing.err
    malformed = conveyor("get", "not-a-uuid")
    assert malformed.code == 2


def test_list_prints_an_aligned_table_and_keeps_the_filters(
    conveyor: Callable[..., Run], client: Client
) -> None:
    label = f"run={uuid.uuid4().hex}"
    labels = dict([label.split("=")])
    echo = client.create("echo", labels=labels)
    failing = client.create("fail", labels=labels)
    for task in (echo, failing):
        client.wait(task.task_id)
    run = conveyor("list", "--label", label)
    assert run.code == 0
    header, *rows = run.out.splitlines()
    assert header.split() == ["ID", "TYPE", "STATUS", "PROGRESS", "PRIORITY", "CREATED", "MESSAGE"]
    assert [row.split()[0] for row in rows] == [failing.task_id, echo.task_id]  # newest first
    status_at = header.index("STATUS")
    assert [row[status_at:].split()[0] for row in rows] == ["FAILED", "COMPLETED"]
    only_failed = conveyor("--json", "list", "--label", label, "--status", "failed")
    assert [t["taskId"] for t in only_failed.json_lines()] == [failing.task_id]
    by_type = conveyor("--json", "list", "--label", label, "--type", "echo")
    assert [t["taskId"] for t in by_type.json_lines()] == [echo.task_id]
    assert len(conveyor("--json", "list", "--label", label, "--limit", "1").json_lines()) == 1
    for bad in (["--status", "sleeping"], ["--limit", "0"], ["--limit", "-1"]):
        assert conveyor("list", *bad).code == 2


def test_list_shows_the_newest_first_and_limit_keeps_the_newest(
    conveyor: Callable[..., Run], client: Client
) -> None:
    labels = {"run": uuid.uuid4().hex}
    made = [client.create("echo", {"i": i}, labels=labels).task_id for i in range(5)]
    label = f"run={labels['run']}"

    def listed(*args: str) -> list[str]:
        run = conveyor("--json", "list", "--label", label, *args)
        assert run.code == 0, run.err
        return [task["taskId"] for task in run.json_lines()]

    assert listed() == made[::-1]
    assert listed("--limit", "2") == [made[4], made[3]]
    assert listed("--oldest-first") == made
    assert listed("--oldest-first", "--limit", "2") == [made[0], made[1]]
    table = conveyor("list", "--label", label, "--limit", "3").out.splitlines()
    assert [row.split()[0] for row in table[1:]] == [made[4], made[3], made[2]]


@pytest.mark.parametrize("columns", [60, 120])
def test_the_table_fits_the_screen_with_one_line_a_task(
    conveyor: Callable[..., Run], client: Client, monkeypatch: pytest.MonkeyPatch, columns: int
) -> None:
    labels = {"run": uuid.uuid4().hex}
    failed = client.create("fail", {"message": "the disk is full " * 8}, labels=labels)
    client.wait(failed.task_id)
    running = client.create("report_then_wait", {"seconds": 30}, labels=labels)
    for state in client.watch(running.task_id):
        if state.status is TaskStatus.RUNNING:
            break
    monkeypatch.setenv("COLUMNS", str(columns))
    run = conveyor("list", "--label", f"run={labels['run']}")
    client.cancel(running.task_id)
    assert run.code == 0
    header, *rows = run.out.splitlines()
    assert max(len(line) for line in [header, *rows]) <= columns
    assert len(rows) == 2  # one line a task, however long its message
    shown = [row.split()[0] for row in rows]
    statuses = [row[header.index("STATUS") :].split()[0] for row in rows]
    assert statuses == ["RUNNING", "FAILED"]  # in full
    assert rows[1].endswith("…")  # the message, cut short
    if columns == 60:
        assert header.split() == ["ID", "TYPE", "STATUS", "PROGRESS", "MESSAGE"]
        assert shown == [running.task_id[:8], failed.task_id[:8]]  # as the progress bar
        again = conveyor("--json", "get", shown[1])  # what it shows, the commands take
        assert again.json_lines()[0]["taskId"] == failed.task_id
    else:
        assert header.split() == [
            "ID", "TYPE", "STATUS", "PROGRESS", "PRIORITY", "CREATED", "MESSAGE"
        ]  # fmt: skip
        assert shown == [running.task_id, failed.task_id]


def test_json_names_the_fields_as_the_protos_json_mapping_does(
    conveyor: Callable[..., Run], client: Client
) -> None:
    labels = {"team_name": uuid.uuid4().hex}
    task = client.create("echo", {"snake_case": 1}, labels=labels)
    ended = client.wait(task.task_id)
    data = conveyor("--json", "get", task.task_id).json_lines()[0]
    assert set(data) == {field.json_name for field in task_pb2.TaskResponse.DESCRIPTOR.fields}
    assert set(json_format.MessageToDict(ended.proto)) <= set(data)  # as json_format names them
    assert data["taskId"] == task.task_id and data["createdAt"].endswith("Z")
    assert data["startDeadline"] is None  # every field, null when unset
    assert data["parameters"] == data["result"] == {"snake_case": 1}  # the data, as it is
    assert data["labels"] == labels
    label = f"team_name={labels['team_name']}"
    counted = conveyor("--json", "cancel", "--label", label, "--dry-run").json_lines()
    assert counted == [{"count": 0, "dryRun": True}]
    (listed,) = conveyor("--json", "list", "--label", label).json_lines()
    assert listed == {**data, "attempts": None}  # a list does not ask for the attempts
    (attempt,) = data["attempts"]
    assert {"startedAt", "endedAt"} <= set(attempt)  # inner records named alike


def test_cancel_shows_the_cancel_under_way_then_the_task_ends_cancelled(
    conveyor: Callable[..., Run], client: Client
) -> None:
    task = client.create("report_then_wait", {"seconds": 30})
    for state in client.watch(task.task_id):
        if state.progress == 0.25:
            break
    run = conveyor("--json", "cancel", task.task_id, "--reason", "enough")
    assert run.code == 0
    answer = run.json_lines()[0]
    assert answer["status"] == "RUNNING" and answer["cancelRequestedAt"]
    waited = conveyor("wait", task.task_id)
    assert waited.code == 3
    assert "CANCELLED" in waited.out and "enough" in waited.out
    watched = conveyor("watch", task.task_id)
    assert watched.code == 3
    assert watched.out.splitlines()[-1] == "CANCELLED: enough"


def test_cancel_by_label_counts_with_a_dry_run_then_cancels_only_those(
    conveyor: Callable[..., Run], client: Client
) -> None:
    ours = [client.create("echo", labels={"conv": "c1"}, start_after_seconds=3600) for _ in "abc"]
    theirs = client.create("echo", labels={"conv": "c2"}, start_after_seconds=3600)
    dry = conveyor("cancel", "--label", "conv=c1", "--dry-run")
    assert (dry.code, dry.out.strip()) == (0, "3 tasks would be cancelled")
    assert client.get(ours[0].task_id).status is TaskStatus.CREATED
    run = conveyor("--json", "cancel", "--label", "conv=c1", "--reason", "closed")
    assert run.json_lines() == [{"count": 3, "dryRun": False}]
    assert {client.get(task.task_id).status for task in ours} == {TaskStatus.CANCELLED}
    assert client.get(theirs.task_id).status is TaskStatus.CREATED


@pytest.mark.parametrize(
    "args",
    [["cancel"], ["cancel", "--dry-run"], ["cancel", str(uuid.uuid4()), "--label", "a=b"]],
)
def test_cancel_needs_an_id_or_a_filter_and_not_both(
    conveyor: Callable[..., Run], args: list[str]
) -> None:
    run = conveyor(*args)
    assert run.code == 2 and "--label" in run.err


def test_a_delayed_task_shows_when_it_starts(conveyor: Callable[..., Run], client: Client) -> None:
    run = conveyor("create", "echo", "--start-at", "2099-01-01T00:00:00+00:00")
    assert run.code == 2 and "366 days" in run.err  # too far ahead, refused by the server
    run = conveyor("create", "echo", "--start-after", "600", "--queue-timeout", "60")
    assert run.code == 0
    assert "CREATED" in run.out and "starts" in run.out and "start deadline" in run.out


def test_pause_and_resume_show_the_task(conveyor: Callable[..., Run], client: Client) -> None:
    task = client.create("echo", start_after_seconds=3600)
    run = conveyor("pause", task.task_id, "--reason", "hold")
    assert run.code == 0 and "PAUSED" in run.out and "hold" in run.out
    listed = conveyor("list", "--status", "paused")
    assert task.task_id[:8] in listed.out
    run = conveyor("resume", task.task_id)
    assert run.code == 0 and "CREATED" in run.out


def test_pause_of_a_running_task_that_cannot_pause_says_so(
    conveyor: Callable[..., Run], client: Client
) -> None:
    task = client.create("report_then_wait", {"seconds": 30})
    for state in client.watch(task.task_id):
        if state.status is TaskStatus.RUNNING:
            break
    run = conveyor("pause", task.task_id)
    assert run.code == 0 and "not paused" in run.err and "RUNNING" in run.out
    client.cancel(task.task_id)


def test_pause_of_a_running_handler_that_can_pause_says_when(
    conveyor: Callable[..., Run], client: Client
) -> None:
    task = client.create("pausable")
    for state in client.watch(task.task_id):
        if state.status is TaskStatus.RUNNING:
            break
    run = conveyor("pause", task.task_id, "--reason", "look first")
    assert run.code == 0 and "next pause point" in run.out and "pause asked" in run.out
    for state in client.watch(task.task_id):
        if state.status is TaskStatus.PAUSED:
            break
    shown = conveyor("get", task.task_id)
    assert "PAUSED" in shown.out and "look first" in shown.out
    assert "RUNNING" in conveyor("resume", task.task_id).out
    client.cancel(task.task_id)


def test_send_gives_a_waiting_task_its_input(
    conveyor: Callable[..., Run], client: Client, tmp_path: Path
) -> None:
    task = client.create("ask", {"timeout": 600})
    for state in client.watch(task.task_id):
        if state.status is TaskStatus.WAITING_INPUT:
            break
    shown = conveyor("get", task.task_id)
    assert "WAITING_INPUT" in shown.out and "your name? [name]" in shown.out
    assert "input by" in shown.out
    run = conveyor("send", task.task_id, "-p", "text=Ann")
    assert run.code == 0 and "input 1 sent" in run.out and "CREATED" in run.out
    colour = tmp_path / "colour.json"
    colour.write_text('{"text": "green"}')
    for state in client.watch(task.task_id):
        if state.input_label == "colour":
            break
    assert (
        conveyor("send", task.task_id, "--json-input", str(colour), "--request-id", "c-1").code == 0
    )
    assert client.wait(task.task_id).result["colour"] == {"text": "green"}
    late = conveyor("send", task.task_id, "-p", "text=late")
    assert late.code == 7 and "already ended" in late.err
    bad = conveyor("send", task.task_id, "--json-input", str(tmp_path / "missing.json"))
    assert bad.code == 2 and "--json-input" in bad.err


def test_cancel_of_a_task_that_completed_is_another_error(
    conveyor: Callable[..., Run], client: Client
) -> None:
    task = client.create("echo")
    client.wait(task.task_id)
    run = conveyor("cancel", task.task_id)
    assert run.code == 7
    assert "already ended" in run.err


# -- IDs given by their start ------------------------------------------------------


def test_every_command_takes_the_start_of_a_task_id(
    conveyor: Callable[..., Run], client: Client
) -> None:
    task = client.create("report_then_wait", {"seconds": 30})
    short = task.task_id[:8]  # as the progress bar shows it
    shown = conveyor("--json", "get", short)
    assert shown.code == 0
    assert shown.json_lines()[0]["taskId"] == task.task_id
    for given in (task.task_id[:4], short.upper(), task.task_id[:9], task.task_id[:-1]):
        assert task.task_id in conveyor("get", given).out
    cancelled = conveyor("--json", "cancel", short, "--reason", "by its prefix")
    assert cancelled.code == 0
    assert cancelled.json_lines()[0]["taskId"] == task.task_id
    waited = conveyor("--json", "wait", short)
    assert waited.code == 3
    assert waited.json_lines()[-1]["taskId"] == task.task_id
    watched = conveyor("watch", short)
    assert watched.code == 3
    assert watched.out.splitlines()[-1] == "CANCELLED: by its prefix"


def test_the_start_of_an_id_that_several_tasks_have_is_a_usage_error(
    conveyor: Callable[..., Run], client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Have the server give out ids that start alike, as some ids do by chance among many.
    random_id = api.new_task_id
    monkeypatch.setattr(api, "new_task_id", lambda: "0ddba11" + random_id()[7:])
    first, second = client.create("echo"), client.create("echo")
    for command in ("get", "cancel", "watch", "wait"):
        run = conveyor(command, "0DDBA11")
        assert (run.code, run.out) == (2, "")
        assert "0ddba11 is ambiguous" in run.err
        assert first.task_id in run.err and second.task_id in run.err
    assert client.get(first.task_id).status is not TaskStatus.CANCELLED
    assert client.get(second.task_id).status is not TaskStatus.CANCELLED
    longer = conveyor("--json", "wait", first.task_id[:-1])  # more of the id is unique again
    assert (longer.code, longer.json_lines()[-1]["taskId"]) == (0, first.task_id)


def test_the_start_of_an_id_that_no_task_has_is_not_found(
    conveyor: Callable[..., Run], client: Client
) -> None:
    task = client.create("echo")
    other = ("1" if task.task_id[0] != "1" else "2") + task.task_id[1:8]
    for command in ("get", "cancel", "watch", "wait"):
        run = conveyor(command, other)
        assert (run.code, run.out) == (4, "")
        assert "not found" in run.err and other in run.err


def test_a_whole_id_goes_straight_to_the_server_and_the_start_of_one_costs_one_list(
    start_server: StartServer, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = Calls()
    server = start_server(interceptors=[calls])
    with Client(server.address) as client:
        task = client.create("report_then_wait", {"seconds": 30})
        for args in (["get"], ["pause"], ["resume"], ["send", "-p", "answer=42"]):
            for given, lists in (
                (task.task_id, 0),
                (task.task_id[:8], 1),
                (task.task_id.upper(), 0),
            ):
                before = calls.counts["List"]
                assert (
                    main(["--server", server.address, "--json", *args[:1], given, *args[1:]]) == 0
                )
                shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
                assert shown[-1]["taskId"] == task.task_id
                assert calls.counts["List"] - before == lists, (args, given)
        assert client.get(task.task_id).input_count == 3
        client.cancel(task.task_id)


@pytest.mark.parametrize("given", ["1", "abc", "xyz!", "0ddba11g", "0" * 37])
def test_what_is_neither_an_id_nor_its_start_is_a_usage_error(
    conveyor: Callable[..., Run], given: str
) -> None:
    for command in ("get", "cancel", "watch", "wait"):
        run = conveyor(command, given)
        assert (run.code, run.out) == (2, "")
        assert "is not a task id, nor the first 4 or more characters of one" in run.err


# -- watch, wait --------------------------------------------------------------------


def test_watch_json_prints_each_state_and_exits_with_how_the_task_ended(
    conveyor: Callable[..., Run], client: Client
) -> None:
    task = client.create("fail", {"message": "nope", "times": 1}, max_attempts=2)
    run = conveyor("--json", "watch", task.task_id)
    assert run.code == 0  # the second attempt succeeds
    states = run.json_lines()
    assert states[-1]["status"] == "COMPLETED"
    assert "FAILED" not in [state["status"] for state in states]
    assert any(state["attempt"] == 2 for state in states)
    failed = client.create("fail", {"message": "nope"})
    run = conveyor("watch", failed.task_id)
    assert run.code == 1
    assert run.out.splitlines()[-1] == "FAILED: HANDLER_ERROR: RuntimeError: nope"


def test_watch_and_wait_of_an_unknown_task_exit_not_found(conveyor: Callable[..., Run]) -> None:
    for command in ("watch", "wait"):
        run = conveyor(command, str(uuid.uuid4()))
        assert run.code == 4
        assert "not found" in run.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["watch"], "a task ID or --all"),
        (["watch", "--all", str(uuid.uuid4())], "a task ID or --all"),
        (["watch", str(uuid.uuid4()), "--type", "x"], "go with --all"),
        (["create", "echo", "--wait-timeout", "5"], "goes with --wait or --watch"),
        (["create", "echo", "--wait", "--watch"], "not allowed with"),
        (["create"], "a task TYPE or --from-file"),
        (["create", "echo", "--from-file", "tasks.jsonl"], "a task TYPE or --from-file"),
        (["create", "--from-file", "tasks.jsonl", "--priority", "3"], "go in the file"),
    ],
)
def test_options_that_do_not_go_together_are_a_usage_error(
    conveyor: Callable[..., Run], args: list[str], message: str
) -> None:
    run = conveyor(*args)
    assert (run.code, run.out) == (2, "")
    assert message in run.err


def test_wait_that_runs_out_of_time_exits_timed_out(
    conveyor: Callable[..., Run], client: Client
) -> None:
    task = client.create("report_then_wait", {"seconds": 30})
    run = conveyor("wait", task.task_id, "--timeout", "0.3")
    assert run.code == 6
    assert "timed out" in run.err and task.task_id in run.err
    watched = conveyor("watch", task.task_id, "--timeout", "0.3")
    assert watched.code == 6
    client.cancel(task.task_id)


def test_wait_of_a_task_that_ended_prints_it(conveyor: Callable[..., Run], client: Client) -> None:
    task = client.create("echo", {"n": 3})
    run = conveyor("--json", "wait", task.task_id)
    assert run.code == 0
    assert run.json_lines()[0]["result"] == {"n": 3}


# -- where the server is ------------------------------------------------------------


def test_the_server_comes_from_the_option_or_the_environment(
    server: ServerThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client(server.address) as client:
        task = client.create("echo")
    assert main(["get", task.task_id, "--server", server.address]) == 0  # after the command
    monkeypatch.setenv("CONVEYOR_SERVER", server.address)
    assert main(["get", task.task_id]) == 0
    assert capsys.readouterr().out.count(task.task_id) == 2


@pytest.mark.parametrize(
    "args",
    [
        ["get", str(uuid.uuid4())],
        ["get", "0ddba11"],  # the start of an id: the List that looks it up is refused
        ["create", "echo"],
        ["create", "echo", "--watch"],
        ["list"],
        ["watch", str(uuid.uuid4())],
        ["watch", "--all"],
        ["cancel", "--label", "a=b", "--yes"],
    ],
)
def test_a_server_that_refuses_the_connection_is_reported_at_once_with_exit_five(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    address = closed_port_address()  # nothing listens: the connection is refused
    started = time.monotonic()
    code = main(["--server", address, "--rpc-timeout", "30", *args])
    took = time.monotonic() - started
    captured = capsys.readouterr()
    assert code == 5
    assert captured.err == (
        f"conveyor: cannot reach the conveyor server at {address}: connection refused; is it "
        "running? Point --server or $CONVEYOR_SERVER at it.\n"
    )
    heading = "watching the running tasks, then every change; Ctrl-C to stop\n"
    assert captured.out == (heading if "--all" in args else "")
    assert took < 3.0  # at once (well under a second unloaded), not after the 30 s timeout


# -- a newer server: a status and an event type this conveyor has never seen --------

NEW_STATUS = task_pb2.TaskStatus.ValueType(9)  # such as a newer server's PAUSED
NEW_EVENT = pb.WatchEventType.ValueType(9)


def newer_event(
    kind: pb.WatchEventType.ValueType,
    revision: int,
    status: task_pb2.TaskStatus.ValueType,
    task_id: str,
) -> pb.WatchResponse:
    task = task_pb2.TaskResponse(
        task_id=task_id, task_type="sleep", status=status, revision=revision, message="zzz"
    )
    return pb.WatchResponse(type=kind, task=task, revision=revision)


@pytest.fixture
def against(capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """Run `conveyor --server ADDRESS ARGS...` in this process."""

    def run(address: str, *args: str) -> Run:
        code = main(["--server", address, *args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return Run(code, ESCAPE.sub("", captured.out), captured.err)

    return run


def as_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the command draw its live views, as on a terminal of 120 columns by 30 rows."""

    class TerminalConsole(_views._Console):
        def __init__(self, **options: Any) -> None:
            super().__init__(force_terminal=True, width=120, height=30, **options)

    monkeypatch.setattr(_views, "_Console", TerminalConsole)


def test_a_status_not_known_is_shown_by_its_number(against: Callable[..., Run]) -> None:
    task_id = str(uuid.uuid4())
    paused = newer_event(pb.WATCH_EVENT_TYPE_CURRENT, 5, NEW_STATUS, task_id).task
    with ScriptedServer(paused) as server:
        shown = against(server.address, "get", task_id)
        listed = against(server.address, "list")
        as_json = against(server.address, "--json", "get", task_id)
        by_unknown = against(server.address, "list", "--status", "unknown")
    assert shown.code == 0 and re.search(r"status\s+UNKNOWN\(9\)", shown.out)
    assert listed.code == 0 and re.search(rf"{task_id}\s+sleep\s+UNKNOWN\(9\)", listed.out)
    assert as_json.json_lines()[0]["status"] == "UNKNOWN(9)"
    assert by_unknown.code == 2  # no task is UNKNOWN on the server: not a status to filter by
    assert (
        "expected one of created, running, completed, failed, cancelled, paused" in by_unknown.err
    )


def test_wait_and_watch_go_on_through_a_status_and_an_event_type_not_known(
    against: Callable[..., Run],
) -> None:
    task_id = str(uuid.uuid4())
    events = [
        newer_event(pb.WATCH_EVENT_TYPE_CURRENT, 5, NEW_STATUS, task_id),
        pb.WatchResponse(type=NEW_EVENT, revision=6),
        newer_event(pb.WATCH_EVENT_TYPE_CHANGED, 7, task_pb2.TASK_STATUS_COMPLETED, task_id),
    ]
    with ScriptedServer(events[0].task, events, hold=False) as server:
        waited = against(server.address, "wait", task_id)
        watched = against(server.address, "--json", "watch", task_id)
        plain = against(server.address, "watch", task_id)
    assert waited.code == 0 and re.search(r"status\s+COMPLETED", waited.out)
    assert watched.code == 0
    assert [state["status"] for state in watched.json_lines()] == ["UNKNOWN(9)", "COMPLETED"]
    assert plain.code == 0
    lines = plain.out.splitlines()
    assert [line.split()[3] for line in lines[:-1]] == ["UNKNOWN(9)", "COMPLETED"]
    assert lines[-1].startswith("COMPLETED in")


def test_a_watch_that_ends_in_a_status_not_known_exits_seven(
    against: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task was removed while in it: the watch ends, without a known end to report."""
    as_on_a_terminal(monkeypatch)
    task_id = str(uuid.uuid4())
    paused = newer_event(pb.WATCH_EVENT_TYPE_CURRENT, 5, NEW_STATUS, task_id)
    removed = pb.WatchResponse(type=pb.WATCH_EVENT_TYPE_REMOVED, task=paused.task, revision=6)
    with ScriptedServer(paused.task, [paused, removed], hold=False) as server:
        run = against(server.address, "watch", task_id)  # the live progress bar
    assert run.code == 7
    assert re.search(r"sleep \w{8}.*UNKNOWN\(9\)\s+zzz", run.out)  # the bar's last state
    assert run.out.splitlines()[-1] == "UNKNOWN(9)"  # how it ended, as far as is known


def test_watch_all_skips_an_event_type_not_known_and_shows_a_status_not_known(
    against: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = str(uuid.uuid4())
    events = [  # after revision 5, which List gives as the one to start from
        pb.WatchResponse(type=NEW_EVENT, revision=6),
        newer_event(pb.WATCH_EVENT_TYPE_CHANGED, 7, NEW_STATUS, task_id),
    ]
    start = newer_event(pb.WATCH_EVENT_TYPE_CURRENT, 5, task_pb2.TASK_STATUS_RUNNING, task_id)
    watch_all = ["watch", "--all", "--timeout", "0.5"]
    with ScriptedServer(start.task, events) as server:
        as_json = against(server.address, "--json", *watch_all)
        plain = against(server.address, *watch_all)
        as_on_a_terminal(monkeypatch)
        live = against(server.address, *watch_all)
    assert as_json.code == plain.code == live.code == 6  # it ran out of time, as asked
    assert [(e["kind"], e["revision"], e["task"]["status"]) for e in as_json.json_lines()] == [
        ("CURRENT", 5, "RUNNING"),  # listed first, as running
        ("CHANGED", 7, "UNKNOWN(9)"),
    ]
    assert re.search(rf"CHANGED\s+{task_id}\s+sleep\s+UNKNOWN\(9\)", plain.out)
    assert re.search(rf"{task_id}\s+sleep\s+UNKNOWN\(9\)", live.out)  # the live table


# -- real processes: the installed command, live views, Ctrl-C, a closed pipe ------


def command_line() -> list[str]:
    installed = shutil.which("conveyor", path=str(Path(sys.executable).parent))
    assert installed, "the conveyor command is not installed (make setup)"
    return [installed]


def process_env(server: ServerThread) -> dict[str, str]:
    """The environment of a command run in a process: this checkout's sources come first (not
    those the command was installed from, which may be another checkout's)."""
    return {**os.environ, "CONVEYOR_SERVER": server.address, "PYTHONPATH": SOURCE_PATH}


class Terminal:
    """A process on a pseudo-terminal of 120 columns by 30 rows; its output as the screen got it."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self._master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        self.process = subprocess.Popen(
            args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "30"},
            cwd=ROOT,
        )
        os.close(slave)
        self.output = ""

    @property
    def text(self) -> str:
        """What was written, without the terminal's control sequences."""
        return ESCAPE.sub("", self.output)

    def read_until(self, text: str, timeout: float = 30) -> str:
        """Read until `text` shows (select waits on the terminal itself); returns `self.text`."""
        while text not in self.text:
            ready, _, _ = select.select([self._master], [], [], timeout)
            assert ready, f"{text!r} did not show; got:\n{self.output}"
            chunk = self._read()
            assert chunk, f"the process ended before {text!r} showed; got:\n{self.output}"
        return self.text

    def type(self, text: str) -> None:
        """Type `text` at the terminal, as a person would."""
        os.write(self._master, text.encode())

    def finish(self, timeout: float = 30) -> int:
        """Read everything up to the end of the process; returns its exit code."""
        while self._read():
            pass
        os.close(self._master)
        return self.process.wait(timeout)

    def _read(self) -> str:
        try:
            chunk = os.read(self._master, 65536).decode(errors="replace")
        except OSError:  # the process closed the terminal
            return ""
        self.output += chunk
        return chunk


def test_watch_in_a_terminal_draws_a_live_progress_bar_and_ends_with_the_result(
    server: ServerThread,
) -> None:
    args = [sys.executable, "-m", "conveyor", "create", "sleep", "-p", "seconds=1", "-p", "steps=4"]
    terminal = Terminal([*args, "--watch"], process_env(server))
    assert terminal.finish() == 0
    assert "\x1b[2K" in terminal.output  # the line is cleared and drawn again in place
    screen = terminal.text
    assert "━" in screen  # the bar
    for text in ("sleep", "step 2 of 4", "RUNNING", "25%", "100%", "0:00:0"):
        assert text in screen
    assert "COMPLETED in" in screen and '"slept": 1' in screen
    assert "Traceback" not in screen


def test_watch_in_a_terminal_ends_with_the_error_of_a_failed_task(
    server: ServerThread, client: Client
) -> None:
    task = client.create("fail", {"message": "out of paper"})
    terminal = Terminal([*command_line(), "watch", task.task_id], process_env(server))
    assert terminal.finish() == 1
    assert "FAILED: HANDLER_ERROR: RuntimeError: out of paper" in terminal.text


def test_a_bulk_cancel_at_a_terminal_asks_first_with_the_count(
    server: ServerThread, client: Client
) -> None:
    label = f"run={uuid.uuid4().hex}"
    tasks = [
        client.create("echo", labels=dict([label.split("=")]), start_after_seconds=3600)
        for _ in range(2)
    ]
    for answer, status in (("n", TaskStatus.CREATED), ("y", TaskStatus.CANCELLED)):
        terminal = Terminal([*command_line(), "cancel", "--label", label], process_env(server))
        terminal.read_until("cancel 2 unfinished tasks that match? [y/N]")
        terminal.type(f"{answer}\n")
        assert terminal.finish() == 0
        assert {client.get(task.task_id).status for task in tasks} == {status}
    assert "cancelled 2 tasks" in terminal.text


def test_watch_all_in_a_terminal_starts_with_the_running_tasks_and_goes_on_until_ctrl_c(
    start_server: StartServer,
) -> None:
    calls = Calls()
    server = start_server(interceptors=[calls])
    labels = {"run": uuid.uuid4().hex}
    with Client(server.address) as client:
        ended = client.create("echo", labels=labels)
        client.wait(ended.task_id)
        running = client.create("report_then_wait", {"seconds": 30}, labels=labels)
        for state in client.watch(running.task_id):
            if state.status is TaskStatus.RUNNING:
                break
        calls.arrived["Watch"].clear()
        args = [*command_line(), "watch", "--all", "--label", f"run={labels['run']}"]
        terminal = Terminal(args, process_env(server))
        screen = terminal.read_until(running.task_id)  # before any change: it was running
        assert "RUNNING" in screen and ended.task_id not in screen
        assert calls.arrived["Watch"].wait(30)  # after the List that found it
        first = client.create("echo", labels=labels)
        second = client.create("fail", labels=labels)
        terminal.read_until(second.task_id)
        screen = terminal.read_until("FAILED")
        assert first.task_id in screen and running.task_id in screen
        assert "ID" in screen and "STATUS" in screen
        terminal.process.send_signal(signal.SIGINT)
        assert terminal.finish() == 130
        client.cancel(running.task_id)
    assert "interrupted" in terminal.text
    assert "Traceback" not in terminal.text


def test_watch_all_for_a_script_prints_each_change_as_json_until_ctrl_c(
    start_server: StartServer,
) -> None:
    calls = Calls()
    server = start_server(interceptors=[calls])
    labels = {"run": uuid.uuid4().hex}
    process = subprocess.Popen(
        [*command_line(), "--json", "watch", "--all", "--label", f"run={labels['run']}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=process_env(server),
    )
    assert process.stdout is not None and process.stderr is not None
    assert calls.arrived["Watch"].wait(30)  # it has read the revision to start from
    with Client(server.address) as client:
        task = client.create("echo", labels=labels)
    events = []
    for line in process.stdout:
        events.append(json.loads(line))
        if events[-1]["task"]["status"] == "COMPLETED":
            break
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 130
    assert [event["kind"] for event in events] == ["CHANGED"] * len(events)  # none was running
    assert {event["task"]["taskId"] for event in events} == {task.task_id}
    assert events[0]["task"]["status"] == TaskStatus.CREATED.name
    assert "Traceback" not in process.stderr.read()
    process.stdout.close()
    process.stderr.close()


def test_ctrl_c_during_create_watch_says_the_task_goes_on_and_how_to_follow_it(
    server: ServerThread,
) -> None:
    args = ["create", "report_then_wait", "-p", "seconds=30", "--watch"]
    process = subprocess.Popen(
        [*command_line(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=process_env(server),
    )
    assert process.stdout is not None and process.stderr is not None
    created = process.stdout.readline()  # created task ID (report_then_wait)
    task_id = created.split()[2]
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 130
    assert process.stderr.read() == (
        f"conveyor: interrupted; task {task_id} goes on: follow it with "
        f"`conveyor watch {task_id}`\n"
    )
    process.stdout.close()
    process.stderr.close()
    with Client(server.address) as client:
        assert not client.get(task_id).status.terminal  # it goes on indeed
        client.cancel(task_id)


def test_ctrl_c_during_watch_in_a_terminal_says_the_task_goes_on(
    server: ServerThread, client: Client
) -> None:
    task = client.create("report_then_wait", {"seconds": 30})
    terminal = Terminal([*command_line(), "watch", task.task_id[:8]], process_env(server))
    terminal.read_until(f"report_then_wait {task.task_id[:8]}")  # the bar is drawn
    terminal.process.send_signal(signal.SIGINT)
    assert terminal.finish() == 130
    assert f"task {task.task_id} goes on: follow it with `conveyor watch {task.task_id}`" in (
        terminal.text.replace("\r\n", "")
    )
    assert "Traceback" not in terminal.text
    assert not client.get(task.task_id).status.terminal
    client.cancel(task.task_id)


@pytest.mark.parametrize("args", [["list"], ["--json", "list"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(
    server: ServerThread, args: list[str]
) -> None:
    with Client(server.address) as client:
        for _ in range(3):
            client.create("echo")
    process = subprocess.Popen(
        [*command_line(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=process_env(server),
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # as `| head` does once it has what it wants
    assert process.wait(30) == 141
    assert process.stderr.read() == b""
    process.stderr.close()
