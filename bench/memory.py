"""Memory: does a server that was abused and then left alone come back near where it started?

Three kinds of abuse, each against a fresh conveyord (memory store), whose resident memory
(VmRSS) is read from /proc:

- Get requests padded to 4 MiB with an unknown field, one at a time, in rounds; RSS after
  each round, then after the server has been left alone for a while. Each is refused:
  unparsed for its size by a server that checks it, else INVALID_ARGUMENT for its task id.
- The same with BatchCreate requests of no tasks, which the server parses (a BatchCreate
  may be that large) and refuses (INVALID_ARGUMENT).
- Rounds of Watch streams (of every task) opened by a child process that is then killed with
  SIGKILL; RSS once they are open, once the server has closed their connections, and after
  the server has been left alone.

    python -m bench.memory [--quick] [--root PATH] [--tune [all|mallopt|trim]]
                           [--env NAME=VALUE ...]

--root runs the server from another tree (say a worktree of an older commit); --tune starts
it with this tree's conveyord.allocator applied from outside, for a tree that does not
apply it itself (mallopt: tune_allocator only; trim: trim_when_idle only); --env sets the
server's environment, say MALLOC_ARENA_MAX=2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import ROOT, Process
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskFilter
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub

MiB = 2**20
REQUEST_SIZE = 4 * MiB  # gRPC's default receive limit, which a message may reach but not pass
UNKNOWN_FIELD = 1000
SETTLE = 1.0  # seconds after start-up before the first reading
QUIET = duration_pb2.Duration(seconds=3600)  # no heartbeat on the Watch streams

# Starts conveyord with this tree's conveyord.allocator applied (tune_allocator first, and
# trim_when_idle beside the server), whichever tree the server comes from: the module is
# loaded from its file, so an older tree need not have it.
TUNINGS = ("all", "mallopt", "trim")
TUNED = """
import asyncio, importlib.util, runpy, sys
spec = importlib.util.spec_from_file_location("conveyord_allocator", {path!r})
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
if {mallopt}:
    assert allocator.tune_allocator()
import conveyord.cli
serve = conveyord.cli.serve
async def trimmed(config):
    trimmer = asyncio.create_task(allocator.trim_when_idle())
    try:
        return await serve(config)
    finally:
        trimmer.cancel()
if {trim}:
    conveyord.cli.serve = trimmed
runpy.run_module("conveyord", run_name="__main__", alter_sys=True)
"""


@contextlib.asynccontextmanager
async def server(root: Path, tune: str, env: dict[str, str]) -> AsyncIterator[Process]:
    """A conveyord from `root` (its service/ and client/ ahead of the installed ones), with
    `tune` one of TUNINGS or empty."""
    paths = [root / "service", root / "client", root]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths)), **env}
    path = str(ROOT / "service" / "conveyord" / "allocator.py")
    mallopt, trim = tune in ("all", "mallopt"), tune in ("all", "trim")
    start = (
        ["-c", TUNED.format(path=path, mallopt=mallopt, trim=trim)] if tune else ["-m", "conveyord"]
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *start,
        *("--store", "memory", "--listen", "127.0.0.1:0"),
        cwd=root,
        env=environment,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    drain: asyncio.Task[bytes] | None = None
    try:
        address = await _ready(process.stderr, r"\(port (\d+)\)", "conveyord")
        drain = asyncio.create_task(process.stderr.read())
        await asyncio.sleep(SETTLE)
        yield Process(address, process.pid)
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        if drain is not None:
            await drain


async def _ready(stderr: asyncio.StreamReader, pattern: str, what: str) -> str:
    """The address in the first line of `stderr` that matches `pattern`, within a minute."""
    log = []
    async with asyncio.timeout(60):
        while line := (await stderr.readline()).decode():
            log.append(line)
            if match := re.search(pattern, line):
                return f"127.0.0.1:{match.group(1)}" if match.groups() else ""
    raise RuntimeError(f"{what} did not start:\n{''.join(log)}")


def connections(server: Process) -> int:
    """The server's open file descriptors: its listening socket and files, and a socket per
    client connection."""
    return len(os.listdir(f"/proc/{server.pid}/fd"))


async def healthy(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())


# -- requests padded with an unknown field, refused ------------------------------------


def padded(request: message.Message, size: int = REQUEST_SIZE) -> bytes:
    """`request` encoded, then an unknown length-delimited field, `size` bytes in all."""
    head = request.SerializeToString()
    tag = _varint(UNKNOWN_FIELD << 3 | 2)
    padding = size - len(head) - len(tag)
    padding -= len(_varint(padding))
    data = head + tag + _varint(padding) + b"x" * padding
    parsed = type(request).FromString(data)
    parsed.DiscardUnknownFields()
    assert len(data) == size and parsed == request
    return data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# A Get of a task id that is not one (INVALID_ARGUMENT once parsed; a server that checks a
# request's size first refuses it unparsed), and a BatchCreate of no tasks (INVALID_ARGUMENT:
# it is parsed, since a BatchCreate may be that large).
REFUSED = {
    "Get": pb.GetRequest(task_id="not-a-task-id"),
    "BatchCreate": pb.BatchCreateRequest(),
}


async def big_requests(
    method: str, root: Path, tune: str, env: dict[str, str], quick: bool
) -> dict[str, Any]:
    """Requests of 4 MiB, one at a time, in rounds; the server's RSS after each round and
    after it has been left alone."""
    rounds, per_round, idle = (2, 10, 12.0) if quick else (5 if method == "Get" else 2, 40, 15.0)
    request = padded(REFUSED[method])
    codes: dict[str, int] = {}
    options = [("grpc.max_send_message_length", 2 * REQUEST_SIZE)]
    async with (
        server(root, tune, env) as conveyord,
        grpc.aio.insecure_channel(conveyord.address, options=options) as channel,
    ):
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/conveyor.v1.TaskService/{method}"
        )
        figures: dict[str, Any] = {
            "method": method,
            "requests": rounds * per_round,
            "start": conveyord.rss(),
        }
        after: list[int] = []
        for _ in range(rounds):
            for _ in range(per_round):
                try:
                    await call(request)
                    code = "OK"
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                codes[code] = codes.get(code, 0) + 1
            after.append(conveyord.rss())
        await asyncio.sleep(idle)  # the channel stays open, as a client's would
        figures.update(rounds=after, peak=max(after), idle=conveyord.rss(), codes=codes)
        figures["idle_seconds"] = idle
    return figures


# -- Watch streams whose client is killed -------------------------------------------


async def killed_watchers(
    root: Path, tune: str, env: dict[str, str], quick: bool
) -> dict[str, Any]:
    rounds, count, idle = (2, 1000, 12.0) if quick else (4, 2000, 15.0)
    async with (
        server(root, tune, env) as conveyord,
        grpc.aio.insecure_channel(conveyord.address) as channel,
    ):
        stub = TaskServiceStub(channel)
        created = await stub.Create(pb.CreateRequest(task=task_pb2.TaskRequest(task_type="echo")))
        since = int(created.task.revision) - 1  # each Watch replays the one change: it is open
        baseline = connections(conveyord)
        figures: dict[str, Any] = {"streams": count, "start": conveyord.rss()}
        opened: list[int] = []
        after: list[int] = []
        noticed: list[float] = []
        for _ in range(rounds):
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "bench.memory", "--watch", conveyord.address, str(count), str(since)),
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stderr=asyncio.subprocess.PIPE,
            )
            assert child.stderr is not None
            try:
                await _ready(child.stderr, r"\(watching \d+\)", "the watchers")
                opened.append(conveyord.rss())
            finally:
                child.send_signal(signal.SIGKILL)
                await child.wait()
            killed = time.perf_counter()
            for _ in range(600):  # until the server has closed their connections, 30 s at most
                if connections(conveyord) <= baseline:
                    break
                await asyncio.sleep(0.05)
            await healthy(conveyord.address)
            noticed.append(time.perf_counter() - killed)
            await asyncio.sleep(SETTLE)
            after.append(conveyord.rss())
        await asyncio.sleep(idle)
        figures.update(opened=opened, rounds=after, peak=max(opened), idle=conveyord.rss())
        figures.update(noticed_seconds=max(noticed), idle_seconds=idle)
    return figures


async def watch(address: str, count: int, since: int) -> None:
    """In the child: open `count` Watches of every task, say so, and wait to be killed."""
    from bench.fanout import Stream, watching

    request = pb.WatchRequest(filter=TaskFilter(), since_revision=since, heartbeat_interval=QUIET)
    kind = Stream(lambda channel: TaskServiceStub(channel).Watch(request), lambda _: True)
    async with watching(address, count, kind):
        print(f"(watching {count})", file=sys.stderr, flush=True)
        await asyncio.Event().wait()


# -- the section ---------------------------------------------------------------------


async def run(
    quick: bool, *, root: Path = ROOT, tune: str = "", env: dict[str, str] | None = None
) -> dict[str, Any]:
    env = env or {}
    return {
        "get_4mib": await big_requests("Get", root, tune, env, quick),
        "batch_create_4mib": await big_requests("BatchCreate", root, tune, env, quick),
        "killed_watchers": await killed_watchers(root, tune, env, quick),
    }


def table(results: dict[str, Any]) -> list[list[str]]:
    def mib(value: int) -> str:
        return f"{value / MiB:.0f} MiB"

    rows = [["abuse", "start", "peak", "after each round", "idle after", "idle - start"]]
    for key in ("get_4mib", "batch_create_4mib", "killed_watchers"):
        r = results[key]
        if "method" in r:
            name = f"{r['requests']} {r['method']}s of 4 MiB"
        else:
            name = f"{len(r['rounds'])} x {r['streams']} Watches killed"
        rounds = ", ".join(f"{value / MiB:.0f}" for value in r["rounds"])
        rows.append([
            name, mib(r["start"]), mib(r["peak"]), rounds, mib(r["idle"]),
            f"{(r['idle'] - r['start']) / MiB:+.0f} MiB",
        ])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    parser.add_argument("--root", type=Path, default=ROOT, help="the tree the server runs from")
    parser.add_argument(
        "--tune",
        nargs="?",
        const="all",
        default="",
        choices=TUNINGS,
        help="apply conveyord.allocator: all (the default), mallopt only, or trim only",
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for the server"
    )
    parser.add_argument("--watch", nargs=3, help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.watch:
        address, count, since = args.watch
        asyncio.run(watch(address, int(count), int(since)))
        return
    from bench.run import print_table

    env = dict(item.split("=", 1) for item in args.env)
    figures = asyncio.run(run(args.quick, root=args.root.resolve(), tune=args.tune, env=env))
    print_table("memory", table(figures))
    for key, value in figures.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
