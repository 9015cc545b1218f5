"""The contract: buf lint and format, fresh generated code, health and reflection."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import ServerThread

ROOT = Path(__file__).resolve().parent.parent
GENERATED = Path("client/conveyor/v1")


def buf() -> str:
    found = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    assert found, "the buf CLI (buf-bin) is not installed"
    return found


def test_buf_lint_passes() -> None:
    result = subprocess.run([buf(), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_changes_nothing() -> None:
    result = subprocess.run(
        [buf(), "format", "--diff", "--exit-code"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    """`buf generate` (buf.gen.yaml) into a scratch folder makes exactly the committed code."""
    result = subprocess.run(
        [buf(), "generate", "--output", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fresh, committed = tmp_path / GENERATED, ROOT / GENERATED
    assert generated_files(fresh), "buf generate wrote nothing"
    assert generated_files(fresh) == generated_files(committed), "run make generate"
    stale = [
        n
        for n in generated_files(fresh)
        if (fresh / n).read_bytes() != (committed / n).read_bytes()
    ]
    assert not stale, f"stale generated code, run make generate: {stale}"


def test_the_contract_ships_with_the_client() -> None:
    """Each .proto file of the contract is in the client package, as package data."""
    protos = sorted(p.name for p in (ROOT / "protos" / "conveyor" / "v1").glob("*.proto"))
    packaged = ROOT / GENERATED
    assert protos == sorted(p.name for p in packaged.glob("*.proto"))
    for name in protos:
        shipped = (packaged / name).read_bytes()
        assert shipped == (ROOT / "protos" / "conveyor" / "v1" / name).read_bytes()


def generated_files(folder: Path) -> list[str]:
    """The generated files of a folder (not its hand-written __init__.py, nor the .proto files)."""
    names = (p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    return sorted(name for name in names if name != "__init__.py")


async def test_health_reports_serving_overall_and_per_service(server: ServerThread) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "conveyor.v1.TaskService"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(server: ServerThread) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for response in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in response.list_services_response.service}
            break
    assert {"conveyor.v1.TaskService", "grpc.health.v1.Health"} <= names


async def test_reflection_can_be_turned_off(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(reflection=False)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        # No request is sent: the server's answer may come before a request is written,
        # and grpc then reports the failed write (INTERNAL) instead of the server's status.
        call = stub.ServerReflectionInfo(iter(()))
        assert await call.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_reflection_describes_the_task_service(server: ServerThread) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="conveyor.v1.TaskService"
        )
        async for response in stub.ServerReflectionInfo(iter([request])):
            files = response.file_descriptor_response.file_descriptor_proto
            break
    assert files, "reflection returned no file for conveyor.v1.TaskService"
