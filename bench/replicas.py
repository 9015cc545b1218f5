"""conveyord on PostgreSQL: one server against one on SQLite, a change from one replica to a
watcher on another, and one, two and three replicas on one database.

0. First, BatchCreate alone: a PostgreSQL server that has a core of its own (the load
   generator's, which waits on its two calls), as a database has a machine of its own where
   it is deployed, against SQLite, with no other server up (in part 1, the other servers'
   databases vacuum and checkpoint on the servers' core meanwhile), in turns.
1. One conveyord on PostgreSQL against one on SQLite (a file of its own), in the same run:
   Create of parked tasks 16 at once (as the rpc section), BatchCreate of 1,000 parked
   tasks 2 at once (as the batch section), and no-op tasks end to end, Create to COMPLETED
   seen by a watcher, created one at a time (64 at once) and 100 to a BatchCreate (as the
   end_to_end section). The parked tasks stay queued, and on PostgreSQL such a backlog
   slows every claim: the no-op tasks run on a second server with a store of its own (and
   no cap on parked tasks), and once at the end on the first, behind its backlog. Every
   server is up at once and they are measured in turns, the medians counting (as the
   observability section). The headline PostgreSQL server keeps PostgreSQL's durability
   (fsync, synchronous_commit and full_page_writes on: a commit is answered once its WAL is
   on disk), as the SQLite store keeps its own (WAL, synchronous FULL); a second one with
   the three off, as the tests run it, takes the same turns.
2. A change made on one replica to a watcher on another, at light load: two replicas on one
   database; tasks created on A at 100 a second (of a type no worker runs: creating is the
   only change); one watcher on B and one on A. The delay is from the task's created_at
   (stamped by A when the Create came, before A's write) to the watcher receiving it; also
   from A's answer to the Create reaching the client to B's watcher receiving it.
3. End to end with one, two and three replicas on one database: the creates go round-robin
   over the replicas, and one watcher on the first replica counts every task's COMPLETED
   (each replica's feed carries every replica's changes). Every replica runs no-op tasks
   with its local worker, claiming from the shared queue. Each count of replicas has a
   database of its own on the same server, all up at once, measured in turns. Beside each
   rate: each replica's CPU per task, PostgreSQL's (its processes', from /proc), and this
   process's (the load generator's).

PostgreSQL runs on the servers' core, as the servers do (bench/harness.py); each conveyord
has the store's default pool of 4 connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from bench.batch import batch_request
from bench.end_to_end import WATCH_TIMEOUT, spread_throughput, throughput
from bench.harness import (
    LOAD_CORES,
    SERVER_CORES,
    Load,
    closed_loop,
    cpu_seconds,
    ms,
    quiet_conveyord,
    ratio,
    stat_fields,
)
from bench.rpc import PARKED, create_call
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskFilter
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.postgres import DURABLE_SETTINGS, TEST_SETTINGS, PostgresServer

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

T = TypeVar("T")
# As the end_to_end section's server: `noop` tasks run at once, and the watcher that counts
# them may fall behind in a burst without being let go.
SERVER_FLAGS = ("--concurrency", "32", "--max-queued", "10000000", "--watch-buffer", "1000000")
# The server that creates tasks of type `parked`, which stay queued (Create alone is
# measured). Its cap on them holds across replicas on PostgreSQL, so that every claim there
# takes a lock of the whole database: the other servers have none.
CREATES_FLAGS = (*SERVER_FLAGS, *PARKED)
UNRUN = "bench.unrun"  # a type for workers outside the server: none comes, the tasks stay
DURABLE, FAST, SQLITE = "PostgreSQL, fsync on", "PostgreSQL, fsync off", "SQLite"
OWN_CORE = "PostgreSQL, fsync on, a core of its own"  # BatchCreate only
STORES = (DURABLE, FAST, SQLITE)
REPLICAS = (1, 2, 3)
LIGHT_LOAD = 100.0  # tasks a second, in part 2
BATCH = 1000  # tasks to a BatchCreate, in part 1's BatchCreate figure
BATCHES = 20  # BatchCreates to a measurement of its rate, in each round
TARGETS = {
    "tasks_per_second": 1000.0,  # end to end, one replica, PostgreSQL
    "tasks_ratio": 0.5,  # the same, to SQLite's in the same run
    "batch_per_second": 20000.0,  # BatchCreate, PostgreSQL
    "cross_replica_p99": 0.050,  # seconds, at light load
}


def postgres_cpu_seconds(postmaster: int) -> float:
    """The CPU time PostgreSQL has used so far: its postmaster's, that of the children it
    has reaped (backends that ended), and that of its processes that run now."""
    used = cpu_seconds(postmaster, children=True)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat_fields(int(entry.name))[1]) == postmaster:
                    used += cpu_seconds(int(entry.name))
    return used


class Meter:
    """CPU seconds per task of some conveyord processes, PostgreSQL and this process, over
    a stretch of work."""

    def __init__(self, pids: Sequence[int], postmaster: int | None) -> None:
        self.pids = pids
        self.postmaster = postmaster

    def read(self) -> tuple[list[float], float, float]:
        servers = [cpu_seconds(pid) for pid in self.pids]
        database = 0.0 if self.postmaster is None else postgres_cpu_seconds(self.postmaster)
        return servers, database, cpu_seconds(os.getpid())

    async def measure(self, work: Awaitable[T], tasks: int) -> tuple[T, dict[str, Any]]:
        """What `work` gives, and the CPU per task of each part meanwhile."""
        servers, database, client = self.read()
        began = time.perf_counter()
        rate = await work
        elapsed = time.perf_counter() - began
        servers_after, database_after, client_after = self.read()
        each = [
            (after - before) / tasks for before, after in zip(servers, servers_after, strict=True)
        ]
        return rate, {
            "server_cpu_per_task": each,
            "postgres_cpu_per_task": (database_after - database) / tasks,
            "client_cpu_per_task": (client_after - client) / tasks,
            # How busy the servers' core was: every replica's CPU and PostgreSQL's.
            "server_core_busy": (sum(servers_after) - sum(servers) + database_after - database)
            / elapsed
            / len(SERVER_CORES),
        }


def batch_call(stub: TaskServiceAsyncStub, count: int) -> Callable[[], Awaitable[object]]:
    """BatchCreates of BATCH parked tasks each, made before the clock starts."""
    requests = iter([batch_request() for _ in range(count)])
    return lambda: stub.BatchCreate(next(requests))


@dataclasses.dataclass(frozen=True)
class Store:
    """A store's two servers in part 1: one that creates parked tasks, which stay queued,
    and one with a store of its own that runs no-op tasks, with no such backlog (a backlog
    of queued tasks that cannot run slows the PostgreSQL store's claims: measured apart)."""

    creates: TaskServiceAsyncStub
    tasks: TaskServiceAsyncStub
    creates_meter: Meter
    tasks_meter: Meter


class Samples:
    """Figures measured round after round, by server: kept, then their medians."""

    def __init__(self) -> None:
        self._kept: dict[str, dict[str, list[float]]] = {}

    def keeper(self, name: str) -> Callable[[str, float], None]:
        """What keeps a figure of server `name`: keep(figure, value)."""
        figures = self._kept.setdefault(name, {})
        return lambda figure, value: figures.setdefault(figure, []).append(value)

    def medians(self) -> dict[str, dict[str, Any]]:
        return {
            name: {figure: statistics.median(values) for figure, values in figures.items()}
            for name, figures in self._kept.items()
        }


def batches_of(quick: bool) -> int:
    """BatchCreates to a measurement of their rate, 2 at once: the first and the last run
    alone (no call overlaps them), which over 5 calls cut the rate by a fifth or more."""
    return 6 if quick else BATCHES


async def batch_create(
    keep: Callable[[str, float], None], stub: TaskServiceAsyncStub, meter: Meter, quick: bool
) -> None:
    """BatchCreates of BATCH parked tasks, 2 at once: the rate, a call's p50 and the CPU of
    conveyord per task, to `keep` (figure, value)."""
    batches = batches_of(quick)
    load, cpu = await meter.measure(
        closed_loop(batch_call(stub, batches), concurrency=2, calls=batches), batches * BATCH
    )
    keep("batch_per_second", load.rate * BATCH)
    keep("batch_p50", load.percentile(0.5))
    keep("batch_server_cpu_per_task", cpu["server_cpu_per_task"][0])


# --- 0. BatchCreate alone ----------------------------------------------------------------


async def batch_alone(quick: bool) -> dict[str, Any]:
    """BatchCreate on PostgreSQL with a core of its own, and on SQLite, nothing else up."""
    rounds = 2 if quick else 5
    samples = Samples()
    async with contextlib.AsyncExitStack() as stack:
        own = stack.enter_context(PostgresServer(cpus=LOAD_CORES, durable=True))
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="conveyor-bench-"))
        servers: dict[str, tuple[TaskServiceAsyncStub, Meter]] = {}
        for name, store in ((OWN_CORE, own.create_database()), (SQLITE, f"sqlite:{folder}/b.db")):
            process = await stack.enter_async_context(
                quiet_conveyord(*CREATES_FLAGS, "--store", store)
            )
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(process.address))
            servers[name] = (TaskServiceStub(channel), Meter([process.pid], None))
            await servers[name][0].BatchCreate(batch_request())  # warm-up
        for _ in range(rounds):
            for name, (stub, meter) in servers.items():
                await batch_create(samples.keeper(name), stub, meter, quick)
    results = samples.medians()
    results[OWN_CORE]["batch_per_second_to_sqlite"] = (
        results[OWN_CORE]["batch_per_second"] / results[SQLITE]["batch_per_second"]
    )
    return results


# --- 1. one server on each store, in turns -------------------------------------------


async def single_servers(stores: Mapping[str, Store], quick: bool) -> dict[str, Any]:
    creates, tasks, rounds = (500, 1000, 2) if quick else (1000, 1000, 5)
    batches = batches_of(quick)
    backlog_tasks = 500 if quick else 1000
    samples = Samples()

    warm_up = 200 + BATCH
    for store in stores.values():
        await closed_loop(create_call(store.creates, 200), concurrency=16, calls=200)
        await store.creates.BatchCreate(batch_request())
        await throughput(store.tasks, 500)

    for _ in range(rounds):  # one server after another: the host's drift hits all alike
        for name, store in stores.items():
            call = create_call(store.creates, creates)
            load = await closed_loop(call, concurrency=16, calls=creates)
            keep = samples.keeper(name)
            keep("create_per_second", load.rate)
            keep("create_p50", load.percentile(0.5))
            keep("create_p99", load.percentile(0.99))
            await batch_create(keep, store.creates, store.creates_meter, quick)
            rate, cpu = await store.tasks_meter.measure(throughput(store.tasks, tasks), tasks)
            keep("tasks_per_second", rate)
            keep("server_cpu_per_task", cpu["server_cpu_per_task"][0])
            keep("postgres_cpu_per_task", cpu["postgres_cpu_per_task"])
            keep("server_core_busy", cpu["server_core_busy"])
            batched = await throughput(store.tasks, tasks, batch=100)
            keep("tasks_per_second_batched", batched)
    results = samples.medians()
    # Once, at the end: end to end on the server whose store holds the parked tasks.
    for name, store in stores.items():
        work = throughput(store.creates, backlog_tasks)
        rate, cpu = await store.creates_meter.measure(work, backlog_tasks)
        results[name]["backlog_tasks_per_second"] = rate
        results[name]["backlog_postgres_cpu_per_task"] = cpu["postgres_cpu_per_task"]
        results[name]["backlog"] = warm_up + rounds * (creates + batches * BATCH) - 1
    for name in stores:
        for figure in (
            "create_per_second", "batch_per_second", "tasks_per_second",
            "tasks_per_second_batched", "backlog_tasks_per_second",
        ):  # fmt: skip
            results[name][f"{figure}_to_sqlite"] = results[name][figure] / results[SQLITE][figure]
    return results


# --- 2. a change from one replica to a watcher on another ------------------------------


async def cross_replica(
    on_a: TaskServiceAsyncStub, on_b: TaskServiceAsyncStub, quick: bool
) -> dict[str, Any]:
    tasks = 200 if quick else 1000
    arrived: dict[str, dict[str, float]] = {"a": {}, "b": {}}
    opened = {"a": asyncio.Event(), "b": asyncio.Event()}
    heartbeat = pb.WatchRequest(filter=TaskFilter(task_type=UNRUN))
    heartbeat.heartbeat_interval.FromMilliseconds(100)

    async def watch(stub: TaskServiceAsyncStub, side: str) -> None:
        async for response in stub.Watch(heartbeat):
            now = time.time()
            opened[side].set()  # its first heartbeat: the watch is in place
            if response.type == pb.WATCH_EVENT_TYPE_CHANGED:
                arrived[side].setdefault(response.task.task_id, now)

    watchers = [asyncio.create_task(watch(on_a, "a")), asyncio.create_task(watch(on_b, "b"))]
    try:
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in opened.values())), 10)
        created: dict[str, float] = {}  # task_id: its created_at
        answered: dict[str, float] = {}  # task_id: when its Create's answer came
        task = task_pb2.TaskRequest(task_type=UNRUN)

        async def create() -> None:
            request = pb.CreateRequest(task=task, request_id=str(uuid.uuid4()))
            response = await on_a.Create(request)
            answered[response.task.task_id] = time.time()
            stamp = response.task.created_at
            created[response.task.task_id] = stamp.seconds + stamp.nanos / 1e9

        began = time.perf_counter()
        creating = []
        for index in range(tasks):  # on time, whether the Creates before are answered or not
            await asyncio.sleep(max(0.0, began + index / LIGHT_LOAD - time.perf_counter()))
            creating.append(asyncio.create_task(create()))
        await asyncio.gather(*creating)
        deadline = time.perf_counter() + WATCH_TIMEOUT
        while any(len(arrived[side]) < tasks for side in arrived):
            if time.perf_counter() > deadline:
                raise RuntimeError("a watcher did not see every task")
            await asyncio.sleep(0.05)
    finally:
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    results: dict[str, Any] = {"tasks": tasks, "per_second": LIGHT_LOAD}
    for side, name in (("b", "other"), ("a", "same")):
        from_created = Load(tasks, 0, [arrived[side][t] - at for t, at in created.items()])
        from_answer = Load(tasks, 0, [arrived[side][t] - at for t, at in answered.items()])
        results[f"{name}_from_created_p50"] = from_created.percentile(0.5)
        results[f"{name}_from_created_p99"] = from_created.percentile(0.99)
        results[f"{name}_from_answer_p50"] = from_answer.percentile(0.5)
        results[f"{name}_from_answer_p99"] = from_answer.percentile(0.99)
    return results


# --- 3. one, two and three replicas on one database ----------------------------------


async def scaling(
    stubs: Mapping[int, Sequence[TaskServiceAsyncStub]],
    meters: Mapping[int, Meter],
    quick: bool,
) -> dict[str, Any]:
    tasks, rounds = (1000, 1) if quick else (2000, 3)
    rates: dict[int, list[float]] = {count: [] for count in stubs}
    cpus: dict[int, list[dict[str, Any]]] = {count: [] for count in stubs}
    for replicas in stubs.values():  # warm-up
        await spread_throughput(replicas, 500)
    for _ in range(rounds):
        for count, replicas in stubs.items():
            rate, cpu = await meters[count].measure(spread_throughput(replicas, tasks), tasks)
            rates[count].append(rate)
            cpus[count].append(cpu)
    results: dict[str, Any] = {}
    for count in stubs:
        samples = cpus[count]
        results[str(count)] = {
            "tasks_per_second": statistics.median(rates[count]),
            "server_cpu_per_task": [
                statistics.median(sample["server_cpu_per_task"][i] for sample in samples)
                for i in range(count)
            ],
            **{
                figure: statistics.median(sample[figure] for sample in samples)
                for figure in ("postgres_cpu_per_task", "client_cpu_per_task", "server_core_busy")
            },
        }
    return results


# --- the run -------------------------------------------------------------------------


async def run(quick: bool) -> dict[str, Any]:
    alone = await batch_alone(quick)  # 0.
    async with contextlib.AsyncExitStack() as stack:
        durable = stack.enter_context(PostgresServer(cpus=SERVER_CORES, durable=True))
        fast = stack.enter_context(PostgresServer(cpus=SERVER_CORES))
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="conveyor-bench-"))

        async def server(store: str, *flags: str) -> tuple[TaskServiceAsyncStub, int]:
            """A conveyord on `store` with `flags` (SERVER_FLAGS where none), and its pid."""
            process = await stack.enter_async_context(
                quiet_conveyord(*(flags or SERVER_FLAGS), "--store", store)
            )
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(process.address))
            return TaskServiceStub(channel), process.pid

        # 1.
        postmasters = {DURABLE: durable.pid, FAST: fast.pid, SQLITE: None}

        def store_of(name: str, label: str) -> str:
            if name == SQLITE:
                return f"sqlite:{Path(folder) / label}.db"
            return (durable if name == DURABLE else fast).create_database()

        stores: dict[str, Store] = {}
        for name in STORES:
            creates, creates_pid = await server(store_of(name, "creates"), *CREATES_FLAGS)
            tasks, tasks_pid = await server(store_of(name, "tasks"))
            meters = (Meter([pid], postmasters[name]) for pid in (creates_pid, tasks_pid))
            stores[name] = Store(creates, tasks, *meters)
        single = await single_servers(stores, quick)
        # 2.
        shared = durable.create_database()
        on_a, _ = await server(shared, *SERVER_FLAGS, "--task-type", UNRUN)
        on_b, _ = await server(shared, *SERVER_FLAGS, "--task-type", UNRUN)
        across = await cross_replica(on_a, on_b, quick)
        # 3.
        replicas: dict[int, list[TaskServiceAsyncStub]] = {}
        replica_meters: dict[int, Meter] = {}
        for count in REPLICAS:
            database = durable.create_database()
            started = [await server(database) for _ in range(count)]
            replicas[count] = [stub for stub, _ in started]
            replica_meters[count] = Meter([pid for _, pid in started], durable.pid)
        spread = await scaling(replicas, replica_meters, quick)
        version = durable.version
    return {
        "postgres_version": version,
        "postgres_settings": {DURABLE: DURABLE_SETTINGS, FAST: TEST_SETTINGS},
        "alone": alone,
        "single": single,
        "cross_replica": across,
        "replicas": spread,
        "targets": TARGETS,
    }


# --- the table -----------------------------------------------------------------------


def _met(value: float, target: float, below: bool = False) -> str:
    ok = value < target if below else value >= target
    return "met" if ok else "NOT met"


def table(results: dict[str, Any]) -> list[list[str]]:
    single, across, spread = results["single"], results["cross_replica"], results["replicas"]
    targets = results["targets"]
    rows = [["figure", DURABLE, FAST, SQLITE, "fsync on / SQLite", "target (fsync on)"]]

    def line(title: str, figure: str, show: Callable[[float], str], target: str = "") -> None:
        values = [show(single[name][figure]) for name in STORES]
        compared = single[DURABLE].get(f"{figure}_to_sqlite")
        rows.append([title, *values, "" if compared is None else ratio(compared), target])

    def rate(value: float) -> str:
        return f"{value:,.0f}"

    def micros(value: float) -> str:
        return f"{value * 1e6:,.0f} µs"

    durable = single[DURABLE]
    line("Create/s, 16 at once (parked tasks)", "create_per_second", rate)
    line("  its p50", "create_p50", ms)
    line("  its p99", "create_p99", ms)
    line(
        "tasks/s, BatchCreate of 1,000 (2 at once)", "batch_per_second", rate,
        f">= {targets['batch_per_second']:,.0f}: "
        + _met(durable["batch_per_second"], targets["batch_per_second"]),
    )  # fmt: skip
    line("  a BatchCreate's p50", "batch_p50", ms)
    line("  conveyord's CPU per task", "batch_server_cpu_per_task", micros)
    own, alone = results["alone"][OWN_CORE], results["alone"][SQLITE]
    rows.append([
        "  the same alone, PostgreSQL on a core of its own (fsync on), against SQLite alone",
        rate(own["batch_per_second"]), "", rate(alone["batch_per_second"]),
        ratio(own["batch_per_second_to_sqlite"]),
        f">= {targets['batch_per_second']:,.0f}: "
        + _met(own["batch_per_second"], targets["batch_per_second"]),
    ])  # fmt: skip
    rows.append([
        "    its p50; conveyord's CPU per task",
        f"{ms(own['batch_p50'])}; {micros(own['batch_server_cpu_per_task'])}", "",
        f"{ms(alone['batch_p50'])}; {micros(alone['batch_server_cpu_per_task'])}", "", "",
    ])  # fmt: skip
    tasks_met = (
        durable["tasks_per_second"] >= targets["tasks_per_second"]
        and durable["tasks_per_second_to_sqlite"] >= targets["tasks_ratio"]
    )
    line(
        "no-op tasks/s end to end (Create, 64 at once, to COMPLETED seen by a watcher)",
        "tasks_per_second", rate,
        f">= {targets['tasks_per_second']:,.0f} and >= {targets['tasks_ratio']} of SQLite: "
        + ("met" if tasks_met else "NOT met"),
    )  # fmt: skip
    line("  the same, created 100 to a BatchCreate", "tasks_per_second_batched", rate)
    line("  conveyord's CPU per task", "server_cpu_per_task", micros)
    line("  PostgreSQL's CPU per task", "postgres_cpu_per_task", micros)
    line(
        "  the servers' core busy (conveyord and PostgreSQL)", "server_core_busy",
        lambda value: f"{value:.0%}",
    )  # fmt: skip
    backlog = f"{durable['backlog']:,}"
    line(
        f"  the same (Create, 64 at once) on the server with {backlog} parked tasks queued",
        "backlog_tasks_per_second", rate,
    )  # fmt: skip
    line("    PostgreSQL's CPU per task there", "backlog_postgres_cpu_per_task", micros)
    blank = ["", "", ""]
    light = f"at {across['per_second']:.0f} tasks/s"
    p99 = across["other_from_created_p99"]
    rows += [
        [f"{light}, created on A to B's watcher, p50", ms(across["other_from_created_p50"]),
         *blank, ""],
        [f"{light}, created on A to B's watcher, p99", ms(p99), *blank,
         f"< {ms(targets['cross_replica_p99'])}: "
         + _met(p99, targets["cross_replica_p99"], below=True)],
        ["  from A's answer to B's watcher, p50 / p99",
         f"{ms(across['other_from_answer_p50'])} / {ms(across['other_from_answer_p99'])}",
         *blank, ""],
        ["  created on A to A's own watcher, p50 / p99",
         f"{ms(across['same_from_created_p50'])} / {ms(across['same_from_created_p99'])}",
         *blank, ""],
    ]  # fmt: skip
    for count, figures in spread.items():
        servers = ", ".join(micros(value) for value in figures["server_cpu_per_task"])
        database = figures["postgres_cpu_per_task"]
        total = sum(figures["server_cpu_per_task"]) + database
        replicas = f"{count} replica" + ("s" if count != "1" else "")
        rows += [
            [f"{replicas}: no-op tasks/s end to end, creates round-robin, one watcher on the "
             "first counting all", rate(figures["tasks_per_second"]), *blank, ""],
            [f"  CPU per task: each conveyord {servers}; PostgreSQL {micros(database)} "
             f"(the servers' core: {micros(total)}); load generator "
             f"{micros(figures['client_cpu_per_task'])}", "", *blank, ""],
            ["  the servers' core busy", f"{figures['server_core_busy']:.0%}", *blank, ""],
        ]  # fmt: skip
    return rows
