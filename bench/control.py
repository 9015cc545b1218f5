"""Task control: what delayed tasks cost against queued ones, and a cancel by labels of
many tasks, with what it does to the other calls meanwhile.

Delayed against queued: in-process on the scheduler and the memory store (as the
scheduling section, one process per run so that its memory can be read), a million tasks
are created that wait for a start an hour ahead, or that wait in the queue behind a task
holding the one slot; then the rate of more Creates, and the memory per task.

Cancel by labels: a conveyord with 100,000 queued tasks of one label (and as many of
another), one CancelMatching of the label, timed, while a client Gets a task one call at a
time; the Gets' latency during the cancel against the same Gets just before it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import grpc

from bench.handlers import noop, parked
from bench.harness import ROOT, SOURCE_PATH, Load, closed_loop, conveyord, ms, ratio
from bench.rpc import PARKED
from bench.scheduling import CREATES, _rss, _task, _typical_rate
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.handlers import HandlerRegistry
from conveyord.model import Change, Task, TaskStatus
from conveyord.scheduler import Scheduler, SchedulerConfig
from conveyord.store.memory import MemoryStore

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

HOUR = 3600.0


def _waiting(task_type: str, delayed: bool) -> Task:
    task = _task(task_type)
    if delayed:
        task.next_attempt_at = task.created_at + HOUR
    return task


async def probe(count: int, delayed: bool) -> dict[str, float]:
    """Fill `count` delayed (or queued) tasks; the memory each takes, and Creates then."""
    store = MemoryStore()
    blocker_running = asyncio.Event()

    def listen(change: Change) -> None:
        if change.task.task_type == "parked" and change.task.status is TaskStatus.RUNNING:
            blocker_running.set()

    store.feed.follow(listen)
    registry = HandlerRegistry({"parked": parked, "noop": noop})
    config = SchedulerConfig(concurrency=1, max_queued=count + CREATES + 1)
    scheduler = Scheduler(store, registry, config)
    await scheduler.start()
    await scheduler.create([_task("parked")])  # holds the one slot: the queued stay queued
    await blocker_running.wait()
    before = _rss()
    for start in range(0, count, 1000):
        await scheduler.create([_waiting("noop", delayed) for _ in range(min(1000, count - start))])
    per_task = (_rss() - before) / count
    latencies: list[float] = []
    for task in [_waiting("noop", delayed) for _ in range(CREATES)]:
        began = time.perf_counter()
        await scheduler.create([task])
        latencies.append(time.perf_counter() - began)
    await scheduler.shutdown(grace=0)
    return {"create_per_second": _typical_rate(latencies), "bytes_per_task": per_task}


async def _probe_in_process(count: int, delayed: bool) -> dict[str, float]:
    kind = "delayed" if delayed else "queued"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.control", str(count), kind, cwd=ROOT,
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": SOURCE_PATH},
    )  # fmt: skip
    output, _ = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"the probe of {count} {kind} tasks failed")
    result: dict[str, float] = json.loads(output)
    return result


def _labelled_batch(label: str) -> pb.BatchCreateRequest:
    task = task_pb2.TaskRequest(task_type="parked", labels={"batch": label})
    return pb.BatchCreateRequest(
        requests=[pb.CreateRequest(task=task, request_id=str(uuid.uuid4())) for _ in range(1000)]
    )


async def _fill(stub: TaskServiceAsyncStub, label: str, count: int) -> None:
    """Queue `count` parked tasks labelled batch=`label`, a thousand to a BatchCreate."""
    batches = iter([_labelled_batch(label) for _ in range(count // 1000)])
    await closed_loop(lambda: stub.BatchCreate(next(batches)), concurrency=2, calls=count // 1000)


async def cancel_by_labels(count: int) -> dict[str, float]:
    """Cancel `count` queued tasks of one label beside as many of another; its time, and
    the latency of Gets one at a time, before it and during it."""
    async with (
        conveyord(*PARKED) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = TaskServiceStub(channel)
        known = await stub.Create(pb.CreateRequest(task=task_pb2.TaskRequest(task_type="parked")))
        for label in ("ours", "theirs"):
            await _fill(stub, label, count)
        get = pb.GetRequest(task_id=known.task.task_id)
        calls = 2000
        before = await closed_loop(lambda: stub.Get(get), concurrency=1, calls=calls)
        match = task_pb2.TaskFilter(labels={"batch": "ours"})
        began = time.perf_counter()
        dry = await stub.CancelMatching(pb.CancelMatchingRequest(filter=match, dry_run=True))
        counted = time.perf_counter() - began
        latencies: list[float] = []
        cancelling = True

        async def get_meanwhile() -> None:
            while cancelling:
                started = time.perf_counter()
                await stub.Get(get)
                latencies.append(time.perf_counter() - started)

        getter = asyncio.create_task(get_meanwhile())
        began = time.perf_counter()
        answer = await stub.CancelMatching(pb.CancelMatchingRequest(filter=match))
        took = time.perf_counter() - began
        cancelling = False
        await getter
        assert dry.count == answer.count == count, (dry.count, answer.count)
    during = Load(len(latencies), took, latencies)
    return {
        "cancel_seconds": took,
        "dry_run_seconds": counted,
        "get_p50_before": before.percentile(0.5),
        "get_p99_before": before.percentile(0.99),
        "get_p50_during": during.percentile(0.5),
        "get_p99_during": during.percentile(0.99),
        "gets_during": len(latencies),
    }


async def run(quick: bool) -> dict[str, Any]:
    count, cancelled = (100_000, 20_000) if quick else (1_000_000, 100_000)
    probes: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(2 if quick else 3):  # alternated, the best of each counting: runs vary
        for kind in (False, True):
            probes[kind].append(await _probe_in_process(count, delayed=kind))
    queued, delayed = (
        max(probes[kind], key=lambda probe: probe["create_per_second"]) for kind in (False, True)
    )
    return {
        "count": count,
        "queued": queued,
        "delayed": delayed,
        "create_ratio": delayed["create_per_second"] / queued["create_per_second"],
        "memory_ratio": delayed["bytes_per_task"] / queued["bytes_per_task"],
        "cancelled": cancelled,
        **await cancel_by_labels(cancelled),
    }


def table(results: dict[str, Any]) -> list[list[str]]:
    queued, delayed = results["queued"], results["delayed"]
    count, cancelled = f"{results['count']:,}", f"{results['cancelled']:,}"
    return [
        ["figure", "queued", "delayed an hour", "ratio"],
        [
            f"Create/s with {count} waiting (in-process)",
            f"{queued['create_per_second']:.0f}",
            f"{delayed['create_per_second']:.0f}",
            ratio(results["create_ratio"]),
        ],
        [
            "memory per waiting task",
            f"{queued['bytes_per_task']:.0f} B",
            f"{delayed['bytes_per_task']:.0f} B",
            ratio(results["memory_ratio"]),
        ],
        [f"CancelMatching of {cancelled} queued tasks (as many others beside)", "", "", ""],
        [
            "the cancel / its dry run",
            f"{results['cancel_seconds']:.2f} s",
            f"{results['dry_run_seconds'] * 1000:.0f} ms",
            "",
        ],
        [
            "a Get meanwhile, p50 / p99 (before the cancel)",
            f"{ms(results['get_p50_during'])} / {ms(results['get_p99_during'])}",
            f"({ms(results['get_p50_before'])} / {ms(results['get_p99_before'])})",
            "",
        ],
    ]


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)  # the attempt stopped at the end is expected
    print(json.dumps(asyncio.run(probe(int(sys.argv[1]), delayed=sys.argv[2] == "delayed"))))
