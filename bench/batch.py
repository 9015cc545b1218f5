"""BatchCreate with batches of 1,000: tasks created per second (they stay queued, parked)."""

from __future__ import annotations

import uuid
from typing import Any

import grpc

from bench.harness import closed_loop, conveyord
from bench.rpc import PARKED
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub

BATCH = 1000


def batch_request() -> pb.BatchCreateRequest:
    task = task_pb2.TaskRequest(task_type="parked")
    return pb.BatchCreateRequest(
        requests=[pb.CreateRequest(task=task, request_id=str(uuid.uuid4())) for _ in range(BATCH)]
    )


async def run(quick: bool) -> dict[str, Any]:
    batches = 10 if quick else 60
    requests = [batch_request() for _ in range(batches + 2)]
    async with (
        conveyord(*PARKED) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = TaskServiceStub(channel)
        for request in requests[:2]:  # warm-up
            await stub.BatchCreate(request)
        pending = iter(requests[2:])
        load = await closed_loop(
            lambda: stub.BatchCreate(next(pending)), concurrency=2, calls=batches
        )
    return {"tasks_per_second": load.rate * BATCH, "batch_p50": load.percentile(0.5)}


def table(results: dict[str, Any]) -> list[list[str]]:
    return [
        ["figure", "value"],
        ["tasks created per second, batches of 1,000", f"{results['tasks_per_second']:.0f}"],
    ]
