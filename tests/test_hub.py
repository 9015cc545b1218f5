"""The event hub: fan-out by task and filter, one encoding per change, and slow watchers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.hub import Delivery, EventHub, HubClosed, Subscription, WatcherTooSlow
from conveyord.model import Change, ChangeKind, TaskFilter, TaskStatus
from tests.conftest import ServerThread
from tests.support import create, error_info, read, revision
from tests.test_store import new_task

StartServer = Callable[..., ServerThread]


def _change(
    revision: int, task_id: str, status: TaskStatus = TaskStatus.RUNNING, **fields: Any
) -> Change:
    task = new_task(task_id=task_id, status=status, revision=revision, **fields)
    return Change(revision, ChangeKind.CHANGED, task, 0.0)


async def _drain(subscription: Subscription) -> list[int]:
    revisions = []
    while (delivery := await subscription.next(0.01)) is not None:
        revisions.append(delivery.change.revision)
    return revisions


async def test_a_change_reaches_only_the_watchers_it_concerns() -> None:
    hub = EventHub()
    of_a = hub.subscribe(TaskFilter(task_id="a"))
    of_b = hub.subscribe(TaskFilter(task_id="b"))
    of_echo = hub.subscribe(TaskFilter(task_type="echo"))
    of_sleep = hub.subscribe(TaskFilter(task_type="sleep"))
    of_all = hub.subscribe(TaskFilter())
    hub.publish(_change(1, "a"))
    assert await _drain(of_a) == [1]
    assert await _drain(of_b) == []
    assert await _drain(of_echo) == [1]
    assert await _drain(of_sleep) == []
    assert await _drain(of_all) == [1]
    assert hub.revision == 1


async def test_a_change_is_encoded_once_for_all_its_watchers() -> None:
    hub = EventHub()
    watchers = [hub.subscribe(TaskFilter()) for _ in range(50)]
    hub.publish(_change(1, "a"))
    encodings: list[int] = []

    def encode(change: Change) -> bytes:
        encodings.append(change.revision)
        return b"wire"

    for watcher in watchers:
        delivery = await watcher.next(0.01)
        assert isinstance(delivery, Delivery)
        assert delivery.encoded(encode) == b"wire"
    assert encodings == [1]


async def test_a_lagging_watcher_gets_the_latest_state_of_each_task_and_every_end() -> None:
    hub = EventHub(buffer=6)
    watcher = hub.subscribe(TaskFilter())
    hub.publish(_change(1, "a"))
    hub.publish(_change(2, "b"))
    hub.publish(_change(3, "a", progress=0.5))
    hub.publish(_change(4, "b", TaskStatus.COMPLETED))
    hub.publish(_change(5, "b", TaskStatus.COMPLETED, message="again"))
    hub.publish(_change(6, "a", progress=0.7))
    hub.publish(_change(7, "a", progress=0.9))  # 7 > 6: coalesced to 3, half the buffer
    assert await _drain(watcher) == [4, 5, 7]


async def test_a_watcher_still_too_far_behind_is_cut_loose() -> None:
    hub = EventHub(buffer=6)
    slow = hub.subscribe(TaskFilter())
    fast = hub.subscribe(TaskFilter(task_id="t0"))
    for number in range(7):  # seven tasks: coalescing keeps all seven, more than half
        hub.publish(_change(number + 1, f"t{number}"))
    with pytest.raises(WatcherTooSlow):
        await slow.next(0.01)
    assert hub.watchers == 1  # the slow one costs nothing any more
    assert await _drain(fast) == [1]


async def test_coalesced_changes_that_still_fill_half_the_buffer_cut_the_watcher_loose() -> None:
    hub = EventHub(buffer=6)
    slow = hub.subscribe(TaskFilter())
    for number, task_id in enumerate(["a", "b", "c", "d", "a", "b", "c"], start=1):
        hub.publish(_change(number, task_id))  # coalesced at the 7th: 4 tasks, over 3
    with pytest.raises(WatcherTooSlow):
        await slow.next(0.01)


async def test_closing_the_hub_ends_watchers_after_what_they_have() -> None:
    hub = EventHub()
    watcher = hub.subscribe(TaskFilter())
    hub.publish(_change(1, "a"))
    hub.close()
    delivery = await watcher.next(0.01)
    assert delivery is not None and delivery.change.revision == 1
    with pytest.raises(HubClosed):
        await watcher.next(0.01)
    with pytest.raises(HubClosed):
        hub.subscribe(TaskFilter())


async def test_a_stalled_client_is_ended_and_resumes_while_a_fast_one_sees_everything(
    start_server: StartServer,
) -> None:
    server = start_server(watch_buffer=50)
    no_window_growth = [("grpc.http2.bdp_probe", 0)]
    async with (
        grpc.aio.insecure_channel(server.address) as channel,
        grpc.aio.insecure_channel(server.address, options=no_window_growth) as stalled_channel,
    ):
        stub = TaskServiceStub(channel)
        since = await revision(stub)
        fast = stub.Watch(pb.WatchRequest(since_revision=since))
        stalled = TaskServiceStub(stalled_channel).Watch(pb.WatchRequest(since_revision=since))
        await create(stub, "echo")
        await stalled.read()  # it is open; from now on it reads nothing
        seen = [(await read(fast)).revision]
        created = 0
        while server.call(_watchers(server)) > 1:  # until the stalled one is let go
            created += 1
            assert created < 5000, "the stalled watcher was never cut loose"
            await create(stub, "echo", {"padding": "x" * 200})
            while seen[-1] < await revision(stub):
                seen.append((await read(fast)).revision)
        assert seen == list(range(since + 1, seen[-1] + 1))  # every change, in order

        received = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                received.append((await read(stalled)).revision)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        resume = _resume_revision(caught.value)
        assert received == sorted(received) and (not received or resume >= received[-1])
        fast.cancel()
        rest = TaskServiceStub(stalled_channel).Watch(pb.WatchRequest(since_revision=resume))
        assert (await read(rest)).revision == resume + 1  # it carries on with no gap
        rest.cancel()


async def _watchers(server: ServerThread) -> int:
    return server.server.hub.watchers


def _resume_revision(error: grpc.aio.AioRpcError) -> int:
    info = error_info(error)
    assert info.reason == "WATCHER_TOO_SLOW"
    return int(info.metadata["resume_revision"])
