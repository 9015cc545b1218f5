"""Create, Get and List through a real server: ids, defaults, idempotency, paging, queue limit."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from conveyor.protojson import struct_to_dict, to_python
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_pb2 import TaskFilter
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from tests.conftest import ServerThread
from tests.support import (
    CANCELLED,
    COMPLETED,
    CREATED,
    RUNNING,
    create,
    details,
    error_reason,
    field_violations,
    final,
    revision,
    task_request,
    wait_status,
)

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

StartServer = Callable[..., ServerThread]


async def test_create_answers_at_once_with_a_queued_task_and_defaults(
    stub: TaskServiceAsyncStub,
) -> None:
    task = await create(stub, "echo", {"n": 1}, description="say it", labels={"session": "s1"})
    assert uuid.UUID(task.task_id).version == 4
    assert task.status == CREATED
    assert (task.priority, task.max_attempts, task.attempt) == (5, 1, 1)
    assert task.timeout_seconds == 300
    assert task.description == "say it"
    assert dict(task.labels) == {"session": "s1"}
    assert struct_to_dict(task.parameters) == {"n": 1}
    assert task.revision == 1  # the first change to the test's own, empty, server
    assert task.HasField("created_at") and not task.HasField("finished_at")


async def test_get_returns_the_task_as_it_stands(stub: TaskServiceAsyncStub) -> None:
    created = await create(stub, "echo", {"word": "hi"})
    ended = await final(stub, created.task_id)
    got = (await stub.Get(pb.GetRequest(task_id=created.task_id))).task
    assert got == ended
    assert got.status == COMPLETED
    assert to_python(got.result) == {"word": "hi"}
    assert got.progress == 1.0
    assert got.HasField("started_at") and got.HasField("finished_at")


async def test_get_accepts_a_task_id_in_upper_case(stub: TaskServiceAsyncStub) -> None:
    created = await create(stub, "echo")
    got = (await stub.Get(pb.GetRequest(task_id=created.task_id.upper()))).task
    assert got.task_id == created.task_id


async def test_get_of_an_unknown_task_is_not_found(stub: TaskServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Get(pb.GetRequest(task_id=str(uuid.uuid4())))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(caught.value) == "TASK_NOT_FOUND"


async def test_a_repeated_request_id_returns_the_first_task(stub: TaskServiceAsyncStub) -> None:
    request_id = str(uuid.uuid4())
    first = await create(stub, "echo", {"a": 1}, request_id=request_id)
    again = await create(stub, "echo", {"a": 1}, request_id=request_id)
    assert again.task_id == first.task_id
    listed = await stub.List(pb.ListRequest())
    assert [t.task_id for t in listed.tasks] == [first.task_id]


async def test_a_request_id_reused_with_a_different_request_is_already_exists(
    stub: TaskServiceAsyncStub,
) -> None:
    request_id = str(uuid.uuid4())
    first = await create(stub, "echo", {"a": 1}, request_id=request_id)
    before = await revision(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(stub, "echo", {"a": 2}, request_id=request_id)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(caught.value) == "REQUEST_ID_REUSED"
    assert first.task_id in details(caught.value)
    assert await revision(stub) == before


async def test_a_thousand_concurrent_creates_get_distinct_ids_and_none_is_lost(
    stub: TaskServiceAsyncStub,
) -> None:
    tasks = await asyncio.gather(*(create(stub, "echo", {"i": i}) for i in range(1000)))
    ids = {task.task_id for task in tasks}
    assert len(ids) == 1000
    listed: set[str] = set()
    token = ""
    while True:
        page = await stub.List(pb.ListRequest(page_size=1000, page_token=token))
        listed.update(t.task_id for t in page.tasks)
        token = page.next_page_token
        if not token:
            break
    assert listed == ids


async def test_list_filters_by_status_type_and_labels(start_server: StartServer) -> None:
    server: ServerThread = start_server(concurrency=1)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        blocker = await create(stub, "sleep", {"seconds": 60}, labels={"team": "a"})
        await wait_status(stub, blocker.task_id, RUNNING)
        queued_a = await create(stub, "echo", labels={"team": "a", "env": "prod"})
        queued_b = await create(stub, "echo", labels={"team": "b"})
        cancelled = await create(stub, "sleep", labels={"team": "a"})
        await stub.Cancel(pb.CancelRequest(task_id=cancelled.task_id))

        async def ids(**filter_fields: Any) -> list[str]:
            request = pb.ListRequest(filter=TaskFilter(**filter_fields))
            return [t.task_id for t in (await stub.List(request)).tasks]

        assert await ids() == [
            blocker.task_id,
            queued_a.task_id,
            queued_b.task_id,
            cancelled.task_id,
        ]
        assert await ids(statuses=[CREATED]) == [queued_a.task_id, queued_b.task_id]
        assert await ids(statuses=[RUNNING, CANCELLED]) == [blocker.task_id, cancelled.task_id]
        assert await ids(task_type="sleep") == [blocker.task_id, cancelled.task_id]
        assert await ids(labels={"team": "a"}) == [
            blocker.task_id,
            queued_a.task_id,
            cancelled.task_id,
        ]
        assert await ids(labels={"team": "a", "env": "prod"}) == [queued_a.task_id]
        assert await ids(task_type="sleep", statuses=[CREATED]) == []
        await stub.Cancel(pb.CancelRequest(task_id=blocker.task_id))


async def test_paging_stays_correct_while_tasks_are_created(stub: TaskServiceAsyncStub) -> None:
    first = [(await create(stub, "sleep", {"seconds": 0})).task_id for _ in range(25)]
    seen: list[str] = []
    added: list[str] = []
    token = ""
    while True:
        page = await stub.List(pb.ListRequest(page_size=10, page_token=token))
        seen.extend(t.task_id for t in page.tasks)
        token = page.next_page_token
        if not token:
            break
        added.append((await create(stub, "sleep", {"seconds": 0})).task_id)  # between pages
    assert seen == first + added  # nothing skipped, nothing twice, creation order
    assert len(seen) == len(set(seen))


async def test_newest_first_pages_back_in_time_while_tasks_are_created(
    stub: TaskServiceAsyncStub,
) -> None:
    before = await created_ids(stub, 25)
    seen: list[str] = []
    added: list[str] = []
    token = ""
    while True:
        request = pb.ListRequest(page_size=10, page_token=token, newest_first=True)
        page = await stub.List(request)
        seen.extend(t.task_id for t in page.tasks)
        token = page.next_page_token
        if not token:
            break
        added.extend(await created_ids(stub, 1))  # newer than the first page: not listed
    assert seen == before[::-1]  # nothing skipped, nothing twice, newest first
    assert len(added) == 2
    newest = await stub.List(pb.ListRequest(page_size=3, newest_first=True))
    assert [t.task_id for t in newest.tasks] == [added[1], added[0], before[-1]]


async def test_a_page_token_belongs_to_its_order(stub: TaskServiceAsyncStub) -> None:
    await created_ids(stub, 3)
    for newest_first in (False, True):
        page = await stub.List(pb.ListRequest(page_size=1, newest_first=newest_first))
        turned = pb.ListRequest(
            page_size=1, page_token=page.next_page_token, newest_first=not newest_first
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.List(turned)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(caught.value) == {
            "page_token": "was issued for a different filter or order; keep the filter and "
            "the order the same while paging"
        }


async def test_a_page_holds_50_tasks_unless_asked_otherwise(stub: TaskServiceAsyncStub) -> None:
    await asyncio.gather(*(create(stub, "sleep", {"seconds": 0}) for _ in range(51)))
    first = await stub.List(pb.ListRequest())
    assert len(first.tasks) == 50 and first.next_page_token
    rest = await stub.List(pb.ListRequest(page_token=first.next_page_token))
    assert len(rest.tasks) == 1 and not rest.next_page_token
    assert len((await stub.List(pb.ListRequest(page_size=1000))).tasks) == 51


async def test_a_page_token_belongs_to_its_filter(stub: TaskServiceAsyncStub) -> None:
    for _ in range(3):
        await create(stub, "echo")
    page = await stub.List(pb.ListRequest(page_size=1))
    other = pb.ListRequest(
        page_size=1, page_token=page.next_page_token, filter=TaskFilter(task_type="echo")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.List(other)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "different filter" in details(caught.value)


async def created_ids(stub: TaskServiceAsyncStub, count: int) -> list[str]:
    return [(await create(stub, "sleep", {"seconds": 0})).task_id for _ in range(count)]


def shared_first_digit(ids: list[str]) -> str:
    """The first hex digit that most of the ids start with; of 17 ids or more (there are
    16 digits), at least two start with it."""
    return collections.Counter(task_id[0] for task_id in ids).most_common(1)[0][0]


async def test_list_filters_by_the_start_of_the_task_id(stub: TaskServiceAsyncStub) -> None:
    ids = await created_ids(stub, 17)
    shared = shared_first_digit(ids)
    hex_pairs = (a + b for a in "0123456789abcdef" for b in "0123456789abcdef")
    unused = next(pair for pair in hex_pairs if not any(i.startswith(pair) for i in ids))

    async def listed(prefix: str, **filter_fields: Any) -> list[str]:
        task_filter = TaskFilter(task_id_prefix=prefix, **filter_fields)
        page = await stub.List(pb.ListRequest(filter=task_filter, page_size=1000))
        return [t.task_id for t in page.tasks]

    assert len(await listed(shared)) >= 2
    for prefix in (shared, ids[0][:8], ids[0][:9], ids[-1][:13], ids[0], unused, "-"):
        assert await listed(prefix) == [i for i in ids if i.startswith(prefix)], prefix
    assert await listed(ids[0][:8].upper()) == await listed(ids[0][:8])  # ids are lower case
    assert await listed(ids[0]) == [ids[0]]
    assert await listed(unused) == []
    assert await listed(ids[0], task_type="echo") == []  # every field that is set must match
    assert await listed(ids[0], task_type="sleep") == [ids[0]]


@pytest.mark.parametrize("prefix", ["xyz!", "0ddba11g", "0ddba11 ", "0" * 37])
async def test_a_bad_task_id_prefix_is_invalid_argument(
    stub: TaskServiceAsyncStub, prefix: str
) -> None:
    task_filter = TaskFilter(task_id_prefix=prefix)
    with pytest.raises(grpc.aio.AioRpcError) as listing:
        await stub.List(pb.ListRequest(filter=task_filter))
    with pytest.raises(grpc.aio.AioRpcError) as watching:
        async for _ in stub.Watch(pb.WatchRequest(filter=task_filter)):
            pass
    for caught in (listing, watching):
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(field_violations(caught.value)) == ["filter.task_id_prefix"]


async def test_pages_of_a_task_id_prefix_hold_its_tasks_and_their_tokens_keep_it(
    stub: TaskServiceAsyncStub,
) -> None:
    ids = await created_ids(stub, 33)
    shared = shared_first_digit(ids)  # 33 ids, 16 digits: at least three start with it
    expected = [i for i in ids if i.startswith(shared)]
    assert len(expected) >= 3
    seen: list[str] = []
    token = ""
    while True:
        request = pb.ListRequest(
            filter=TaskFilter(task_id_prefix=shared), page_size=1, page_token=token
        )
        page = await stub.List(request)
        seen.extend(t.task_id for t in page.tasks)
        token = page.next_page_token
        if not token:
            break
        for other in (TaskFilter(), TaskFilter(task_id_prefix=shared + "0")):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.List(pb.ListRequest(filter=other, page_size=1, page_token=token))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "different filter" in details(caught.value)
    assert seen == expected
    unfiltered = await stub.List(pb.ListRequest(page_size=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        request = pb.ListRequest(
            filter=TaskFilter(task_id_prefix=shared),
            page_size=1,
            page_token=unfiltered.next_page_token,
        )
        await stub.List(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_reports_the_store_revision(stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "sleep", {"seconds": 60})
    listed = await stub.List(pb.ListRequest())
    assert listed.revision >= task.revision
    assert listed.revision == max(t.revision for t in listed.tasks)
    await stub.Cancel(pb.CancelRequest(task_id=task.task_id))


async def test_create_beyond_the_queue_limit_is_resource_exhausted(
    start_server: StartServer,
) -> None:
    server: ServerThread = start_server(concurrency=1, max_queued=2)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = TaskServiceStub(channel)
        blocker = await create(stub, "sleep", {"seconds": 60})
        await wait_status(stub, blocker.task_id, RUNNING)
        kept = [await create(stub, "echo", request_id=f"r{i}") for i in range(2)]
        before = await revision(stub)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(stub, "echo")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(caught.value) == "QUEUE_FULL"
        assert await revision(stub) == before
        # A replay of a task already accepted is still answered while the queue is full.
        assert (await create(stub, "echo", request_id="r0")).task_id == kept[0].task_id
        await stub.Cancel(pb.CancelRequest(task_id=kept[0].task_id))
        assert (await create(stub, "echo")).status == CREATED  # room again
        await stub.Cancel(pb.CancelRequest(task_id=blocker.task_id))


async def test_request_with_every_field_set_round_trips(stub: TaskServiceAsyncStub) -> None:
    request = pb.CreateRequest(
        task=task_request(
            "echo",
            {"nested": {"list": [1, "two", None, True]}},
            description="d",
            priority=9,
            timeout_seconds=12.5,
            max_attempts=3,
            labels={"a": "1", "b.c/d-e_f": ""},
        ),
        request_id="every-field",
    )
    task = (await stub.Create(request)).task
    assert (task.priority, task.timeout_seconds, task.max_attempts) == (9, 12.5, 3)
    assert dict(task.labels) == {"a": "1", "b.c/d-e_f": ""}
    ended = await final(stub, task.task_id)
    assert to_python(ended.result) == {"nested": {"list": [1, "two", None, True]}}
