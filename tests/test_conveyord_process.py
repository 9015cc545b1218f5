"""The `conveyord` command as a real process: flags, environment, start-up errors, graceful stop."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.cli import build_parser, config_from_args
from tests.support import FAILED, RUNNING, create, wait_status

ROOT = Path(__file__).resolve().parent.parent


class Conveyord:
    """A conveyord process on a free port, with its log on stderr."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conveyord",
                "--listen",
                "127.0.0.1:0",
                "--store",
                "memory",
                *args,
            ],
            cwd=ROOT,
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        self.log: list[str] = []
        for line in self.process.stderr:
            self.log.append(line)
            if match := re.search(r"\(port (\d+)\)", line):
                self.address = f"127.0.0.1:{match.group(1)}"
                return
        raise AssertionError("conveyord did not start:\n" + "".join(self.log))

    def rest_of_log(self) -> str:
        assert self.process.stderr is not None
        return "".join(self.log) + self.process.stderr.read()


@pytest.fixture
def conveyord() -> Iterator[type[Conveyord]]:
    started: list[Conveyord] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Conveyord:
        process = Conveyord(*args, env=env)
        started.append(process)
        return process

    yield start  # type: ignore[misc]
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
        process.process.wait()
        if process.process.stderr:
            process.process.stderr.close()


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


async def test_sigterm_stops_gracefully(conveyord) -> None:  # type: ignore[no-untyped-def]
    server: Conveyord = conveyord("--handlers", "tests.handlers", "--shutdown-grace", "30")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        statuses = health.Watch(health_pb2.HealthCheckRequest(service="conveyor.v1.TaskService"))
        assert (await statuses.read()).status == health_pb2.HealthCheckResponse.SERVING
        task = await create(stub, "cooperative_blocking", timeout_seconds=0.5)
        await wait_status(stub, task.task_id, RUNNING)
        updates = stub.Watch(pb.WatchRequest(task_id=task.task_id))
        await updates.read()

        server.process.send_signal(signal.SIGTERM)
        # Health turns NOT_SERVING first, and new tasks are refused...
        assert (await statuses.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(stub, "echo")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # ...while the running task gets its grace period to end, and watchers see the end.
        last = (await updates.read()).task
        assert (last.status, last.error.code) == (FAILED, "DEADLINE_EXCEEDED")
        assert await updates.read() == grpc.aio.EOF
    assert server.process.wait(timeout=30) == 0
    log = server.rest_of_log()
    assert "signal received: stopping (1 running" in log
    assert "conveyord stopped" in log
