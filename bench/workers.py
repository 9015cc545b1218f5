"""Remote workers: no-op tasks end to end through one `conveyor worker` process against the
server's own (local) worker, in the same run; how soon a task is held by its worker after
Create, at light load; and how long a task waits after its worker is killed (kill -9)
before it runs on another worker. With them, the host's yardsticks from the same run: the
bare gRPC server's calls per second (64 at once) and one bare call's time at the same light
load (an idle process is slow to wake on some hosts, and every figure at light load pays it).

A remote worker runs on the load generator's core, not the server's: it stands for a worker
on a machine of its own, so that what is compared is what the server does per task with its
own handlers and with a worker over gRPC. (The load generator's core is then shared, so
the remote figure is, if anything, low.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bench.end_to_end import at_light_load, throughput
from bench.harness import Load, Process, bare, closed_loop, conveyord, ms, ratio, server_process
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub

COORDINATOR = (
    "-m", "conveyord", "--listen", "127.0.0.1:0", "--store", "memory", "--no-builtin-handlers",
    "--task-type", "noop", "--task-type", "assigned", "--task-type", "parked",
    "--log-level", "INFO", "--max-queued", "10000000", "--watch-buffer", "1000000",
)  # fmt: skip
RUNNING = task_pb2.TASK_STATUS_RUNNING


def worker(address: str, concurrency: int = 32) -> contextlib.AbstractAsyncContextManager[Process]:
    """A `conveyor worker` process with the benchmark handlers, once it is connected."""
    return server_process(
        "-m", "conveyor", "--server", address, "worker", "--handlers", "bench.handlers",
        "--concurrency", str(concurrency), ready=r"connected,", on_server_cores=False,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def remote(workers: int = 1) -> AsyncIterator[str]:
    """A coordinator with no handlers of its own and `workers` worker processes."""
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(server_process(*COORDINATOR))
        for _ in range(workers):
            await stack.enter_async_context(worker(server.address))
        yield server.address


async def assignment_delays(address: str, tasks: int, per_second: float) -> Load:
    """Create an `assigned` task every 1/per_second s; from the Create to its handler's start."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = TaskServiceStub(channel)

        async def one() -> float:
            request = pb.CreateRequest(
                task=task_pb2.TaskRequest(task_type="assigned"), request_id=str(uuid.uuid4())
            )
            sent = time.time()
            task = (await stub.Create(request)).task
            async for response in stub.Watch(pb.WatchRequest(task_id=task.task_id)):
                if response.task.HasField("result"):
                    return response.task.result.number_value - sent
            raise RuntimeError("the watch ended without the task's result")

        return await at_light_load(one, tasks, per_second)


async def bare_yardsticks(calls: int, light: int) -> tuple[float, Load]:
    """The bare server's unary calls per second, 64 at once; one call's time at 100/s."""
    async with bare() as ceiling, grpc.aio.insecure_channel(ceiling.address) as channel:
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/bench.Bare/Unary"
        )
        await closed_loop(lambda: unary(b""), concurrency=64, calls=calls // 10)
        busy = await closed_loop(lambda: unary(b""), concurrency=64, calls=calls)

        async def one() -> float:
            began = time.perf_counter()
            await unary(b"")
            return time.perf_counter() - began

        return busy.rate, await at_light_load(one, light, per_second=100)


async def rescue_time(address: str) -> float:
    """Kill -9 the worker that holds a task; seconds until the task runs on another."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = TaskServiceStub(channel)
        with contextlib.suppress(ProcessLookupError):
            async with worker(address) as doomed:
                parked = task_pb2.TaskRequest(task_type="parked", max_attempts=2)
                request = pb.CreateRequest(task=parked)
                task = (await stub.Create(request)).task
                async for response in stub.Watch(pb.WatchRequest(task_id=task.task_id)):
                    if response.task.status == RUNNING:
                        break
                async with worker(address):  # the other worker, connected and idle
                    killed = time.perf_counter()
                    os.kill(doomed.pid, signal.SIGKILL)
                    async for response in stub.Watch(pb.WatchRequest(task_id=task.task_id)):
                        if response.task.status == RUNNING and response.task.attempt == 2:
                            rescued = time.perf_counter() - killed
                            break
                    await stub.Cancel(pb.CancelRequest(task_id=task.task_id, reason="done"))
        return rescued


async def run(quick: bool) -> dict[str, Any]:
    tasks, light, kills = (2000, 100, 1) if quick else (20000, 500, 3)
    rates: dict[str, list[float]] = {"local": [], "remote": []}
    for _ in range(1 if quick else 2):  # alternated, the best of each counting
        async with (
            conveyord(
                "--concurrency", "32", "--max-queued", "10000000", "--watch-buffer", "1000000"
            ) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = TaskServiceStub(channel)
            await throughput(stub, tasks // 10)
            rates["local"].append(await throughput(stub, tasks))
        async with remote() as address, grpc.aio.insecure_channel(address) as channel:
            stub = TaskServiceStub(channel)
            await throughput(stub, tasks // 10)
            rates["remote"].append(await throughput(stub, tasks))
    async with conveyord() as server:
        local_assign = await assignment_delays(server.address, light, per_second=100)
    async with remote() as address:
        remote_assign = await assignment_delays(address, light, per_second=100)
    async with remote(workers=0) as address:  # rescue_time brings its own two workers
        rescues = [await rescue_time(address) for _ in range(kills)]
    ceiling, bare_light = await bare_yardsticks(tasks, light)
    local, far = max(rates["local"]), max(rates["remote"])
    return {
        "bare_calls_per_second": ceiling,
        "bare_call_p50": bare_light.percentile(0.5),
        "bare_call_p99": bare_light.percentile(0.99),
        "local_tasks_per_second": local,
        "remote_tasks_per_second": far,
        "remote_ratio": far / local,
        "local_assignment_p50": local_assign.percentile(0.5),
        "local_assignment_p99": local_assign.percentile(0.99),
        "remote_assignment_p50": remote_assign.percentile(0.5),
        "remote_assignment_p99": remote_assign.percentile(0.99),
        "rescue_seconds": statistics.median(rescues),
    }


def table(results: dict[str, Any]) -> list[list[str]]:
    return [
        ["figure", "local worker", "one remote worker"],
        [
            "no-op tasks/s, Create to COMPLETED seen by a watcher",
            f"{results['local_tasks_per_second']:.0f}",
            f"{results['remote_tasks_per_second']:.0f} ({ratio(results['remote_ratio'])})",
        ],
        [
            "at 100 tasks/s, Create to the handler's start, p50 / p99",
            f"{ms(results['local_assignment_p50'])} / {ms(results['local_assignment_p99'])}",
            f"{ms(results['remote_assignment_p50'])} / {ms(results['remote_assignment_p99'])}",
        ],
        [
            "a worker killed (kill -9): until its task runs on another, median",
            "",
            f"{results['rescue_seconds']:.2f} s",
        ],
        [
            "yardsticks: a bare gRPC server's calls/s, 64 at once; one call at 100/s, p50 / p99",
            f"{results['bare_calls_per_second']:.0f}",
            f"{ms(results['bare_call_p50'])} / {ms(results['bare_call_p99'])}",
        ],
    ]
