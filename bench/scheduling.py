"""Scheduling cost: Create and dispatch with 1,000 and with 1,000,000 tasks queued, and the
memory a queued task takes.

Each size runs in a process of its own (so that its memory can be read), in-process on
the scheduler and the memory store, without gRPC: what is measured is what grows with
the queue. A parked task holds the one slot while the queue is filled and Creates are
timed; then it is cancelled, and the time to dispatch (start and finish) the next
no-op tasks is taken.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time
import uuid
from typing import Any

from bench.handlers import noop, parked
from bench.harness import ROOT, ratio
from conveyord.handlers import HandlerRegistry
from conveyord.model import Change, Task, TaskStatus
from conveyord.scheduler import Scheduler, SchedulerConfig
from conveyord.store.memory import MemoryStore

CREATES = 5000
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

    store.set_listener(listen)
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

    began = time.perf_counter()
    for _ in range(CREATES):
        await scheduler.create([_task("noop")])
    create_rate = CREATES / (time.perf_counter() - began)

    began = time.perf_counter()
    await scheduler.cancel(blocker.task_id, "go")
    await enough.wait()
    dispatch_rate = DISPATCHES / (time.perf_counter() - began)
    await scheduler.shutdown(grace=0)
    return {
        "create_per_second": create_rate,
        "dispatch_per_second": dispatch_rate,
        "bytes_per_task": per_task,
    }


async def run(quick: bool) -> dict[str, Any]:
    sizes = (1000, 100_000) if quick else (1000, 1_000_000)
    results: dict[str, Any] = {}
    for size in sizes:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.scheduling", str(size), cwd=ROOT, stdout=subprocess.PIPE
        )
        output, _ = await process.communicate()
        if process.returncode:
            raise RuntimeError(f"the scheduling probe of {size} tasks failed")
        results[str(size)] = json.loads(output)
    small, large = (results[str(size)] for size in sizes)
    results["create_ratio"] = large["create_per_second"] / small["create_per_second"]
    results["dispatch_ratio"] = large["dispatch_per_second"] / small["dispatch_per_second"]
    return results


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [["queued", "Create/s", "dispatch/s", "memory per queued task"]]
    sizes = [key for key in results if key.isdigit()]
    for size in sizes:
        r = results[size]
        rows.append([
            f"{int(size):,}", f"{r['create_per_second']:.0f}", f"{r['dispatch_per_second']:.0f}",
            f"{r['bytes_per_task']:.0f} B",
        ])  # fmt: skip
    rows.append(["ratio", ratio(results["create_ratio"]), ratio(results["dispatch_ratio"]), ""])
    return rows


if __name__ == "__main__":
    print(json.dumps(asyncio.run(probe(int(sys.argv[1])))))
