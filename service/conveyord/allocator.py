"""Keep the server's memory near what it uses: glibc's malloc tuned at start, trimmed when idle.

Measured with bench/memory.py, glibc kept the memory of a server that was abused and then
left alone, in two ways:

- Its dynamic mmap threshold. A block of 128 KiB or more starts out mmapped, and given back
  to the system when freed; but freeing one raises the threshold to that block's size (up
  to 32 MiB on 64 bits), so after the first 4 MiB request every later one was carved from
  a heap, and what a heap frees stays with the process. `tune_allocator` fixes the
  threshold at 1 MiB, which turns the adjustment off: a block that large is always mmapped
  and given back when freed; smaller ones still come from the heaps, without a system call.
- Free pages inside its heaps. When thousands of connections and calls are freed, the pages
  they leave are free but not at the top of a heap, and glibc returns only the top of a
  heap on its own. `malloc_trim(0)` returns every free page; `trim_when_idle` calls it, in
  a thread, once the server has gone quiet after being busy.

`tune_allocator` also caps glibc's arenas (M_ARENA_MAX; by default up to 8 per core, one
per thread that allocates while another does), in which gRPC's threads each kept their
share of the buffers of a burst of large requests.

Not handled here, Python's own share: grpc.aio keeps an aborted RPC's AbortError in a
reference cycle (its traceback holds the handler's frame, which holds the context, which
holds the RPC's state, which holds the AbortError) that only the cyclic garbage collector
frees, with whatever the frames hold, such as the request (api.py aborts outside its except
block, without the request, for that reason); and pymalloc keeps an arena of small objects
as long as one of them lives.

Everything above is a no-op where the C library is not glibc.

`tune_collector` makes Python's cyclic garbage collector look at the young generation every
10,000 new container objects rather than every 700. Creating a task makes dozens of them,
and the collections of the older generations walk every task the store keeps in memory.
Timed with gc.callbacks, in 42 BatchCreates of 1,000 tasks into a PostgreSQL store: with
the defaults, a dozen collections to a BatchCreate, taking a fifth of the server's time;
with the young generation at 10,000, a twentieth. Young garbage cycles (an aborted RPC's,
above) are still collected within 10,000 allocations.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import time

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

DEFAULT_MMAP_THRESHOLD = 1024 * 1024  # a block of 1 MiB or more is always mmapped
DEFAULT_ARENA_MAX = 2
DEFAULT_TRIM_INTERVAL = 5.0  # seconds
YOUNG_GENERATION = 10_000  # new container objects between collections of the youngest
QUIET_CPU = 0.01  # of one CPU, over an interval: below it, the server is quiet

# An operator's own setting wins over ours: the environment variable, or any GLIBC_TUNABLES
# (glibc.malloc.mmap_threshold, glibc.malloc.arena_max).
_OVERRIDES = {
    M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    M_ARENA_MAX: ("MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
}


def _glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    if not version or not version.startswith("glibc"):
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


_LIBC = _glibc()


def _set_by_operator(parameter: int) -> bool:
    variable, tunable = _OVERRIDES[parameter]
    return variable in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", "")


def tune_allocator(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, arena_max: int = DEFAULT_ARENA_MAX
) -> bool:
    """Fix glibc's mmap threshold and cap its arenas; True if glibc took every setting that
    the environment does not already make (False, and nothing done, elsewhere).

    Call it first thing, before gRPC starts its threads: arenas already made stay."""
    if _LIBC is None:
        return False
    accepted = True
    for parameter, value in ((M_MMAP_THRESHOLD, mmap_threshold), (M_ARENA_MAX, arena_max)):
        if not _set_by_operator(parameter):
            accepted = _LIBC.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) == 1 and accepted
    return accepted


def tune_collector(young: int = YOUNG_GENERATION) -> None:
    """Collect the youngest generation every `young` new container objects (the older
    generations' thresholds are kept: they count collections of the one below)."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)


def trim() -> bool:
    """Give every free page of glibc's heaps back to the system (blocks the caller for a few
    milliseconds); True if some memory was released."""
    return _LIBC is not None and _LIBC.malloc_trim(ctypes.c_size_t(0)) == 1


async def trim_when_idle(
    interval: float = DEFAULT_TRIM_INTERVAL, quiet_cpu: float = QUIET_CPU
) -> None:
    """Run until cancelled: after the server has been busy, trim once it has been quiet (its
    threads used less than `quiet_cpu` of a CPU) for an `interval`; so at most once per
    `interval`, and never while the server is busy or has stayed quiet since the last trim."""
    if _LIBC is None:
        return
    busy = False
    used = time.process_time()
    while True:
        await asyncio.sleep(interval)
        now = time.process_time()
        if now - used >= quiet_cpu * interval:
            busy = True
        elif busy:
            began = time.perf_counter()
            released = await asyncio.to_thread(trim)
            log.debug(
                "malloc_trim: %s in %.1f ms",
                "released memory" if released else "nothing to release",
                (time.perf_counter() - began) * 1000,
            )
            busy = False
            now = time.process_time()  # the trim's own time is not activity
        used = now
