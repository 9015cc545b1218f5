"""A tenant that floods Create, in a process of its own, as another service would be.

    python -m bench.flood ADDRESS TOKEN CONCURRENCY

Creates no-op tasks (labelled `bench=flood`) with CONCURRENCY AsyncClients' calls at once,
each starting its next when one ends; a call refused for the tenant's rate is waited out
as the client does (it honours the RetryInfo) and counted. Says "(flooding)" once it has
begun, and on SIGTERM stops and says "(flooded CREATED REFUSED)".
"""

from __future__ import annotations

import asyncio
import signal
import sys

from conveyor import AsyncClient, ResourceExhausted


async def main(address: str, token: str, concurrency: int) -> None:
    created = refused = 0
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with AsyncClient(address, token=token) as client:

        async def flood() -> None:
            nonlocal created, refused
            while not stop.is_set():
                try:
                    await client.create("noop", labels={"bench": "flood"})
                    created += 1
                except ResourceExhausted:
                    refused += 1

        floods = [asyncio.create_task(flood()) for _ in range(concurrency)]
        print("(flooding)", file=sys.stderr, flush=True)
        await stop.wait()
        await asyncio.gather(*floods)
    print(f"(flooded {created} {refused})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
