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

from bench.harness import Load, Process, bare, conveyord, ms, ratio, stalled_watchers
from bench.rpc import PARKED
from conveyor.protojson import dict_to_struct
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskFilter
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub

STREAMS_PER_CHANNEL = 100
OPEN_AT_ONCE = 100
FILL_ROUNDS = 3 * 64 * 1024 // 2048  # changes of 2 KiB that fill a 64 KiB window, three times
QUIET = duration_pb2.Duration(seconds=3600)  # no heartbeat while measuring
STALLED_OPTIONS = [("grpc.http2.bdp_probe", 0)]  # keep the stalled clients' windows small

Publish = Callable[[], Awaitable[object]]


class Watchers:
    """Open streams whose every event is timed; `round` publishes one and waits for all.

    A stream's first message says it is open (the bare stream's "ready"; for a Watch, the
    one change it replays); after it, only the messages that `is_event` accepts count.
    A stream that ends makes every wait fail, rather than hang.
    """

    def __init__(self, count: int, is_event: Callable[[Any], bool]) -> None:
        self.count = count
        self.times: list[float] = []
        self.is_event = is_event
        self.open = 0
        self._open_target = 0
        self._all_open = asyncio.Event()
        self._target = 0
        self._all_in = asyncio.Event()
        self._ended: BaseException | None = None

    async def follow(self, stream: Any, *, stall: bool = False) -> None:
        """Time the stream's events; with `stall`, read only its first message and then
        never again, like a watcher that stopped reading."""
        try:
            await stream.read()
            self.open += 1
            if self.open >= self._open_target:
                self._all_open.set()
            if stall:
                await asyncio.Event().wait()
            while (message := await stream.read()) is not grpc.aio.EOF:
                if self.is_event(message):
                    self.times.append(time.perf_counter())
                    if len(self.times) >= self._target:
                        self._all_in.set()
            self._end(RuntimeError("the server ended it"))
        except grpc.aio.AioRpcError as error:
            self._end(error)

    def _end(self, error: BaseException) -> None:
        self._ended = self._ended or error
        self._all_open.set()
        self._all_in.set()

    async def opened(self, count: int) -> None:
        """Until `count` streams are open."""
        self._open_target = count
        if self.open < count:
            self._all_open.clear()
            await self._all_open.wait()
        self._raise_if_ended()

    async def round(self, publish: Publish) -> list[float]:
        """Publish one change; each watcher's delay until it got it."""
        self._target = len(self.times) + self.count
        self._all_in.clear()
        started = time.perf_counter()
        await publish()
        await self._all_in.wait()
        self._raise_if_ended()
        return [at - started for at in self.times[-self.count :]]

    def _raise_if_ended(self) -> None:
        if self._ended is not None:
            raise RuntimeError(f"a watcher's stream ended: {self._ended}")


@dataclasses.dataclass(frozen=True)
class Stream:
    """How to open one kind of stream, and which of its messages are events."""

    open: Callable[[grpc.aio.Channel], Any]
    is_event: Callable[[Any], bool]


@contextlib.asynccontextmanager
async def watching(
    address: str, count: int, kind: Stream, options: Any = None, *, follow: bool = True
) -> AsyncIterator[Watchers]:
    """`count` open streams over as many channels as it takes, each followed by a reader
    (or, with `follow=False`, read once and then left alone: a watcher that stalls).

    They are opened OPEN_AT_ONCE at a time: grpc cancels some of many thousands of streams
    opened in one burst, whichever the server.
    """
    watchers = Watchers(count, kind.is_event)
    channels = [
        grpc.aio.insecure_channel(address, options=options)
        for _ in range(max(1, -(-count // STREAMS_PER_CHANNEL)))
    ]
    streams: list[Any] = []
    readers: list[asyncio.Task[None]] = []
    try:
        for start in range(0, count, OPEN_AT_ONCE):
            for index in range(start, min(count, start + OPEN_AT_ONCE)):
                streams.append(kind.open(channels[index // STREAMS_PER_CHANNEL]))
                readers.append(asyncio.create_task(watchers.follow(streams[-1], stall=not follow)))
            await watchers.opened(len(streams))
        yield watchers
    finally:
        for stream in streams:
            stream.cancel()
        for task in readers:
            task.cancel()  # a stalled reader waits on nothing that the stream's end wakes
        await asyncio.gather(*readers, return_exceptions=True)
        for channel in channels:
            await channel.close()


async def measure(
    server: Process, kind: Stream, publish: Publish, count: int, rounds: int
) -> dict[str, float]:
    before = server.rss()
    async with watching(server.address, count, kind) as watchers:
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


async def latest_revision(stub: Any) -> int:
    return int((await stub.List(pb.ListRequest(page_size=1))).revision)


def parked_watch(since_revision: int) -> Stream:
    """Watches of the parked tasks that replay the changes after `since_revision` (one, the
    sign that they are open), then go live."""
    request = pb.WatchRequest(
        filter=TaskFilter(task_type="parked"),
        since_revision=since_revision,
        heartbeat_interval=QUIET,
    )
    return Stream(
        lambda channel: TaskServiceStub(channel).Watch(request),
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
            watch = parked_watch(await latest_revision(stub) - 1)
            ours = await measure(server, watch, _create_parked(stub), count, rounds)
            ours["rate_ratio"] = ours["messages_per_second"] / baseline["messages_per_second"]
            ours["p99_ratio"] = ours["p99"] / baseline["p99"]
            results[str(count)] = {"bare": baseline, "conveyor": ours}
    return results


async def slow_watchers(quick: bool) -> dict[str, Any]:
    """100 fast watchers' delays and the server's memory, without and then with 100 watchers
    that stop reading, for the same changes (each with 2 KiB of parameters). The two phases
    take turns, a few times over; each keeps its lowest p99, the least disturbed.

    Until its HTTP/2 flow-control window (64 KiB) is full, a watcher that stopped reading
    still takes every change like any other; the warm-up fills it, so that what is measured
    is the cost of watchers that have stalled.
    """
    rounds, turns = (100, 2) if quick else (300, 3)
    async with conveyord(*PARKED) as server, grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        publish = _create_parked(stub, padding=2048)
        await _create_parked(stub)()
        phases: dict[str, Any] = {}
        for phase in ("without", "with") * turns:
            async with contextlib.AsyncExitStack() as stack:
                since = await latest_revision(stub) - 1
                if phase == "with":
                    await stack.enter_async_context(stalled_watchers(server.address, 100, since))
                watch = parked_watch(since)
                fast = await stack.enter_async_context(watching(server.address, 100, watch))
                for _ in range(FILL_ROUNDS):
                    await fast.round(publish)
                before = server.rss()
                delays: list[float] = []
                for _ in range(rounds):
                    delays += await fast.round(publish)
                figures = {
                    "p99": Load(len(delays), 1.0, delays).percentile(0.99),
                    "memory_growth": server.rss() - before,
                }
            if phase not in phases or figures["p99"] < phases[phase]["p99"]:
                phases[phase] = figures
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
