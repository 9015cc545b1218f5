"""Prometheus metrics of one server, on an HTTP endpoint of their own (`--metrics-address`).

Each server has a registry of its own (tests run several servers in one process). What
happens is counted as it happens, on the event loop: tasks from the change feed
(task_metrics.py), RPCs as they end (calls.py), the store's group commits, the schedules'
runs from their book. What is a state (the queue, workers' slots, open watches) is read at
scrape time; prometheus-client serves scrapes from a thread of its own, so that reading is
done on the event loop, which owns that state, and handed back. A server started without
the flag makes none of this: no follower, no wrapped method, no thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from conveyord.calls import CallEnded
from conveyord.hub import EventHub
from conveyord.model import TaskFilter, TaskStatus
from conveyord.schedules.model import Schedule
from conveyord.store.base import TaskStore
from conveyord.task_metrics import Labelled, TaskMetrics

log = logging.getLogger(__name__)

RPC_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
)  # fmt: skip
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
COMMIT_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
# How long a scrape waits for the event loop to read the current state (a loop that
# does not answer in this time is stuck, which the blocked-loop warning tells of).
STATE_TIMEOUT = 5.0
SEED_PAGE = 10_000  # queued tasks read at a time when the server starts


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port); ValueError if it is not one."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


class Occupancy(Protocol):
    """What dispatch tells of its workers."""

    def occupancy(self) -> dict[str, tuple[int, int]]: ...


class Metrics:
    """The registry of one server, what feeds it, and its endpoint."""

    def __init__(self, address: str) -> None:
        self.address = parse_address(address)
        self.registry = CollectorRegistry()
        self.tasks = TaskMetrics(self.registry)
        registry = self.registry
        self._rpcs = Labelled(
            Counter(
                "conveyor_rpcs",
                "RPCs that ended, by method and status code (streams count when they end).",
                ["service", "method", "code"],
                registry=registry,
            )
        )
        self._rpc_seconds = Labelled(
            Histogram(
                "conveyor_rpc_duration_seconds",
                "How long RPCs took, by method (a stream: how long it was open).",
                ["service", "method"],
                registry=registry,
                buckets=RPC_BUCKETS,
            )
        )
        self._commit_seconds = Histogram(
            "conveyor_store_commit_seconds",
            "How long the store took to write and sync one group commit.",
            registry=registry,
            buckets=COMMIT_BUCKETS,
        )
        self._commit_size = Histogram(
            "conveyor_store_commit_changes",
            "Changes written by one group commit of the store.",
            registry=registry,
            buckets=COMMIT_SIZE_BUCKETS,
        )
        self._fires = Counter(
            "conveyor_schedule_runs", "Runs that schedules made.", registry=registry
        )
        self._skips = Labelled(
            Counter(
                "conveyor_schedule_skips",
                "Schedules' times that made no run: skipped (overlap), dropped (buffer "
                "full) or missed (no server ran, or the schedule was paused).",
                ["reason"],
                registry=registry,
            )
        )
        self._lateness = Histogram(
            "conveyor_schedule_lateness_seconds",
            "How long after its nominal time a schedule's run was made (runs of the spec).",
            registry=registry,
            buckets=LATENESS_BUCKETS,
        )
        ProcessCollector(registry=registry)
        self._schedules: dict[str, tuple[int, int, int, int, int]] = {}
        self._stops: list[Callable[[], None]] = []
        self._httpd: WSGIServer | None = None
        self.port = 0

    async def start(
        self,
        store: TaskStore,
        hub: EventHub,
        dispatch: Occupancy,
        clock: Callable[[], float],
    ) -> int:
        """Count what is queued, follow what changes, and serve; returns the bound port."""
        await self._seed(store)
        self._stops.append(store.feed.follow_steps(self.tasks.changed))
        store.on_commit = self.store_committed
        for schedule in store.schedules.all():
            self._schedules[schedule.schedule_id] = _schedule_counts(schedule)
        self._stops.append(store.schedules.follow(self.schedule_changed))
        loop = asyncio.get_running_loop()
        self.registry.register(_StateCollector(loop, self.tasks, hub, dispatch, clock))
        host, port = self.address
        try:
            self._httpd, _ = start_http_server(port, host, self.registry)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {host}:{port}: {error}") from error
        self.port = self._httpd.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    async def _seed(self, store: TaskStore) -> None:
        queued = TaskFilter(statuses=frozenset({TaskStatus.CREATED}))
        after = 0
        while True:
            page, _ = await store.list(queued, after, SEED_PAGE)
            self.tasks.seed(page)
            if len(page) < SEED_PAGE:
                return
            after = page[-1].seq

    async def stop(self) -> None:
        """Stop following and serving (the endpoint's thread ends within half a second)."""
        for stop in self._stops:
            stop()
        self._stops.clear()
        if self._httpd is not None:
            await asyncio.to_thread(self._httpd.shutdown)
            self._httpd.server_close()
            self._httpd = None

    def rpc_ended(self, service: str, method: str) -> CallEnded:
        """What counts the end of each call of one method (a calls.CallObserver)."""
        seconds = self._rpc_seconds(service, method)
        by_code: dict[grpc.StatusCode, Counter] = {}

        def ended(code: grpc.StatusCode, took: float) -> None:
            counter = by_code.get(code)
            if counter is None:
                counter = by_code[code] = self._rpcs(service, method, code.name)
            counter.inc()
            seconds.observe(took)

        return ended

    def store_committed(self, changes: int, seconds: float) -> None:
        """The store wrote and synced a batch of changes."""
        self._commit_seconds.observe(seconds)
        self._commit_size.observe(changes)

    def schedule_changed(self, schedule: Schedule, removed: bool) -> None:
        """A schedule's new state (a schedule book's listener): count what it did since,
        once the runs it decided are made (their lateness is known then)."""
        if removed:
            self._schedules.pop(schedule.schedule_id, None)
            return
        if schedule.pending:
            return
        now = _schedule_counts(schedule)
        runs, skipped, dropped, missed, spec_runs = now
        was = self._schedules.get(schedule.schedule_id, (0, 0, 0, 0, 0))
        self._schedules[schedule.schedule_id] = now
        if runs > was[0]:
            self._fires.inc(runs - was[0])
        for reason, count, before in (
            ("skipped", skipped, was[1]),
            ("dropped", dropped, was[2]),
            ("missed", missed, was[3]),
        ):
            if count > before:
                self._skips(reason).inc(count - before)
        last = schedule.last_run
        if spec_runs > was[4] and last is not None:
            self._lateness.observe(max(0.0, last.made_at - last.nominal))


def _schedule_counts(schedule: Schedule) -> tuple[int, int, int, int, int]:
    return (
        schedule.run_count,
        schedule.skipped,
        schedule.buffer_dropped,
        schedule.missed,
        schedule.spec_runs,
    )


class _StateCollector(Collector):
    """The gauges of the server's current state, read on the event loop at each scrape."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tasks: TaskMetrics,
        hub: EventHub,
        dispatch: Occupancy,
        clock: Callable[[], float],
    ) -> None:
        self._loop = loop
        self._tasks = tasks
        self._hub = hub
        self._dispatch = dispatch
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        """Called on the endpoint's thread: ask the loop, wait for its answer."""
        answer: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def read() -> None:
            try:
                answer.set_result(list(self._families()))
            except Exception as error:
                answer.set_exception(error)

        try:
            self._loop.call_soon_threadsafe(read)
            return answer.result(STATE_TIMEOUT)
        except (RuntimeError, TimeoutError):  # the loop is closed, or stuck
            log.warning("metrics: the server's state could not be read for a scrape")
            return []

    def _families(self) -> Iterator[Metric]:
        """The families, read on the loop."""
        depth = GaugeMetricFamily(
            "conveyor_queue_depth",
            "Queued tasks (CREATED: runnable, or waiting for a delayed start or a retry), "
            "by type and priority.",
            labels=["type", "priority"],
        )
        for (task_type, priority), count in sorted(self._tasks.depth.items()):
            depth.add_metric([task_type, str(priority)], count)
        yield depth
        oldest = GaugeMetricFamily(
            "conveyor_queue_oldest_age_seconds",
            "How long the oldest runnable queued task of a type has waited.",
            labels=["type"],
        )
        for task_type, age in sorted(self._tasks.oldest_ages(self._clock()).items()):
            oldest.add_metric([task_type], age)
        yield oldest
        running = GaugeMetricFamily(
            "conveyor_worker_running_tasks", "Attempts each worker holds.", labels=["worker"]
        )
        free = GaugeMetricFamily(
            "conveyor_worker_free_slots", "Free slots of each worker.", labels=["worker"]
        )
        for holder, (held, slots) in sorted(self._dispatch.occupancy().items()):
            running.add_metric([holder], held)
            free.add_metric([holder], slots)
        yield running
        yield free
        yield GaugeMetricFamily(
            "conveyor_watch_streams", "Open Watch streams.", value=self._hub.watchers
        )
        yield CounterMetricFamily(
            "conveyor_watchers_coalesced",
            "Times a slow watcher's buffered changes were coalesced to the latest of each task.",
            value=self._hub.coalesced,
        )
        yield CounterMetricFamily(
            "conveyor_watchers_cut",
            "Watchers ended (RESOURCE_EXHAUSTED) for falling too far behind.",
            value=self._hub.cut,
        )
