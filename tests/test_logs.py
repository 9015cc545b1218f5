"""Structured logs of real `conveyord` (and `conveyor worker`) processes, read from their
stderr: a line per task transition, a line per RPC at debug only, handlers' own lines
with their task and attempt, as JSON and as text; and no opentelemetry without --tracing."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import Client, NotFound, TaskStatus, Unauthenticated
from conveyor.logs import AttemptFilter, JsonFormatter, PacedHandler, TextFormatter, line_writer
from conveyord.cli import build_parser, config_from_args
from tests.processes import ROOT, SOURCE_PATH, Conveyord

StartConveyord = Callable[..., Conveyord]
HANDLERS = ("--handlers", "tests.observed_handlers", "--retry-initial", "0.05")
FLAKY_FAILURE = "RuntimeError: first attempts fail"


def stopped_log(process: Conveyord) -> str:
    """Everything the process logged, once it has stopped (gracefully, on SIGTERM)."""
    process.process.send_signal(signal.SIGTERM)
    return process.rest_of_log()


def json_lines(log: str) -> list[dict[str, Any]]:
    """Every line of a JSON log, parsed (each line must be one JSON object)."""
    return [json.loads(line) for line in log.splitlines() if line.strip()]


def task_lines(entries: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["logger"] == "conveyord.tasks" and e["task_id"] == task_id]


def test_json_lines_tell_a_completed_a_retried_and_a_failed_task_s_steps(
    conveyord: StartConveyord,
) -> None:
    server = conveyord(*HANDLERS, "--log-format", "json")
    with Client(server.address) as client:
        completed = client.create("echo", {"x": 1})
        retried = client.create("observed.flaky", max_attempts=2)
        failed = client.create("fail", {"message": "boom"}, max_attempts=1)
        for task in (completed, retried, failed):
            client.wait(task.task_id, timeout=20)
    entries = json_lines(stopped_log(server))

    steps = task_lines(entries, completed.task_id)
    assert [e["message"] for e in steps] == ["task created", "task started", "task ended"]
    created, started, ended = steps
    assert created | {"time": None} == {
        "time": None, "level": "INFO", "logger": "conveyord.tasks", "message": "task created",
        "task_id": completed.task_id, "task_type": "echo", "tenant": "", "attempt": 1,
        "priority": 5,
    }  # fmt: skip
    assert (started["worker"], started["attempt"]) == ("conveyord/local", 1)
    assert (ended["status"], ended["attempt"]) == ("COMPLETED", 1)
    assert 0 <= ended["run_seconds"] <= ended["duration_seconds"] < 20
    assert "error_code" not in ended

    steps = task_lines(entries, retried.task_id)
    assert [(e["message"], e["attempt"]) for e in steps] == [
        ("task created", 1), ("task started", 1), ("task retried", 1), ("task started", 2),
        ("task ended", 2),
    ]  # fmt: skip
    retry = steps[2]
    assert (retry["error_code"], retry["error_message"]) == ("HANDLER_ERROR", FLAKY_FAILURE)
    assert (retry["next_attempt"], retry["worker"]) == (2, "conveyord/local")
    assert retry["retry_in_seconds"] == 0.05
    assert retry["error_type"] == "RuntimeError"  # the exception, as the task keeps it
    assert retry["traceback"].endswith(f"{FLAKY_FAILURE}\n")
    assert steps[-1]["status"] == "COMPLETED" and "error_code" not in steps[-1]

    steps = task_lines(entries, failed.task_id)
    assert [e["message"] for e in steps] == ["task created", "task started", "task ended"]
    assert {k: steps[-1][k] for k in ("status", "error_code", "error_message", "attempt")} == {
        "status": "FAILED", "error_code": "HANDLER_ERROR", "error_message": "RuntimeError: boom",
        "attempt": 1,
    }  # fmt: skip
    assert steps[-1]["error_type"] == "RuntimeError"
    assert steps[-1]["traceback"].startswith("Traceback (most recent call last):")

    (raised,) = [e for e in entries if e["level"] == "ERROR" and e["task_id"] == failed.task_id]
    assert (raised["attempt"], raised["task_type"]) == (1, "fail")
    assert raised["exception"].endswith("RuntimeError: boom")  # the traceback, in one field

    handled = [e for e in entries if e["logger"] == "tests.observed_handlers"]
    assert [(e["message"], e["task_id"], e["attempt"]) for e in handled] == [
        ("handling observed.flaky", retried.task_id, 1),
        ("handling observed.flaky", retried.task_id, 2),
    ]
    assert not [e for e in entries if e["logger"] == "conveyord.rpc"]  # debug only


def test_text_lines_carry_the_same_fields_as_key_value_pairs(conveyord: StartConveyord) -> None:
    server = conveyord(*HANDLERS)  # text is the default
    with Client(server.address) as client:
        flaky = client.create("observed.flaky", max_attempts=2)
        blocking = client.create("observed.blocking")
        for task in (flaky, blocking):
            client.wait(task.task_id, timeout=20)
    lines = stopped_log(server).splitlines()

    def line(text: str) -> str:
        (found,) = [one for one in lines if text in one]
        return found

    retried = line(f"conveyord.tasks: task retried task_id={flaky.task_id} ")
    assert (
        ' task_type=observed.flaky tenant="" attempt=1 next_attempt=2 worker=conveyord/local '
        f'retry_in_seconds=0.05 error_code=HANDLER_ERROR error_message="{FLAKY_FAILURE}" '
        'error_type=RuntimeError traceback="Traceback (most recent call last):\\n'
    ) in retried
    assert (
        line(f"task ended task_id={flaky.task_id} ")
        .split(" attempt=")[1]
        .startswith("2 status=COMPLETED duration_seconds=")
    )
    for attempt in (1, 2):
        handled = f"tests.observed_handlers: handling observed.flaky task_id={flaky.task_id} "
        assert line(handled + f"attempt={attempt}")
    # A blocking handler logs from its own thread, which has its attempt too.
    assert line(f"handling on a thread task_id={blocking.task_id} attempt=1")


def _token_file(tmp_path: Path) -> Path:
    entry = {
        "name": "team-a-ci", "tenant": "team-a", "permissions": ["admin"],
        "sha256": hashlib.sha256(b"secret-token").hexdigest(),
    }  # fmt: skip
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [entry]}))
    return path


def test_rpc_lines_appear_at_debug_with_method_tenant_code_duration_and_task(
    conveyord: StartConveyord, tmp_path: Path
) -> None:
    env = {"CONVEYORD_LOG_LEVEL": "debug", "CONVEYORD_LOG_FORMAT": "json"}
    server = conveyord("--token-file", str(_token_file(tmp_path)), env=env)
    missing = "00000000-0000-4000-8000-000000000000"
    with Client(server.address, token="secret-token") as client:
        task = client.create("echo")
        with pytest.raises(NotFound):
            client.get(missing)
    with Client(server.address, token="wrong") as stranger, pytest.raises(Unauthenticated):
        stranger.get(task.task_id)
    rpcs = [e for e in json_lines(stopped_log(server)) if e["logger"] == "conveyord.rpc"]

    fields = ("method", "service", "tenant", "code", "task_id")
    assert [{k: e.get(k) for k in fields} for e in rpcs] == [
        {"method": "Create", "service": "conveyor.v1.TaskService", "tenant": "team-a",
         "code": "OK", "task_id": task.task_id},
        {"method": "Get", "service": "conveyor.v1.TaskService", "tenant": "team-a",
         "code": "NOT_FOUND", "task_id": missing},
        # refused before its request is read: no tenant, no task
        {"method": "Get", "service": "conveyor.v1.TaskService", "tenant": "",
         "code": "UNAUTHENTICATED", "task_id": None},
    ]  # fmt: skip
    assert all(e["level"] == "DEBUG" and 0 < e["duration_ms"] < 10_000 for e in rpcs)


@pytest.fixture
def worker_processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_a_remote_worker_s_handler_lines_carry_task_and_attempt(
    conveyord: StartConveyord, worker_processes: list[subprocess.Popen[str]]
) -> None:
    server = conveyord("--task-type", "observed.flaky", "--retry-initial", "0.05")
    command = [sys.executable, "-m", "conveyor", "--server", server.address, "worker"]
    worker = subprocess.Popen(
        [*command, "--handlers", "tests.observed_handlers", "--worker-id", "w-1"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": SOURCE_PATH, "CONVEYOR_LOG_FORMAT": "json"},
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    worker_processes.append(worker)
    with Client(server.address) as client:
        task = client.create("observed.flaky", max_attempts=2)
        assert client.wait(task.task_id, timeout=20).status is TaskStatus.COMPLETED
    worker.send_signal(signal.SIGTERM)  # drains, then exits
    _, worker_log = worker.communicate(timeout=20)
    handled = [e for e in json_lines(worker_log) if e["logger"] == "tests.observed_handlers"]
    assert [(e["task_id"], e["attempt"]) for e in handled] == [(task.task_id, 1), (task.task_id, 2)]
    started = [line for line in stopped_log(server).splitlines() if "task started" in line]
    assert [line.rpartition(" tenant=")[2] for line in started] == [
        '"" attempt=1 worker=w-1',
        '"" attempt=2 worker=w-1',
    ]


def _imported_modules(conveyord: StartConveyord, *args: str) -> str:
    """The import log of a conveyord that served a Create and a Watch to a traced caller."""
    server = conveyord(*args, env={"PYTHONPROFILEIMPORTTIME": "1", "OTEL_TRACES_EXPORTER": "none"})
    from opentelemetry.sdk.trace import TracerProvider

    with (
        TracerProvider().get_tracer(__name__).start_as_current_span("caller"),
        Client(server.address) as client,
    ):
        task = client.create("echo")
        client.wait(task.task_id, timeout=20)
    return stopped_log(server)


def test_without_tracing_conveyord_imports_nothing_of_opentelemetry(
    conveyord: StartConveyord,
) -> None:
    assert "opentelemetry" not in _imported_modules(conveyord)
    assert "| opentelemetry.sdk.trace" in _imported_modules(conveyord, "--tracing")


def test_the_flags_and_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["--log-level", "DEBUG", "--log-format", "json"])
    assert (args.log_level, args.log_format, config_from_args(args).tracing) == (
        "debug", "json", False,
    )  # fmt: skip
    monkeypatch.setenv("CONVEYORD_TRACING", "1")
    monkeypatch.setenv("CONVEYORD_LOG_FORMAT", "json")
    args = build_parser().parse_args([])
    assert (args.log_level, args.log_format, config_from_args(args).tracing) == (
        "info", "json", True,
    )  # fmt: skip
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--log-format", "xml"])


def test_an_attempt_cut_short_by_a_crash_is_logged_as_retried_after_the_restart(
    conveyord: StartConveyord, tmp_path: Path
) -> None:
    store = ("--store", f"sqlite:{tmp_path / 'tasks.db'}", "--log-format", "json")
    first = conveyord(*store)
    with Client(first.address) as client:
        task = client.create("sleep", {"seconds": 60}, max_attempts=2)
        for state in client.watch(task.task_id, timeout=20):
            if state.status is TaskStatus.RUNNING:
                break
    first.process.kill()
    first.process.wait()
    second = conveyord(*store)
    with Client(second.address) as client:
        for state in client.watch(task.task_id, timeout=20):
            if state.status is TaskStatus.RUNNING and state.attempt == 2:
                break
        client.cancel(task.task_id, reason="enough")  # its second attempt is not awaited
        client.wait(task.task_id, timeout=20)
    steps = task_lines(json_lines(stopped_log(second)), task.task_id)
    assert [(e["message"], e["attempt"]) for e in steps][:2] == [
        ("task retried", 1), ("task started", 2),
    ]  # fmt: skip
    assert (steps[0]["error_code"], steps[0]["worker"]) == ("INTERRUPTED", "conveyord/local")
    assert (steps[-1]["message"], steps[-1]["status"]) == ("task ended", "CANCELLED")


async def test_lines_of_the_loop_are_written_together_at_its_pace_and_in_order() -> None:
    stream = io.StringIO()
    handler = PacedHandler(stream, pace=3600)  # no timer fires within the test: flush does
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("tests.paced")
    log.propagate, log.level = False, logging.INFO
    log.addHandler(handler)
    try:
        log.info("first")
        log.info("second")
        assert stream.getvalue() == ""  # waiting for the loop's next write
        await asyncio.to_thread(log.info, "from a thread")  # no loop there: written at once
        assert stream.getvalue() == "first\nsecond\nfrom a thread\n"  # after those waiting
        log.info("third")
        handler.flush()  # as at exit
        assert stream.getvalue().endswith("from a thread\nthird\n")
    finally:
        log.removeHandler(handler)


@pytest.mark.parametrize("formatter", [TextFormatter, JsonFormatter])
async def test_a_line_written_without_a_record_is_the_line_a_record_gives(
    formatter: type[TextFormatter | JsonFormatter],
) -> None:
    stream = io.StringIO()
    handler = PacedHandler(stream, pace=3600)
    handler.setFormatter(formatter())
    handler.addFilter(AttemptFilter())
    name = f"tests.direct.{formatter.__name__}"  # pytest's capture joins loggers once used
    parent, log = logging.getLogger(name), logging.getLogger(f"{name}.tasks")
    parent.propagate = False
    log.setLevel(logging.INFO)
    parent.addHandler(handler)
    fields = {"task_id": "t-1", "tenant": "", "attempt": 2, "why": 'a "b" = c', "seconds": 0.25}
    try:
        write = line_writer(log)
        assert write is not None
        write("task retried", fields.items())
        log.info("task retried", extra=fields)
        handler.flush()
        direct, recorded = stream.getvalue().splitlines()
        if formatter is JsonFormatter:
            assert {**json.loads(direct), "time": 0} == {**json.loads(recorded), "time": 0}
        else:  # the same but for the time stamp (its first two words)
            assert direct.split(" ", 2)[2] == recorded.split(" ", 2)[2]
            assert direct.split(" ", 2)[2].endswith('attempt=2 why="a \\"b\\" = c" seconds=0.25')
        # Lines that would go elsewhere too, or through a filter, or not at INFO: as records.
        log.addFilter(logging.Filter(log.name))
        assert line_writer(log) is None
        log.filters.clear()
        log.addHandler(second := logging.NullHandler())
        assert line_writer(log) is None
        log.removeHandler(second)
        log.setLevel(logging.WARNING)
        assert line_writer(log) is None
    finally:
        parent.removeHandler(handler)


def test_a_number_of_an_enum_is_written_as_its_number_in_text_and_json() -> None:
    class Shade(enum.IntEnum):
        DARK = 4

    fields = [("shade", Shade.DARK), ("flag", True)]
    assert TextFormatter().render(0.0, "INFO", "x", "m", fields).endswith(" m shade=4 flag=true")
    assert json.loads(JsonFormatter().render(0.0, "INFO", "x", "m", fields))["shade"] == 4
