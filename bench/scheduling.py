"""Scheduling cost: Create and dispatch with 1,000 and with 1,000,000 tasks queued, and the
memory a queued task takes.

Each size runs in a process of its own (so that its memory can be read), in-process on
the scheduler and the memory store, without gRPC: what is measured is what grows with
the queue. A parked task holds the one slot while the queue is filled and Creates are
timed (the rate of the typical window of them, and the slowest one apart); then it is
cancelled, and the time to dispatch (start and finish) the next no-op tasks is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import grpc

from bench.batch import BATCH, batch_request
from bench.handlers import noop, parked
from bench.harness import ROOT, SOURCE_PATH, Load, best, closed_loop, conveyord, ms, ratio
from bench.rpc import PARKED, create_call
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.handlers import HandlerRegistry
from conveyord.model import Change, Task, TaskStatus
from conveyord.scheduler import Scheduler, SchedulerConfig
from conveyord.store.memory import MemoryStore

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

CREATES = 10_000
WINDOW = 500
DISPATCHES = 1000


def _task(task_type: str) -> Task:
    now = time.time()
    return Task(
        task_id=str(uuid.uuid4()), seq=0, task_type=task_type, description="", parameters={},
        priority=5, timeout_seconds=300.0, max_attempts=1, labels={}, created_at=now,
        updated_at=now, request_id=str(uuid.uuid4()), request_hash=b"0" * 32,
    )  # fmt: skip


def _rss() -> int:
    gc.collect()
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def probe(queued: int) -> dict[str, float]:
    store = MemoryStore()
    completed, blocker_running = 0, asyncio.Event()
    enough = asyncio.Event()

    def listen(change: Change) -> None:
        nonlocal completed
        if change.task.task_type == "parked" and change.task.status is TaskStatus.RUNNING:
            blocker_running.set()
        if change.task.status is TaskStatus.COMPLETED:
            completed += 1
            if completed == DISPATCHES:
                enough.set()

    store.feed.follow(listen)
    registry = HandlerRegistry({"parked": parked, "noop": noop})
    config = SchedulerConfig(concurrency=1, max_queued=queued + CREATES + 1)
    scheduler = Scheduler(store, registry, config)
    await scheduler.start()
    ((blocker, _),) = await scheduler.create([_task("parked")])
    await blocker_running.wait()

    before = _rss()
    for start in range(0, queued, 1000):
        await scheduler.create([_task("noop") for _ in range(min(1000, queued - start))])
    per_task = (_rss() - before) / queued

    tasks = [_task("noop") for _ in range(CREATES)]
    latencies: list[float] = []
    for task in tasks:
        began = time.perf_counter()
        await scheduler.create([task])
        latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await scheduler.cancel(blocker.task_id, "go")
    await enough.wait()
    dispatch_rate = DISPATCHES / (time.perf_counter() - began)
    await scheduler.shutdown(grace=0)
    return {
        "create_per_second": _typical_rate(latencies),
        "slowest_create": max(latencies),
        "dispatch_per_second": dispatch_rate,
        "bytes_per_task": per_task,
    }


def _typical_rate(latencies: list[float]) -> float:
    """Creates per second in the median window of WINDOW Creates.

    A growing list or dict of a million entries is now and then copied whole (tens of ms
    on a machine whose fresh memory is slow to touch): rare, and shown apart as the
    slowest Create, rather than left to decide a short measurement.
    """
    windows = sorted(
        sum(latencies[start : start + WINDOW]) for start in range(0, len(latencies), WINDOW)
    )
    return WINDOW / windows[len(windows) // 2]


async def run(quick: bool) -> dict[str, Any]:
    sizes = (1000, 100_000) if quick else (1000, 1_000_000)
    results: dict[str, Any] = {}
    for size in sizes:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.scheduling", str(size), cwd=ROOT, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": SOURCE_PATH},
        )  # fmt: skip
        output, _ = await process.communicate()
        if process.returncode:
            raise RuntimeError(f"the scheduling probe of {size} tasks failed")
        results[str(size)] = json.loads(output)
    small, large = (results[str(size)] for size in sizes)
    results["create_ratio"] = large["create_per_second"] / small["create_per_second"]
    results["dispatch_ratio"] = large["dispatch_per_second"] / small["dispatch_per_second"]
    results["through_server"] = await through_server(sizes, quick)
    return results


async def _fill(stub: TaskServiceAsyncStub, size: int) -> None:
    """Queue `size` parked tasks, a thousand to a BatchCreate, two batches at a time."""
    batches = (batch_request() for _ in range(size // BATCH))
    await closed_loop(lambda: stub.BatchCreate(next(batches)), concurrency=2, calls=size // BATCH)


async def through_server(sizes: tuple[int, int], quick: bool) -> dict[str, Any]:
    """Create over gRPC at concurrency 16, as a client sees it, on two servers at once, one
    with each number of tasks queued (their runs interleaved, the best of each counting),
    and the server's memory per queued task."""
    calls, repeats = (1000, 2) if quick else (5000, 3)
    async with contextlib.AsyncExitStack() as stack:
        stubs, memory = [], []
        for size in sizes:
            server = await stack.enter_async_context(conveyord(*PARKED))
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(server.address))
            stub = TaskServiceStub(channel)
            await stub.Create(pb.CreateRequest(task=task_pb2.TaskRequest(task_type="parked")))
            before = server.rss()
            await _fill(stub, size)
            memory.append((server.rss() - before) / size)
            stubs.append(stub)
        loads: list[list[Load]] = [[], []]
        for _ in range(repeats):
            for index, stub in enumerate(stubs):
                loads[index].append(
                    await closed_loop(create_call(stub, calls), concurrency=16, calls=calls)
                )
    small, large = (best(runs).rate for runs in loads)
    return {
        "create_per_second": [small, large],
        "create_ratio": large / small,
        "bytes_per_task": memory,
    }


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [["queued", "Create/s", "slowest Create", "dispatch/s", "memory per queued task"]]
    sizes = [key for key in results if key.isdigit()]
    for size in sizes:
        r = results[size]
        rows.append([
            f"{int(size):,}", f"{r['create_per_second']:.0f}", ms(r["slowest_create"]),
            f"{r['dispatch_per_second']:.0f}", f"{r['bytes_per_task']:.0f} B",
        ])  # fmt: skip
    rows.append(["ratio", ratio(results["create_ratio"]), "", ratio(results["dispatch_ratio"]), ""])
    served = results["through_server"]
    for size, rate, memory in zip(
        sizes, served["create_per_second"], served["bytes_per_task"], strict=True
    ):
        rows.append([
            f"{int(size):,} in conveyord", f"{rate:.0f} over gRPC", "", "", f"{memory:.0f} B"
        ])  # fmt: skip
    rows.append(["ratio in conveyord", ratio(served["create_ratio"]), "", "", ""])
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)  # the attempt stopped at the end is expected
    print(json.dumps(asyncio.run(probe(int(sys.argv[1])))))
