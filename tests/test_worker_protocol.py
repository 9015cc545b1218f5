"""WorkerService spoken from the .proto alone (the generated stubs, no client library), to a
real server on a real port: assignments, reports, results, stale leases, cancel, a broken
connection's grace, a reconnect that keeps its attempt, and drain."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import struct_pb2

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1 import worker_service_pb2 as wpb
from conveyor.v1.task_pb2 import TaskFilter
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyor.v1.worker_service_pb2_grpc import WorkerServiceStub
from conveyord.worker.remote import SessionTimings
from tests.conftest import ServerThread

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub
    from conveyor.v1.worker_service_pb2_grpc import WorkerServiceAsyncStub
from tests.support import (
    CANCELLED,
    COMPLETED,
    CREATED,
    PAUSED,
    RUNNING,
    WAITING_INPUT,
    create,
    error_reason,
    field_violations,
    final,
    read,
    task_request,
    wait_until,
)

StartServer = Callable[..., ServerThread]
TYPE = "remote.echo"


class Session:
    """One Connect stream, read message by message."""

    def __init__(self, workers: WorkerServiceAsyncStub, worker_id: str = "w-1", **fields: Any):
        request = wpb.ConnectRequest(
            worker_id=worker_id, task_types=fields.pop("task_types", [TYPE]),
            slots=fields.pop("slots", 1), batch_assignments=fields.pop("batch", True), **fields,
        )  # fmt: skip
        self.call = workers.Connect(request)
        self.assigned: list[wpb.Assignment] = []  # from an `assignments`, not yet read

    async def next(self, kind: str) -> Any:
        """The next message that is not a heartbeat; it must be of `kind`. An `assignment`
        is one Assignment of the `assignments` messages, in order."""
        if kind == "assignment_alone":  # a message of its own, to a worker that does not batch
            kind = "assignment"
        elif kind == "assignment":
            if not self.assigned:
                self.assigned.extend((await self.next("assignments")).assignments)
            return self.assigned.pop(0)
        assert not self.assigned, f"expected the assignments {self.assigned} first"
        while True:
            response = await self.call.read()
            assert isinstance(response, wpb.ConnectResponse), f"the stream ended: {response!r}"
            which = response.WhichOneof("message")
            if which != "heartbeat":
                assert which == kind, f"expected {kind}, got {response}"
                return getattr(response, which)


@pytest.fixture
async def channel_to(start_server: StartServer) -> AsyncIterator[Callable[..., Any]]:
    channels: list[grpc.aio.Channel] = []

    def open_channel(server: ServerThread) -> tuple[TaskServiceAsyncStub, WorkerServiceAsyncStub]:
        channel = grpc.aio.insecure_channel(server.address)
        channels.append(channel)
        return TaskServiceStub(channel), WorkerServiceStub(channel)

    yield open_channel
    for channel in channels:
        await channel.close()


def _ref(assignment: wpb.Assignment) -> wpb.LeaseRef:
    return wpb.LeaseRef(task_id=assignment.task.task_id, lease_id=assignment.lease_id)


async def test_a_remote_worker_runs_a_task_reports_and_finishes(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(tasks, TYPE)  # no worker ever declared it
    assert "task.task_type" in field_violations(refused.value)

    session = Session(workers)
    welcome = await session.next("welcome")
    assert welcome.worker_id == "w-1" and welcome.lease_duration.seconds > 0
    task = await create(tasks, TYPE, {"n": 7}, timeout_seconds=30)
    assignment = await session.next("assignment")
    assert assignment.task.task_id == task.task_id
    assert assignment.task.parameters["n"] == 7 and assignment.task.attempt == 1
    assert len(assignment.lease_id) == 32
    assert assignment.deadline.seconds - assignment.task.started_at.seconds in (29, 30)

    await workers.Report(wpb.ReportRequest(lease=_ref(assignment), progress=0.5, message="half"))
    halfway = await wait_until(tasks, task.task_id, lambda t: t.progress == 0.5)
    assert halfway.message == "half"
    answer = await workers.Finish(
        wpb.FinishRequest(lease=_ref(assignment), result=struct_pb2.Value(string_value="done"))
    )
    assert answer.task.status == COMPLETED
    done = await final(tasks, task.task_id)
    assert (done.status, done.result.string_value) == (COMPLETED, "done")
    assert "w-1" not in done.error.message  # no error


async def test_a_stale_lease_is_refused_and_changes_nothing(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server())
    session = Session(workers)
    await session.next("welcome")
    task = await create(tasks, TYPE)
    assignment = await session.next("assignment")
    error = wpb.AttemptError(code="BROKEN", message="no", no_retry=True)
    await workers.Finish(wpb.FinishRequest(lease=_ref(assignment), error=error))
    ended = (await tasks.Get(pb.GetRequest(task_id=task.task_id))).task
    assert ended.error.code == "BROKEN"
    for late in (
        workers.Finish(wpb.FinishRequest(lease=_ref(assignment), result=struct_pb2.Value())),
        workers.Report(wpb.ReportRequest(lease=_ref(assignment), progress=0.9)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await late
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(refused.value) == "LEASE_NOT_HELD"
    assert (await tasks.Get(pb.GetRequest(task_id=task.task_id))).task == ended
    renewed = await workers.Renew(wpb.RenewRequest(leases=[_ref(assignment)]))
    assert list(renewed.lost) == [_ref(assignment)]


async def test_a_cancel_reaches_the_worker_on_its_stream(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server(cancel_grace=30))
    session = Session(workers)
    await session.next("welcome")
    task = await create(tasks, TYPE)
    assignment = await session.next("assignment")
    await tasks.Cancel(pb.CancelRequest(task_id=task.task_id, reason="enough"))
    stop = await session.next("stop")
    assert (stop.task_id, stop.lease_id, stop.cause) == (
        task.task_id,
        assignment.lease_id,
        wpb.STOP_CAUSE_CANCELLED,
    )
    assert stop.reason == "enough" and stop.grace.seconds == 30
    report = await workers.Report(wpb.ReportRequest(lease=_ref(assignment), message="stopping"))
    assert report.stop_requested
    error = wpb.AttemptError(code="STOPPED", message="as asked")
    await workers.Finish(wpb.FinishRequest(lease=_ref(assignment), error=error))
    done = await final(tasks, task.task_id)
    assert (done.status, done.error.code, done.error.message) == (CANCELLED, "CANCELLED", "enough")


async def test_a_lost_worker_s_attempt_is_retried_after_the_grace(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    server = start_server(workers=SessionTimings(reconnect_grace=0.2))
    tasks, workers = channel_to(server)
    session = Session(workers)
    await session.next("welcome")
    task = await create(tasks, TYPE, max_attempts=2)
    first = await session.next("assignment")
    session.call.cancel()  # the connection is gone
    retried = await wait_until(tasks, task.task_id, lambda t: t.attempt == 2)
    assert (retried.status, retried.error.code) == (
        CREATED,
        "WORKER_LOST",
    )
    again = Session(workers, worker_id="w-2")
    await again.next("welcome")
    second = await again.next("assignment")
    assert (second.task.attempt, second.task.task_id) == (2, task.task_id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await workers.Finish(wpb.FinishRequest(lease=_ref(first), result=struct_pb2.Value()))
    assert error_reason(refused.value) == "LEASE_NOT_HELD"


async def test_a_worker_that_reconnects_within_the_grace_keeps_its_attempt(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    server = start_server(workers=SessionTimings(reconnect_grace=30))
    tasks, workers = channel_to(server)
    session = Session(workers)
    await session.next("welcome")
    task = await create(tasks, TYPE)
    assignment = await session.next("assignment")
    session.call.cancel()
    again = Session(workers, held=[_ref(assignment)])
    welcome = await again.next("welcome")
    assert list(welcome.kept) == [_ref(assignment)]
    await workers.Finish(
        wpb.FinishRequest(lease=_ref(assignment), result=struct_pb2.Value(number_value=1))
    )
    done = await final(tasks, task.task_id)
    assert (done.status, done.attempt, done.result.number_value) == (COMPLETED, 1, 1)


async def test_a_draining_worker_finishes_what_it_holds_and_its_stream_ends(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server())
    session = Session(workers, slots=2)
    await session.next("welcome")
    task = await create(tasks, TYPE)
    assignment = await session.next("assignment")
    await workers.Drain(wpb.DrainRequest(worker_id="w-1"))
    waiting = await create(tasks, TYPE)  # not for a draining worker
    await workers.Finish(wpb.FinishRequest(lease=_ref(assignment), result=struct_pb2.Value()))
    assert await session.call.read() == grpc.aio.EOF
    assert await session.call.code() == grpc.StatusCode.OK
    assert (await tasks.Get(pb.GetRequest(task_id=waiting.task_id))).task.status == CREATED
    assert (await final(tasks, task.task_id)).status == COMPLETED
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await workers.Drain(wpb.DrainRequest(worker_id="w-1"))
    assert error_reason(refused.value) == "WORKER_NOT_CONNECTED"


async def test_a_bad_connect_names_every_bad_field(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    _, workers = channel_to(start_server())
    request = wpb.ConnectRequest(
        worker_id="bad id!", task_types=["ok", "no spaces"], slots=0,
        held=[wpb.LeaseRef(task_id="x", lease_id="y")],
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await workers.Connect(request).read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(refused.value)) == {
        "worker_id", "task_types[1]", "slots", "held[0].task_id", "held[0].lease_id",
    }  # fmt: skip


async def test_a_second_connection_of_one_worker_replaces_the_first(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    _, workers = channel_to(start_server())
    first = Session(workers)
    await first.next("welcome")
    second = Session(workers)
    await second.next("welcome")
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await first.call.read()
    assert ended.value.code() == grpc.StatusCode.ABORTED
    assert error_reason(ended.value) == "WORKER_REPLACED"


async def test_a_declared_type_is_accepted_after_a_restart_with_no_worker(
    start_server: StartServer, channel_to: Callable[..., Any], tmp_path: Path
) -> None:
    store = f"sqlite:{tmp_path / 'tasks.db'}"
    first = start_server(store=store)
    tasks, workers = channel_to(first)
    session = Session(workers)
    await session.next("welcome")
    session.call.cancel()
    first.stop()
    tasks, _ = channel_to(start_server(store=store))
    queued = await create(tasks, TYPE)  # no worker is connected: it waits for one
    assert queued.status == CREATED


async def test_a_renewal_is_not_an_event_for_watchers(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server())
    session = Session(workers)
    await session.next("welcome")
    task = await create(tasks, TYPE)
    assignment = await session.next("assignment")
    stream = tasks.Watch(pb.WatchRequest(task_id=task.task_id))
    current = await read(stream)
    assert current.task.status == RUNNING
    for _ in range(2):
        renewed = await workers.Renew(wpb.RenewRequest(leases=[_ref(assignment)]))
        assert not renewed.lost
    await workers.Report(wpb.ReportRequest(lease=_ref(assignment), message="after renewals"))
    assert (await read(stream)).task.message == "after renewals"  # the renewals made no event
    replayed = tasks.Watch(pb.WatchRequest(task_id=task.task_id, since_revision=current.revision))
    assert (await read(replayed)).task.message == "after renewals"
    stream.cancel()
    replayed.cancel()


async def _running(tasks: TaskServiceAsyncStub) -> list[str]:
    listed = await tasks.List(pb.ListRequest(filter=TaskFilter(statuses=[RUNNING])))
    return [task.task_id for task in listed.tasks]


async def test_max_running_holds_across_workers(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server(max_running=2))
    sessions = [Session(workers, worker_id=f"w-{n}", slots=5) for n in range(2)]
    for session in sessions:
        await session.next("welcome")
    request = pb.CreateRequest(task=task_request(TYPE))
    await tasks.BatchCreate(pb.BatchCreateRequest(requests=[request] * 4))  # one claim round
    assert len(await _running(tasks)) == 2


async def test_a_type_limit_holds_across_workers(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server(type_concurrency={TYPE: 1}))
    sessions = [Session(workers, worker_id=f"w-{n}", slots=5) for n in range(2)]
    for session in sessions:
        await session.next("welcome")
    request = pb.CreateRequest(task=task_request(TYPE))
    await tasks.BatchCreate(pb.BatchCreateRequest(requests=[request] * 3))
    assert len(await _running(tasks)) == 1  # two workers with free slots, one of the type


async def test_finish_many_records_each_end_and_refuses_a_stale_one_alone(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server())
    session = Session(workers, slots=2)
    await session.next("welcome")
    first, second = await create(tasks, TYPE), await create(tasks, TYPE)
    one, two = await session.next("assignment"), await session.next("assignment")
    await workers.Finish(wpb.FinishRequest(lease=_ref(one), result=struct_pb2.Value()))
    finishes = [
        wpb.FinishRequest(lease=_ref(one), result=struct_pb2.Value(number_value=1)),  # stale
        wpb.FinishRequest(lease=_ref(two), result=struct_pb2.Value(number_value=2)),
    ]
    answer = await workers.FinishMany(wpb.FinishManyRequest(finishes=finishes, refusals_only=True))
    [stale] = answer.refused
    assert (stale.lease, stale.code, stale.reason) == (_ref(one), 9, "LEASE_NOT_HELD")
    recorded = (await tasks.Get(pb.GetRequest(task_id=two.task.task_id))).task
    assert recorded.status == COMPLETED and recorded.result.number_value == 2
    assert {first.task_id, second.task_id} == {one.task.task_id, two.task.task_id}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await workers.FinishMany(wpb.FinishManyRequest(finishes=[finishes[1], finishes[1]]))
    assert "finishes" in field_violations(refused.value)


async def test_the_attempts_of_one_claim_round_come_in_one_message_best_first(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server())
    session = Session(workers, slots=3)
    await session.next("welcome")
    requests = [pb.CreateRequest(task=task_request(TYPE, priority=p)) for p in (1, 5, 3, 4)]
    created = await tasks.BatchCreate(pb.BatchCreateRequest(requests=requests))  # one round
    by_priority = sorted(created.tasks, key=lambda task: -task.priority)
    batch = (await session.next("assignments")).assignments
    assert [a.task.task_id for a in batch] == [t.task_id for t in by_priority[:3]]
    assert {a.task.status for a in batch} == {RUNNING}  # the three free slots, no more
    result = struct_pb2.Value(number_value=1)
    await workers.Finish(wpb.FinishRequest(lease=_ref(batch[0]), result=result))
    [last] = (await session.next("assignments")).assignments  # the slot it freed
    assert last.task.task_id == by_priority[3].task_id


async def test_finish_many_refuses_a_bad_end_alone_and_records_the_rest(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server())
    session = Session(workers, slots=2)
    await session.next("welcome")
    await tasks.BatchCreate(
        pb.BatchCreateRequest(requests=[pb.CreateRequest(task=task_request(TYPE))] * 2)
    )
    one, two = await session.next("assignment"), await session.next("assignment")
    bad = wpb.AttemptError(code="not upper case", message="x")
    finishes = [
        wpb.FinishRequest(lease=_ref(one), error=bad),
        wpb.FinishRequest(lease=_ref(two), result=struct_pb2.Value(string_value="done")),
    ]
    answer = await workers.FinishMany(wpb.FinishManyRequest(finishes=finishes, refusals_only=True))
    [refused] = answer.refused
    assert (refused.lease, refused.code) == (_ref(one), 3) and "error.code" in refused.message
    assert (await tasks.Get(pb.GetRequest(task_id=one.task.task_id))).task.status == RUNNING
    assert (await tasks.Get(pb.GetRequest(task_id=two.task.task_id))).task.status == COMPLETED


async def test_a_worker_that_does_not_batch_gets_one_assignment_a_message_and_full_results(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    """The first form of the contract still holds for a worker that asks for neither
    batched assignments nor refusals only."""
    tasks, workers = channel_to(start_server())
    session = Session(workers, slots=2, batch=False)
    await session.next("welcome")
    request = pb.CreateRequest(task=task_request(TYPE))
    await tasks.BatchCreate(pb.BatchCreateRequest(requests=[request] * 2))  # one round
    one, two = await session.next("assignment_alone"), await session.next("assignment_alone")
    await workers.Finish(wpb.FinishRequest(lease=_ref(one), result=struct_pb2.Value()))
    finishes = [
        wpb.FinishRequest(lease=_ref(one), result=struct_pb2.Value(number_value=1)),  # stale
        wpb.FinishRequest(lease=_ref(two), result=struct_pb2.Value(number_value=2)),
    ]
    answer = await workers.FinishMany(wpb.FinishManyRequest(finishes=finishes))
    stale, recorded = answer.results
    assert (stale.refusal.code, stale.refusal.reason) == (9, "LEASE_NOT_HELD")
    assert stale.refusal.lease == _ref(one) and not answer.refused
    assert recorded.task.status == COMPLETED and recorded.task.result.number_value == 2


async def test_a_pausable_worker_is_told_to_park_and_to_run_on(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server())
    session = Session(workers, pausable_types=[TYPE])
    await session.next("welcome")
    task = await create(tasks, TYPE, timeout_seconds=30)
    assignment = await session.next("assignment")
    asked = await tasks.Pause(pb.PauseRequest(task_id=task.task_id, reason="look first"))
    assert asked.paused and asked.task.HasField("pause_requested_at")
    pause = await session.next("pause")
    assert (pause.task_id, pause.lease_id, pause.reason) == (
        task.task_id,
        assignment.lease_id,
        "look first",
    )
    await workers.Report(wpb.ReportRequest(lease=_ref(assignment), parked=True))
    parked = await wait_until(tasks, task.task_id, lambda t: t.status == PAUSED)
    assert parked.pause_reason == "look first"
    renewed = await workers.Renew(wpb.RenewRequest(leases=[_ref(assignment)]))
    assert not renewed.lost  # a parked attempt keeps its lease
    assert (await tasks.Resume(pb.ResumeRequest(task_id=task.task_id))).task.status == RUNNING
    resume = await session.next("resume")
    assert (resume.task_id, resume.lease_id) == (task.task_id, assignment.lease_id)
    value = struct_pb2.Value(string_value="done")
    await workers.Finish(wpb.FinishRequest(lease=_ref(assignment), result=value))
    assert (await final(tasks, task.task_id)).status == COMPLETED


async def test_inputs_reach_the_worker_and_a_wait_for_input_suspends_the_attempt(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server(worker_types=frozenset({TYPE})))
    task = await create(tasks, TYPE)
    first = struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=1)})
    await tasks.SendInput(pb.SendInputRequest(task_id=task.task_id, input=first))
    session = Session(workers)  # connects after the first input was sent
    await session.next("welcome")
    assignment = await session.next("assignment")
    assert [(i.sequence, i.data["n"]) for i in assignment.inputs] == [(1, 1)]
    second = struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=2)})
    await tasks.SendInput(pb.SendInputRequest(task_id=task.task_id, input=second))
    given = await session.next("input")
    assert (given.task_id, given.lease_id, given.input.sequence) == (
        task.task_id,
        assignment.lease_id,
        2,
    )
    wait = wpb.InputWait(prompt="more?", label="more", inputs_seen=2)
    answer = await workers.Finish(wpb.FinishRequest(lease=_ref(assignment), wait_for_input=wait))
    assert (answer.task.status, answer.task.input_prompt) == (WAITING_INPUT, "more?")
    await tasks.SendInput(pb.SendInputRequest(task_id=task.task_id, input=first))
    again = await session.next("assignment")  # queued again, and run afresh with all three
    assert [i.sequence for i in again.inputs] == [1, 2, 3] and again.task.attempt == 1
    value = struct_pb2.Value(string_value="done")
    await workers.Finish(wpb.FinishRequest(lease=_ref(again), result=value))
    assert (await final(tasks, task.task_id)).status == COMPLETED


async def test_bad_pause_and_wait_fields_are_refused(
    start_server: StartServer, channel_to: Callable[..., Any]
) -> None:
    tasks, workers = channel_to(start_server())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await Session(workers, pausable_types=["other.type"]).next("welcome")
    assert set(field_violations(refused.value)) == {"pausable_types[0]"}
    session = Session(workers)
    await session.next("welcome")
    task = await create(tasks, TYPE)
    assignment = await session.next("assignment")
    wait = wpb.InputWait(prompt="x" * 5000, label="y" * 300)
    wait.timeout.FromSeconds(0)
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await workers.Finish(wpb.FinishRequest(lease=_ref(assignment), wait_for_input=wait))
    assert set(field_violations(bad.value)) == {
        "wait_for_input.prompt",
        "wait_for_input.label",
        "wait_for_input.timeout",
    }
    assert (await tasks.Get(pb.GetRequest(task_id=task.task_id))).task.status == RUNNING
    assert not (await tasks.Pause(pb.PauseRequest(task_id=task.task_id))).paused
