"""The loop watchdog on the test's own loop: what it reports, and that tracking changes nothing.

The blocks here are the thing under test (`time.sleep` on the loop), not waits for something.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import pytest

from conveyord.watchdog import LoopWatchdog, track

THRESHOLD = 0.05


@pytest.fixture
async def watchdog() -> AsyncIterator[LoopWatchdog]:
    watching = LoopWatchdog(THRESHOLD)
    watching.start()
    yield watching
    await watching.stop()


def _reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "conveyord.watchdog"]


async def test_a_handler_that_blocks_the_loop_is_named_with_how_long_it_blocked(
    watchdog: LoopWatchdog, caplog: pytest.LogCaptureFixture
) -> None:
    async def blocking() -> str:
        await asyncio.sleep(0)
        time.sleep(0.3)  # noqa: ASYNC251 - the defect the watchdog is there to catch
        return "done"

    assert await asyncio.ensure_future(track(blocking(), "t-1", "blocky")) == "done"
    await watchdog.stop()  # reports the end of the stall, if the thread has not yet
    warned, ended = _reports(caplog)
    culprit = r"by the handler of task t-1 \(type blocky\)"
    blocked = re.fullmatch(rf"the event loop has been blocked for ([\d.]+) s {culprit}; .*", warned)
    assert blocked is not None, warned
    assert THRESHOLD <= float(blocked[1]) < 0.35
    stalled = re.fullmatch(
        rf"the event loop ran again after being blocked for ([\d.]+) s {culprit}", ended
    )
    assert stalled is not None, ended
    assert float(stalled[1]) >= 0.3


async def test_a_block_outside_any_handler_is_the_servers_own(
    watchdog: LoopWatchdog, caplog: pytest.LogCaptureFixture
) -> None:
    async def quick() -> str:
        return "quick"

    assert await asyncio.ensure_future(track(quick(), "t-2", "fine")) == "quick"
    time.sleep(0.2)  # noqa: ASYNC251 - a block of the server's own, after the handler ended
    await watchdog.stop()
    warned, ended = _reports(caplog)
    assert warned.startswith("the event loop has been blocked for ")
    assert warned.endswith(" s by the server's own code; every call waits")
    assert ended.endswith(" s by the server's own code")


async def test_a_tracked_handler_gets_its_results_errors_and_cancellation_as_before(
    watchdog: LoopWatchdog,
) -> None:
    async def returns() -> dict[str, int]:
        await asyncio.sleep(0)
        return {"n": 1}

    missing = KeyError("missing-key")

    async def raises() -> None:
        await asyncio.sleep(0)
        raise missing

    started = asyncio.Event()

    async def stops_when_cancelled() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "stopped"
        return "never"

    assert await asyncio.ensure_future(track(returns(), "t-3", "a")) == {"n": 1}
    with pytest.raises(KeyError) as caught:
        await asyncio.ensure_future(track(raises(), "t-4", "b"))
    assert caught.value is missing
    cancelled = asyncio.ensure_future(track(stops_when_cancelled(), "t-5", "c"))
    await started.wait()
    cancelled.cancel()
    assert await cancelled == "stopped"


async def test_without_a_watchdog_handlers_run_untouched() -> None:
    LoopWatchdog(0).start()  # a threshold of 0 turns the watchdog off
    handler = asyncio.sleep(0, "as is")
    assert track(handler, "t-6", "d") is handler
    assert await handler == "as is"
