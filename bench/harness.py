"""What every benchmark needs: a conveyord process, closed-loop load, and percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Load:
    """The outcome of a closed loop: calls completed, seconds taken, each call's latency."""

    calls: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def closed_loop(
    call: Callable[[], Awaitable[object]], *, concurrency: int, calls: int
) -> Load:
    """Run `calls` calls, `concurrency` at a time, each worker starting its next when one ends."""
    latencies: list[float] = []
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Load(len(latencies), time.perf_counter() - began, latencies)


@contextlib.asynccontextmanager
async def conveyord(*args: str) -> AsyncIterator[str]:
    """A conveyord process with the benchmark handlers; yields its address."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "conveyord", "--listen", "127.0.0.1:0"]
    command += ["--handlers", "bench.handlers", "--log-level", "INFO", *args]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, env=environment,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    address = None
    while address is None:
        line = (await process.stderr.readline()).decode()
        if not line:
            raise RuntimeError("conveyord did not start")
        if match := re.search(r"\(port (\d+)\)", line):
            address = f"127.0.0.1:{match.group(1)}"
    drain = asyncio.create_task(process.stderr.read())
    try:
        yield address
    finally:
        process.terminate()
        await process.wait()
        await drain


def machine() -> str:
    """One line about where the figures come from."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def median(values: list[float]) -> float:
    return statistics.median(values)
