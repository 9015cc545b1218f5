"""What durability costs: Create throughput and Create-to-Completed latency on the SQLite
store against the in-memory store, in one run."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

import grpc

from bench.harness import Load, closed_loop, conveyord, ms
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

NOOP = pb.CreateRequest(task=task_pb2.TaskRequest(task_type="noop"))


async def create_noop(stub: TaskServiceAsyncStub) -> None:
    request = pb.CreateRequest()
    request.CopyFrom(NOOP)
    request.request_id = str(uuid.uuid4())
    await stub.Create(request)


async def create_to_completed(stub: TaskServiceAsyncStub, calls: int) -> Load:
    """One task at a time: from sending its Create to a watcher seeing it COMPLETED."""
    loop = asyncio.get_running_loop()
    completed: dict[str, asyncio.Future[float]] = {}
    stream = stub.Watch(pb.WatchRequest())

    def completion(task_id: str) -> asyncio.Future[float]:
        return completed.setdefault(task_id, loop.create_future())

    async def follow() -> None:
        async for response in stream:
            if response.task.status == task_pb2.TASK_STATUS_COMPLETED:
                completion(response.task.task_id).set_result(time.perf_counter())

    follower = asyncio.create_task(follow())
    latencies = []
    began = time.perf_counter()
    for _ in range(calls):
        started = time.perf_counter()
        task = (await stub.Create(NOOP)).task
        latencies.append(await completion(task.task_id) - started)
    stream.cancel()
    follower.cancel()
    return Load(calls, time.perf_counter() - began, latencies)


async def measure(store: str, creates: int, sequential: int) -> dict[str, Any]:
    async with (
        conveyord("--store", store, "--concurrency", "64", "--max-queued", "1000000") as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = TaskServiceStub(channel)
        await closed_loop(lambda: create_noop(stub), concurrency=16, calls=creates // 10)  # warm-up
        load = await closed_loop(lambda: create_noop(stub), concurrency=16, calls=creates)
        latency = await create_to_completed(stub, sequential)
    return {
        "create_per_second": load.rate,
        "create_p50": load.percentile(0.5),
        "create_p99": load.percentile(0.99),
        "completed_p50": latency.percentile(0.5),
        "completed_p99": latency.percentile(0.99),
    }


async def run(quick: bool) -> dict[str, Any]:
    creates, sequential = (2000, 100) if quick else (20000, 500)
    results: dict[str, Any] = {"memory": await measure("memory", creates, sequential)}
    with tempfile.TemporaryDirectory() as scratch:
        results["sqlite"] = await measure(f"sqlite:{scratch}/bench.db", creates, sequential)
    results["sqlite_to_memory_create_rate"] = (
        results["sqlite"]["create_per_second"] / results["memory"]["create_per_second"]
    )
    return results


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [
        ["store", "Create/s (16 at once)", "Create p50", "Create p99", "to COMPLETED p50", "p99"]
    ]
    for store in ("memory", "sqlite"):
        r = results[store]
        rows.append([
            store, f"{r['create_per_second']:.0f}", ms(r["create_p50"]), ms(r["create_p99"]),
            ms(r["completed_p50"]), ms(r["completed_p99"]),
        ])  # fmt: skip
    return rows
