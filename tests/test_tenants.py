"""Tenants: every task, schedule and worker belongs to its creator's tenant, and another
tenant's does not exist for a caller. Every RPC of every service (enumerated from the
service descriptors, so that a new RPC without a case fails here) is called by tenant b on
tenant a's task, schedule, worker and lease, and answers as it would for one that never
was; the same call by tenant a finds them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from conveyor.v1 import schedule_service_pb2 as spb
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as tpb
from conveyor.v1 import worker_service_pb2 as wpb
from conveyor.v1.schedule_service_pb2_grpc import ScheduleServiceStub
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyor.v1.worker_service_pb2_grpc import WorkerServiceStub
from tests.conftest import ServerThread
from tests.test_auth import METHODS, write_token_file

StartServer = Callable[..., ServerThread]
REMOTE = "remote.square"


def write_tenant_tokens(path: Path, tokens: dict[str, tuple[str, list[str]]]) -> None:
    """A token file: token -> (tenant, permissions); each token is named after itself."""
    write_token_file(path, [(t, t, tenant, held) for t, (tenant, held) in tokens.items()])


class Tenant:
    """Stubs that call as one tenant's admin."""

    def __init__(self, channel: grpc.Channel, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.tasks = TaskServiceStub(channel)
        self.workers = WorkerServiceStub(channel)
        self.schedules = ScheduleServiceStub(channel)

    def call(self, method: Any, request: Any) -> Any:
        return method(request, metadata=self.metadata, timeout=10)

    def error(self, method: Any, request: Any) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            self.call(method, request)
        return caught.value


class World:
    """Tenant a's task (queued), schedule, connected worker and the lease of a running task;
    and both tenants' stubs."""

    def __init__(self, a: Tenant, b: Tenant) -> None:
        self.a, self.b = a, b
        self.request_id = "shared-request"
        created = a.call(a.tasks.Create, _create("echo", self.request_id, {"a": "yes"}))
        self.task_id = created.task.task_id
        labelled = _create(REMOTE, labels={"a": "yes"})
        remote = {a.call(a.tasks.Create, labelled).task.task_id for _ in range(2)}
        schedule = a.call(a.schedules.CreateSchedule, _schedule())
        self.schedule_id = schedule.schedule.schedule_id
        hello = wpb.ConnectRequest(worker_id="w-a", task_types=[REMOTE], slots=1)
        self.stream = a.workers.Connect(hello, metadata=a.metadata, timeout=30)
        messages = iter(self.stream)
        assert next(messages).WhichOneof("message") == "welcome"
        assignment = _first_assignment(messages)
        self.lease = wpb.LeaseRef(task_id=assignment.task.task_id, lease_id=assignment.lease_id)
        self.running_id = assignment.task.task_id  # one of the two runs on a's worker
        (self.queued_id,) = remote - {self.running_id}  # the other waits for a free slot

    def close(self) -> None:
        self.stream.cancel()


def _first_assignment(messages: Iterator[Any]) -> Any:
    for message in messages:
        kind = message.WhichOneof("message")
        if kind == "assignment":
            return message.assignment
        if kind == "assignments":
            return message.assignments.assignments[0]
    raise AssertionError("the stream ended")


def _create(task_type: str, request_id: str = "", labels: dict[str, str] | None = None) -> Any:
    task = task_pb2.TaskRequest(task_type=task_type, labels=labels or {})
    return tpb.CreateRequest(task=task, request_id=request_id)


def _schedule() -> Any:
    every = spb.IntervalSpec(every=duration_pb2.Duration(seconds=3600))
    request = spb.ScheduleRequest(
        spec=spb.ScheduleSpec(interval=every), task=task_pb2.TaskRequest(task_type="echo")
    )
    return spb.CreateScheduleRequest(schedule=request, request_id="shared-schedule")


def _same_refusal(world: World, method: Any, make: Callable[[str], Any], real: str) -> None:
    """Tenant b's call on tenant a's `real` id is refused exactly as for an id that never
    was: the same code, the same message but for the id."""
    missing = str(uuid.uuid4())
    foreign = world.b.error(method, make(real))
    unknown = world.b.error(method, make(missing))
    assert foreign.code() == grpc.StatusCode.NOT_FOUND
    assert (foreign.code(), str(foreign.details()).replace(real, "ID")) == (
        unknown.code(),
        str(unknown.details()).replace(missing, "ID"),
    )


def _input() -> struct_pb2.Struct:
    data = struct_pb2.Struct()
    data.update({"x": 1})
    return data


def _ids(response: Any) -> set[str]:
    return {task.task_id for task in response.tasks}


def _first_events(stream: Any, count: int) -> list[Any]:
    events = []
    for event in stream:
        events.append(event)
        if len(events) == count:
            break
    stream.cancel()
    return events


# -- one case per RPC: tenant b sees nothing of a's; tenant a sees its own ----------


def task_create(w: World) -> None:
    again = w.b.call(w.b.tasks.Create, _create("echo", w.request_id, {"a": "yes"}))
    assert again.task.task_id != w.task_id  # request ids are per tenant
    assert w.a.call(w.a.tasks.Create, _create("echo", w.request_id, {"a": "yes"})).task.task_id == (
        w.task_id
    )


def task_batch_create(w: World) -> None:
    batch = tpb.BatchCreateRequest(requests=[_create("echo", w.request_id, {"a": "yes"})])
    assert w.b.call(w.b.tasks.BatchCreate, batch).tasks[0].task_id != w.task_id
    assert w.a.call(w.a.tasks.BatchCreate, batch).tasks[0].task_id == w.task_id


def task_get(w: World) -> None:
    _same_refusal(w, w.b.tasks.Get, lambda i: tpb.GetRequest(task_id=i), w.task_id)
    assert w.a.call(w.a.tasks.Get, tpb.GetRequest(task_id=w.task_id)).task.task_id == w.task_id
    _same_refusal(w, w.b.tasks.Get, _get_with_attempts, w.task_id)  # nor its history
    assert w.a.call(w.a.tasks.Get, _get_with_attempts(w.task_id)).task.task_id == w.task_id


def _get_with_attempts(task_id: str) -> tpb.GetRequest:
    return tpb.GetRequest(task_id=task_id, include_attempts=True)


def task_list(w: World) -> None:
    for newest_first in (False, True):
        request = tpb.ListRequest(page_size=100, newest_first=newest_first)
        assert _ids(w.b.call(w.b.tasks.List, request)) == set()
        mine = _ids(w.a.call(w.a.tasks.List, request))
        assert {w.task_id, w.queued_id, w.running_id} <= mine


def task_watch(w: World) -> None:
    def one(i: str) -> Any:
        return tpb.WatchRequest(task_id=i)

    missing = str(uuid.uuid4())
    for tenant, expected in ((w.b, None), (w.a, w.queued_id)):
        stream = tenant.tasks.Watch(one(w.queued_id), metadata=tenant.metadata, timeout=10)
        if expected is None:
            with pytest.raises(grpc.RpcError) as caught:
                next(iter(stream))
            other = w.b.tasks.Watch(one(missing), metadata=w.b.metadata, timeout=10)
            with pytest.raises(grpc.RpcError) as unknown:
                next(iter(other))
            assert caught.value.code() == unknown.value.code() == grpc.StatusCode.NOT_FOUND
        else:
            assert next(iter(stream)).task.task_id == expected
            stream.cancel()
    # Every change since the start, of one's own: b's first is its own task (a's changes
    # came before it, and would come first if they leaked).
    own = w.b.call(w.b.tasks.Create, _create("echo")).task.task_id
    replay = tpb.WatchRequest(since_revision=1)
    b_events = _first_events(w.b.tasks.Watch(replay, metadata=w.b.metadata, timeout=10), 1)
    assert b_events[0].task.task_id == own
    a_events = _first_events(w.a.tasks.Watch(replay, metadata=w.a.metadata, timeout=10), 1)
    assert a_events[0].task.task_id == w.task_id


def task_cancel(w: World) -> None:
    _same_refusal(w, w.b.tasks.Cancel, lambda i: tpb.CancelRequest(task_id=i), w.queued_id)
    assert w.a.call(w.a.tasks.Get, tpb.GetRequest(task_id=w.queued_id)).task.status == (
        task_pb2.TASK_STATUS_CREATED
    )


def task_cancel_matching(w: World) -> None:
    request = tpb.CancelMatchingRequest(
        filter=task_pb2.TaskFilter(labels={"a": "yes"}), dry_run=True
    )
    assert w.b.call(w.b.tasks.CancelMatching, request).count == 0
    assert w.a.call(w.a.tasks.CancelMatching, request).count == 2  # its running and queued


def task_pause(w: World) -> None:
    _same_refusal(w, w.b.tasks.Pause, lambda i: tpb.PauseRequest(task_id=i), w.queued_id)
    paused = w.a.call(w.a.tasks.Pause, tpb.PauseRequest(task_id=w.queued_id)).task
    assert paused.status == task_pb2.TASK_STATUS_PAUSED  # its own: it may


def task_resume(w: World) -> None:
    w.a.call(w.a.tasks.Pause, tpb.PauseRequest(task_id=w.queued_id))
    _same_refusal(w, w.b.tasks.Resume, lambda i: tpb.ResumeRequest(task_id=i), w.queued_id)
    resumed = w.a.call(w.a.tasks.Resume, tpb.ResumeRequest(task_id=w.queued_id)).task
    assert resumed.status == task_pb2.TASK_STATUS_CREATED  # its own: it may


def task_send_input(w: World) -> None:
    def make(i: str) -> Any:
        return tpb.SendInputRequest(task_id=i, input=_input())

    _same_refusal(w, w.b.tasks.SendInput, make, w.queued_id)
    assert w.a.call(w.a.tasks.SendInput, make(w.queued_id)).sequence == 1


def _ended(w: World) -> str:
    """Tenant a's first task, once it has ended (its Watch ends with its terminal state)."""
    for _ in w.a.tasks.Watch(tpb.WatchRequest(task_id=w.task_id), metadata=w.a.metadata):
        pass
    ended: str = w.task_id
    return ended


def task_rerun(w: World) -> None:
    ended = _ended(w)
    _same_refusal(w, w.b.tasks.Rerun, lambda i: tpb.RerunRequest(task_id=i), ended)
    rerun = w.a.call(w.a.tasks.Rerun, tpb.RerunRequest(task_id=ended)).task
    assert rerun.rerun_of == ended
    assert _ids(w.b.call(w.b.tasks.List, tpb.ListRequest())) == set()  # it is a's too


def task_delete(w: World) -> None:
    ended = _ended(w)
    _same_refusal(w, w.b.tasks.Delete, lambda i: tpb.DeleteRequest(task_id=i), ended)
    assert w.a.call(w.a.tasks.Delete, tpb.DeleteRequest(task_id=ended)).task.task_id == ended
    assert w.a.error(w.a.tasks.Get, tpb.GetRequest(task_id=ended)).code() == (
        grpc.StatusCode.NOT_FOUND
    )


def task_list_task_types(w: World) -> None:
    def workers(tenant: Tenant) -> dict[str, list[str]]:
        answer = tenant.call(tenant.tasks.ListTaskTypes, tpb.ListTaskTypesRequest())
        return {t.task_type: [worker.worker_id for worker in t.workers] for t in answer.task_types}

    b_types, a_types = workers(w.b), workers(w.a)
    assert (b_types[REMOTE], a_types[REMOTE]) == ([], ["w-a"])  # a's worker is a's alone
    assert b_types["echo"] == a_types["echo"] == ["conveyord/local"]  # the server's, for all


def task_count_tasks(w: World) -> None:
    def counts(tenant: Tenant) -> dict[str, int]:
        answer = tenant.call(tenant.tasks.CountTasks, tpb.CountTasksRequest())
        found: dict[str, int] = {}
        for entry in answer.counts:
            found[entry.task_type] = found.get(entry.task_type, 0) + entry.count
        return found

    assert counts(w.b) == {}
    assert counts(w.a) == {"echo": 1, REMOTE: 2}


def worker_connect(w: World) -> None:
    # a's worker id, and it says it holds a's running attempt, with its lease.
    hello = wpb.ConnectRequest(worker_id="w-a", task_types=[REMOTE], slots=5, held=[w.lease])
    stream = w.b.workers.Connect(hello, metadata=w.b.metadata, timeout=10)
    messages = iter(stream)
    welcome = next(messages)
    assert welcome.WhichOneof("message") == "welcome"
    assert not welcome.welcome.kept  # b's w-a is its own worker: it keeps nothing of a's
    w.b.call(w.b.tasks.Create, _create(REMOTE))  # b's worker takes b's task, not a's queued
    assignment = _first_assignment(messages)
    stream.cancel()
    assert assignment.task.task_id not in (w.queued_id, w.running_id)
    running = w.a.call(w.a.tasks.Get, tpb.GetRequest(task_id=w.running_id)).task
    assert running.status == task_pb2.TASK_STATUS_RUNNING  # a's w-a was not replaced


def _lease(i: str, w: World) -> Any:
    return wpb.LeaseRef(task_id=i, lease_id=w.lease.lease_id)


def worker_report(w: World) -> None:
    def make(i: str) -> Any:
        return wpb.ReportRequest(lease=_lease(i, w), progress=0.5)

    _same_refusal(w, w.b.workers.Report, make, w.running_id)
    w.a.call(w.a.workers.Report, make(w.running_id))


def worker_renew(w: World) -> None:
    def make(i: str) -> Any:
        return wpb.RenewRequest(leases=[_lease(i, w)])

    missing = str(uuid.uuid4())
    assert [lost.task_id for lost in w.b.call(w.b.workers.Renew, make(w.running_id)).lost] == [
        w.running_id
    ]
    assert [lost.task_id for lost in w.b.call(w.b.workers.Renew, make(missing)).lost] == [missing]
    assert not w.a.call(w.a.workers.Renew, make(w.running_id)).lost


def worker_finish(w: World) -> None:
    def make(i: str) -> Any:
        return wpb.FinishRequest(lease=_lease(i, w), error=wpb.AttemptError(message="x"))

    _same_refusal(w, w.b.workers.Finish, make, w.running_id)
    running = w.a.call(w.a.tasks.Get, tpb.GetRequest(task_id=w.running_id)).task
    assert running.status == task_pb2.TASK_STATUS_RUNNING


def worker_finish_many(w: World) -> None:
    def make(i: str) -> Any:
        finish = wpb.FinishRequest(lease=_lease(i, w), error=wpb.AttemptError(message="x"))
        return wpb.FinishManyRequest(finishes=[finish])

    missing = str(uuid.uuid4())
    foreign = w.b.call(w.b.workers.FinishMany, make(w.running_id)).results[0].refusal
    unknown = w.b.call(w.b.workers.FinishMany, make(missing)).results[0].refusal
    assert foreign.code == unknown.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert foreign.message.replace(w.running_id, "ID") == unknown.message.replace(missing, "ID")


def worker_drain(w: World) -> None:
    refused = w.b.error(w.b.workers.Drain, wpb.DrainRequest(worker_id="w-a"))
    unknown = w.b.error(w.b.workers.Drain, wpb.DrainRequest(worker_id="w-nobody"))
    assert refused.code() == unknown.code() == grpc.StatusCode.FAILED_PRECONDITION
    running = w.a.call(w.a.tasks.Get, tpb.GetRequest(task_id=w.running_id)).task
    assert running.status == task_pb2.TASK_STATUS_RUNNING


def schedule_create(w: World) -> None:
    again = w.b.call(w.b.schedules.CreateSchedule, _schedule())
    assert again.schedule.schedule_id != w.schedule_id  # request ids are per tenant
    same = w.a.call(w.a.schedules.CreateSchedule, _schedule())
    assert same.schedule.schedule_id == w.schedule_id


def _schedule_refusal(method: str, make: Callable[[str], Any]) -> Callable[[World], None]:
    def case(w: World) -> None:
        _same_refusal(w, getattr(w.b.schedules, method), make, w.schedule_id)
        assert w.a.call(
            w.a.schedules.GetSchedule, spb.GetScheduleRequest(schedule_id=w.schedule_id)
        ).schedule.schedule_id == w.schedule_id  # fmt: skip
        w.a.call(getattr(w.a.schedules, method), make(w.schedule_id))  # its own: it may

    return case


def schedule_list(w: World) -> None:
    assert not w.b.call(w.b.schedules.ListSchedules, spb.ListSchedulesRequest()).schedules
    mine = w.a.call(w.a.schedules.ListSchedules, spb.ListSchedulesRequest()).schedules
    assert [s.schedule_id for s in mine] == [w.schedule_id]


def schedule_watch(w: World) -> None:
    # b's first is its own schedule: a's, made before it, would come first if it leaked.
    own = w.b.call(w.b.schedules.CreateSchedule, _schedule()).schedule.schedule_id
    request = spb.WatchSchedulesRequest()
    b_first = _first_events(w.b.schedules.WatchSchedules(request, metadata=w.b.metadata), 1)
    assert b_first[0].schedule.schedule_id == own
    a_first = _first_events(w.a.schedules.WatchSchedules(request, metadata=w.a.metadata), 1)
    assert a_first[0].schedule.schedule_id == w.schedule_id


def _window() -> tuple[timestamp_pb2.Timestamp, timestamp_pb2.Timestamp]:
    return timestamp_pb2.Timestamp(seconds=0), timestamp_pb2.Timestamp(seconds=3600)


CASES: dict[tuple[str, str], Callable[[World], None]] = {
    ("conveyor.v1.TaskService", "Create"): task_create,
    ("conveyor.v1.TaskService", "BatchCreate"): task_batch_create,
    ("conveyor.v1.TaskService", "Get"): task_get,
    ("conveyor.v1.TaskService", "List"): task_list,
    ("conveyor.v1.TaskService", "Watch"): task_watch,
    ("conveyor.v1.TaskService", "Cancel"): task_cancel,
    ("conveyor.v1.TaskService", "CancelMatching"): task_cancel_matching,
    ("conveyor.v1.TaskService", "Pause"): task_pause,
    ("conveyor.v1.TaskService", "Resume"): task_resume,
    ("conveyor.v1.TaskService", "SendInput"): task_send_input,
    ("conveyor.v1.TaskService", "Rerun"): task_rerun,
    ("conveyor.v1.TaskService", "Delete"): task_delete,
    ("conveyor.v1.TaskService", "ListTaskTypes"): task_list_task_types,
    ("conveyor.v1.TaskService", "CountTasks"): task_count_tasks,
    ("conveyor.v1.WorkerService", "Connect"): worker_connect,
    ("conveyor.v1.WorkerService", "Report"): worker_report,
    ("conveyor.v1.WorkerService", "Renew"): worker_renew,
    ("conveyor.v1.WorkerService", "Finish"): worker_finish,
    ("conveyor.v1.WorkerService", "FinishMany"): worker_finish_many,
    ("conveyor.v1.WorkerService", "Drain"): worker_drain,
    ("conveyor.v1.ScheduleService", "CreateSchedule"): schedule_create,
    ("conveyor.v1.ScheduleService", "GetSchedule"): _schedule_refusal(
        "GetSchedule", lambda i: spb.GetScheduleRequest(schedule_id=i)
    ),
    ("conveyor.v1.ScheduleService", "ListSchedules"): schedule_list,
    ("conveyor.v1.ScheduleService", "UpdateSchedule"): _schedule_refusal(
        "UpdateSchedule",
        lambda i: spb.UpdateScheduleRequest(schedule_id=i, schedule=_schedule().schedule),
    ),
    ("conveyor.v1.ScheduleService", "DeleteSchedule"): _schedule_refusal(
        "DeleteSchedule", lambda i: spb.DeleteScheduleRequest(schedule_id=i)
    ),
    ("conveyor.v1.ScheduleService", "PauseSchedule"): _schedule_refusal(
        "PauseSchedule", lambda i: spb.PauseScheduleRequest(schedule_id=i)
    ),
    ("conveyor.v1.ScheduleService", "UnpauseSchedule"): _schedule_refusal(
        "UnpauseSchedule", lambda i: spb.UnpauseScheduleRequest(schedule_id=i)
    ),
    ("conveyor.v1.ScheduleService", "TriggerSchedule"): _schedule_refusal(
        "TriggerSchedule", lambda i: spb.TriggerScheduleRequest(schedule_id=i)
    ),
    ("conveyor.v1.ScheduleService", "BackfillSchedule"): _schedule_refusal(
        "BackfillSchedule",
        lambda i: spb.BackfillScheduleRequest(
            schedule_id=i, start_at=_window()[0], end_at=_window()[1]
        ),
    ),
    ("conveyor.v1.ScheduleService", "WatchSchedules"): schedule_watch,
}


def test_every_rpc_has_a_tenant_case() -> None:
    for service, method, _ in METHODS:
        assert (service, method) in CASES, f"{service}/{method} has no tenant case here"


@pytest.fixture
def world(start_server: StartServer, tmp_path: Path) -> Iterator[World]:
    write_tenant_tokens(
        tmp_path / "tokens.json", {"a-admin": ("a", ["admin"]), "b-admin": ("b", ["admin"])}
    )
    server = start_server(token_file=tmp_path / "tokens.json", worker_types=frozenset({REMOTE}))
    with grpc.insecure_channel(server.address) as channel:
        built = World(Tenant(channel, "a-admin"), Tenant(channel, "b-admin"))
        yield built
        built.close()


@pytest.mark.parametrize(("service", "method"), list(CASES), ids=lambda v: str(v).split(".")[-1])
def test_another_tenant_s_things_do_not_exist(world: World, service: str, method: str) -> None:
    CASES[(service, method)](world)
