"""Leases through a real server: an attempt whose holder is gone is reaped and retried, and
the holder's late report and result are refused and change nothing."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.lifecycle import Outcome, StaleLease
from conveyord.model import Task
from conveyord.store.base import Claim
from tests.conftest import ServerThread
from tests.support import (
    COMPLETED,
    CREATED,
    RUNNING,
    create,
    field_violations,
    final,
    wait_status,
    wait_until,
)

StartServer = Callable[..., ServerThread]


async def test_an_expired_lease_is_retried_and_its_late_result_refused(
    start_server: StartServer,
) -> None:
    # The local worker's one slot is taken, so that the test holds the next task itself,
    # as a worker that then goes silent would.
    server = start_server(concurrency=1, retry_initial=30)
    scheduler = server.server.scheduler
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        blocker = await create(stub, "sleep", {"seconds": 60})
        await wait_status(stub, blocker.task_id, RUNNING)
        task = await create(stub, "echo", {"n": 1}, max_attempts=2)

        async def hold() -> list[Task]:
            now = time.time()
            claim = Claim("silent-worker", 1, None, {}, lambda t: now + 0.2, now)
            return list(await scheduler.store.claim(claim))

        (held,) = server.call(hold())
        assert (held.task_id, held.lease_holder) == (task.task_id, "silent-worker")
        # Renewed once, then never again: the holder goes silent.
        renewed = server.call(scheduler.dispatcher.renew(task.task_id, held.lease_id, 0.3))
        assert renewed.lease_expires_at is not None and held.lease_expires_at is not None
        assert renewed.lease_expires_at > held.lease_expires_at
        retried = await wait_until(stub, task.task_id, lambda t: t.attempt == 2)
        assert (retried.status, retried.error.code) == (CREATED, "LEASE_EXPIRED")
        assert "silent-worker" in retried.error.message

        with pytest.raises(StaleLease):
            server.call(scheduler.dispatcher.renew(task.task_id, held.lease_id, 60))
        with pytest.raises(StaleLease):
            server.call(scheduler.dispatcher.report(task.task_id, held.lease_id, {"progress": 0.9}))
        with pytest.raises(StaleLease):
            server.call(scheduler.dispatcher.finish(task.task_id, held.lease_id, Outcome(result=1)))
        after = (await stub.Get(pb.GetRequest(task_id=task.task_id))).task
        assert after == retried  # nothing changed, not even the revision


async def test_a_type_declared_for_workers_is_accepted_and_waits_for_them(
    start_server: StartServer,
) -> None:
    server = start_server(worker_types=frozenset({"archive"}))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        archive = await create(stub, "archive", {"page": 1})
        echo = await create(stub, "echo")  # created after it, and run by the local worker
        assert (await final(stub, echo.task_id)).status == COMPLETED
        waiting = (await stub.Get(pb.GetRequest(task_id=archive.task_id))).task
        assert (waiting.status, waiting.attempt) == (CREATED, 1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await create(stub, "paint")
        assert "known: archive, ask, " in field_violations(refused.value)["task.task_type"]
