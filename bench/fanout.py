"""Fan-out: one change to 1, 1,000 and 10,000 watchers against the bare server stream, the
memory each open stream costs, and 100 fast watchers with and without 100 that stall."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2

from bench.harness import Load, Process, bare, conveyord, ms, ratio
from bench.rpc import PARKED
from conveyor.protojson import dict_to_struct
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskFilter
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub

STREAMS_PER_CHANNEL = 500
READY = duration_pb2.Duration(seconds=1)  # the first heartbeat tells that a Watch is open
STALLED_OPTIONS = [("grpc.http2.bdp_probe", 0)]  # keep the stalled clients' windows small

Publish = Callable[[], Awaitable[object]]


class Watchers:
    """Open streams whose every event is timed; `round` publishes one and waits for all.

    A stream's first message says it is open (the bare stream's "ready", a Watch's first
    heartbeat); after it, only the messages that `is_event` accepts are counted.
    """

    def __init__(self, count: int, is_event: Callable[[Any], bool]) -> None:
        self.count = count
        self.times: list[float] = []
        self.is_event = is_event
        self._open = 0
        self._all_open = asyncio.Event()
        self._target = 0
        self._all_in = asyncio.Event()

    async def follow(self, stream: Any) -> None:
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await stream.read()
            self._open += 1
            if self._open == self.count:
                self._all_open.set()
            while (message := await stream.read()) is not grpc.aio.EOF:
                if self.is_event(message):
                    self.times.append(time.perf_counter())
                    if len(self.times) >= self._target:
                        self._all_in.set()

    async def opened(self) -> None:
        await self._all_open.wait()

    async def round(self, publish: Publish) -> list[float]:
        """Publish one change; each watcher's delay until it got it."""
        self._target = len(self.times) + self.count
        self._all_in.clear()
        started = time.perf_counter()
        await publish()
        await self._all_in.wait()
        return [at - started for at in self.times[-self.count :]]


@dataclasses.dataclass(frozen=True)
class Stream:
    """How to open one kind of stream, and which of its messages are events."""

    open: Callable[[grpc.aio.Channel], Any]
    is_event: Callable[[Any], bool]


@contextlib.asynccontextmanager
async def watching(
    address: str, count: int, kind: Stream, options: Any = None, *, follow: bool = True
) -> AsyncIterator[Watchers]:
    """`count` streams over as many channels as it takes, each followed by a reader (or, with
    `follow=False`, read once and then left alone: a watcher that stalls)."""
    watchers = Watchers(count, kind.is_event)
    channels = [
        grpc.aio.insecure_channel(address, options=options)
        for _ in range(max(1, -(-count // STREAMS_PER_CHANNEL)))
    ]
    streams = [kind.open(channels[i // STREAMS_PER_CHANNEL]) for i in range(count)]
    reader = watchers.follow if follow else _stall
    readers = [asyncio.create_task(reader(stream)) for stream in streams]
    try:
        yield watchers
    finally:
        for stream in streams:
            stream.cancel()
        await asyncio.gather(*readers)
        for channel in channels:
            await channel.close()


async def _stall(stream: Any) -> None:
    """A watcher that reads its first message and then never again."""
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await stream.read()
        await asyncio.Event().wait()


async def measure(
    server: Process, kind: Stream, publish: Publish, count: int, rounds: int
) -> dict[str, float]:
    before = server.rss()
    async with watching(server.address, count, kind) as watchers:
        await watchers.opened()
        await watchers.round(publish)  # a warm-up
        opened = server.rss()
        delays: list[float] = []
        began = time.perf_counter()
        for _ in range(rounds):
            delays += await watchers.round(publish)
        load = Load(len(delays), time.perf_counter() - began, delays)
    return {
        "messages_per_second": load.rate,
        "p50": load.percentile(0.5),
        "p99": load.percentile(0.99),
        "bytes_per_stream": (opened - before) / count,
    }


def _bare_stream(channel: grpc.aio.Channel) -> Any:
    stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
        "/bench.Bare/Stream"
    )
    return stream(b"")


BARE_STREAM = Stream(_bare_stream, lambda message: True)
WATCH_PARKED = Stream(
    lambda channel: TaskServiceStub(channel).Watch(
        pb.WatchRequest(filter=TaskFilter(task_type="parked"), heartbeat_interval=READY)
    ),
    lambda response: response.type == pb.WATCH_EVENT_TYPE_CHANGED,
)


def _create_parked(stub: Any, padding: int = 0) -> Publish:
    task = task_pb2.TaskRequest(task_type="parked")
    if padding:
        task.parameters.CopyFrom(dict_to_struct({"padding": "x" * padding}))
    request = pb.CreateRequest(task=task)
    return lambda: stub.Create(request)


async def fan_out(quick: bool) -> dict[str, Any]:
    sizes = {1: 100, 1000: 10, 10000: 3} if quick else {1: 1000, 1000: 100, 10000: 20}
    results: dict[str, Any] = {}
    async with (
        bare() as ceiling,
        conveyord(*PARKED) as server,
        grpc.aio.insecure_channel(ceiling.address) as bare_channel,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = TaskServiceStub(channel)
        await _create_parked(stub)()  # the one parked task that runs; the rest stay queued
        bare_publish: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = bare_channel.unary_unary(
            "/bench.Bare/Publish"
        )
        for count, rounds in sizes.items():
            baseline = await measure(ceiling, BARE_STREAM, lambda: bare_publish(b""), count, rounds)
            ours = await measure(server, WATCH_PARKED, _create_parked(stub), count, rounds)
            ours["rate_ratio"] = ours["messages_per_second"] / baseline["messages_per_second"]
            ours["p99_ratio"] = ours["p99"] / baseline["p99"]
            results[str(count)] = {"bare": baseline, "conveyor": ours}
    return results


async def slow_watchers(quick: bool) -> dict[str, Any]:
    """100 fast watchers' delays and the server's memory, without and then with 100 watchers
    that stop reading, for the same changes (each with 2 KiB of parameters)."""
    rounds = 100 if quick else 500
    async with conveyord(*PARKED) as server, grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        publish = _create_parked(stub, padding=2048)
        await _create_parked(stub)()
        phases: dict[str, Any] = {}
        for phase in ("without", "with"):
            async with contextlib.AsyncExitStack() as stack:
                if phase == "with":
                    await stack.enter_async_context(
                        watching(server.address, 100, WATCH_PARKED, STALLED_OPTIONS, follow=False)
                    )
                fast = await stack.enter_async_context(watching(server.address, 100, WATCH_PARKED))
                await fast.opened()
                await fast.round(publish)
                before = server.rss()
                delays: list[float] = []
                for _ in range(rounds):
                    delays += await fast.round(publish)
                load = Load(len(delays), 1.0, delays)
                phases[phase] = {
                    "p99": load.percentile(0.99),
                    "memory_growth": server.rss() - before,
                }
    phases["p99_change"] = phases["with"]["p99"] / phases["without"]["p99"] - 1
    return phases


async def run(quick: bool) -> dict[str, Any]:
    return {"fan_out": await fan_out(quick), "slow_watchers": await slow_watchers(quick)}


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [
        ["watchers", "server", "messages/s", "ratio", "p50", "p99", "p99 ratio", "memory/stream"]
    ]
    for count, pair in results["fan_out"].items():
        for name in ("bare", "conveyor"):
            r = pair[name]
            rows.append([
                count, name, f"{r['messages_per_second']:.0f}",
                ratio(r.get("rate_ratio", 1.0)), ms(r["p50"]), ms(r["p99"]),
                ratio(r.get("p99_ratio", 1.0)), f"{r['bytes_per_stream'] / 1024:.1f} KiB",
            ])  # fmt: skip
    slow = results["slow_watchers"]
    rows.append(["100 fast", "without stalled", "", "", "", ms(slow["without"]["p99"]), "", ""])
    rows.append([
        "100 fast", "with 100 stalled", "", "", "", ms(slow["with"]["p99"]),
        f"{slow['p99_change']:+.0%}", "",
    ])  # fmt: skip
    without, with_stalled = (slow[phase]["memory_growth"] / 2**20 for phase in ("without", "with"))
    growth = f"{without:.1f} / {with_stalled:.1f} MiB"
    rows.append(["memory", "growth without / with", "", "", "", growth, "", ""])
    return rows
