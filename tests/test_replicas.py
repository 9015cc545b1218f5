"""Several conveyord replicas on one PostgreSQL database, as real processes: a task created
on one is watched on another and run by a worker connected to a third; a Cancel reaches an
attempt leased on another replica; and kill -9 of a replica under load loses nothing that
was acknowledged, leaves no task RUNNING, runs no attempt twice, and its watcher resumes on
another replica with no gap; a schedule that every replica fires makes one task for each of
its times, none twice and none skipped, through a kill -9 of a replica; and a tenant's
limits hold across replicas: its rate is one bucket, and its watches and workers on one
replica count on the others (until it dies)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.v1 import schedule_service_pb2 as spb
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1 import worker_service_pb2 as wpb
from conveyor.v1.schedule_service_pb2_grpc import ScheduleServiceStub
from conveyor.v1.task_pb2 import TaskFilter, TaskRequest
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyor.v1.worker_service_pb2_grpc import WorkerServiceStub
from conveyord.schedules.rules import nominal_text
from tests.processes import Conveyord
from tests.support import (
    CANCELLED,
    COMPLETED,
    CREATED,
    RUNNING,
    create,
    error_info,
    eventually,
    final,
    read,
    result_of,
    task_request,
)  # fmt: skip
from tests.test_schedules import NOMINAL, SCHEDULE, every
from tests.test_worker import StartWorker
from tests.test_worker import start_worker as start_worker  # the fixture

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

Replicas = Callable[..., list[Conveyord]]
HANDLERS = ("--handlers", "tests.worker_handlers")
CHANGED = pb.WATCH_EVENT_TYPE_CHANGED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def replicas(
    conveyord: Callable[..., Conveyord], postgres_url: str
) -> Callable[..., list[Conveyord]]:
    """Starts `count` conveyord processes on the test's database, each with `args`."""

    def start(count: int, *args: str) -> list[Conveyord]:
        return [conveyord("--store", postgres_url, *args) for _ in range(count)]

    return start


@contextlib.asynccontextmanager
async def stubs(*servers: Conveyord) -> AsyncIterator[list[TaskServiceAsyncStub]]:
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(server.address))
            for server in servers
        ]
        yield [TaskServiceStub(channel) for channel in channels]


async def test_a_task_created_on_one_replica_is_watched_on_another_and_run_on_a_third(
    replicas: Replicas, start_worker: StartWorker
) -> None:
    a, b, c = replicas(3, "--task-type", "remote.square")
    worker = start_worker(c.address)
    async with stubs(a, b) as (on_a, on_b):
        task = await create(on_a, "remote.square", {"n": 7})
        done = await final(on_b, task.task_id)
    assert done.status == COMPLETED
    assert result_of(done) == {"square": 49, "pid": worker.pid}


async def test_a_request_id_the_database_cannot_hold_is_refused_and_the_replica_serves_on(
    replicas: Replicas,
) -> None:
    """A NUL in a request id: PostgreSQL's text refuses it, which once failed the whole
    replica's store; it is INVALID_ARGUMENT, named, and the replica goes on."""
    (a,) = replicas(1)
    async with stubs(a) as (on_a,):
        request = pb.CreateRequest(task=TaskRequest(task_type="echo"), request_id="a\x00b")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await on_a.Create(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in (caught.value.details() or "")
        done = await final(on_a, (await create(on_a, "echo", {"n": 1})).task_id)
    assert done.status == COMPLETED


async def test_a_cancel_on_one_replica_reaches_an_attempt_leased_on_another(
    replicas: Replicas, start_worker: StartWorker
) -> None:
    a, b = replicas(2, "--task-type", "remote.blocking")
    start_worker(b.address)
    async with stubs(a, b) as (on_a, on_b):
        task = await create(on_a, "remote.blocking", {"wait_cancel": True}, timeout_seconds=60)
        async for response in on_a.Watch(pb.WatchRequest(task_id=task.task_id)):
            if response.task.message == "waiting to be cancelled":  # run on b's worker
                break
        await on_a.Cancel(pb.CancelRequest(task_id=task.task_id, reason="from a"))
        done = await final(on_b, task.task_id)
    assert (done.status, done.error.message) == (CANCELLED, "from a")
    assert done.attempt == 1


class Load:
    """What the clients were told while a replica was killed under them."""

    def __init__(self) -> None:
        self.acknowledged: dict[str, str] = {}  # request id: task id
        self.unanswered: list[str] = []  # request ids whose Create got no answer
        self.enough = asyncio.Event()


def _brief(record: Path, request_id: str) -> pb.CreateRequest:
    """A Create of a brief task that records its attempts in `record`."""
    # Long enough that every replica runs as many as it can when one is killed.
    parameters = {"record": str(record), "seconds": 0.3}
    task = task_request("remote.brief", parameters, max_attempts=3)
    return pb.CreateRequest(task=task, request_id=request_id)


async def _creates(stub: TaskServiceAsyncStub, load: Load, count: int, record: Path) -> None:
    """Create `count` brief tasks, each with a request id of its own, until the server dies."""
    for _ in range(count):
        request_id = str(uuid.uuid4())
        request = _brief(record, request_id)
        try:
            response = await stub.Create(request, timeout=10)
        except grpc.aio.AioRpcError:
            load.unanswered.append(request_id)
            return
        load.acknowledged[request_id] = response.task.task_id
        if len(load.acknowledged) >= 150:
            load.enough.set()


async def _watch(
    stubs: list[TaskServiceAsyncStub], seen: list[tuple[int, str, int]], done: asyncio.Event
) -> None:
    """Watch every task from revision 0, on the first replica and, once it dies, resume on
    the next from the last revision seen: (revision, task id, status) of every change."""
    since = 0
    for stub in stubs:
        request = pb.WatchRequest(filter=TaskFilter(), since_revision=since)
        try:
            async for response in stub.Watch(request):
                if response.type == CHANGED:
                    seen.append((response.task.revision, response.task.task_id,
                                 response.task.status))  # fmt: skip
                    since = response.task.revision
                if done.is_set() and response.revision >= since:
                    return
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    raise AssertionError("every replica's watch ended")


async def test_kill_9_of_a_replica_under_load_loses_nothing_and_leaves_nothing_running(
    replicas: Replicas, tmp_path: Path
) -> None:
    record = tmp_path / "attempts"
    servers = replicas(
        3, *HANDLERS, "--local-lease", "1", "--concurrency", "8", "--retry-initial", "0.05",
        "--watch-buffer", "100000",  # every step seen: never coalesced to the latest
    )  # fmt: skip
    doomed = servers[0]
    load = Load()
    seen: list[tuple[int, str, int]] = []
    all_done = asyncio.Event()
    async with stubs(*servers) as (on_doomed, *on_survivors):
        watcher = asyncio.create_task(_watch([on_doomed, *on_survivors], seen, all_done))
        clients = [
            asyncio.create_task(_creates(stub, load, 100, record))
            for stub in (on_doomed, *on_survivors)
        ]
        await load.enough.wait()
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait()
        await asyncio.gather(*clients)
        # Unanswered creates are sent again to a survivor, with the same request id.
        for request_id in load.unanswered:
            response = await on_survivors[0].Create(_brief(record, request_id))
            load.acknowledged[request_id] = response.task.task_id
        ended = [await final(on_survivors[0], task_id) for task_id in load.acknowledged.values()]
        all_done.set()
        await asyncio.wait_for(watcher, 30)
    assert len(ended) == len(load.acknowledged) >= 150
    assert {task.status for task in ended} == {COMPLETED}  # none lost, none left RUNNING
    # The attempts the killed replica ran were run again once their leases ran out.
    retried = [task for task in ended if task.attempt > 1]
    assert {task.last_attempt_error.code for task in retried} == {"LEASE_EXPIRED"}
    runs = record.read_text().split("\n")[:-1]
    assert len(runs) == len(set(runs))  # no attempt ran twice
    assert {tuple(run.split()[:2]) for run in runs} >= {
        (task.task_id, str(task.attempt)) for task in ended
    }
    # The watcher, resumed on a survivor, missed nothing: in revision order, each task's
    # creation, start and end. (Revisions have gaps: lease renewals take some, unseen.)
    revisions = [revision for revision, _, _ in seen]
    assert revisions == sorted(set(revisions))
    steps: dict[str, set[int]] = {}
    for _, task_id, status in seen:
        steps.setdefault(task_id, set()).add(status)
    assert all(steps.get(task.task_id, set()) >= {CREATED, RUNNING, COMPLETED} for task in ended)


async def test_a_worker_whose_replica_dies_goes_on_with_another_and_keeps_its_attempt(
    replicas: Replicas, start_worker: StartWorker, tmp_path: Path
) -> None:
    a, b = replicas(2, "--task-type", "remote.until_file")
    # As a client-side balancer over both replicas: a first, then b once a is gone.
    worker = start_worker(f"ipv4:{a.address},{b.address}")
    release, record = tmp_path / "release", tmp_path / "attempts"
    parameters = {"path": str(release), "record": str(record)}
    async with stubs(a, b) as (on_a, on_b):
        task = await create(on_b, "remote.until_file", parameters, timeout_seconds=60)
        async for response in on_b.Watch(pb.WatchRequest(task_id=task.task_id)):
            if response.task.message == "waiting for the file":
                break
        assert (await _workers(on_a), await _workers(on_b)) == (1, 0)  # connected to a
        a.process.send_signal(signal.SIGKILL)
        a.process.wait()
        release.touch()
        done = await final(on_b, task.task_id)  # its end came to b: a was gone
    assert (done.status, done.attempt, result_of(done)) == (COMPLETED, 1, 1)
    assert record.read_text().split() == [task.task_id, "1", str(worker.pid)]


async def _workers(stub: TaskServiceAsyncStub) -> int:
    """How many workers connected to this replica serve remote.until_file."""
    known = await stub.ListTaskTypes(pb.ListTaskTypesRequest())
    (until_file,) = (t for t in known.task_types if t.task_type == "remote.until_file")
    return len(until_file.workers)


async def _runs(
    stub: TaskServiceAsyncStub, schedule_id: str, runs: dict[str, set[str]], wanted: int
) -> None:
    """Watch the schedule's runs from the first until `runs` (nominal time: the ids of its
    tasks) holds `wanted` nominal times."""
    request = pb.WatchRequest(filter=TaskFilter(labels={SCHEDULE: schedule_id}), since_revision=0)
    async for response in stub.Watch(request):
        if response.type == CHANGED:
            runs.setdefault(response.task.labels[NOMINAL], set()).add(response.task.task_id)
            if len(runs) >= wanted:
                return
    raise AssertionError("the watch ended")


def _one_task_per_second(runs: dict[str, set[str]]) -> list[float]:
    """The nominal times, each of one task, one second apart from the first to the last."""
    assert all(len(task_ids) == 1 for task_ids in runs.values()), runs
    times = sorted(datetime.fromisoformat(nominal).timestamp() for nominal in runs)
    assert [later - earlier for earlier, later in itertools.pairwise(times)] == [1.0] * (
        len(times) - 1
    ), sorted(runs)
    return times


async def test_a_schedule_fired_by_three_replicas_makes_one_task_per_time_through_a_kill_9(
    replicas: Replicas,
) -> None:
    doomed, other, watched = replicas(3, "--task-type", "remote.tick")
    request = every(1, "remote.tick", overlap=spb.OVERLAP_POLICY_ALLOW_ALL)  # runs pile up
    runs: dict[str, set[str]] = {}
    async with grpc.aio.insecure_channel(doomed.address) as channel:
        made = await ScheduleServiceStub(channel).CreateSchedule(
            spb.CreateScheduleRequest(schedule=request)
        )
    schedule_id = made.schedule.schedule_id
    async with stubs(other, watched) as (on_other, on_watched):
        await asyncio.wait_for(_runs(on_watched, schedule_id, runs, 4), 30)
        _one_task_per_second(runs)
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait()
        await asyncio.wait_for(_runs(on_watched, schedule_id, runs, len(runs) + 4), 30)
        times = _one_task_per_second(runs)
        # Every replica's List shows the same runs, and the schedule counts each once.
        async with grpc.aio.insecure_channel(other.address) as channel:
            shown = await ScheduleServiceStub(channel).GetSchedule(
                spb.GetScheduleRequest(schedule_id=schedule_id)
            )
        listed = await on_other.List(
            pb.ListRequest(filter=TaskFilter(labels={SCHEDULE: schedule_id}), page_size=1000)
        )
    made_by_then = [
        task for task in listed.tasks if task.labels[NOMINAL] <= _nominal(shown.schedule)
    ]
    assert shown.schedule.info.run_count == len(made_by_then) >= len(times) - 1
    assert len({task.labels[NOMINAL] for task in listed.tasks}) == len(listed.tasks)
    assert {task.labels[NOMINAL] for task in listed.tasks} >= set(runs)


def _nominal(schedule: spb.Schedule) -> str:
    """The nominal time of a schedule's last run, as its runs' label shows it."""
    stamp = schedule.info.last_run.nominal_time
    return nominal_text(stamp.seconds + stamp.nanos / 1e9)


# A tenant's rate on every replica: a burst of 10, and a token every 100 s after it (none
# comes back during a test).
SLOW_RATE = ("--tenant-rate", "0.01", "--tenant-burst", "10")


def _refusal(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, float]:
    """A refused call's code, the limit its ErrorInfo names, and its RetryInfo's delay."""
    status = rpc_status.from_call(error)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    (delay,) = [
        retry.retry_delay.ToTimedelta().total_seconds()
        for detail in status.details
        if detail.Unpack(retry)
    ]
    return error.code(), error_info(error).metadata["limit"], delay


async def test_a_tenant_s_rate_is_one_bucket_for_every_replica(replicas: Replicas) -> None:
    a, b = replicas(2, "--task-type", "remote.square", *SLOW_RATE)
    made: list[str] = []
    refusals: list[tuple[grpc.StatusCode, str, float]] = []
    async with stubs(a, b) as (on_a, on_b):
        for number in range(30):  # by turns on each replica
            stub = on_a if number % 2 else on_b
            try:
                made.append((await create(stub, "remote.square", {"n": number})).task_id)
            except grpc.aio.AioRpcError as error:
                refusals.append(_refusal(error))
        listed = await on_a.List(pb.ListRequest(page_size=100))
    assert len(made) == 10  # the one burst: each replica's own bucket would have let 20
    assert {(code, limit) for code, limit, _ in refusals} == {(EXHAUSTED, "rate")}
    # The next token is 100 s away: each refused caller, on either replica, is told to come
    # back after those refused before it.
    assert [round(delay / 100) for _, _, delay in refusals] == list(range(1, 21))
    assert sorted(task.task_id for task in listed.tasks) == sorted(made)  # refused: none made


async def test_a_request_id_taken_on_one_replica_costs_no_token_on_another(
    replicas: Replicas,
) -> None:
    a, b = replicas(2, "--task-type", "remote.square", *SLOW_RATE)
    async with stubs(a, b) as (on_a, on_b):
        first = await create(on_a, "remote.square", {"n": 1}, request_id="nightly")
        for _ in range(5):  # replayed on the other replica: the same task, for free
            again = await create(on_b, "remote.square", {"n": 1}, request_id="nightly")
            assert again.task_id == first.task_id
        for number in range(9):  # the burst's other nine tokens, on both replicas
            await create(on_b if number % 2 else on_a, "remote.square", {"n": number})
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await create(on_b, "remote.square", {"n": 10})
    assert _refusal(refused.value)[:2] == (EXHAUSTED, "rate")


async def _refused(call: Any, limit: str) -> bool:
    """Whether a Watch or Connect stream is refused at its tenant's `limit` (False: it was
    taken; it is ended at once)."""
    try:
        await call.read()
    except grpc.aio.AioRpcError as error:
        assert _refusal(error)[:2] == (EXHAUSTED, limit)
        return True
    finally:
        call.cancel()
    return False


async def _not(attempt: Awaitable[bool]) -> bool:
    return not await attempt


async def test_a_tenant_s_watches_and_workers_count_on_every_replica(replicas: Replicas) -> None:
    a, b = replicas(
        2, "--task-type", "remote.square", "--tenant-max-watches", "1", "--tenant-max-workers", "1"
    )
    hello = wpb.ConnectRequest(worker_id="w", task_types=["remote.square"], slots=1)
    async with (
        grpc.aio.insecure_channel(a.address) as to_a,
        grpc.aio.insecure_channel(b.address) as to_b,
    ):
        on_a, on_b = TaskServiceStub(to_a), TaskServiceStub(to_b)
        workers_a, workers_b = WorkerServiceStub(to_a), WorkerServiceStub(to_b)
        task = await create(on_a, "remote.square", {"n": 1})
        watch = pb.WatchRequest(task_id=task.task_id)
        watching = on_a.Watch(watch)
        assert (await read(watching)).type == pb.WATCH_EVENT_TYPE_CURRENT
        connected = workers_a.Connect(hello)  # held open until a dies
        welcome = await connected.read()
        assert isinstance(welcome, wpb.ConnectResponse)
        assert welcome.WhichOneof("message") == "welcome"
        # Once a has published them, b counts a's watch and worker.
        assert await eventually(lambda: _refused(on_b.Watch(watch), "max_watches"), 20.0)
        assert await eventually(lambda: _refused(workers_b.Connect(hello), "max_workers"), 20.0)
        watching.cancel()  # and once a has published that it closed it, b takes one
        assert await eventually(lambda: _not(_refused(on_b.Watch(watch), "max_watches")), 20.0)
        # a dies with its worker connected: its rows go stale, and b no longer counts it.
        a.process.send_signal(signal.SIGKILL)
        a.process.wait()
        free_again = lambda: _not(_refused(workers_b.Connect(hello), "max_workers"))  # noqa: E731
        assert await eventually(free_again, 20.0)
