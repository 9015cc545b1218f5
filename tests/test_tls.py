"""TLS and mutual TLS with real certificates: the clients, the worker and the command line
talk to a server that has them, certificate files rotated while clients are connected, and
the refusal to listen beyond loopback without protection."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from conveyor import (
    AsyncClient,
    Client,
    PermissionDenied,
    Tls,
    Unauthenticated,
    Unavailable,
    _reloading,
)
from conveyor.cli import main
from conveyord.tls import ExposureRefused, TlsFiles, check_exposure, is_loopback
from tests.certificates import Authority
from tests.conftest import ServerThread
from tests.proxy import Proxy

StartServer = Callable[..., ServerThread]


def _served_certificate(address: str) -> x509.Certificate:
    """The certificate a new connection to `address` is shown."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_client_talks_tls_and_a_plaintext_one_is_refused(
    start_server: StartServer, tmp_path: Path
) -> None:
    ca = Authority(tmp_path)
    pair = ca.issue("server", "conveyord", server=True)
    server = start_server(tls=TlsFiles(pair.cert, pair.key))
    with Client(server.address, tls=Tls(ca_file=str(ca.pem))) as client:
        task = client.create("echo", {"n": 1})
        assert client.wait(task.task_id).result == {"n": 1}
    with Client(server.address, tls=False, timeout=2) as plain, pytest.raises(Unavailable):
        plain.get(task.task_id)
    (tmp_path / "other").mkdir()
    other = Authority(tmp_path / "other")
    stranger = Tls(ca_file=str(other.pem))
    with Client(server.address, tls=stranger, timeout=2) as client, pytest.raises(Unavailable):
        client.get(task.task_id)  # a certificate that its CA did not sign


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    start_server: StartServer, tmp_path: Path
) -> None:
    ca = Authority(tmp_path)
    pair = ca.issue("server", "conveyord", server=True)
    client_pair = ca.issue("client", "team-a", server=False)
    server = start_server(tls=TlsFiles(pair.cert, pair.key, client_ca=ca.pem))
    tls = Tls(str(ca.pem), str(client_pair.cert), str(client_pair.key))
    async with AsyncClient(server.address, tls=tls) as client:
        assert (await client.create("echo")).task_type == "echo"
    async with AsyncClient(server.address, tls=Tls(str(ca.pem)), timeout=2) as anonymous:
        with pytest.raises(Unavailable):
            await anonymous.create("echo")


def test_rotated_certificate_files_reach_new_connections_without_a_restart(
    start_server: StartServer, tmp_path: Path
) -> None:
    ca = Authority(tmp_path)
    first = ca.issue("first", "conveyord-1", server=True)
    live = TlsFiles(tmp_path / "live.crt", tmp_path / "live.key")
    shutil.copy(first.cert, live.cert)
    shutil.copy(first.key, live.key)
    server = start_server(tls=live)
    tls = Tls(ca_file=str(ca.pem))
    with Client(server.address, tls=tls) as connected:
        task = connected.create("echo")
        assert _served_certificate(server.address).subject.rfc4514_string() == "CN=conveyord-1"
        second = ca.issue("second", "conveyord-2", server=True)
        shutil.copy(second.cert, live.cert)
        shutil.copy(second.key, live.key)
        assert _served_certificate(server.address).subject.rfc4514_string() == "CN=conveyord-2"
        assert connected.get(task.task_id).task_id == task.task_id  # still connected
        with Client(server.address, tls=tls) as fresh:
            assert fresh.get(task.task_id).task_id == task.task_id


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_client_follows_its_rotated_files_on_an_open_channel(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Mutual TLS whose CA is replaced: the server trusts only the new CA's clients from its
    next connection on, and the client's files now hold a certificate of the new CA. After
    the connection breaks, the client reconnects with the new files; a channel made from the
    old ones (as gRPC alone would keep) is refused."""
    monkeypatch.setattr(_reloading, "RECHECK_EVERY", 0.0)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old, new = Authority(tmp_path / "old"), Authority(tmp_path / "new")
    server_pair = old.issue("server", "conveyord", server=True)
    trusted = tmp_path / "trusted-clients.pem"
    shutil.copy(old.pem, trusted)
    server = start_server(tls=TlsFiles(server_pair.cert, server_pair.key, client_ca=trusted))
    first = old.issue("client-1", "team-a", server=False)
    live = Tls(str(old.pem), str(tmp_path / "live.crt"), str(tmp_path / "live.key"))
    shutil.copy(first.cert, live.cert_file or "")
    shutil.copy(first.key, live.key_file or "")
    with Proxy(server.address, opaque=True) as proxy:
        frozen = grpc.secure_channel(proxy.address, live.credentials())
        with Client(channel=frozen, timeout=2) as stale:
            task_id = stale.create("echo").task_id
            async with _client(kind, proxy.address, live) as client:
                assert await _get(client, task_id) == task_id
                second = new.issue("client-2", "team-a", server=False)
                shutil.copy(new.pem, trusted)
                shutil.copy(second.cert, live.cert_file or "")
                shutil.copy(second.key, live.key_file or "")
                proxy.cut()
                assert await _get(client, task_id) == task_id  # on a new connection
            with pytest.raises(Unavailable):
                stale.get(task_id)


@contextlib.asynccontextmanager
async def _client(kind: str, address: str, tls: Tls) -> AsyncIterator[Client | AsyncClient]:
    if kind == "sync":
        with Client(address, tls=tls, timeout=10) as client:
            yield client
    else:
        async with AsyncClient(address, tls=tls, timeout=10) as async_client:
            yield async_client


async def _get(client: Client | AsyncClient, task_id: str) -> str:
    if isinstance(client, AsyncClient):
        return (await client.get(task_id)).task_id
    return client.get(task_id).task_id


def test_the_command_line_and_the_environment_take_tls_options(
    start_server: StartServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    ca = Authority(tmp_path)
    pair = ca.issue("server", "conveyord", server=True)
    server = start_server(tls=TlsFiles(pair.cert, pair.key))
    assert main(["--server", server.address, "--tls-ca", str(ca.pem), "create", "echo"]) == 0
    assert "CREATED" in capsys.readouterr().out
    monkeypatch.setenv("CONVEYOR_TLS_CA", str(ca.pem))
    assert main(["--server", server.address, "list"]) == 0
    monkeypatch.delenv("CONVEYOR_TLS_CA")
    assert main(["--server", server.address, "--rpc-timeout", "2", "list"]) == 5  # plaintext
    assert main(["--tls-cert", str(pair.cert), "list"]) == 2  # a certificate without its key


def test_a_worker_process_connects_over_tls(start_server: StartServer, tmp_path: Path) -> None:
    ca = Authority(tmp_path)
    pair = ca.issue("server", "conveyord", server=True)
    server = start_server(
        tls=TlsFiles(pair.cert, pair.key), worker_types=frozenset({"remote.square"})
    )
    root = Path(__file__).resolve().parent.parent
    command = [
        sys.executable,
        "-m",
        "conveyor",
        "--server",
        server.address,
        "--tls-ca",
        str(ca.pem),
    ]
    worker = subprocess.Popen(
        [*command, "worker", "--handlers", "tests.worker_handlers"],
        cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with Client(server.address, tls=Tls(ca_file=str(ca.pem))) as client:
            task = client.create("remote.square", {"n": 7})
            assert client.wait(task.task_id, timeout=30).result["square"] == 49
    finally:
        worker.kill()
        worker.wait()


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:1", True),
     ("0.0.0.0:50051", False), ("10.1.2.3:1", False), ("[::]:1", False)],
)  # fmt: skip
def test_only_loopback_is_loopback(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


def test_listening_beyond_loopback_needs_protection_or_insecure(tmp_path: Path) -> None:
    with pytest.raises(ExposureRefused, match="TLS"):
        check_exposure("0.0.0.0:50051", None, insecure=False)
    pair = Authority(tmp_path).issue("server", "conveyord", server=True)
    with pytest.raises(ExposureRefused, match="authentication"):
        check_exposure("0.0.0.0:50051", TlsFiles(pair.cert, pair.key), insecure=False)
    check_exposure("0.0.0.0:50051", None, insecure=True)  # told: it starts (and warns)


def test_conveyord_refuses_to_listen_beyond_loopback_and_says_why() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "conveyord", "--listen", "0.0.0.0:0", "--store", "memory"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 3
    assert "--insecure" in run.stderr and "0.0.0.0:0" in run.stderr


def test_a_client_certificate_can_stand_for_a_token(
    start_server: StartServer, tmp_path: Path
) -> None:
    ca = Authority(tmp_path)
    pair = ca.issue("server", "conveyord", server=True)
    tokens = tmp_path / "tokens.json"
    entry = {"name": "team-a", "tenant": "a", "certificate": "team-a", "permissions": ["read"]}
    tokens.write_text(json.dumps({"tokens": [entry]}))
    files = TlsFiles(pair.cert, pair.key, client_ca=ca.pem)
    server = start_server(tls=files, token_file=tokens)
    known, stranger = (ca.issue(name, name, server=False) for name in ("team-a", "team-b"))
    with Client(server.address, tls=Tls(str(ca.pem), str(known.cert), str(known.key))) as reader:
        assert list(reader.list()) == []  # read: allowed
        with pytest.raises(PermissionDenied, match="submit"):
            reader.create("echo")
    other = Tls(str(ca.pem), str(stranger.cert), str(stranger.key))
    with Client(server.address, tls=other) as unknown, pytest.raises(Unauthenticated):
        list(unknown.list())
