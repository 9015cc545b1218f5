"""Each tenant's limits: its rate of new tasks (a token bucket), its queued tasks, its open
watches and its connected workers, each refused with RESOURCE_EXHAUSTED and a RetryInfo
before anything changes, and only for the tenant at its limit; a limits file's per-tenant
entries; the client waits what a RetryInfo says and tries again; fair dispatch between
tenants; and the queue's high-water mark in the health of TaskService."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from conveyor import Client
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as tpb
from conveyor.v1 import worker_service_pb2 as wpb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyor.v1.worker_service_pb2_grpc import WorkerServiceStub
from conveyord.high_water import QueueMarks
from conveyord.queue import ReadyQueue
from conveyord.tenants import LimitsFile, TenantLimits
from tests.conftest import ManualClock, ServerThread
from tests.test_tenants import write_tenant_tokens

StartServer = Callable[..., ServerThread]
REMOTE = "remote.square"
TOKENS = {"a-admin": ("a", ["admin"]), "b-admin": ("b", ["admin"])}


class Caller:
    def __init__(self, channel: grpc.Channel, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.tasks = TaskServiceStub(channel)
        self.workers = WorkerServiceStub(channel)

    def create(self, task_type: str = REMOTE, count: int = 1, request_id: str = "") -> Any:
        task = task_pb2.TaskRequest(task_type=task_type)
        if count == 1:
            request = tpb.CreateRequest(task=task, request_id=request_id)
            return self.tasks.Create(request, metadata=self.metadata)
        batch = tpb.BatchCreateRequest(requests=[tpb.CreateRequest(task=task)] * count)
        return self.tasks.BatchCreate(batch, metadata=self.metadata)

    def refused(self, call: Callable[[], Any]) -> tuple[str, float]:
        """The limit a refused call names, and the RetryInfo's delay."""
        with pytest.raises(grpc.RpcError) as caught:
            call()
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(error)
        assert status is not None
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        limit, delay = "", -1.0
        for detail in status.details:
            if detail.Unpack(info):
                assert info.reason == "TENANT_LIMIT"
                limit = info.metadata["limit"]
            elif detail.Unpack(retry):
                delay = retry.retry_delay.ToTimedelta().total_seconds()
        return limit, delay

    def count(self) -> int:
        listed = self.tasks.List(tpb.ListRequest(page_size=1000), metadata=self.metadata)
        return len(listed.tasks)


@pytest.fixture
def limited(
    start_server: StartServer, tmp_path: Path
) -> Iterator[Callable[..., tuple[ServerThread, Caller, Caller]]]:
    write_tenant_tokens(tmp_path / "tokens.json", TOKENS)
    channels: list[grpc.Channel] = []

    def start(**settings: Any) -> tuple[ServerThread, Caller, Caller]:
        server = start_server(
            token_file=tmp_path / "tokens.json", worker_types=frozenset({REMOTE}), **settings
        )
        channel = grpc.insecure_channel(server.address)
        channels.append(channel)
        return server, Caller(channel, "a-admin"), Caller(channel, "b-admin")

    yield start
    for channel in channels:
        channel.close()


def test_a_tenant_over_its_rate_is_refused_until_its_bucket_refills(limited: Any) -> None:
    clock = ManualClock()
    _, a, b = limited(clock=clock, tenant_limits=TenantLimits(rate=2, burst=3))
    a.create(count=3)  # the whole burst at once
    limit, delay = a.refused(lambda: a.create())
    # One task's worth refills in half a second.
    assert (limit, delay) == ("rate", pytest.approx(0.5, abs=1e-5))
    assert a.count() == 3  # the refused call made nothing
    b.create(count=3)  # another tenant's bucket is its own
    clock.now += 0.5
    a.create()
    limit, delay = a.refused(lambda: a.create(count=2))
    assert (limit, delay) == ("rate", pytest.approx(1.0, abs=1e-5))


def test_callers_refused_together_are_told_to_come_back_one_after_another(limited: Any) -> None:
    clock = ManualClock()
    _, a, _ = limited(clock=clock, tenant_limits=TenantLimits(rate=2, burst=1))
    a.create()
    told = [a.refused(lambda: a.create())[1] for _ in range(3)]
    # Each after the tokens of those told before it.
    assert told == pytest.approx([0.5, 1.0, 1.5], abs=1e-5)
    clock.now += 0.5
    a.create()  # the first came back in its turn
    # After the two still to come.
    assert a.refused(lambda: a.create()) == ("rate", pytest.approx(1.5, abs=1e-5))


def test_a_batch_larger_than_the_burst_waits_for_a_full_bucket(limited: Any) -> None:
    clock = ManualClock()
    _, a, _ = limited(clock=clock, tenant_limits=TenantLimits(rate=10, burst=5))
    a.create(count=1)
    assert a.refused(lambda: a.create(count=8)) == ("rate", pytest.approx(0.1, abs=1e-5))
    clock.now += 0.1
    a.create(count=8)  # from a full bucket: it overdraws, and the next waits longer
    assert a.refused(lambda: a.create()) == ("rate", pytest.approx(0.4, abs=1e-5))


def test_a_create_that_makes_nothing_spends_none_of_the_tenant_s_rate(limited: Any) -> None:
    clock = ManualClock()
    _, a, _ = limited(clock=clock, tenant_limits=TenantLimits(rate=1, burst=2, max_queued=1))
    first = a.create(request_id="nightly-report")
    # A replay of a known request_id makes no task: it is answered, and costs no token.
    for _ in range(3):
        assert a.create(request_id="nightly-report").task.task_id == first.task.task_id
    # Refused for the tenant's full queue: nothing made, no token spent.
    assert a.refused(lambda: a.create()) == ("max_queued", 1.0)
    a.tasks.Cancel(tpb.CancelRequest(task_id=first.task.task_id), metadata=a.metadata)
    queued = a.create()  # the burst's second token was still there
    clock.now += 1.0  # one more token: the queue is full again, and still costs none
    assert a.refused(lambda: a.create()) == ("max_queued", 1.0)
    a.tasks.Cancel(tpb.CancelRequest(task_id=queued.task.task_id), metadata=a.metadata)
    a.create()  # that token, which the refusal left
    assert a.refused(lambda: a.create()) == ("max_queued", 1.0)


def test_a_tenant_s_queue_cap_refuses_only_that_tenant(limited: Any) -> None:
    _, a, b = limited(tenant_limits=TenantLimits(max_queued=2))
    a.create(count=2)
    assert a.refused(lambda: a.create()) == ("max_queued", 1.0)
    b.create(count=2)
    assert a.count() == 2


def test_a_tenant_s_open_watches_are_capped(limited: Any) -> None:
    _, a, b = limited(tenant_limits=TenantLimits(max_watches=1))
    task_id = a.create().task.task_id
    request = tpb.WatchRequest(task_id=task_id)
    first = a.tasks.Watch(request, metadata=a.metadata)
    assert next(first).type == tpb.WATCH_EVENT_TYPE_CURRENT
    assert a.refused(lambda: next(a.tasks.Watch(request, metadata=a.metadata))) == (
        "max_watches",
        1.0,
    )
    other = b.tasks.Watch(tpb.WatchRequest(task_id=b.create().task.task_id), metadata=b.metadata)
    assert next(other).type == tpb.WATCH_EVENT_TYPE_CURRENT
    other.cancel()
    a.tasks.Cancel(tpb.CancelRequest(task_id=task_id), metadata=a.metadata)
    assert [event.task.status for event in first] == [task_pb2.TASK_STATUS_CANCELLED]
    # The stream ended on the task's end, and gave its count back as it did.
    again = a.tasks.Watch(request, metadata=a.metadata)
    assert next(again).type == tpb.WATCH_EVENT_TYPE_CURRENT


def test_a_tenant_s_connected_workers_are_capped(limited: Any) -> None:
    _, a, b = limited(tenant_limits=TenantLimits(max_workers=1))

    def connect(caller: Caller, worker_id: str) -> Any:
        hello = wpb.ConnectRequest(worker_id=worker_id, task_types=[REMOTE], slots=1)
        stream = caller.workers.Connect(hello, metadata=caller.metadata)
        assert next(stream).WhichOneof("message") == "welcome"
        return stream

    first = connect(a, "w-1")
    assert a.refused(lambda: connect(a, "w-2")) == ("max_workers", 1.0)
    other = connect(b, "w-1")
    first.cancel()
    other.cancel()


def test_the_client_waits_what_a_retry_info_says_and_tries_again(limited: Any) -> None:
    server, a, _ = limited(tenant_limits=TenantLimits(rate=2, burst=1))
    a.create()  # the bucket is empty: the next one fits in half a second
    with Client(server.address, token="a-admin") as client:
        started = time.monotonic()
        task = client.create(REMOTE)
        waited = time.monotonic() - started
    assert task.task_id
    assert waited >= 0.4  # it was refused, waited what it was told, and tried again
    assert a.count() == 2


def test_a_limits_file_gives_tenants_their_own_limits(tmp_path: Path) -> None:
    path = tmp_path / "limits.json"
    path.write_text(
        json.dumps({"default": {"rate": 10}, "tenants": {"big": {"rate": 1000, "burst": 50}}})
    )
    now = [0.0]
    defaults = TenantLimits(max_queued=100, rate=1)
    limits = LimitsFile(path, defaults, clock=lambda: now[0])
    assert limits.limits_of("small") == TenantLimits(max_queued=100, rate=10)
    assert limits.limits_of("big") == TenantLimits(max_queued=100, rate=1000, burst=50)
    path.write_text(json.dumps({"tenants": {"big": {"max_queued": 5}}}))
    now[0] += 1.0  # read again once it changed
    assert limits.limits_of("big") == TenantLimits(max_queued=5, rate=1)


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"tenants": {"a": {"rate": 0}}}, r"tenants\['a'\].rate must be a positive number"),
        ({"tenants": {"a": {"max_queued": 1.5}}}, r"max_queued must be a whole number"),
        ({"tenants": {"a": {"speed": 1}}}, r"speed is not a limit"),
        ({"default": {"burst": "many"}}, r"default.burst must be a number"),
    ],
)
def test_a_bad_limits_file_is_refused_naming_the_field(
    tmp_path: Path, document: Any, problem: str
) -> None:
    path = tmp_path / "limits.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=problem):
        LimitsFile(path)


def test_dispatch_takes_turns_between_tenants() -> None:
    queue = ReadyQueue(aging_rate=0.0)
    for number in range(100):  # the flood came first, and with a higher priority
        queue.push(f"a-{number}", "work", 9, float(number), tenant="a")
    for number in range(3):
        queue.push(f"b-{number}", "work", 1, 200.0 + number, tenant="b")
    order = [queue.pop(lambda _: True) for _ in range(8)]
    tenants = [found[0][0] for found in order if found is not None]
    assert tenants == ["a", "b", "a", "b", "a", "b", "a", "a"]
    assert queue.pop(lambda _: True, tenant="b") is None  # b's three are taken
    found = queue.pop(lambda _: True, tenant="a")
    assert found is not None and found[0] == "a-5"  # in its own order within a tenant


def _health(server: ServerThread) -> Generator[int, None, None]:
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="conveyor.v1.TaskService")
    try:
        for answer in health.Watch(request):
            yield answer.status
    finally:
        channel.close()


def test_health_says_not_serving_above_the_high_water_mark_and_serving_below_the_low(
    limited: Any,
) -> None:
    server, a, _ = limited(max_queued=10, queue_high_water=0.5)  # high 5, low 4
    statuses = _health(server)
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert next(statuses) == serving
    created = a.create(count=5).tasks
    assert next(statuses) == not_serving
    a.create()  # still taken: the mark tells load balancers; the cap refuses
    for task in created[:2]:  # 4 queued: not below the low-water mark yet
        a.tasks.Cancel(tpb.CancelRequest(task_id=task.task_id), metadata=a.metadata)
    a.tasks.Cancel(tpb.CancelRequest(task_id=created[2].task_id), metadata=a.metadata)
    assert next(statuses) == serving  # 3 queued
    statuses.close()


def test_health_turns_at_the_high_mark_and_back_only_below_the_low_one() -> None:
    queued = [0]
    told: list[bool] = []
    marks = QueueMarks(lambda: queued[0], cap=10, share=0.5, set_serving=told.append)
    assert (marks.high, marks.low) == (5, 4)
    for count, expected in [(4, []), (5, [False]), (6, [False]), (4, [False]), (3, [False, True])]:
        queued[0] = count
        marks.changed()
        assert told == expected, count  # at 4, between the marks, it does not flap back
