"""Schedules: 10,000 schedules that fire every minute, together, in a conveyord on a SQLite
file: how late each run is made after its nominal time (p50, p99), and the server's CPU per
fire against its CPU per task created by BatchCreate in the same run (the yardstick: a fire
plans, makes a task and records the schedule; a created task is stored and answered).

The runs' task type is declared for workers and none is connected, so the runs only queue:
what is measured is the scheduler, not the handlers. A watcher of the runs (or of the
created tasks) tells when all are made, in both measurements alike.
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2

from bench.harness import Load, closed_loop, conveyord, ms, ratio
from conveyor.v1 import schedule_service_pb2 as spb
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.schedule_service_pb2_grpc import ScheduleServiceStub
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

TYPE = "bench.scheduled"
NOMINAL = "conveyor/nominal-time"
TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """The process's CPU time so far (user and system), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def _made(stub: TaskServiceAsyncStub, labels: dict[str, str], count: int) -> list[Any]:
    """Watch until `count` tasks with `labels` were created; each one's first state."""
    seen: dict[str, Any] = {}
    request = pb.WatchRequest(filter=task_pb2.TaskFilter(labels=labels))
    async for event in stub.Watch(request):
        if event.type == pb.WATCH_EVENT_TYPE_CHANGED and event.task.task_id not in seen:
            seen[event.task.task_id] = event.task
            if len(seen) == count:
                break
    return list(seen.values())


async def fire(count: int) -> dict[str, float]:
    """`count` schedules every minute: the lateness of one minute's runs, and the CPU."""
    with tempfile.TemporaryDirectory() as folder:
        store = f"sqlite:{folder}/tasks.db"
        args: tuple[str, ...] = ("--store", store, "--task-type", TYPE, "--max-queued", "100000000")
        args += ("--watch-buffer", "100000")  # the watcher of the runs takes them all at once
        async with (
            conveyord(*args) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            schedules, tasks = ScheduleServiceStub(channel), TaskServiceStub(channel)
            every = duration_pb2.Duration(seconds=60)
            request = spb.CreateScheduleRequest(
                schedule=spb.ScheduleRequest(
                    spec=spb.ScheduleSpec(interval=spb.IntervalSpec(every=every)),
                    task=task_pb2.TaskRequest(task_type=TYPE),
                )
            )
            await closed_loop(
                lambda: schedules.CreateSchedule(request), concurrency=16, calls=count
            )
            nominal = math.ceil(time.time() / 60) * 60
            if nominal - time.time() < 5:
                nominal += 60
            await asyncio.sleep(nominal - time.time() - 2)  # a bench may wait for the clock
            label = datetime.fromtimestamp(nominal, UTC).isoformat().replace("+00:00", "Z")
            watching = asyncio.create_task(_made(tasks, {NOMINAL: label}, count))
            before = _cpu(server.pid)
            runs = await watching
            fired = _cpu(server.pid) - before
            lateness = sorted(_seconds(run.created_at) - nominal for run in runs)
            yardstick = await _created_cpu(tasks, server.pid, count)
    late = Load(len(lateness), 1.0, lateness)
    return {
        "count": count,
        "late_p50": late.percentile(0.5),
        "late_p99": late.percentile(0.99),
        "late_max": lateness[-1],
        "cpu_per_fire": fired / count,
        "cpu_per_create": yardstick,
    }


async def _created_cpu(stub: TaskServiceAsyncStub, pid: int, count: int) -> float:
    """The server's CPU per task created by BatchCreate (1,000 a call), watched as the runs."""
    marker = {"batch": uuid.uuid4().hex}
    task = task_pb2.TaskRequest(task_type=TYPE, labels=marker)
    batches = iter(
        pb.BatchCreateRequest(requests=[pb.CreateRequest(task=task) for _ in range(1000)])
        for _ in range(count // 1000)
    )
    watching = asyncio.create_task(_made(stub, marker, count))
    await asyncio.sleep(0.5)  # the watch is open before the first task
    before = _cpu(pid)
    await closed_loop(lambda: stub.BatchCreate(next(batches)), concurrency=1, calls=count // 1000)
    await watching
    return (_cpu(pid) - before) / count


def _seconds(stamp: Any) -> float:
    return float(stamp.seconds + stamp.nanos / 1e9)


async def run(quick: bool) -> dict[str, Any]:
    return await fire(1_000 if quick else 10_000)


def table(results: dict[str, Any]) -> list[list[str]]:
    count = f"{results['count']:,}"
    per_fire, per_create = results["cpu_per_fire"], results["cpu_per_create"]
    return [
        ["figure", "value"],
        [
            f"{count} schedules firing every minute: a run made after its time, p50",
            ms(results["late_p50"]),
        ],
        ["the same, p99 / the latest", f"{ms(results['late_p99'])} / {ms(results['late_max'])}"],
        ["server CPU per fire", f"{per_fire * 1e6:.0f} µs"],
        ["server CPU per task created by BatchCreate (yardstick)", f"{per_create * 1e6:.0f} µs"],
        ["ratio of the two", ratio(per_fire / per_create)],
    ]
