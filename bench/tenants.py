"""One tenant floods Create while another creates and watches as usual.

The quiet tenant creates a no-op task every 20 ms and follows each to COMPLETED on its Watch:
its latency, from Create to the end seen, is measured on an idle server, then while the
flooding tenant (bench/flood.py, a process of its own on the load generator's core) creates
no-op tasks with 16 calls at once, first with no limit on the flood (fair dispatch alone),
then with the flood's tenant held to a rate (`--tenant-limits`). Every task either tenant was
told was created is seen COMPLETED before the phase ends: nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from bench.harness import ROOT, SOURCE_PATH, Load, conveyord, ms
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub

TOKENS = {"quiet-token": "quiet", "flood-token": "flood"}
FLOOD_RATE = 100  # tasks a second the flooding tenant may create, in the limited phase
FLOOD_BURST = 10  # ... and at once
QUIET_EVERY = 0.02  # seconds between two of the quiet tenant's tasks
COMPLETED = task_pb2.TASK_STATUS_COMPLETED
PHASES = ("idle", "flood", "flood_limited")


def _files(folder: Path) -> tuple[Path, Path]:
    tokens = folder / "tokens.json"
    entries = [
        {"name": tenant, "tenant": tenant, "sha256": hashlib.sha256(token.encode()).hexdigest(),
         "permissions": ["admin"]}
        for token, tenant in TOKENS.items()
    ]  # fmt: skip
    tokens.write_text(json.dumps({"tokens": entries}))
    limits = folder / "limits.json"
    held = {"rate": FLOOD_RATE, "burst": FLOOD_BURST}
    limits.write_text(json.dumps({"tenants": {"flood": held}}))
    return tokens, limits


class Completions:
    """A tenant's Watch of its COMPLETED tasks: when each was seen, and how many."""

    def __init__(self, stub: Any, metadata: Any, revision: int, record: bool) -> None:
        request = pb.WatchRequest(
            filter=task_pb2.TaskFilter(statuses=[COMPLETED]), since_revision=revision
        )
        self.stream = stub.Watch(request, metadata=metadata)
        self.record = record
        self.seen: dict[str, float] = {}  # ended before anyone asked (when recording)
        self.waiters: dict[str, asyncio.Future[float]] = {}
        self.count = 0
        self.reached = asyncio.Event()
        self.target = -1
        self.task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for event in self.stream:
            if event.type != pb.WATCH_EVENT_TYPE_CHANGED:
                continue
            self.count += 1
            waiter = self.waiters.pop(event.task.task_id, None)
            if waiter is not None:
                waiter.set_result(time.perf_counter())
            elif self.record:
                self.seen[event.task.task_id] = time.perf_counter()
            if self.count == self.target:
                self.reached.set()

    async def all_of(self, count: int) -> None:
        """Until `count` tasks were seen COMPLETED."""
        self.target = count
        if self.count >= count:
            return
        await self.reached.wait()

    async def ended(self, task_id: str) -> float:
        """When the task was seen COMPLETED."""
        if task_id in self.seen:
            return self.seen.pop(task_id)
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters[task_id] = waiter
        return await waiter

    def close(self) -> None:
        self.stream.cancel()
        self.task.cancel()


async def _quiet(stub: Any, metadata: Any, watch: Completions, seconds: float) -> Load:
    """The quiet tenant's tasks, one every QUIET_EVERY: each one's Create to its end seen."""
    request = pb.CreateRequest(
        task=task_pb2.TaskRequest(task_type="noop", labels={"bench": "quiet"})
    )
    latencies: list[float] = []
    pending: list[asyncio.Task[None]] = []

    async def one() -> None:
        started = time.perf_counter()
        created = await stub.Create(request, metadata=metadata)
        latencies.append(await watch.ended(created.task.task_id) - started)

    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        pending.append(asyncio.create_task(one()))
        await asyncio.sleep(QUIET_EVERY)  # the pace of the quiet tenant's work
    await asyncio.gather(*pending)
    return Load(len(latencies), time.perf_counter() - began, latencies)


@contextlib.asynccontextmanager
async def _flood(address: str) -> AsyncIterator[dict[str, int]]:
    """The flooding tenant's process while the block runs; then how many it created."""
    environment = {**os.environ, "PYTHONPATH": SOURCE_PATH}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.flood", address, "flood-token", "16",
        cwd=ROOT, env=environment, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    assert b"(flooding)" in await process.stderr.readline()
    counts: dict[str, int] = {}
    try:
        yield counts
    finally:
        process.terminate()
        output = (await process.stderr.read()).decode()
        await process.wait()
    found = re.search(r"\(flooded (\d+) (\d+)\)", output)
    assert found is not None, output
    counts["created"], counts["refused"] = int(found.group(1)), int(found.group(2))


async def _phase(address: str, phase: str, seconds: float) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = TaskServiceStub(channel)
        quiet = (("authorization", "Bearer quiet-token"),)
        flood = (("authorization", "Bearer flood-token"),)
        # The watches replay from the revision before any work: none of its ends is missed.
        revision = (await stub.List(pb.ListRequest(page_size=1), metadata=quiet)).revision
        quiet_done = Completions(stub, quiet, revision, record=True)
        flood_done = Completions(stub, flood, revision, record=False)
        counts: dict[str, int] = {"created": 0, "refused": 0}
        began = time.perf_counter()
        if phase == "idle":
            load = await _quiet(stub, quiet, quiet_done, seconds)
        else:
            async with _flood(address) as counts:
                load = await _quiet(stub, quiet, quiet_done, seconds)
        await flood_done.all_of(counts["created"])
        await quiet_done.all_of(load.calls)
        drained = time.perf_counter() - began
        quiet_done.close()
        flood_done.close()
    return {
        "quiet_tasks": load.calls,
        "quiet_p50": load.percentile(0.5),
        "quiet_p99": load.percentile(0.99),
        "flood_created": counts["created"],
        "flood_refused": counts["refused"],
        "flood_per_second": counts["created"] / seconds,
        "all_completed_after": drained,
    }


async def run(quick: bool) -> dict[str, Any]:
    seconds = 3.0 if quick else 8.0
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        tokens, limits = _files(Path(folder))
        flags = ["--token-file", str(tokens), "--max-queued", "10000000"]
        async with (
            conveyord(*flags) as open_server,
            conveyord(*flags, "--tenant-limits", str(limits)) as limited_server,
        ):
            for phase in PHASES:
                server = limited_server if phase == "flood_limited" else open_server
                results[phase] = await _phase(server.address, phase, seconds)
    return results


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [
        [
            "the quiet tenant's task, Create to its end seen",
            "p50",
            "p99",
            "p99 / idle p99",
            "flood created/s (refused)",
            "all seen COMPLETED",
        ]
    ]
    idle = results["idle"]["quiet_p99"]
    names = {
        "idle": "idle server",
        "flood": "another tenant floods (no limit)",
        "flood_limited": f"another tenant floods (held to {FLOOD_RATE}/s, bursts of {FLOOD_BURST})",
    }
    for phase in PHASES:
        figures = results[phase]
        rows.append(
            [
                names[phase],
                ms(figures["quiet_p50"]),
                ms(figures["quiet_p99"]),
                f"{figures['quiet_p99'] / idle:.2f}",
                f"{figures['flood_per_second']:.0f} ({figures['flood_refused']})",
                f"yes, {figures['all_completed_after']:.1f} s after the start",
            ]
        )
    return rows
