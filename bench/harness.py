"""What every benchmark needs: server processes, closed-loop load, percentiles, the machine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import platform
import re
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpc

from tests.postgres import on_cpus

ROOT = Path(__file__).resolve().parent.parent

# The code under test is this tree's, even where the installed package points at another
# checkout (as when an older commit is measured from a worktree beside this one).
SOURCE_PATH = os.pathsep.join(str(ROOT / part) for part in ("service", "client", "."))

# On a machine of 2 cores or more, the load generator (this process) runs on core 0 and the
# servers under test on the others: unpinned, both move between cores and a ratio between
# two runs moves by 0.2; pinned, it holds to about 0.03.
LOAD_CORES = {0}
SERVER_CORES = set(range(1, os.cpu_count() or 1)) or {0}


def pin_load_generator() -> None:
    """Keep this process (and what it starts, unless told otherwise) on LOAD_CORES."""
    if hasattr(os, "sched_setaffinity") and SERVER_CORES != LOAD_CORES:
        os.sched_setaffinity(0, LOAD_CORES)


@dataclasses.dataclass(frozen=True)
class Load:
    """The outcome of some calls: how many, in how many seconds, and each one's latency."""

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


def best(loads: list[Load]) -> Load:
    """Of repeated runs, the one with the highest rate: the least disturbed by the machine."""
    return max(loads, key=lambda load: load.rate)


@dataclasses.dataclass(frozen=True)
class Process:
    """A server under test: where it listens, and its pid (to read its memory)."""

    address: str
    pid: int

    def rss(self) -> int:
        """Its resident memory, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def conveyord(*args: str) -> contextlib.AbstractAsyncContextManager[Process]:
    """A conveyord process (memory store unless told otherwise) with the benchmark handlers."""
    command = ["-m", "conveyord", "--listen", "127.0.0.1:0", "--store", "memory"]
    return server_process(*command, "--handlers", "bench.handlers", "--log-level", "INFO", *args)


def bare() -> contextlib.AbstractAsyncContextManager[Process]:
    """The bare grpc.aio server that is the ceiling."""
    return server_process("-m", "bench.bare")


def stalled_watchers(
    address: str, count: int, since_revision: int | None = None
) -> contextlib.AbstractAsyncContextManager[Process]:
    """A process with `count` streams to `address` that it has stopped reading."""
    args = [address, str(count)] + ([] if since_revision is None else [str(since_revision)])
    return server_process(
        "-m", "bench.stalled", *args, ready=r"\(stalled \d+\)", on_server_cores=False
    )  # fmt: skip


@contextlib.asynccontextmanager
async def server_process(
    *args: str, ready: str = r"\(port (\d+)\)", on_server_cores: bool = True
) -> AsyncIterator[Process]:
    """A Python process that logs a line matching `ready` once it is ready (a server: its
    port, which gives the address); on the servers' cores, unless it is a client."""
    async with _running(args, on_server_cores) as (process, log):
        match = await _logged(process, log, re.compile(ready))
        address = f"127.0.0.1:{match.group(1)}" if match.groups() else ""
        yield Process(address, process.pid)


# A quiet conveyord: how long it may take to be ready, and how often a port is tried.
READY_SECONDS = 30.0
LISTEN_TRIES = 3
CANNOT_LISTEN_EXIT = 3  # conveyord's exit status when it cannot listen on its address


@contextlib.asynccontextmanager
async def quiet_conveyord(*args: str) -> AsyncIterator[Process]:
    """A conveyord that logs warnings only (no line per task, nor the one naming its port):
    on a port chosen here, ready once a channel to it is. The port was free when chosen, but
    a client's connection may take it as its own before conveyord listens: conveyord then
    exits, and another port is chosen."""
    for _ in range(LISTEN_TRIES):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        address = f"127.0.0.1:{port}"
        command = ["-m", "conveyord", "--listen", address, "--store", "memory"]
        flags = ["--handlers", "bench.handlers", "--log-level", "warning", *args]
        async with (
            _running([*command, *flags], on_server_cores=True) as (process, log),
            grpc.aio.insecure_channel(address) as channel,
        ):
            if await _ready_or_exited(channel, process):
                yield Process(address, process.pid)
                return
            if process.returncode != CANNOT_LISTEN_EXIT:
                raise RuntimeError(
                    f"conveyord exited ({process.returncode}) before it was ready: "
                    f"{log.read_text(errors='replace')[-2000:]}"
                )
    raise RuntimeError(f"conveyord could not listen on a free port, {LISTEN_TRIES} times")


async def _ready_or_exited(channel: grpc.aio.Channel, process: asyncio.subprocess.Process) -> bool:
    """True once the channel is ready, False if the process exits first."""
    ready = asyncio.ensure_future(channel.channel_ready())
    exited = asyncio.ensure_future(process.wait())
    try:
        done, _ = await asyncio.wait(
            {ready, exited}, timeout=READY_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        ready.cancel()
        exited.cancel()
    if ready in done:
        return True
    if exited in done:
        return False
    raise TimeoutError(f"conveyord was not ready in {READY_SECONDS:.0f} s")


@contextlib.asynccontextmanager
async def _running(
    args: Sequence[str], on_server_cores: bool
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    """The process, its log written to a file: a server's log lines cost it what they cost
    in production, and nothing to the load generator (which a pipe to read would). The
    process is stopped, and its log removed, at the end."""
    environment = {**os.environ, "PYTHONPATH": SOURCE_PATH}
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as folder:
        log = Path(folder) / "stderr.log"
        with log.open("wb") as stderr:
            pin = on_cpus(SERVER_CORES if on_server_cores else None)
            process = await asyncio.create_subprocess_exec(
                *pin, sys.executable, *args, cwd=ROOT, env=environment, stderr=stderr,
            )  # fmt: skip
        try:
            yield process, log
        finally:
            if process.returncode is None:
                process.terminate()
            await process.wait()


async def _logged(
    process: asyncio.subprocess.Process, log: Path, pattern: re.Pattern[str]
) -> re.Match[str]:
    """The first match of `pattern` in a line of the process's log, read as it grows (a
    line is looked at once it is whole: a port half written is not a port)."""
    rest, written = b"", b""
    with log.open("rb") as lines:
        while True:
            chunk = lines.read()
            written += chunk
            *whole, rest = (rest + chunk).split(b"\n")
            for line in whole:
                if match := pattern.search(line.decode(errors="replace")):
                    return match
            if not chunk:
                if process.returncode is not None:
                    raise RuntimeError(f"exited before it was ready: {written.decode()}")
                await asyncio.sleep(0.01)


def cpu_seconds(pid: int, children: bool = False) -> float:
    """The CPU time (user and system) that process `pid` has used so far; with `children`,
    that of the children it has reaped too."""
    fields = stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the process's name (which may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


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


def ratio(value: float) -> str:
    return f"{value:.2f}"
