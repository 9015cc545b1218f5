"""kill -9 under load: a real conveyord on a SQLite file is killed at random moments while
several clients create, cancel and watch tasks, and restarted on the same file each time.

Nothing a client was told may be lost: every acknowledged task is there, an acknowledged
Cancel holds, a terminal state a client saw is still the task's state, revisions only go
up, and after each recovery no task is left RUNNING from before the crash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskResponse
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.processes import Conveyord
from tests.support import CANCELLED, RUNNING, TERMINAL, task_request

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

ROUNDS = 6
CLIENTS = 4
CALL_TIMEOUT = 10


@dataclasses.dataclass
class Seen:
    """What the clients were told, over every round."""

    tasks: dict[str, TaskResponse] = dataclasses.field(default_factory=dict)
    cancelled: set[str] = dataclasses.field(default_factory=set)
    revision: int = 0
    creates: int = 0
    kill_after: int = 0  # the number of creates after which this round's kill comes
    enough: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def saw(self, task: TaskResponse) -> None:
        known = self.tasks.get(task.task_id)
        if known is None or task.revision > known.revision:
            self.tasks[task.task_id] = task
        self.revision = max(self.revision, task.revision)


async def _client(stub: TaskServiceAsyncStub, rng: random.Random, seen: Seen) -> None:
    """Create and cancel until the server dies under it."""
    own: list[str] = []
    try:
        while True:
            if own and rng.random() < 0.3:
                task_id = rng.choice(own)
                try:
                    answer = await stub.Cancel(
                        pb.CancelRequest(task_id=task_id, reason="crash test"), timeout=CALL_TIMEOUT
                    )
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    continue
                seen.saw(answer.task)
                seen.cancelled.add(task_id)
                continue
            parameters = {"seconds": rng.uniform(0.005, 0.05), "steps": rng.randint(1, 3)}
            request = task_request(
                "sleep", parameters, max_attempts=rng.randint(1, 2), priority=rng.randint(1, 10)
            )
            task = (await stub.Create(pb.CreateRequest(task=request), timeout=CALL_TIMEOUT)).task
            seen.saw(task)
            own.append(task.task_id)
            seen.creates += 1
            if seen.creates >= seen.kill_after:
                seen.enough.set()
    except grpc.aio.AioRpcError as error:
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), error


async def _watcher(stub: TaskServiceAsyncStub, seen: Seen) -> None:
    """Watch every change; what it sees counts as seen by a client."""
    try:
        async for response in stub.Watch(pb.WatchRequest()):
            if response.type == pb.WATCH_EVENT_TYPE_CHANGED:
                seen.saw(response.task)
    except grpc.aio.AioRpcError as error:
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), error


async def _all_tasks(stub: TaskServiceAsyncStub) -> tuple[dict[str, TaskResponse], int]:
    tasks: dict[str, TaskResponse] = {}
    token, revision = "", None
    while True:
        page = await stub.List(pb.ListRequest(page_size=1000, page_token=token))
        revision = page.revision if revision is None else revision
        tasks.update((t.task_id, t) for t in page.tasks)
        token = page.next_page_token
        if not token:
            return tasks, revision


def _check_recovered(
    tasks: dict[str, TaskResponse], revision: int, seen: Seen, restarted_at: float
) -> None:
    assert revision >= seen.revision, "the store's revision went back"
    for task_id, known in seen.tasks.items():
        task = tasks.get(task_id)
        assert task is not None, f"acknowledged task {task_id} was lost"
        assert task.revision >= known.revision, f"task {task_id} went back in revisions"
        if known.status in TERMINAL:
            assert task == known, f"task {task_id} changed after a client saw it end"
    for task_id in seen.cancelled:
        assert tasks[task_id].status == CANCELLED, f"acknowledged cancel of {task_id} was lost"
    for task in tasks.values():
        if task.status == RUNNING:
            started = task.started_at.seconds + task.started_at.nanos / 1e9
            assert started >= restarted_at, (
                f"task {task.task_id} is still RUNNING from before the crash"
            )


async def _round(address: str, rng: random.Random, seen: Seen, kill: Callable[[], None]) -> None:
    seen.enough.clear()
    seen.kill_after = seen.creates + rng.randint(10, 80)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = TaskServiceStub(channel)
        watcher = asyncio.create_task(_watcher(stub, seen))
        clients = [
            asyncio.create_task(_client(stub, random.Random(rng.random()), seen))
            for _ in range(CLIENTS)
        ]
        await seen.enough.wait()
        kill()
        await asyncio.gather(*clients, watcher)


async def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random(20261122)
    seen = Seen()
    store = ["--store", f"sqlite:{tmp_path / 'tasks.db'}", "--concurrency", "4"]
    store += ["--retry-initial", "0.02", "--cancel-grace", "0.05"]
    for _ in range(ROUNDS):
        restarted_at = time.time()
        server = Conveyord(*store)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                tasks, revision = await _all_tasks(TaskServiceStub(channel))
            _check_recovered(tasks, revision, seen, restarted_at)
            await _round(server.address, rng, seen, server.process.kill)
        finally:
            server.process.kill()
            server.process.wait()
            assert server.process.stderr is not None
            server.process.stderr.close()

    restarted_at = time.time()
    server = Conveyord(*store)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = TaskServiceStub(channel)
            tasks, revision = await _all_tasks(stub)
            _check_recovered(tasks, revision, seen, restarted_at)
            # No task stays RUNNING forever: every one of them ends.
            open_ids = {t.task_id for t in tasks.values() if t.status not in TERMINAL}
            if open_ids:
                async for response in stub.Watch(pb.WatchRequest(since_revision=revision)):
                    if response.task.status in TERMINAL:
                        open_ids.discard(response.task.task_id)
                    if not open_ids:
                        break
        assert seen.creates > ROUNDS * 10
        assert seen.cancelled, "the load never cancelled anything"
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        assert server.process.stderr is not None
        server.process.stderr.close()
