"""Bearer tokens from a token file, and the permission each RPC needs: every RPC of every
service without a token, with a token that lacks its permission, and with one that has it
(enumerated from the service descriptors, so that a new RPC without a rule fails here);
permissions limited to task types; revocation by editing the file; health stays open."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from conveyor import Client, PermissionDenied, Unauthenticated
from conveyor.cli import main
from conveyor.v1 import schedule_service_pb2, task_service_pb2, worker_service_pb2
from conveyor.v1 import worker_service_pb2 as wpb
from conveyor.v1.worker_service_pb2_grpc import WorkerServiceStub
from conveyord.auth import REQUIRED, Permission, TokenFile
from conveyord.tls import TlsFiles, check_exposure
from tests.certificates import Authority
from tests.conftest import ServerThread

StartServer = Callable[..., ServerThread]
TOKENS = {
    "reader-token": ("reader", ["read"]),
    "echo-token": ("echoer", ["read", "submit:echo"]),
    "worker-token": ("worker", ["worker:remote.square"]),
    "admin-token": ("admin", ["admin"]),
}


def write_tokens(path: Path, tokens: dict[str, tuple[str, list[str]]]) -> None:
    """A token file: token -> (name, permissions), all of tenant "t"."""
    write_token_file(path, [(t, name, "t", held) for t, (name, held) in tokens.items()])


def write_token_file(path: Path, tokens: list[tuple[str, str, str, list[str]]]) -> None:
    """A token file of (token, name, tenant, permissions), each token kept as its hash."""
    entries = [
        {"name": name, "tenant": tenant, "sha256": hashlib.sha256(token.encode()).hexdigest(),
         "permissions": permissions}
        for token, name, tenant, permissions in tokens
    ]  # fmt: skip
    path.write_text(json.dumps({"tokens": entries}))


@pytest.fixture
def guarded(start_server: StartServer, tmp_path: Path) -> ServerThread:
    write_tokens(tmp_path / "tokens.json", TOKENS)
    return start_server(
        token_file=tmp_path / "tokens.json", worker_types=frozenset({"remote.square"})
    )


def _methods() -> Iterator[tuple[str, str, bool]]:
    """(service, method, server streaming) of every RPC of the three services."""
    for module in (task_service_pb2, worker_service_pb2, schedule_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield service.full_name, method.name, method.server_streaming


METHODS = list(_methods())


def test_every_rpc_has_a_rule() -> None:
    for service, method, _ in METHODS:
        assert method in REQUIRED.get(service, {}), f"{service}/{method} has no permission rule"


def _call(address: str, service: str, method: str, streaming: bool, token: str | None) -> Any:
    """The status code of a call with an empty request (and `token`)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as typed:
        channel: Any = typed  # raw bytes in, raw bytes out: the methods' types do not matter
        path = f"/{service}/{method}"
        try:
            if streaming:
                call = channel.unary_stream(path)(b"", metadata=metadata, timeout=5)
                next(iter(call), None)
            else:
                channel.unary_unary(path)(b"", metadata=metadata, timeout=5)
        except grpc.RpcError as error:
            return error
    return None


@pytest.mark.parametrize(("service", "method", "streaming"), METHODS)
def test_each_rpc_needs_a_token_and_its_permission(
    guarded: ServerThread, service: str, method: str, streaming: bool
) -> None:
    anonymous = _call(guarded.address, service, method, streaming, None)
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
    unknown = _call(guarded.address, service, method, streaming, "forged")
    assert unknown.code() == grpc.StatusCode.UNAUTHENTICATED
    needed = REQUIRED[service][method]
    lacking = next(t for t, (_, perms) in TOKENS.items() if needed.value not in
                   {p.split(":")[0] for p in perms} and "admin" not in perms)  # fmt: skip
    denied = _call(guarded.address, service, method, streaming, lacking)
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert needed.value in denied.details()
    status = rpc_status.from_call(denied)
    assert status is not None and status.details  # an ErrorInfo, with the permission
    allowed = _call(guarded.address, service, method, streaming, "admin-token")
    if allowed is not None:  # an empty request may be refused, but not for who calls
        assert allowed.code() not in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        )


def test_the_clients_carry_their_token(guarded: ServerThread, monkeypatch: Any) -> None:
    with Client(guarded.address, token="echo-token") as client:
        task = client.create("echo", {"n": 1})
        assert client.wait(task.task_id).result == {"n": 1}
        with pytest.raises(PermissionDenied, match="echo"):
            client.create("sleep")  # submit is limited to echo
        with pytest.raises(PermissionDenied, match="control"):
            client.cancel(task.task_id)
    with Client(guarded.address) as anonymous, pytest.raises(Unauthenticated):
        anonymous.get(task.task_id)
    monkeypatch.setenv("CONVEYOR_TOKEN", "reader-token")
    with Client(guarded.address) as reader:
        assert reader.get(task.task_id).task_id == task.task_id


def test_a_worker_token_takes_only_its_task_types(guarded: ServerThread) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        workers = WorkerServiceStub(channel)
        request = wpb.ConnectRequest(worker_id="w-1", task_types=["remote.other"], slots=1)
        metadata = (("authorization", "Bearer worker-token"),)
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(workers.Connect(request, metadata=metadata, timeout=5)))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "remote.square" in str(refused.value.details())
        request = wpb.ConnectRequest(worker_id="w-1", task_types=["remote.square"], slots=1)
        welcome = next(iter(workers.Connect(request, metadata=metadata, timeout=5)))
        assert welcome.WhichOneof("message") == "welcome"


def test_health_stays_open(guarded: ServerThread) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_the_command_line_takes_a_token(
    guarded: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--server", guarded.address, "--token", "echo-token", "create", "echo"]) == 0
    capsys.readouterr()
    assert main(["--server", guarded.address, "list"]) == 7  # no token: refused
    assert "bearer token" in capsys.readouterr().err


def test_a_removed_token_is_refused_once_the_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    write_tokens(path, TOKENS)
    now = [0.0]
    tokens = TokenFile(path, clock=lambda: now[0])
    assert tokens.identify("reader-token") is not None
    write_tokens(path, {k: v for k, v in TOKENS.items() if k != "reader-token"})
    assert tokens.identify("reader-token") is not None  # not looked at again yet
    now[0] += 1.0
    assert tokens.identify("reader-token") is None
    identity = tokens.identify("echo-token")
    assert identity is not None and identity.types_for(Permission.SUBMIT) == frozenset({"echo"})


def test_a_bad_token_file_is_refused_naming_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(
        json.dumps({"tokens": [{"name": "x", "sha256": "00", "permissions": ["root"]}]})
    )
    with pytest.raises(ValueError, match=r"tokens\[0\].*root"):
        TokenFile(path)


def test_tls_and_tokens_together_may_listen_beyond_loopback(tmp_path: Path) -> None:
    pair = Authority(tmp_path).issue("server", "conveyord", server=True)
    check_exposure("0.0.0.0:50051", TlsFiles(pair.cert, pair.key), False, authenticated=True)
