"""The blocking client is generated from the asyncio one (scripts/unasync.py) and kept so."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync", ROOT / "scripts" / "unasync.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


unasync = _load_script()


def test_the_sync_client_is_generated_from_the_async_one() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/unasync.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_shows_a_hand_edit(tmp_path: Path) -> None:
    source, target = unasync.TWINS[0]
    edited = tmp_path / target.name
    edited.write_text(target.read_text().replace("def get(", "def fetch("))
    diff = unasync.stale(source, edited)
    assert "-    def fetch(" in diff and "+    def get(" in diff
    assert unasync.stale(source, target) == ""


def test_the_rewrites_and_the_markers() -> None:
    source = '''\
import asyncio
from collections.abc import AsyncIterator


class AsyncThing:
    # unasync: async-only
    """Async."""
    # unasync: sync-only
    # """Blocking; `AsyncThing` is its twin.
    #
    # Two paragraphs."""
    # unasync: end

    async def __aenter__(self) -> AsyncThing:
        await asyncio.sleep(0)
        return self

    async def items(self, channel: grpc.aio.Channel) -> AsyncIterator[int]:
        async with channel:
            async for item in self._items(ASYNC_OPTIONS):
                yield item
            async for item in self._items():
                yield item
                yield item
            for item in self._items():
                yield item

                print(item)
'''
    expected = '''\
import time
from collections.abc import Iterator


class Thing:
    """Blocking; `AsyncThing` is its twin.

    Two paragraphs."""

    def __enter__(self) -> Thing:
        time.sleep(0)
        return self

    def items(self, channel: grpc.Channel) -> Iterator[int]:
        with channel:
            yield from self._items(OPTIONS)
            for item in self._items():
                yield item
                yield item
            for item in self._items():
                yield item

                print(item)
'''
    assert unasync.unasync(source) == expected


@pytest.mark.parametrize(
    "source",
    [
        "# unasync: end\n",
        "# unasync: async-only\nx = 1\n",
        "# unasync: sync-only\n# unasync: async-only\n# unasync: end\n",
        "# unasync: sync-only\nx = 1\n# unasync: end\n",
        "x = 1  # unasync: y = 1\n",
    ],
    ids=["end-alone", "unclosed", "sync-then-async", "sync-not-commented", "unknown-marker"],
)
def test_a_misplaced_marker_is_refused(source: str) -> None:
    with pytest.raises(unasync.UnasyncError):
        unasync.unasync(source)
