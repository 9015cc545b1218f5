"""The ceiling: a bare grpc.aio server, with an empty unary RPC and an empty server stream.

Every figure of conveyor is taken as a ratio to this server, measured in the same run, on
the same machine, in a process of its own, so that it holds however noisy the machine is.

    python -m bench.bare   (prints "port N" once it listens)

`Unary` answers an empty message. `Stream` says "ready", then sends every open stream what
`Publish` is given, as it is: the least a fan-out can do.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import grpc

from conveyord.server import KEEPALIVE_OPTIONS

SERVICE = "bench.Bare"


class Bare:
    def __init__(self) -> None:
        self.streams: set[asyncio.Queue[bytes]] = set()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b""

    async def publish(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        for queue in self.streams:
            queue.put_nowait(request)
        return b""

    async def stream(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.streams.add(queue)
        try:
            yield b"ready"  # it gets what is published from now on
            while True:
                yield await queue.get()
        finally:
            self.streams.discard(queue)


async def main() -> None:
    bare = Bare()
    server = grpc.aio.server(options=KEEPALIVE_OPTIONS)
    server.add_registered_method_handlers(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(bare.unary),
            "Publish": grpc.unary_unary_rpc_method_handler(bare.publish),
            "Stream": grpc.unary_stream_rpc_method_handler(bare.stream),
        },
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"(port {port})", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
