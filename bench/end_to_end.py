"""Tasks from Create to COMPLETED as a watcher sees them, and how soon a watcher learns
that a task ended, against a client that polls."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from bench.harness import Load, closed_loop, conveyord, ms
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskFilter
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

COMPLETED = task_pb2.TASK_STATUS_COMPLETED
POLL_INTERVAL = 0.5  # what a polling client commonly waits between two Gets
WATCH_TIMEOUT = 120.0  # seconds a watcher may take to see every task, before the run fails


async def throughput(stub: TaskServiceAsyncStub, tasks: int, batch: int = 1) -> float:
    """No-op tasks per second, from the first Create to the last COMPLETED seen by a watcher;
    created one Create at a time (64 at once), or `batch` to a BatchCreate (4 at once)."""
    return await spread_throughput([stub], tasks, batch)


async def spread_throughput(
    stubs: Sequence[TaskServiceAsyncStub], tasks: int, batch: int = 1
) -> float:
    """`throughput` over several servers (replicas on one store): the tasks are created on
    each in turn, and counted by a watcher on the first."""
    stream = stubs[0].Watch(
        pb.WatchRequest(filter=TaskFilter(task_type="noop", statuses=[COMPLETED]))
    )
    seen = 0
    began = time.perf_counter()

    async def count() -> float:
        nonlocal seen
        async for _ in stream:
            seen += 1
            if seen == tasks:
                return time.perf_counter()
        raise RuntimeError("the watch ended")

    counter = asyncio.create_task(count())
    turns = itertools.cycle(stubs)
    request = pb.CreateRequest(task=task_pb2.TaskRequest(task_type="noop"))
    if batch == 1:
        await closed_loop(lambda: next(turns).Create(request), concurrency=64, calls=tasks)
    else:
        many = pb.BatchCreateRequest(requests=[request] * batch)
        await closed_loop(
            lambda: next(turns).BatchCreate(many), concurrency=4, calls=tasks // batch
        )
    try:
        ended = await asyncio.wait_for(counter, WATCH_TIMEOUT)
    finally:
        stream.cancel()
    return tasks / (ended - began)


def _finished(task: task_pb2.TaskResponse) -> float:
    return task.finished_at.seconds + task.finished_at.nanos / 1e9


async def watched_delay(stub: TaskServiceAsyncStub) -> float:
    """Create a brief task, watch it, and return how long after it ended the watcher knew."""
    request = pb.CreateRequest(
        task=task_pb2.TaskRequest(task_type="brief"), request_id=str(uuid.uuid4())
    )
    task = (await stub.Create(request)).task
    async for response in stub.Watch(pb.WatchRequest(task_id=task.task_id)):
        if response.task.status == COMPLETED:
            return time.time() - _finished(response.task)
    raise RuntimeError("the watch ended without the task completing")


async def polled_delay(stub: TaskServiceAsyncStub) -> float:
    """The same, for a client that Gets the task every POLL_INTERVAL seconds."""
    task = (await stub.Create(pb.CreateRequest(task=task_pb2.TaskRequest(task_type="brief")))).task
    while True:
        await asyncio.sleep(POLL_INTERVAL)
        task = (await stub.Get(pb.GetRequest(task_id=task.task_id))).task
        if task.status == COMPLETED:
            return time.time() - _finished(task)


async def at_light_load(follow: Any, tasks: int, per_second: float) -> Load:
    """Start one task every 1/per_second seconds, each followed on its own; their delays."""
    began = time.perf_counter()
    followers = []
    for index in range(tasks):
        await asyncio.sleep(max(0.0, began + index / per_second - time.perf_counter()))
        followers.append(asyncio.create_task(follow()))
    delays = list(await asyncio.gather(*followers))
    return Load(tasks, time.perf_counter() - began, delays)


async def run(quick: bool) -> dict[str, Any]:
    tasks, light = (2000, 200) if quick else (20000, 1000)
    async with (
        # A watcher of every completion may fall behind in a burst; here it is to count them
        # all, not to be let go (the slow-watcher figures are in the fanout section).
        conveyord(
            "--concurrency", "32", "--max-queued", "10000000", "--watch-buffer", "1000000"
        ) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = TaskServiceStub(channel)
        await throughput(stub, tasks // 10)  # warm-up
        rate = await throughput(stub, tasks)
        batched = await throughput(stub, tasks, batch=100)
        watched = await at_light_load(lambda: watched_delay(stub), light, per_second=100)
        polled = await at_light_load(lambda: polled_delay(stub), light // 4, per_second=100)
    return {
        "tasks_per_second": rate,
        "tasks_per_second_batched": batched,
        "watch_delay_p50": watched.percentile(0.5),
        "watch_delay_p99": watched.percentile(0.99),
        "poll_delay_p50": polled.percentile(0.5),
        "poll_delay_p99": polled.percentile(0.99),
        "poll_interval": POLL_INTERVAL,
    }


def table(results: dict[str, Any]) -> list[list[str]]:
    polling = f"the same for a client polling every {POLL_INTERVAL:g} s"
    return [
        ["figure", "value"],
        [
            "no-op tasks/s, Create to COMPLETED seen by a watcher",
            f"{results['tasks_per_second']:.0f}",
        ],
        ["the same, created 100 to a BatchCreate", f"{results['tasks_per_second_batched']:.0f}"],
        [
            "at 100 tasks/s, from a task's end to its watcher knowing, p50",
            ms(results["watch_delay_p50"]),
        ],
        ["the same, p99", ms(results["watch_delay_p99"])],
        [f"{polling}, p50", ms(results["poll_delay_p50"])],
        [f"{polling}, p99", ms(results["poll_delay_p99"])],
    ]
