"""glibc's malloc tuned and trimmed: the settings are taken and change where a large block
comes from; the idle trimmer trims once after each busy spell, never while busy; elsewhere
nothing happens."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conveyord import allocator
from tests.processes import SOURCE_PATH

ROOT = Path(__file__).resolve().parent.parent

glibc = pytest.mark.skipif(allocator._LIBC is None, reason="glibc only")

# In a process of its own: free a 4 MiB block, allocate another, and say whether glibc
# mmapped it (mallinfo2's hblkhd, the bytes in mmapped blocks, grows by its size).
_SECOND_BLOCK = """
import ctypes, json, sys
from conveyord import allocator
tuned = allocator.tune_allocator() if sys.argv[1] == "tune" else None
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 4 * 1024 * 1024
libc.free(libc.malloc(size))  # untuned, this raises the mmap threshold past 4 MiB
before = libc.mallinfo2().hblkhd
block = libc.malloc(size)
mmapped = libc.mallinfo2().hblkhd - before >= size
libc.free(block)
print(json.dumps({"tuned": tuned, "mmapped": mmapped}))
"""


def _second_block(mode: str) -> dict[str, object]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"
    }
    environment["PYTHONPATH"] = SOURCE_PATH  # this checkout's conveyord (and conveyor)
    result = subprocess.run(
        [sys.executable, "-c", _SECOND_BLOCK, mode],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    figures: dict[str, object] = json.loads(result.stdout)
    return figures


@glibc
def test_after_a_large_block_is_freed_the_next_is_still_mmapped_once_tuned() -> None:
    assert _second_block("tune") == {"tuned": True, "mmapped": True}
    # What tuning is for: left alone, glibc carves the second block from its heap.
    assert _second_block("leave") == {"tuned": None, "mmapped": False}


def test_trims_once_quiet_after_busy_and_never_while_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    interval = 0.01
    # CPU seconds used in each interval: busy, busy, quiet, quiet, quiet, busy, quiet.
    used = [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    clock = {"cpu": 0.0}
    trims: list[int] = []
    step = 0

    def process_time() -> float:
        return clock["cpu"]

    async def sleep(seconds: float) -> None:
        nonlocal step
        assert seconds == interval
        if step == len(used):
            raise asyncio.CancelledError
        clock["cpu"] += used[step] * interval
        step += 1

    def trim() -> bool:
        trims.append(step)
        clock["cpu"] += 0.5 * interval  # the trim's own CPU time is not activity
        return True

    monkeypatch.setattr(allocator, "_LIBC", object())
    monkeypatch.setattr("conveyord.allocator.time.process_time", process_time)
    monkeypatch.setattr("conveyord.allocator.asyncio.sleep", sleep)
    monkeypatch.setattr(allocator, "trim", trim)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(allocator.trim_when_idle(interval, quiet_cpu=0.1))
    assert trims == [3, 7]  # after the first quiet interval that follows a busy one


def test_nothing_happens_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_LIBC", None)
    assert allocator.tune_allocator() is False
    assert allocator.trim() is False
    asyncio.run(asyncio.wait_for(allocator.trim_when_idle(0.01), 1))  # returns at once


def test_the_young_generation_is_collected_every_10_000_new_objects() -> None:
    before = gc.get_threshold()
    try:
        allocator.tune_collector()
        assert gc.get_threshold() == (10_000, before[1], before[2])
    finally:
        gc.set_threshold(*before)
