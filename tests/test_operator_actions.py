"""The operator actions against a real server, through the client: rerun and delete a task
that ended (and the refusals of one that has not), watchers told of a delete, counts by type
and status across a task's life, and the task types with the workers serving them (the
server's handlers, and a real `conveyor worker` process)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import cast

import grpc
import pytest

from conveyor import (
    AlreadyExists,
    Client,
    EventKind,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Task,
    TaskEvent,
    TaskStatus,
)
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.tenants import TenantLimits
from tests.conftest import ServerThread
from tests.handlers import gate
from tests.processes import SOURCE_PATH
from tests.test_auth import TOKENS, write_tokens

ROOT = Path(__file__).resolve().parent.parent
MISSING = "00000000-0000-4000-8000-000000000000"
StartServer = Callable[..., ServerThread]


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.address, timeout=10) as opened:
        yield opened


@contextlib.contextmanager
def running_gated(client: Client) -> Iterator[Task]:
    """A `gated` task, RUNNING inside the gate until the block ends (then it completes)."""
    gate.reset()
    task = client.create("gated")
    try:
        yield next(t for t in client.watch(task.task_id) if t.status is TaskStatus.RUNNING)
    finally:
        gate.opened.set()
    assert client.wait(task.task_id).status is TaskStatus.COMPLETED


# -- rerun --------------------------------------------------------------------------


def test_a_rerun_repeats_the_request_of_a_task_that_ended(client: Client) -> None:
    first = client.create(
        "echo", {"n": 1}, priority=7, timeout_seconds=20, max_attempts=2,
        labels={"team": "data"}, description="the first", queue_timeout_seconds=60,
    )  # fmt: skip
    ended = client.wait(first.task_id)
    again = client.rerun(first.task_id)
    assert again.task_id != first.task_id
    assert (again.status, again.rerun_of, again.attempt) == (TaskStatus.CREATED, first.task_id, 1)
    same = ("task_type", "parameters", "priority", "timeout_seconds", "max_attempts", "labels")
    for field in (*same, "description"):
        assert getattr(again, field) == getattr(first, field), field
    assert again.start_deadline == again.created_at + timedelta(seconds=60)  # from the rerun
    assert client.wait(again.task_id).result == {"n": 1}
    assert client.get(first.task_id) == ended  # the ended task stays as it was
    twice = client.rerun(again.task_id)
    assert twice.rerun_of == again.task_id  # a rerun of a rerun names the one it repeats


def test_a_rerun_of_every_ending_is_allowed(client: Client) -> None:
    failed = client.wait(client.create("raises_key_error").task_id)
    cancelled = client.create("echo", start_after_seconds=600)
    client.cancel(cancelled.task_id)
    assert failed.status is TaskStatus.FAILED
    for ended in (failed, cancelled):
        assert client.rerun(ended.task_id).rerun_of == ended.task_id


def test_a_rerun_with_a_request_id_is_made_once(client: Client) -> None:
    first = client.wait(client.create("echo").task_id)
    other = client.wait(client.create("echo").task_id)
    made = client.rerun(first.task_id, request_id="rerun-1")
    assert client.rerun(first.task_id, request_id="rerun-1").task_id == made.task_id
    with pytest.raises(AlreadyExists, match="rerun-1"):
        client.rerun(other.task_id, request_id="rerun-1")  # a rerun of another task
    with pytest.raises(AlreadyExists, match="rerun-1"):
        client.create("echo", request_id="rerun-1")  # Create's request ids are the same
    plain = client.rerun(first.task_id, request_id="")
    assert plain.task_id != made.task_id  # none given: a new task each time


def test_rerun_and_delete_refuse_a_task_that_has_not_ended(client: Client) -> None:
    with running_gated(client) as running:
        before = client.count_tasks()
        with pytest.raises(FailedPrecondition, match="is RUNNING") as refused:
            client.rerun(running.task_id)
        assert (refused.value.reason, refused.value.metadata["status"]) == (
            "TASK_NOT_ENDED",
            "RUNNING",
        )
        with pytest.raises(FailedPrecondition, match="is RUNNING"):
            client.delete(running.task_id)
        assert client.count_tasks() == before  # nothing was made, nothing removed
        assert client.get(running.task_id).status is TaskStatus.RUNNING
    queued = client.create("echo", start_after_seconds=600)
    with pytest.raises(FailedPrecondition, match="is CREATED"):
        client.delete(queued.task_id)


def test_rerun_and_delete_refuse_an_unknown_or_malformed_id(client: Client) -> None:
    for action in (client.rerun, client.delete):
        with pytest.raises(NotFound, match=MISSING):
            action(MISSING)
        with pytest.raises(InvalidArgument) as invalid:
            action("not-an-id")
        assert [v.field for v in invalid.value.field_violations] == ["task_id"]
    with pytest.raises(InvalidArgument) as long:
        client.rerun(MISSING, request_id="x" * 129)
    assert [v.field for v in long.value.field_violations] == ["request_id"]


@pytest.mark.parametrize(
    "limits",
    [{"max_queued": 1}, {"tenant_limits": TenantLimits(max_queued=1)}],
    ids=["queue", "tenant"],
)
def test_a_rerun_is_admitted_as_a_create(
    start_server: StartServer, limits: dict[str, object]
) -> None:
    server = start_server(**limits)
    with Client(server.address, timeout=10) as client:
        ended = client.wait(client.create("echo").task_id)
        client.create("echo", start_after_seconds=600)  # the queue is full now
        with pytest.raises(ResourceExhausted):
            client.rerun(ended.task_id, request_id="")
        assert client.count_tasks().total == 2


# -- delete -------------------------------------------------------------------------


def test_a_deleted_task_is_gone_and_its_request_id_free(client: Client) -> None:
    task = client.create("echo", {"n": 1}, request_id="once")
    ended = client.wait(task.task_id)
    last = client.delete(task.task_id)
    assert last == ended
    with pytest.raises(NotFound):
        client.get(task.task_id)
    with pytest.raises(NotFound):
        client.delete(task.task_id)
    assert task.task_id not in {listed.task_id for listed in client.list()}
    assert client.count_tasks().total == 0
    again = client.create("echo", {"n": 1}, request_id="once")
    assert again.task_id != task.task_id


def test_watchers_see_a_delete_as_a_removal(server: ServerThread, client: Client) -> None:
    task = client.wait(client.create("echo", labels={"team": "ops"}).task_id)
    since = client.revision()
    many = client.watch_all(labels={"team": "ops"}, since_revision=since)
    client.delete(task.task_id)
    event = next(many)
    cast(Generator[TaskEvent], many).close()  # a generator: closing it ends the stream
    assert (event.kind, event.task) == (EventKind.REMOVED, task)
    with grpc.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        resumed = pb.WatchRequest(task_id=task.task_id, since_revision=task.revision)
        events = list(stub.Watch(resumed, timeout=10))  # it ends after the removal
        assert [(e.type, e.revision) for e in events] == [
            (pb.WATCH_EVENT_TYPE_REMOVED, event.revision)
        ]
        with pytest.raises(grpc.RpcError) as gone:
            next(iter(stub.Watch(pb.WatchRequest(task_id=task.task_id), timeout=10)))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_delete_outlasts_a_restart(start_server: StartServer, tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'tasks.db'}"
    first = start_server(store=store)
    with Client(first.address, timeout=10) as client:
        gone = client.wait(client.create("echo", request_id="r").task_id)
        kept = client.wait(client.create("echo").task_id)
        client.delete(gone.task_id)
    first.stop()
    second = start_server(store=store)
    with Client(second.address, timeout=10) as client:
        with pytest.raises(NotFound):
            client.get(gone.task_id)
        assert [t.task_id for t in client.list()] == [kept.task_id]
        assert client.count_tasks().by_type == {"echo": {TaskStatus.COMPLETED: 1}}
        assert client.create("echo", request_id="r").task_id != gone.task_id


# -- counts -------------------------------------------------------------------------


def test_counts_move_across_a_task_s_life(client: Client) -> None:
    def counts() -> dict[str, dict[TaskStatus, int]]:
        return client.count_tasks(task_type="gated").by_type

    assert counts() == {}
    with running_gated(client) as running:
        waiting = client.create("gated", start_after_seconds=600)
        assert counts() == {"gated": {TaskStatus.RUNNING: 1, TaskStatus.CREATED: 1}}
    assert counts() == {"gated": {TaskStatus.COMPLETED: 1, TaskStatus.CREATED: 1}}
    client.cancel(waiting.task_id)
    client.delete(running.task_id)
    assert counts() == {"gated": {TaskStatus.CANCELLED: 1}}
    client.create("echo")
    everything = client.count_tasks()
    assert everything.total == 2 and set(everything.by_type) == {"gated", "echo"}
    cancelled = client.count_tasks(statuses=[TaskStatus.CANCELLED])
    assert (cancelled.by_type, cancelled.of_status(TaskStatus.CANCELLED)) == (
        {"gated": {TaskStatus.CANCELLED: 1}},
        1,
    )
    assert everything.revision <= client.revision()


def test_counts_refuse_what_they_are_not_kept_by(client: Client, server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        for fields in ({"labels": {"a": "b"}}, {"task_id_prefix": "3f2a"}):
            request = pb.CountTasksRequest(filter=task_pb2.TaskFilter(**fields))
            with pytest.raises(grpc.RpcError) as refused:
                stub.CountTasks(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"filter.{next(iter(fields))}" in str(refused.value.details())


# -- task types ---------------------------------------------------------------------


@contextlib.contextmanager
def started_worker(address: str) -> Iterator[subprocess.Popen[str]]:
    """A real `conveyor worker` (3 slots, id w-ops), killed and reaped at the end."""
    command = [sys.executable, "-m", "conveyor", "--server", address, "worker"]
    process = subprocess.Popen(
        [*command, "--handlers", "tests.worker_handlers", "--concurrency", "3",
         "--worker-id", "w-ops"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": SOURCE_PATH}, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield process
    finally:
        process.kill()
        process.wait()
        assert process.stderr is not None
        process.stderr.close()


def test_types_list_the_server_s_handlers_and_a_connected_worker(
    start_server: StartServer,
) -> None:
    server = start_server(worker_types=frozenset({"remote.square"}))
    with Client(server.address, timeout=10) as client:
        before = {t.task_type: t for t in client.list_task_types()}
        assert (before["remote.square"].accepted, before["remote.square"].workers) == (True, ())
        assert "remote.pausable" not in before  # no worker runs it yet
        (local,) = before["echo"].workers
        assert (local.worker_id, local.local, local.slots, local.free_slots) == (
            "conveyord/local", True, 8, 8,
        )  # fmt: skip
        assert (local.pausable, before["pausable"].workers[0].pausable) == (False, True)
        with started_worker(server.address):
            task = client.create("remote.square", {"n": 3})
            assert client.wait(task.task_id, timeout=20).result["square"] == 9  # it is there
            after = {t.task_type: t for t in client.list_task_types()}
        (square,) = after["remote.square"].workers
        (pausable,) = after["remote.pausable"].workers
        assert (square.worker_id, square.local, square.slots, square.free_slots) == (
            "w-ops", False, 3, 3,
        )  # fmt: skip
        assert (square.pausable, pausable.pausable, square.draining) == (False, True, False)
        assert after["remote.pausable"].accepted  # declared by the worker as it connected
        assert after["echo"].workers == before["echo"].workers  # the local one only


def test_types_include_those_of_kept_tasks_the_server_no_longer_takes(
    start_server: StartServer, tmp_path: Path
) -> None:
    store = f"sqlite:{tmp_path / 'tasks.db'}"
    first = start_server(store=store, worker_types=frozenset({"retired"}))
    with Client(first.address, timeout=10) as client:
        task = client.create("retired")
    first.stop()
    second = start_server(store=store)
    with Client(second.address, timeout=10) as client:
        retired = {t.task_type: t for t in client.list_task_types()}["retired"]
        assert (retired.accepted, retired.workers) == (False, ())
        client.cancel(task.task_id)
        with pytest.raises(FailedPrecondition, match="retired") as refused:
            client.rerun(task.task_id)
        assert refused.value.reason == "TASK_TYPE_UNKNOWN"


def test_a_rerun_needs_the_permission_to_submit_its_type(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_tokens(tmp_path / "tokens.json", TOKENS)
    server = start_server(token_file=tmp_path / "tokens.json")
    with (
        Client(server.address, timeout=10, token="admin-token") as admin,
        Client(server.address, timeout=10, token="echo-token") as echoer,
    ):
        echo = admin.wait(admin.create("echo").task_id)
        sleep = admin.wait(admin.create("sleep", {"seconds": 0}).task_id)
        assert echoer.rerun(echo.task_id).rerun_of == echo.task_id
        with pytest.raises(PermissionDenied, match="sleep"):
            echoer.rerun(sleep.task_id)
        with pytest.raises(PermissionDenied, match="control"):
            echoer.delete(echo.task_id)  # deleting takes the control permission
        assert admin.delete(echo.task_id) == echo
