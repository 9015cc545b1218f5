"""The client through real failures: cut connections, lost history, refused watches, lost answers.

A TCP proxy (tests/proxy.py) stands between the client and the server and breaks things
on cue; a blocking stub straight to the server acts behind the client's back and checks
what the server itself recorded.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from conveyor import EventKind, NotFound, Task, TaskEvent, TaskStatus, Unavailable
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from tests.client_support import (
    KINDS,
    Calls,
    direct_stub,
    first_item,
    open_twin,
    server_record,
    store_revision,
)
from tests.conftest import ServerThread
from tests.proxy import Proxy
from tests.support import CANCELLED, COMPLETED, TERMINAL, task_request

StartServer = Callable[..., ServerThread]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def proxy(server: ServerThread) -> Iterator[Proxy]:
    with Proxy(server.address) as running:
        yield running


def create_directly(address: str, task_type: str, **parameters: object) -> str:
    with direct_stub(address) as stub:
        request = pb.CreateRequest(task=task_request(task_type, parameters))
        return stub.Create(request, timeout=10).task.task_id


def end_directly(address: str, task_id: str) -> None:
    """Cancel a task behind the client's back and wait until the server has ended it."""
    with direct_stub(address) as stub:
        stub.Cancel(pb.CancelRequest(task_id=task_id, reason="ended behind the client"))
        for response in stub.Watch(pb.WatchRequest(task_id=task_id), timeout=30):
            if response.task.status in TERMINAL:
                return


def wait_directly(address: str, task_id: str) -> None:
    """Wait, behind the client's back, until the server has ended a task."""
    with direct_stub(address) as stub:
        list(stub.Watch(pb.WatchRequest(task_id=task_id), timeout=30))


def churn(address: str, changes: int) -> None:
    """Make at least `changes` changes to other tasks, each finished before this returns."""
    for _ in range(changes // 3 + 1):  # an echo makes three: created, running, completed
        wait_directly(address, create_directly(address, "echo"))


def assert_out_of_history(address: str, task_id: str, revision: int) -> None:
    with direct_stub(address) as stub, pytest.raises(grpc.RpcError) as caught:
        list(stub.Watch(pb.WatchRequest(task_id=task_id, since_revision=revision), timeout=10))
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE


# -- watch: cut connections ---------------------------------------------------------


async def test_watch_survives_its_connection_cut_after_every_state(
    kind: str, server: ServerThread, proxy: Proxy
) -> None:
    async with open_twin(kind, proxy.address) as twin:
        task = await twin.create("sleep", {"seconds": 1, "steps": 8})
        states = await twin.collect("watch", task.task_id, each=lambda state: proxy.cut())
    assert proxy.connections >= 2
    assert states[-1].status is TaskStatus.COMPLETED
    # No gap, no duplicate: after the first state, exactly the server's own record.
    recorded = server_record(server.address, task.task_id, states[0].revision)
    assert [state.proto for state in states[1:]] == recorded


async def test_watch_resumes_when_the_task_changed_while_the_connection_was_down(
    kind: str, server: ServerThread, proxy: Proxy
) -> None:
    async with open_twin(kind, proxy.address) as twin:
        task = await twin.create("report_then_wait", {"seconds": 30})

        def cut_then_cancel(state: Task) -> None:
            if state.progress == 0.25 and proxy.connections == 1:
                proxy.hold()
                proxy.cut()
                end_directly(server.address, task.task_id)  # while the client cannot see it
                proxy.release()

        states = await twin.collect("watch", task.task_id, each=cut_then_cancel)
    assert proxy.connections >= 2
    assert states[-1].status is TaskStatus.CANCELLED
    assert any(state.cancel_requested_at for state in states)  # replayed from the history
    recorded = server_record(server.address, task.task_id, states[0].revision)
    assert [state.proto for state in states[1:]] == recorded


async def test_watch_carries_on_from_the_current_state_when_its_revision_left_the_history(
    kind: str, start_server: StartServer
) -> None:
    server = start_server(history_size=5)
    with Proxy(server.address) as proxy:
        async with open_twin(kind, proxy.address) as twin:
            task = await twin.create("report_then_wait", {"seconds": 30})
            last_seen: list[int] = []

            def cut_then_change_a_lot(state: Task) -> None:
                if state.progress == 0.25 and not last_seen:
                    last_seen.append(state.revision)
                    proxy.hold()
                    proxy.cut()
                    end_directly(server.address, task.task_id)
                    churn(server.address, 10)  # more than the history holds
                    assert_out_of_history(server.address, task.task_id, state.revision)
                    proxy.release()

            states = await twin.collect("watch", task.task_id, each=cut_then_change_a_lot)
            now = await twin.get(task.task_id)
    assert last_seen, "the watch never reached the state where the connection is cut"
    assert states[-1] == now
    assert now.status is TaskStatus.CANCELLED
    revisions = [state.revision for state in states]
    assert revisions == sorted(set(revisions))
    # It carried on from the task as it stands: the state in between was never replayed.
    assert not any(s.status is TaskStatus.RUNNING and s.cancel_requested_at for s in states)


async def test_watch_waits_out_a_proxy_that_holds_its_new_connection(
    kind: str, server: ServerThread, proxy: Proxy
) -> None:
    async with open_twin(kind, proxy.address) as twin:
        task = await twin.create("report_then_wait", {"seconds": 30})
        released = threading.Event()

        def release_once_the_client_is_back() -> None:
            assert proxy.wait_for_connections(2)  # the client's new connection, held
            end_directly(server.address, task.task_id)
            released.set()
            proxy.release()

        def cut_and_hold(state: Task) -> None:
            if state.progress == 0.25 and proxy.connections == 1:
                proxy.hold()
                proxy.cut()
                threading.Thread(target=release_once_the_client_is_back).start()

        states = await twin.collect("watch", task.task_id, each=cut_and_hold)
    assert released.is_set()
    assert states[-1].status is TaskStatus.CANCELLED
    recorded = server_record(server.address, task.task_id, states[0].revision)
    assert [state.proto for state in states[1:]] == recorded


# -- watch_all: cut connections and lost history ------------------------------------


def record_all(
    address: str, labels: dict[str, str], since: int, ending: int
) -> list[tuple[Any, ...]]:
    """The server's own record of the matching tasks' changes, until `ending` of them ended."""
    events: list[tuple[Any, ...]] = []
    ended: set[str] = set()
    request = pb.WatchRequest(filter=task_pb2.TaskFilter(labels=labels), since_revision=since)
    with direct_stub(address) as stub:
        for response in stub.Watch(request, timeout=30):
            events.append((response.type, response.task, response.revision))
            if response.task.status in TERMINAL:
                ended.add(response.task.task_id)
            if len(ended) == ending:
                return events
    raise AssertionError("the stream ended")


def ends_after(count: int) -> Callable[[TaskEvent], bool]:
    ended: set[str] = set()

    def each(event: TaskEvent) -> bool:
        if event.task.status.terminal:
            ended.add(event.task.task_id)
        return len(ended) == count

    return each


async def test_watch_all_survives_its_connection_cut_after_every_event(
    kind: str, server: ServerThread, proxy: Proxy
) -> None:
    labels = {"run": uuid.uuid4().hex}
    since = store_revision(server.address)
    async with open_twin(kind, proxy.address) as twin:
        for _ in range(3):
            await twin.create("sleep", {"seconds": 0.5, "steps": 4}, labels=labels)
        stop = ends_after(3)

        def cut(event: TaskEvent) -> bool:
            proxy.cut()
            return stop(event)

        events = await twin.collect("watch_all", labels=labels, since_revision=since, each=cut)
    assert proxy.connections >= 2
    recorded = record_all(server.address, labels, since, 3)
    assert [(e.kind, e.task.proto, e.revision) for e in events] == recorded


async def test_watch_all_lists_again_when_its_revision_left_the_history(
    kind: str, start_server: StartServer
) -> None:
    server = start_server(history_size=5)
    labels = {"run": uuid.uuid4().hex}
    with Proxy(server.address) as proxy:
        async with open_twin(kind, proxy.address) as twin:
            waiting = await twin.create("report_then_wait", {"seconds": 30}, labels=labels)
            cut_at: list[int] = []
            made_meanwhile: list[str] = []
            stop = ends_after(2)

            def cut_then_change_a_lot(event: TaskEvent) -> bool:
                if event.task.progress == 0.25 and not cut_at:
                    cut_at.append(event.revision)
                    proxy.hold()
                    proxy.cut()
                    end_directly(server.address, waiting.task_id)
                    with direct_stub(server.address) as stub:
                        request = pb.CreateRequest(task=task_request("echo", labels=labels))
                        made_meanwhile.append(stub.Create(request, timeout=10).task.task_id)
                    churn(server.address, 10)
                    assert_out_of_history(server.address, waiting.task_id, event.revision)
                    proxy.release()
                return stop(event)

            events = await twin.collect(
                "watch_all",
                labels=labels,
                since_revision=waiting.revision - 1,
                each=cut_then_change_a_lot,
            )
            now = {task.task_id: task for task in await twin.list(labels=labels)}
    assert cut_at, "the watch never reached the event where the connection is cut"
    after_cut = [event for event in events if event.revision > cut_at[0]]
    # Listed again: each task as it stands, once, as CHANGED; nothing from in between.
    assert sorted(event.task.task_id for event in after_cut) == sorted(now)
    assert all(event.kind is EventKind.CHANGED for event in after_cut)
    assert all(event.task == now[event.task.task_id] for event in after_cut)
    assert now[waiting.task_id].proto.status == CANCELLED
    assert now[made_meanwhile[0]].proto.status == COMPLETED


# -- wait: a server that refuses to let it watch ------------------------------------


async def test_wait_falls_back_to_polling_when_the_server_refuses_watch(
    kind: str, start_server: StartServer
) -> None:
    calls = Calls(refuse={"Watch": grpc.StatusCode.UNIMPLEMENTED})
    server = start_server(interceptors=[calls])
    task_id = create_directly(server.address, "report_then_wait", seconds=30)

    def end_after_the_first_look() -> None:
        assert calls.arrived["Get"].wait(30)
        with direct_stub(server.address) as stub:  # no waiting for the end: Watch is refused
            stub.Cancel(pb.CancelRequest(task_id=task_id), timeout=10)

    ender = threading.Thread(target=end_after_the_first_look)
    ender.start()
    async with open_twin(kind, server.address) as twin:
        ended = await twin.wait(task_id, timeout=30)
    ender.join()
    assert ended.status is TaskStatus.CANCELLED
    assert calls.counts["Watch"] == 1
    assert calls.counts["Get"] >= 2  # a look before the task ended, and one after


async def test_wait_does_not_poll_when_the_task_does_not_exist(
    kind: str, start_server: StartServer
) -> None:
    calls = Calls()
    server = start_server(interceptors=[calls])
    async with open_twin(kind, server.address) as twin:
        with pytest.raises(NotFound):
            await twin.wait(str(uuid.uuid4()))
    assert calls.counts["Watch"] == 1
    assert calls.counts["Get"] == 0


# -- lost answers: what is retried, and what is not ---------------------------------


async def test_create_whose_answer_was_lost_is_retried_and_makes_one_task(
    kind: str, server: ServerThread, proxy: Proxy
) -> None:
    labels = {"run": uuid.uuid4().hex}
    async with open_twin(kind, proxy.address) as twin:
        proxy.drop_next_answer()
        task = await twin.create("echo", labels=labels)
        assert proxy.dropped_answers == 1
        assert [t.task_id for t in await twin.list(labels=labels)] == [task.task_id]


async def test_create_without_a_request_id_is_not_retried(
    kind: str, server: ServerThread, proxy: Proxy
) -> None:
    labels = {"run": uuid.uuid4().hex}
    async with open_twin(kind, proxy.address) as twin:
        proxy.drop_next_answer()
        with pytest.raises(Unavailable):
            await twin.create("echo", labels=labels, request_id="")
        # The server did make it: a blind retry would have made a second one.
        assert len(await twin.list(labels=labels)) == 1


async def test_get_whose_answer_was_lost_is_retried(
    kind: str, server: ServerThread, proxy: Proxy
) -> None:
    async with open_twin(kind, proxy.address) as twin:
        task = await twin.create("echo")
        proxy.drop_next_answer()
        assert (await twin.get(task.task_id)).task_id == task.task_id
        assert proxy.dropped_answers == 1


async def test_cancel_whose_answer_was_lost_is_not_retried(
    kind: str, server: ServerThread, proxy: Proxy
) -> None:
    async with open_twin(kind, proxy.address) as twin:
        task = await twin.create("report_then_wait", {"seconds": 30})
        proxy.drop_next_answer()
        with pytest.raises(Unavailable):
            await twin.cancel(task.task_id, reason="once")
        ended = await twin.wait(task.task_id)
    assert ended.status is TaskStatus.CANCELLED


async def test_list_whose_answer_was_lost_is_retried(
    kind: str, server: ServerThread, proxy: Proxy
) -> None:
    labels = {"run": uuid.uuid4().hex}
    async with open_twin(kind, proxy.address) as twin:
        task = await twin.create("echo", labels=labels)
        proxy.drop_next_answer()
        assert [t.task_id for t in await twin.list(labels=labels)] == [task.task_id]
        assert proxy.dropped_answers == 1


# -- watch: a reader too slow for the server ----------------------------------------


async def test_a_watch_the_server_lets_go_for_reading_slowly_carries_on(
    kind: str, start_server: StartServer
) -> None:
    server = start_server(watch_buffer=50)
    options = [("grpc.http2.bdp_probe", 0)]  # keep the client's window small, so that it fills
    if kind == "Client":
        options.append(("SingleThreadedUnaryStream", 1))  # as the Client's own channel has
        channel: Any = grpc.insecure_channel(server.address, options=options)
    else:
        channel = grpc.aio.insecure_channel(server.address, options=options)
    async with open_twin(kind, None, channel=channel) as twin:
        since = store_revision(server.address)
        stream = twin.client.watch_all(
            statuses=[TaskStatus.COMPLETED], task_type="echo", since_revision=since
        )
        expected = [create_directly(server.address, "echo")]
        seen = [(await first_item(stream)).task.task_id]
        # Now the reader stops reading while the changes pile up, until the server lets it go.
        while server.call(_watchers(server)):
            assert len(expected) < 5000, "the server never let the slow watcher go"
            expected.append(create_directly(server.address, "echo", padding="x" * 500))
            wait_directly(server.address, expected[-1])
        revisions = []
        while len(seen) < len(expected):
            event = await first_item(stream)
            seen.append(event.task.task_id)
            revisions.append(event.revision)
        assert seen == expected  # each one's end, once, in order: no gap, no duplicate
        assert revisions == sorted(set(revisions))
    if kind == "Client":
        channel.close()
    else:
        await channel.close()


async def _watchers(server: ServerThread) -> int:
    return server.server.hub.watchers
