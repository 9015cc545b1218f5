"""A worker written in JavaScript from the .proto alone (examples/node-worker), run end to
end against a real server: progress, a result, a failure that is not retried, a cancel."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.conftest import ServerThread
from tests.support import CANCELLED, COMPLETED, FAILED, RUNNING, create, final, wait_until, watch

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

WORKER = Path(__file__).resolve().parent.parent / "examples" / "node-worker"
TYPES = frozenset({"node.greet", "node.fail", "node.wait"})


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    return start_server(worker_types=TYPES)


@pytest.fixture
def node_worker(server: ServerThread) -> Iterator[subprocess.Popen[str]]:
    node = shutil.which("node")
    assert node, "Node.js is needed: `make setup` installs the example's packages"
    assert (WORKER / "node_modules").is_dir(), "run `make setup` (npm ci in examples/node-worker)"
    process = subprocess.Popen(
        [node, "worker.js", "--server", server.address, "--slots", "3"],
        cwd=WORKER, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()
    assert process.stderr is not None
    process.stderr.close()


@pytest.fixture
async def stub(server: ServerThread) -> AsyncIterator[TaskServiceAsyncStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield TaskServiceStub(channel)


async def test_a_node_worker_runs_reports_fails_and_is_cancelled(
    stub: TaskServiceAsyncStub, node_worker: subprocess.Popen[str]
) -> None:
    greet = await create(stub, "node.greet", {"name": "ada"})
    refuse = await create(stub, "node.fail", {"name": "bob"}, max_attempts=3)
    wait = await create(stub, "node.wait")
    states = [
        r.task for r in await watch(stub, task_id=greet.task_id, since_revision=greet.revision)
    ]
    assert [(t.progress, t.message) for t in states if t.status == RUNNING][-1] == (
        0.5,
        "greeting ada",
    )
    done = states[-1]
    assert done.status == COMPLETED
    assert dict(done.result.struct_value) == {"greeting": "hello, ada", "attempt": 1}
    failed = await final(stub, refuse.task_id)
    assert (failed.status, failed.attempt) == (FAILED, 1)  # no_retry: not tried again
    assert (failed.error.code, failed.error.message) == ("GREETING_REFUSED", "no greeting for bob")
    await wait_until(stub, wait.task_id, lambda t: t.message == "waiting to be stopped")
    await stub.Cancel(pb.CancelRequest(task_id=wait.task_id, reason="enough"))
    cancelled = await final(stub, wait.task_id)
    assert (cancelled.status, cancelled.error.message) == (CANCELLED, "enough")
    node_worker.send_signal(signal.SIGTERM)
    assert node_worker.wait(timeout=30) == 0  # drained
