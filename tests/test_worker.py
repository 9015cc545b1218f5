"""Real `conveyor worker` processes against a real server: tasks run where the handlers are,
a killed worker's task runs again elsewhere (once per attempt), cancel reaches a remote
handler, and SIGTERM drains."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from conveyor.protojson import dict_to_struct
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskFilter
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.worker.remote import SessionTimings
from tests.conftest import ServerThread
from tests.processes import SOURCE_PATH, Conveyord
from tests.proxy import Proxy
from tests.support import (
    CANCELLED,
    COMPLETED,
    CREATED,
    FAILED,
    PAUSED,
    RUNNING,
    WAITING_INPUT,
    create,
    final,
    result_of,
    task_request,
    wait_until,
)

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

ROOT = Path(__file__).resolve().parent.parent
TYPES = frozenset({
    "remote.square", "remote.blocking", "remote.fail", "remote.stuck_once", "remote.record",
    "remote.until_file", "remote.pausable", "remote.ask", "remote.collect",
})  # fmt: skip
StartWorker = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def start_worker() -> Iterator[StartWorker]:
    """`conveyor worker --handlers tests.worker_handlers` processes, killed at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(address: str, *args: str) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "conveyor", "--server", address, "worker"]
        process = subprocess.Popen(
            [*command, "--handlers", "tests.worker_handlers", *args],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": SOURCE_PATH},
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    """Knows the workers' types before any worker connects, so that tasks can wait for one."""
    return start_server(worker_types=TYPES, workers=SessionTimings(reconnect_grace=0.5))


@pytest.fixture
async def stub(server: ServerThread) -> AsyncIterator[TaskServiceAsyncStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield TaskServiceStub(channel)


async def test_a_worker_process_runs_async_blocking_and_failing_handlers(
    server: ServerThread, stub: TaskServiceAsyncStub, start_worker: StartWorker
) -> None:
    squared = await create(stub, "remote.square", {"n": 12})
    blocked = await create(stub, "remote.blocking")
    failed = await create(stub, "remote.fail")
    worker = start_worker(server.address, "--concurrency", "3")
    halfway = await wait_until(stub, squared.task_id, lambda t: t.message == "halfway")
    assert halfway.progress_detail["seen"] == 12
    done = await final(stub, squared.task_id)
    assert done.status == COMPLETED and done.result.struct_value["square"] == 144
    assert done.result.struct_value["pid"] == worker.pid  # it ran in the worker process
    assert (await final(stub, blocked.task_id)).result.string_value == "done"
    broken = await final(stub, failed.task_id)
    assert (broken.status, broken.error.code) == (FAILED, "HANDLER_ERROR")
    assert broken.error.message == "KeyError: 'missing-key'"
    assert broken.error.error_type == "KeyError"  # and where it was raised:
    assert 'raise KeyError("missing-key")' in broken.error.traceback


async def test_a_cancel_reaches_a_blocking_handler_in_a_worker(
    server: ServerThread, stub: TaskServiceAsyncStub, start_worker: StartWorker
) -> None:
    task = await create(stub, "remote.blocking", {"wait_cancel": True})
    start_worker(server.address)
    await wait_until(stub, task.task_id, lambda t: t.message == "waiting to be cancelled")
    await stub.Cancel(pb.CancelRequest(task_id=task.task_id, reason="not needed"))
    done = await final(stub, task.task_id)
    assert (done.status, done.error.message) == (CANCELLED, "not needed")


async def test_a_pause_parks_a_handler_in_a_worker_and_a_resume_reaches_it_after_a_cut(
    start_server: Callable[..., ServerThread], start_worker: StartWorker
) -> None:
    server = start_server(worker_types=TYPES, workers=SessionTimings(reconnect_grace=30))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "remote.pausable", {"steps": 500})
        with Proxy(server.address) as proxy:
            start_worker(proxy.address)
            await wait_until(stub, task.task_id, lambda t: t.status == RUNNING)
            pause = pb.PauseRequest(task_id=task.task_id, reason="hold")
            assert (await stub.Pause(pause)).paused
            await wait_until(stub, task.task_id, lambda t: t.status == PAUSED)
            proxy.hold()
            proxy.cut()  # the resume is sent while the worker is away: it hears it on return
            resumed = (await stub.Resume(pb.ResumeRequest(task_id=task.task_id))).task
            assert resumed.status == RUNNING
            proxy.release()
            done = await final(stub, task.task_id)
    assert (done.status, done.attempt, done.result.struct_value["parks"]) == (COMPLETED, 1, 1)


async def test_inputs_reach_handlers_in_a_worker_before_during_and_after_a_wait(
    server: ServerThread, stub: TaskServiceAsyncStub, start_worker: StartWorker
) -> None:
    asking = await create(stub, "remote.ask")
    collecting = await create(stub, "remote.collect", {"count": 2})
    await send_input(stub, asking.task_id, {"text": "Ann"})  # before any worker runs it
    start_worker(server.address)
    await wait_until(stub, collecting.task_id, lambda t: t.status == RUNNING)
    for n in (1, 2):  # while it runs
        await send_input(stub, collecting.task_id, {"n": n})
    collected = await final(stub, collecting.task_id)
    assert [item["n"] for item in result_of(collected)] == [1, 2]
    waiting = await wait_until(stub, asking.task_id, lambda t: t.status == WAITING_INPUT)
    assert waiting.input_prompt == "your colour?"
    await send_input(stub, asking.task_id, {"text": "green"})  # while it waits
    done = await final(stub, asking.task_id)
    assert result_of(done)["colour"]["text"] == "green"


async def send_input(stub: TaskServiceAsyncStub, task_id: str, data: dict[str, Any]) -> None:
    await stub.SendInput(pb.SendInputRequest(task_id=task_id, input=dict_to_struct(data)))


async def test_a_killed_worker_s_task_runs_again_on_another_once_per_attempt(
    server: ServerThread, stub: TaskServiceAsyncStub, start_worker: StartWorker, tmp_path: Path
) -> None:
    record = tmp_path / "attempts"
    task = await create(stub, "remote.stuck_once", {"record": str(record)}, max_attempts=3)
    first = start_worker(server.address)
    await wait_until(stub, task.task_id, lambda t: t.message == "stuck")
    first.send_signal(signal.SIGKILL)
    first.wait()
    retried = await wait_until(stub, task.task_id, lambda t: t.status == CREATED)
    assert (retried.attempt, retried.error.code) == (2, "WORKER_LOST")
    second = start_worker(server.address)
    done = await final(stub, task.task_id)
    assert (done.status, done.attempt, done.result.number_value) == (COMPLETED, 2, 2)
    assert done.last_attempt_error.code == "WORKER_LOST"
    lines = record.read_text().split()
    assert lines == [task.task_id, "1", str(first.pid), task.task_id, "2", str(second.pid)]


async def test_sigterm_drains_a_worker(
    server: ServerThread, stub: TaskServiceAsyncStub, start_worker: StartWorker
) -> None:
    task = await create(stub, "remote.blocking", {"wait_cancel": True}, timeout_seconds=60)
    worker = start_worker(server.address)
    await wait_until(stub, task.task_id, lambda t: t.message == "waiting to be cancelled")
    await asyncio.to_thread(_wait_connected, worker)
    worker.send_signal(signal.SIGTERM)
    await asyncio.to_thread(_wait_for_line, worker, ": draining,")
    later = await create(stub, "remote.square", {"n": 2})  # not for a draining worker
    # The running attempt goes on; the worker leaves once it ends.
    await stub.Cancel(pb.CancelRequest(task_id=task.task_id, reason="wrap up"))
    assert (await final(stub, task.task_id)).status == CANCELLED
    assert worker.wait(timeout=30) == 0
    assert (await stub.Get(pb.GetRequest(task_id=later.task_id))).task.status == CREATED


async def test_a_connection_cut_within_the_grace_keeps_the_attempt(
    start_server: Callable[..., ServerThread], start_worker: StartWorker, tmp_path: Path
) -> None:
    server = start_server(worker_types=TYPES, workers=SessionTimings(reconnect_grace=30))
    release = tmp_path / "release"
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        task = await create(stub, "remote.until_file", {"path": str(release)})
        with Proxy(server.address) as proxy:
            start_worker(proxy.address)
            await wait_until(stub, task.task_id, lambda t: t.message == "waiting for the file")
            proxy.cut()
            assert proxy.wait_for_connections(2)  # the worker came back through the proxy
            release.touch()
            done = await final(stub, task.task_id)
    assert (done.status, done.attempt, done.result.number_value) == (COMPLETED, 1, 1)


async def test_a_worker_cut_off_past_the_grace_loses_its_attempt(
    start_server: Callable[..., ServerThread], start_worker: StartWorker, tmp_path: Path
) -> None:
    server = start_server(worker_types=TYPES, workers=SessionTimings(reconnect_grace=0.2))
    release, record = tmp_path / "release", tmp_path / "attempts"
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        parameters = {"path": str(release), "record": str(record)}
        task = await create(stub, "remote.until_file", parameters, max_attempts=2)
        with Proxy(server.address) as proxy:
            worker = start_worker(proxy.address)
            await wait_until(stub, task.task_id, lambda t: t.message == "waiting for the file")
            proxy.hold()  # the worker cannot get back in
            proxy.cut()
            lost = await wait_until(stub, task.task_id, lambda t: t.status == CREATED)
            assert (lost.attempt, lost.error.code) == (2, "WORKER_LOST")
            release.touch()
            proxy.release()  # it reconnects; its attempt 1 was not kept, so it runs attempt 2
            done = await final(stub, task.task_id)
    assert (done.status, done.attempt, done.result.number_value) == (COMPLETED, 2, 2)
    pid = str(worker.pid)
    assert record.read_text().split() == [task.task_id, "1", pid, task.task_id, "2", pid]


async def test_four_workers_run_ten_thousand_tasks_each_once(
    start_server: Callable[..., ServerThread], start_worker: StartWorker, tmp_path: Path
) -> None:
    # A watcher of every completion may fall behind in a burst: it is here to count them.
    server = start_server(worker_types=TYPES, watch_buffer=20_000)
    async with grpc.aio.insecure_channel(server.address) as channel:
        await _run_ten_thousand(server, TaskServiceStub(channel), start_worker, tmp_path)


async def _run_ten_thousand(
    server: ServerThread, stub: TaskServiceAsyncStub, start_worker: StartWorker, tmp_path: Path
) -> None:
    record = tmp_path / "attempts"
    count = 10_000
    completed = stub.Watch(
        pb.WatchRequest(filter=TaskFilter(task_type="remote.record", statuses=[COMPLETED]))
    )
    request = pb.CreateRequest(task=task_request("remote.record", {"record": str(record)}))
    created: set[str] = set()
    workers = [start_worker(server.address, "--concurrency", "16") for _ in range(4)]
    for worker in workers:
        await asyncio.to_thread(_wait_connected, worker)
    for _ in range(count // 1000):
        batch = await stub.BatchCreate(pb.BatchCreateRequest(requests=[request] * 1000))
        created |= {task.task_id for task in batch.tasks}
    ended: list[str] = []
    async for event in completed:
        ended.append(event.task.task_id)
        if len(ended) == count:
            break
    completed.cancel()
    assert len(created) == count and sorted(ended) == sorted(created)  # each ended once
    runs = [line.split() for line in record.read_text().splitlines()]
    assert sorted(task_id for task_id, _, _ in runs) == sorted(created)  # each ran once
    assert {attempt for _, attempt, _ in runs} == {"1"}
    # All four were connected when the tasks came: each took its slots' worth at once.
    assert {pid for _, _, pid in runs} == {str(worker.pid) for worker in workers}


def _wait_connected(worker: subprocess.Popen[str]) -> None:
    """Read the worker's log until it says it is connected."""
    _wait_for_line(worker, ": connected,")


_unread: dict[int, bytes] = {}  # by worker pid: what was read of its log past the last line


def _wait_for_line(worker: subprocess.Popen[str], text: str, timeout: float = 60.0) -> None:
    """Read the worker's log until a line holds `text` (a failure after `timeout` seconds,
    rather than a thread that keeps the test's loop from closing)."""
    assert worker.stderr is not None
    fd, wanted = worker.stderr.fileno(), text.encode()
    deadline = time.monotonic() + timeout
    while True:
        buffered = _unread.get(worker.pid, b"")
        if b"\n" in buffered:
            line, _unread[worker.pid] = buffered.split(b"\n", 1)
            if wanted in line:
                return
            continue
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        _unread[worker.pid] = buffered + chunk
    raise AssertionError(f"the worker did not log {text!r}")


async def test_conveyord_with_no_handlers_coordinates_workers(
    conveyord: Callable[..., Conveyord], start_worker: StartWorker
) -> None:
    coordinator = conveyord("--no-builtin-handlers")
    assert "with handlers: \n" in coordinator.log[-1]  # none of its own
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        stub = TaskServiceStub(channel)
        for task_type in ("echo", "remote.square"):  # no built-in handlers, no worker yet
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await create(stub, task_type)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await asyncio.to_thread(_wait_connected, start_worker(coordinator.address))
        task = await create(stub, "remote.square", {"n": 3})  # declared by the worker
        done = await final(stub, task.task_id)
    assert done.result.struct_value["square"] == 9


async def test_a_worker_drops_a_silent_stream_and_connects_again(
    start_server: Callable[..., ServerThread], start_worker: StartWorker
) -> None:
    timings = SessionTimings(heartbeat_interval=0.1, reconnect_grace=30)
    server = start_server(worker_types=TYPES, workers=timings)
    with Proxy(server.address) as proxy:
        worker = start_worker(proxy.address)
        await asyncio.to_thread(_wait_connected, worker)
        proxy.stall()  # the connection stays open, but nothing comes through any more
        assert await asyncio.to_thread(proxy.wait_for_connections, 2)  # it gave up, came back
        await asyncio.to_thread(_wait_connected, worker)  # a second session
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = TaskServiceStub(channel)
            task = await create(stub, "remote.square", {"n": 4})
            assert (await final(stub, task.task_id)).result.struct_value["square"] == 16
