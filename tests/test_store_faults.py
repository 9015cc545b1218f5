"""A real conveyord whose SQLite file is taken from under it, fills its disk, or cannot be
written: it stops acknowledging at once, exits with the store's code, and says what happened.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.processes import ROOT, SOURCE_PATH, Conveyord
from tests.support import create, details, error_reason

Start = Callable[..., Conveyord]
STORE_FAILED_EXIT = 1


def _in_a_mount_of_its_own(mount: str) -> tuple[str, ...]:
    """Run conveyord in a mount namespace of its own, after `mount` ($DIR is the store's folder)."""
    return ("unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", sys.executable, "-m")


def _assert_store_failed(refused: grpc.aio.AioRpcError, *, gone: bool = False) -> None:
    """The refusal of a server whose store failed: STORE_FAILED, or, when the call came as
    the server was closing its port, CANCELLED (a client retries both elsewhere).

    With `gone`, the store may have failed on a write of the server's own (a task starting
    or ending) between two creates, so the next create may find the port already closed.
    """
    if refused.code() == grpc.StatusCode.CANCELLED:
        return
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    if gone and "Connection refused" in details(refused):
        return
    assert error_reason(refused) == "STORE_FAILED"


async def _creates_until_refused(address: str, description: str = "") -> grpc.aio.AioRpcError:
    """Create tasks until the server refuses one; the refusal."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = TaskServiceStub(channel)
        for _ in range(10_000):
            try:
                await create(stub, "echo", description=description)
            except grpc.aio.AioRpcError as error:
                return error
    raise AssertionError("the server acknowledged every create")


@pytest.mark.parametrize("change", ["deleted", "replaced"])
async def test_a_store_file_taken_away_stops_the_server_before_it_acknowledges(
    conveyord: Start, tmp_path: Path, change: str
) -> None:
    path = tmp_path / "tasks.db"
    server = conveyord("--store", f"sqlite:{path}")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        await create(stub, "echo")  # acknowledged while the file was the store's
        if change == "replaced":  # at once: the path never lacks a file
            (tmp_path / "other.db").write_bytes(b"")
            os.replace(tmp_path / "other.db", path)
        else:
            path.unlink()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await create(stub, "echo")
        _assert_store_failed(refused.value)
    assert server.process.wait(timeout=30) == STORE_FAILED_EXIT
    log = server.rest_of_log()
    assert f"store file {path} was {change}" in log
    assert "could not be recorded" not in log  # no wait for ends that no store can take


async def test_a_full_disk_is_named_in_the_log(conveyord: Start, tmp_path: Path) -> None:
    folder = tmp_path / "small"
    folder.mkdir()
    wrapper = _in_a_mount_of_its_own('mount -t tmpfs -o size=512k tmpfs "$DIR"')
    server = conveyord(
        "--store",
        f"sqlite:{folder / 'tasks.db'}",
        command=(*wrapper, "conveyord"),
        env={"DIR": str(folder)},
    )
    refused = await _creates_until_refused(server.address, description="x" * 4000)
    _assert_store_failed(refused, gone=True)
    assert server.process.wait(timeout=30) == STORE_FAILED_EXIT
    log = server.rest_of_log()
    assert "database or disk is full" in log
    assert "cannot rollback" not in log


def test_a_read_only_store_is_named_at_start(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    made = subprocess.run(
        [sys.executable, "-m", "conveyord", "--store", f"sqlite:{path}", "--listen", "x:-1"],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert made.returncode == 3 and path.exists()  # the file was made, then listening failed
    wrapper = _in_a_mount_of_its_own('mount -o bind,ro "$DIR" "$DIR"')
    result = subprocess.run(
        [*wrapper, "conveyord", "--store", f"sqlite:{path}", "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
        env={**os.environ, "PYTHONPATH": SOURCE_PATH, "DIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 5
    assert f"store file {path} is on a read-only file system" in result.stderr
    assert "Traceback" not in result.stderr
