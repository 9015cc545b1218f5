"""The client carries on across a restart of a durable server: a real conveyord on a SQLite
file is killed (SIGKILL) while a client watches or waits, and started again on the same
port and file; the client resumes from the last revision it saw."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from conveyor import Client, Task, TaskStatus
from tests.client_support import (
    KINDS,
    Twin,
    closed_port_address,
    first_item,
    open_twin,
    server_record,
)
from tests.processes import Conveyord


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[Callable[[], Conveyord]]:
    """Starts conveyord on one port and one SQLite file, again and again."""
    address = closed_port_address()
    args: tuple[str, ...] = ("--listen", address, "--store", f"sqlite:{tmp_path / 'tasks.db'}")
    args += ("--retry-initial", "0.05")
    started: list[Conveyord] = []

    def start() -> Conveyord:
        server = Conveyord(*args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.process.kill()
        server.process.wait()
        assert server.process.stderr is not None
        server.process.stderr.close()


def _crash(server: Conveyord) -> None:
    server.process.kill()
    server.process.wait()


@contextlib.asynccontextmanager
async def _client(kind: str, address: str) -> AsyncIterator[Twin]:
    async with open_twin(kind, address, timeout=60) as twin:
        yield twin


async def test_a_watch_carries_on_across_a_restart_with_no_gap_and_no_duplicate(
    kind: str, restartable: Callable[[], Conveyord]
) -> None:
    server = restartable()
    async with _client(kind, server.address) as twin:
        task = await twin.create("sleep", {"seconds": 0.6, "steps": 6}, max_attempts=2)
        stream = twin.client.watch(task.task_id)
        seen: list[Task] = []
        while not (seen and seen[-1].progress >= 0.3):
            seen.append(await first_item(stream))
        _crash(server)
        server = restartable()
        while not seen[-1].status.terminal:
            seen.append(await first_item(stream))
    assert seen[-1].status is TaskStatus.COMPLETED and seen[-1].attempt == 2
    record = server_record(server.address, task.task_id, seen[0].revision)
    assert [t.revision for t in seen[1:]] == [r.revision for r in record]
    retried = next(t for t in seen if t.attempt == 2)
    assert retried.status is TaskStatus.CREATED and retried.error is not None
    assert retried.error.code == "INTERRUPTED"


async def test_a_wait_carries_on_across_a_restart(
    kind: str, restartable: Callable[[], Conveyord]
) -> None:
    server = restartable()
    async with _client(kind, server.address) as twin:
        task = await twin.create("sleep", {"seconds": 0.5, "steps": 5}, max_attempts=2)
        client = twin.client
        if isinstance(client, Client):  # a blocking wait, on a thread of its own
            waiting = asyncio.ensure_future(asyncio.to_thread(client.wait, task.task_id))
        else:
            waiting = asyncio.ensure_future(client.wait(task.task_id))
        running = await twin.collect(
            "watch", task.task_id, each=lambda t: t.status is TaskStatus.RUNNING
        )
        assert running[-1].status is TaskStatus.RUNNING
        _crash(server)
        restartable()
        ended = await waiting
    assert (ended.status, ended.attempt) == (TaskStatus.COMPLETED, 2)
