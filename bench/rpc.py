"""Create, Get and List against the bare unary RPC, at concurrency 1, 16 and 64.

The tasks created are of type `parked` with `--type-concurrency parked=1`: after the
first, they stay queued, so that Create is measured without the cost of running tasks
(the end-to-end section measures that).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from bench.harness import Load, bare, best, closed_loop, conveyord, ms, ratio
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

CONCURRENCY = (1, 16, 64)
KINDS = ("bare", "Create", "Get", "List")
PARKED = ("--type-concurrency", "parked=1", "--max-queued", "100000000")


def create_call(stub: TaskServiceAsyncStub, count: int) -> Callable[[], Awaitable[object]]:
    """Creates of parked tasks, each with a request_id of its own, made before the clock
    starts (as the bare RPC's empty request is)."""
    task = task_pb2.TaskRequest(task_type="parked")
    requests = iter(
        [pb.CreateRequest(task=task, request_id=str(uuid.uuid4())) for _ in range(count)]
    )
    return lambda: stub.Create(next(requests))


async def run(quick: bool) -> dict[str, Any]:
    calls = {1: 300, 16: 1500, 64: 1500} if quick else {1: 2000, 16: 10000, 64: 10000}
    loads: dict[tuple[str, int], list[Load]] = {}
    async with (
        bare() as ceiling,
        conveyord(*PARKED) as server,
        grpc.aio.insecure_channel(ceiling.address) as bare_channel,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = TaskServiceStub(channel)
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = bare_channel.unary_unary(
            "/bench.Bare/Unary"
        )
        repeats = 1 if quick else 2
        create = create_call(stub, 200 + repeats * sum(calls.values()))
        await closed_loop(create, concurrency=16, calls=200)  # warm-up, and tasks to list
        known = (await stub.List(pb.ListRequest(page_size=1))).tasks[0].task_id
        get_request = pb.GetRequest(task_id=known)
        list_request = pb.ListRequest(page_size=10)
        work: dict[str, Callable[[], Awaitable[object]]] = {
            "bare": lambda: unary(b""),
            "Create": create,
            "Get": lambda: stub.Get(get_request),
            "List": lambda: stub.List(list_request),
        }
        await closed_loop(work["bare"], concurrency=16, calls=200)
        for _ in range(repeats):  # repeated, interleaved: the best run of each counts
            for concurrency in CONCURRENCY:
                for kind, call in work.items():
                    load = await closed_loop(
                        call, concurrency=concurrency, calls=calls[concurrency]
                    )
                    loads.setdefault((kind, concurrency), []).append(load)
    results: dict[str, Any] = {}
    for (kind, concurrency), runs in loads.items():
        load = best(runs)
        baseline = best(loads[("bare", concurrency)])
        results.setdefault(kind, {})[str(concurrency)] = {
            "per_second": load.rate,
            "p50": load.percentile(0.5),
            "p99": load.percentile(0.99),
            "ratio_to_bare": load.rate / baseline.rate,
        }
    return results


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [["RPC", "at once", "calls/s", "ratio to bare", "p50", "p99"]]
    for kind in KINDS:
        for concurrency in CONCURRENCY:
            r = results[kind][str(concurrency)]
            rows.append([
                kind, str(concurrency), f"{r['per_second']:.0f}", ratio(r["ratio_to_bare"]),
                ms(r["p50"]), ms(r["p99"]),
            ])  # fmt: skip
    return rows
