"""The `conveyord` command as a real process: flags, environment, start-up errors, graceful stop."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.protojson import to_python
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.cli import build_parser, config_from_args
from tests.processes import CONSOLE_SCRIPT, ROOT, Conveyord
from tests.support import COMPLETED, CREATED, RUNNING, create, final, read, wait_status


def test_help_documents_every_option_with_its_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "conveyord", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for option in build_parser()._actions:
        for flag in option.option_strings:
            assert flag in text
    for words in (
        "--listen",
        "127.0.0.1:50051",
        "CONVEYORD_CONCURRENCY",
        "(default: 8)",
        "--retention",
        "(default: 86400.0)",
        "SIGTERM",
    ):
        assert words in text


def test_environment_variables_set_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYORD_CONCURRENCY", "3")
    monkeypatch.setenv("CONVEYORD_LISTEN", "0.0.0.0:6000")
    monkeypatch.setenv("CONVEYORD_HANDLERS", "a.b, c")
    config = config_from_args(build_parser().parse_args(["--max-queued", "7"]))
    assert config.scheduler.concurrency == 3
    assert config.scheduler.max_queued == 7
    assert config.listen == "0.0.0.0:6000"
    assert config.handler_modules == ("a.b", "c")


def test_the_worker_and_running_limits_reach_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYORD_WORKER_GRACE", "4.5")
    args = ["--worker-lease", "30", "--max-running", "12"]
    config = config_from_args(build_parser().parse_args(args))
    assert (config.workers.lease_duration, config.workers.reconnect_grace) == (30.0, 4.5)
    assert config.scheduler.max_running == 12
    monkeypatch.delenv("CONVEYORD_WORKER_GRACE")
    default = config_from_args(build_parser().parse_args([]))
    assert (default.workers.reconnect_grace, default.scheduler.max_running) == (2.0, None)


def test_a_flag_wins_over_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYORD_CONCURRENCY", "3")
    config = config_from_args(build_parser().parse_args(["--concurrency", "5"]))
    assert config.scheduler.concurrency == 5


def test_a_bad_flag_value_is_refused_clearly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "conveyord", "--concurrency", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "must be positive" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_handler_module_stops_the_start_with_a_message() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "conveyord",
            "--listen",
            "127.0.0.1:0",
            "--handlers",
            "no.such.module",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 2
    assert "cannot load handlers" in result.stderr and "no.such" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_stops_the_start_with_a_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "conveyord", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
    assert result.returncode == 3
    assert "cannot listen on" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_conveyord_on_the_same_port_stops_with_a_message(
    conveyord: Callable[..., Conveyord],
) -> None:
    first: Conveyord = conveyord()
    result = subprocess.run(
        [sys.executable, "-m", "conveyord", "--store", "memory", "--listen", first.address],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert result.returncode == 3
    assert f"cannot listen on {first.address}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_sigterm_stops_gracefully(conveyord: Callable[..., Conveyord]) -> None:
    server: Conveyord = conveyord("--handlers", "tests.handlers", "--shutdown-grace", "30")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        statuses = health.Watch(health_pb2.HealthCheckRequest(service="conveyor.v1.TaskService"))
        assert (await statuses.read()).status == health_pb2.HealthCheckResponse.SERVING
        task = await create(stub, "cooperative_blocking")
        await wait_status(stub, task.task_id, RUNNING)
        updates = stub.Watch(pb.WatchRequest(task_id=task.task_id))
        await updates.read()

        server.process.send_signal(signal.SIGTERM)
        # Health turns NOT_SERVING first, and new tasks are refused...
        assert (await statuses.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(stub, "echo")
        # UNAVAILABLE (SHUTTING_DOWN) while the server stops; CANCELLED if the call comes as it
        # closes its port, the handler having stopped at once. Either way nothing is created.
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        # ...the handler is told to stop as the grace period starts (this one stops at once),
        # and the attempt it gave up goes back to the queue without being used.
        last = (await read(updates)).task
        assert (last.status, last.attempt, last.error.code) == (CREATED, 1, "INTERRUPTED")
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await updates.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # the server is going away
    assert server.process.wait(timeout=30) == 0
    log = server.rest_of_log()
    assert "signal received: stopping (1 running" in log
    assert "conveyord stopped" in log


async def test_the_console_script_finds_handler_modules_in_the_current_directory(
    conveyord: Callable[..., Conveyord],
    tmp_path: Path,
) -> None:
    """`conveyord --handlers myhandlers`, run where myhandlers.py is, as the README says."""
    (tmp_path / "myhandlers.py").write_text(
        "from conveyord import TaskContext, handler\n\n\n"
        '@handler("shout")\n'
        "def shout(ctx: TaskContext) -> str:\n"
        '    return str(ctx.parameters["text"]).upper()\n'
    )
    server = conveyord("--handlers", "myhandlers", command=[str(CONSOLE_SCRIPT)], cwd=tmp_path)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "shout", {"text": "hello"})
        ended = await final(stub, task.task_id)
    assert ended.status == COMPLETED
    assert to_python(ended.result) == "HELLO"


def test_a_handler_that_takes_a_built_in_task_type_stops_the_start(tmp_path: Path) -> None:
    """Replacing the built-in `echo` silently would run the wrong code: say so, and stop."""
    (tmp_path / "myhandlers.py").write_text(
        "from conveyord import TaskContext, handler\n\n\n"
        '@handler("echo")\n'
        "def my_echo(ctx: TaskContext) -> str:\n"
        '    return "mine"\n'
    )
    result = subprocess.run(
        [
            str(CONSOLE_SCRIPT),
            "--listen",
            "127.0.0.1:0",
            "--store",
            "memory",
            "--handlers",
            "myhandlers",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
    )
    assert result.returncode == 2
    assert (
        "conveyord: cannot load handlers: task type 'echo' has two handlers, "
        "conveyord.builtin_handlers.echo and myhandlers.my_echo" in result.stderr
    )
    assert "--no-builtin-handlers" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_handler_that_blocks_the_event_loop_is_named_in_the_log(
    conveyord: Callable[..., Conveyord],
) -> None:
    server = conveyord("--handlers", "tests.handlers", "--blocked-loop-warning", "0.2")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "blocks_loop", {"seconds": 1})
        assert (await final(stub, task.task_id)).status == COMPLETED
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    log = server.rest_of_log()
    culprit = rf"by the handler of task {task.task_id} \(type blocks_loop\)"
    blocked = re.search(
        rf"WARNING conveyord\.watchdog: the event loop has been blocked for ([\d.]+) s {culprit}",
        log,
    )
    assert blocked is not None, log
    assert 0.2 <= float(blocked[1]) <= 1.0
    ended = re.search(
        rf"the event loop ran again after being blocked for ([\d.]+) s {culprit}", log
    )
    assert ended is not None, log
    assert float(ended[1]) >= 1.0
    assert log.count("the event loop has been blocked") == 1  # once per stall
