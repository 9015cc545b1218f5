"""Prometheus metrics, read over real HTTP from a real server's endpoint (port 0) and parsed
as Prometheus parses them: each moves as it should across a task's life (created, started,
finished by status, retried, timed out, interrupted, the queue's wait), the queue's depth
and oldest task, workers' slots, RPCs by method and code, open watches, the store's
commits and schedules' runs; and a server without the flag does none of it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.v1 import schedule_service_pb2 as spb
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.cli import build_parser
from conveyord.worker.local import LOCAL_HOLDER
from tests.conftest import ManualClock, ServerThread
from tests.handlers import gate
from tests.processes import SOURCE_PATH, Conveyord
from tests.support import (
    COMPLETED,
    FAILED,
    RUNNING,
    create,
    final,
    read,
    task_request,
    wait_status,
)
from tests.test_schedules import Stubs, every, make, runs_made

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

StartServer = Callable[..., ServerThread]
TASKS = "conveyor.v1.TaskService"
ON = {"metrics_address": "127.0.0.1:0"}


class Scrape:
    """One scrape of a metrics endpoint: the value of each sample, by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        """The sample's value; 0 where there is none (a counter not yet moved)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(port: int) -> Scrape:
    """GET /metrics over HTTP, as Prometheus would."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert answer.status == 200
            return str(answer.read().decode())

    return Scrape(await asyncio.to_thread(get))


@pytest.fixture
def measured(start_server: StartServer) -> ServerThread:
    return start_server(**ON)


@pytest.fixture
async def stub(measured: ServerThread) -> AsyncIterator[TaskServiceAsyncStub]:
    async with grpc.aio.insecure_channel(measured.address) as channel:
        yield TaskServiceStub(channel)


async def test_a_completed_task_is_created_started_and_finished(
    measured: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    assert (await scrape(measured.server.metrics_port))("conveyor_tasks_created_total") == 0
    task = await create(stub, "echo")
    assert (await final(stub, task.task_id)).status == COMPLETED
    seen = await scrape(measured.server.metrics_port)
    assert seen("conveyor_tasks_created_total", type="echo") == 1
    assert seen("conveyor_tasks_started_total", type="echo") == 1
    assert seen("conveyor_tasks_finished_total", type="echo", status="COMPLETED") == 1
    assert seen("conveyor_tasks_finished_total", type="echo", status="FAILED") == 0
    assert seen("conveyor_queue_wait_seconds_count", type="echo") == 1
    assert seen("conveyor_task_run_seconds_count", type="echo") == 1
    assert seen("conveyor_task_end_to_end_seconds_count", type="echo") == 1
    assert seen("conveyor_queue_depth", type="echo", priority="5") == 0


async def test_the_queue_wait_counts_from_a_delayed_start_not_from_the_create(
    start_server: StartServer,
) -> None:
    clocked = start_server(clock=ManualClock(1_000_000.0), **ON)
    async with grpc.aio.insecure_channel(clocked.address) as channel:
        stub: TaskServiceAsyncStub = TaskServiceStub(channel)
        task = await create(stub, "echo", start_after_seconds=600)
        clocked.advance(600.5)  # runnable for half a second when the clock gets there
        assert (await final(stub, task.task_id)).status == COMPLETED
    seen = await scrape(clocked.server.metrics_port)
    assert seen("conveyor_queue_wait_seconds_count", type="echo") == 1
    assert seen("conveyor_queue_wait_seconds_sum", type="echo") == pytest.approx(0.5)
    assert seen("conveyor_queue_wait_seconds_bucket", type="echo", le="0.25") == 0
    assert seen("conveyor_queue_wait_seconds_bucket", type="echo", le="0.5") == 1
    assert seen("conveyor_task_end_to_end_seconds_sum", type="echo") == pytest.approx(600.5)


async def test_a_retried_task_and_a_timed_out_one(
    measured: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    retried = await create(stub, "fail", {"times": 1}, max_attempts=2)
    assert (await final(stub, retried.task_id)).status == COMPLETED
    slow = await create(stub, "cooperative_blocking", timeout_seconds=0.2)
    assert (await final(stub, slow.task_id)).error.code == "DEADLINE_EXCEEDED"
    seen = await scrape(measured.server.metrics_port)
    assert seen("conveyor_tasks_started_total", type="fail") == 2
    assert seen("conveyor_tasks_retried_total", type="fail") == 1
    assert seen("conveyor_task_run_seconds_count", type="fail") == 2
    assert seen("conveyor_tasks_finished_total", type="fail", status="COMPLETED") == 1
    assert seen("conveyor_tasks_timed_out_total", type="fail", timeout="attempt") == 0
    kind = {"type": "cooperative_blocking"}
    assert seen("conveyor_tasks_timed_out_total", **kind, timeout="attempt") == 1
    assert seen("conveyor_tasks_retried_total", **kind) == 0
    assert seen("conveyor_tasks_finished_total", **kind, status="FAILED") == 1


async def test_the_queue_depth_its_oldest_task_and_a_queue_timeout(
    start_server: StartServer,
) -> None:
    clocked = start_server(clock=ManualClock(), worker_types=frozenset({"remote"}), **ON)
    async with grpc.aio.insecure_channel(clocked.address) as channel:
        stub: TaskServiceAsyncStub = TaskServiceStub(channel)
        first = await create(stub, "remote")
        clocked.advance(10)
        await create(stub, "remote")
        urgent = await create(stub, "remote", priority=7, queue_timeout_seconds=5)
        seen = await scrape(clocked.server.metrics_port)
        assert seen("conveyor_queue_depth", type="remote", priority="5") == 2
        assert seen("conveyor_queue_depth", type="remote", priority="7") == 1
        assert seen("conveyor_queue_oldest_age_seconds", type="remote") == 10
        await stub.Cancel(pb.CancelRequest(task_id=first.task_id))
        clocked.advance(6)  # the urgent one is past its queue timeout
        assert (await final(stub, urgent.task_id)).status == FAILED
    seen = await scrape(clocked.server.metrics_port)
    assert seen("conveyor_queue_depth", type="remote", priority="5") == 1
    assert seen("conveyor_queue_depth", type="remote", priority="7") == 0
    assert seen("conveyor_queue_oldest_age_seconds", type="remote") == 6
    assert seen("conveyor_tasks_timed_out_total", type="remote", timeout="queue") == 1
    assert seen("conveyor_tasks_finished_total", type="remote", status="CANCELLED") == 1
    assert seen("conveyor_tasks_started_total", type="remote") == 0


async def test_rpcs_by_method_and_code(measured: ServerThread, stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "echo")
    await final(stub, task.task_id)  # a Watch, which ends once the task has ended
    await stub.Get(pb.GetRequest(task_id=task.task_id))
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Get(pb.GetRequest(task_id="0" * 32))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.Create(pb.CreateRequest())
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    seen = await scrape(measured.server.metrics_port)
    assert seen("conveyor_rpcs_total", service=TASKS, method="Get", code="OK") == 1
    assert seen("conveyor_rpcs_total", service=TASKS, method="Get", code="NOT_FOUND") == 1
    assert seen("conveyor_rpcs_total", service=TASKS, method="Create", code="OK") == 1
    assert seen("conveyor_rpcs_total", service=TASKS, method="Create", code="INVALID_ARGUMENT") == 1
    assert seen("conveyor_rpcs_total", service=TASKS, method="Watch", code="OK") == 1
    assert seen("conveyor_rpc_duration_seconds_count", service=TASKS, method="Get") == 2


async def test_open_watches_and_the_slots_of_the_server_s_worker(
    measured: ServerThread, stub: TaskServiceAsyncStub
) -> None:
    gate.reset()
    task = await create(stub, "gated")
    stream = stub.Watch(pb.WatchRequest(task_id=task.task_id))  # the only stream
    while (await read(stream)).task.status != RUNNING:
        pass
    seen = await scrape(measured.server.metrics_port)
    assert seen("conveyor_watch_streams") == 1
    assert seen("conveyor_worker_running_tasks", worker=LOCAL_HOLDER) == 1
    slots = measured.server.config.scheduler.concurrency
    assert seen("conveyor_worker_free_slots", worker=LOCAL_HOLDER) == slots - 1
    gate.opened.set()
    while await stream.read() is not grpc.aio.EOF:  # to its end, after the task's end
        pass
    seen = await scrape(measured.server.metrics_port)
    assert seen("conveyor_watch_streams") == 0
    assert seen("conveyor_worker_running_tasks", worker=LOCAL_HOLDER) == 0
    assert seen("conveyor_worker_free_slots", worker=LOCAL_HOLDER) == slots


async def test_a_watcher_too_slow_is_coalesced_then_cut(start_server: StartServer) -> None:
    small = start_server(watch_buffer=4, worker_types=frozenset({"remote"}), **ON)
    async with grpc.aio.insecure_channel(small.address) as channel:
        stub: TaskServiceAsyncStub = TaskServiceStub(channel)
        since = (await stub.List(pb.ListRequest(page_size=1))).revision
        stream = stub.Watch(pb.WatchRequest(since_revision=since))
        await create(stub, "remote")  # the watcher is subscribed once it has this one
        await stream.read()
        # Six changes at once, more than the buffer: coalesced, still more than half of it.
        batch = [pb.CreateRequest(task=task_request("remote"))] * 6
        await stub.BatchCreate(pb.BatchCreateRequest(requests=batch))
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            while await stream.read() is not grpc.aio.EOF:
                pass
    assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    seen = await scrape(small.server.metrics_port)
    assert seen("conveyor_watchers_coalesced_total") == 1
    assert seen("conveyor_watchers_cut_total") == 1
    cut_watch = {"service": TASKS, "method": "Watch", "code": "RESOURCE_EXHAUSTED"}
    assert seen("conveyor_rpcs_total", **cut_watch) == 1


async def test_the_store_s_group_commits(start_server: StartServer, tmp_path: Path) -> None:
    durable = start_server(
        store=f"sqlite:{tmp_path / 'tasks.db'}", worker_types=frozenset({"remote"}), **ON
    )
    async with grpc.aio.insecure_channel(durable.address) as channel:
        stub: TaskServiceAsyncStub = TaskServiceStub(channel)
        await stub.BatchCreate(
            pb.BatchCreateRequest(requests=[pb.CreateRequest(task=task_request("remote"))] * 3)
        )
    seen = await scrape(durable.server.metrics_port)
    assert seen("conveyor_store_commit_seconds_count") >= 1
    assert seen("conveyor_store_commit_changes_count") >= 1
    assert seen("conveyor_store_commit_changes_sum") >= 3  # the three, in one batch at least


async def test_schedules_fires_skips_and_lateness(start_server: StartServer) -> None:
    minute = 1_800_000_000.0  # a whole minute since the epoch: the interval's phase
    clocked = start_server(clock=ManualClock(minute), worker_types=frozenset({"remote"}), **ON)
    async with grpc.aio.insecure_channel(clocked.address) as channel:
        stubs = Stubs(channel)
        schedule = await make(stubs, every(60, task_type="remote"))  # its runs never end
        clocked.advance(61)  # a second late
        await runs_made(stubs, schedule.schedule_id, 1)
        clocked.advance(60)  # the next time falls due while the first run waits: skipped
        await _skipped(stubs, schedule.schedule_id)
    seen = await scrape(clocked.server.metrics_port)
    assert seen("conveyor_schedule_runs_total") == 1
    assert seen("conveyor_schedule_skips_total", reason="skipped") == 1
    assert seen("conveyor_schedule_lateness_seconds_count") == 1
    assert seen("conveyor_schedule_lateness_seconds_sum") == pytest.approx(1)


async def _skipped(stubs: Stubs, schedule_id: str) -> None:
    async for event in stubs.schedules.WatchSchedules(spb.WatchSchedulesRequest()):
        if event.schedule.schedule_id == schedule_id and event.schedule.info.skipped:
            return


async def test_an_attempt_cut_by_a_crash_is_counted_as_interrupted(
    conveyord: Callable[..., Conveyord], tmp_path: Path
) -> None:
    store = ["--store", f"sqlite:{tmp_path / 'tasks.db'}"]
    crashed = conveyord(*store)
    async with grpc.aio.insecure_channel(crashed.address) as channel:
        stub: TaskServiceAsyncStub = TaskServiceStub(channel)
        task = await create(stub, "sleep", {"seconds": 30}, max_attempts=2)
        await wait_status(stub, task.task_id, RUNNING)
    crashed.process.send_signal(signal.SIGKILL)
    crashed.process.wait()
    after = conveyord(*store, env={"CONVEYORD_METRICS_ADDRESS": "127.0.0.1:0"})
    port = int(re.findall(r"metrics on http://127\.0\.0\.1:(\d+)/", "".join(after.log))[0])
    seen = await scrape(port)
    assert seen("conveyor_tasks_interrupted_total", type="sleep") == 1
    assert seen("conveyor_tasks_retried_total", type="sleep") == 1


async def test_without_the_flag_no_metrics_are_made(start_server: StartServer) -> None:
    threads = set(threading.enumerate())
    plain = start_server()
    assert not [t for t in set(threading.enumerate()) - threads if "serve_forever" in t.name]
    assert plain.server.metrics is None
    assert plain.server.metrics_port == 0
    assert plain.server.store.on_commit is None
    threads = set(threading.enumerate())
    measured = start_server(**ON)
    assert len([t for t in set(threading.enumerate()) - threads if "serve_forever" in t.name]) == 1
    assert measured.server.store.feed.followers == plain.server.store.feed.followers + 1


def test_a_metrics_address_must_be_host_and_port() -> None:
    parser = build_parser()
    assert parser.parse_args(["--metrics-address", "0.0.0.0:9464"]).metrics_address
    assert not parser.parse_args([]).metrics_address
    with pytest.raises(SystemExit):
        parser.parse_args(["--metrics-address", "9464"])


def test_a_metrics_port_in_use_stops_the_start() -> None:
    taken = socket.socket()
    with taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "conveyord", "--store", "memory", "--listen"]
        address = ["127.0.0.1:0", "--metrics-address", f"127.0.0.1:{port}"]
        done = subprocess.run(
            [*command, *address],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": SOURCE_PATH},
        )
    assert done.returncode == 3
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
