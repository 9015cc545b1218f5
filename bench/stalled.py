"""Watchers that stop reading, in a process of their own, as they would be: other services.

    python -m bench.stalled ADDRESS COUNT [SINCE_REVISION]

Opens COUNT streams (Watches of the parked tasks from SINCE_REVISION, or without it the bare
server's stream), reads the first message of each, says "(stalled COUNT)", and then reads
nothing more until it is stopped.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from bench.fanout import BARE_STREAM, STALLED_OPTIONS, parked_watch, watching


async def main(address: str, count: int, since_revision: int | None) -> None:
    kind = BARE_STREAM if since_revision is None else parked_watch(since_revision)
    async with watching(address, count, kind, STALLED_OPTIONS, follow=False):
        print(f"(stalled {count})", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()


if __name__ == "__main__":
    since = int(sys.argv[3]) if len(sys.argv) > 3 else None
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), since))
