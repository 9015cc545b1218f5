"""What TLS and token checks cost: Create and Get at 16 at once against a conveyord with TLS
alone, and with TLS and a token file, as ratios to a plaintext conveyord without
authentication, in the same run (alternated, the best of each counting). The certificates
are made for the run."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import grpc

from bench.harness import Load, best, closed_loop, conveyord, ms, ratio
from bench.rpc import PARKED, create_call
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.certificates import Authority

TOKEN = "bench-token"
KINDS = ("Create", "Get")
SERVERS = ("plain", "tls", "protected")


def _files(folder: Path) -> tuple[list[str], Path]:
    """The protected server's flags (TLS first, then the token file), and the CA that
    signed its certificate."""
    authority = Authority(folder)
    pair = authority.issue("server", "conveyord", server=True)
    tokens = folder / "tokens.json"
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    entry = {"name": "bench", "tenant": "bench", "sha256": digest, "permissions": ["admin"]}
    tokens.write_text(json.dumps({"tokens": [entry]}))
    flags = ["--tls-cert", str(pair.cert), "--tls-key", str(pair.key), "--token-file", str(tokens)]
    return flags, authority.pem


async def _measure(channel: Any, calls: int) -> dict[str, Load]:
    """Create and Get at 16 at once on `channel` (which adds the token, if it is needed)."""
    stub = TaskServiceStub(channel)
    create = create_call(stub, 100 + calls)

    await closed_loop(create, concurrency=16, calls=100)  # warm-up
    known = (await stub.List(pb.ListRequest(page_size=1))).tasks[0].task_id
    get = pb.GetRequest(task_id=known)
    return {
        "Create": await closed_loop(create, concurrency=16, calls=calls),
        "Get": await closed_loop(lambda: stub.Get(get), concurrency=16, calls=calls),
    }


async def run(quick: bool) -> dict[str, Any]:
    calls, rounds = (1500, 1) if quick else (8000, 2)
    with tempfile.TemporaryDirectory() as folder:
        flags, ca = _files(Path(folder))
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        async with (
            conveyord(*PARKED) as plain,
            conveyord(*PARKED, *flags[:4]) as tls,
            conveyord(*PARKED, *flags) as protected,
        ):
            results: dict[str, dict[str, list[Load]]] = {name: {} for name in SERVERS}
            for _ in range(rounds):  # alternated, so that the host's drift hits all alike
                for name, server in zip(SERVERS, (plain, tls, protected), strict=True):
                    target = server.address.replace("127.0.0.1", "localhost")
                    channel = (
                        grpc.aio.insecure_channel(target)
                        if name == "plain"
                        else grpc.aio.secure_channel(target, credentials)
                    )
                    async with channel:
                        chosen = _Tokened(channel) if name == "protected" else channel
                        for kind, load in (await _measure(chosen, calls)).items():
                            results[name].setdefault(kind, []).append(load)
    return {
        kind: {
            **{name: best(results[name][kind]).rate for name in SERVERS},
            **{f"{name}_p50": best(results[name][kind]).percentile(0.5) for name in SERVERS},
        }
        for kind in KINDS
    }


class _Tokened:
    """A channel whose unary calls carry the bench's token."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        call = self._channel.unary_unary(method, *args, **kwargs)
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        return lambda request, **options: call(request, metadata=metadata, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [["RPC, 16 at once", "plaintext", "TLS (ratio)", "TLS and a token (ratio)", "p50s"]]
    for kind in KINDS:
        figures = results[kind]
        rows.append(
            [
                kind,
                f"{figures['plain']:.0f}/s",
                f"{figures['tls']:.0f}/s ({ratio(figures['tls'] / figures['plain'])})",
                f"{figures['protected']:.0f}/s ({ratio(figures['protected'] / figures['plain'])})",
                " / ".join(ms(figures[f"{name}_p50"]) for name in SERVERS),
            ]
        )
    return rows
