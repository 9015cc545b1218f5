"""The PostgreSQL store when the database lets it down.

A replica whose unread changes were deleted from the changes table fails loudly (a conveyord
exits, naming the gap) rather than skip them or answer from a view with a hole in it; a
replica a little behind keeps every change it has not read, whatever another replica trims.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.model import Change, Task, TaskFilter
from conveyord.store.base import StoreFailed
from conveyord.store.postgres import KEEP_CHANGES_SECONDS, TRIM_EVERY, PostgresStore
from tests.conftest import ManualClock, PostgresOpener
from tests.processes import Conveyord
from tests.proxy import Proxy
from tests.support import error_reason, revision
from tests.test_postgres_store import sql
from tests.test_store import admit, create_one, new_task

STORE_FAILED_EXIT = 1
# Enough changes in one batch that a store keeping 10 in its history trims the table after it.
BURST = TRIM_EVERY + 100
NOBODY_RUNS = "nobody.runs"  # a task type no handler of a conveyord takes: it writes nothing
OpenThrough = Callable[..., Awaitable[PostgresStore]]
ByProxy = tuple[Proxy, OpenThrough]


class Failures:
    """What a store told its server when it failed (its on_failure), as it comes."""

    def __init__(self, store: PostgresStore) -> None:
        self.errors: list[Exception] = []
        self._failed = asyncio.Event()
        store.on_failure = self._heard

    def _heard(self, error: Exception) -> None:
        self.errors.append(error)
        self._failed.set()

    async def first(self) -> Exception:
        await asyncio.wait_for(self._failed.wait(), 30)
        return self.errors[0]


def through(proxy: Proxy, url: str) -> str:
    """The database URL, by way of the proxy."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}@{proxy.address}"))


def upstream(url: str) -> str:
    """host:port of the database URL, for a proxy to forward to."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


@pytest.fixture
async def by_proxy(postgres_url: str) -> AsyncIterator[ByProxy]:
    """A proxy to the test's database, and a way to open stores through it (closed at the
    end, before the proxy)."""
    stores: list[PostgresStore] = []

    async def make(**options: Any) -> PostgresStore:
        store = PostgresStore(through(proxy, postgres_url), **options)
        await store.open()
        stores.append(store)
        return store

    with Proxy(upstream(postgres_url), opaque=True) as proxy:
        yield proxy, make
        proxy.resume()
        for store in stores:
            await store.close()


def burst(task_type: str = "echo") -> list[Task]:
    return [new_task(task_type=task_type) for _ in range(BURST)]


async def _trim_past(trimmer: PostgresStore, clock: ManualClock, task_type: str) -> Task:
    """Make the trimmer (a store keeping 10 changes, on `clock`) write two bursts of changes,
    the second once the first is older than the table keeps, and trim the first from the
    table; the last task it made."""
    await trimmer.create(burst(task_type), admit)
    clock.now += KEEP_CHANGES_SECONDS + 1
    await trimmer.create(burst(task_type), admit)
    # Delivered by the trimmer's reader in its next read, once the trim of the one before
    # (which read the second burst) is done.
    last, _ = await create_one(trimmer, new_task(task_type=task_type))
    return last


# --- a replica left behind -------------------------------------------------------------


async def test_a_store_whose_unread_changes_were_trimmed_fails_and_skips_none(
    postgres_url: str, opened: PostgresOpener, by_proxy: ByProxy
) -> None:
    """Its reader is held back (its connections stall) while another store writes, then,
    its clock past what the table keeps, writes again and trims the first changes: once it
    reads again it fails, delivers nothing past the gap, and answers no read that the
    missing changes would decide."""
    proxy, open_behind = by_proxy
    clock = ManualClock()
    trimmer = await opened(history_size=10, clock=clock)
    behind = await open_behind()
    failures = Failures(behind)
    delivered: list[Change] = []
    behind.feed.follow(delivered.append)
    first, _ = await create_one(trimmer, new_task())
    assert await behind.get(first.task_id) == first  # caught up
    read = await behind.revision()
    proxy.stall()
    last = await _trim_past(trimmer, clock, "echo")
    kept = await sql(postgres_url, "SELECT min(revision) FROM conveyor_changes")
    assert kept > read + 1  # the first burst is gone from the table
    proxy.resume()
    error = await failures.first()
    assert isinstance(error, StoreFailed)
    assert f"changes jump from revision {read} to {kept}" in str(error)
    assert [change.revision for change in delivered] == list(range(1, read + 1))
    assert await behind.revision() == read
    with pytest.raises(StoreFailed):  # not "no such task": it may be in the changes missed
        await behind.get(last.task_id)
    with pytest.raises(StoreFailed):
        await behind.changes_since(await trimmer.revision(), TaskFilter())
    with pytest.raises(StoreFailed):
        await create_one(behind, new_task())
    assert len(failures.errors) == 1


async def test_a_store_a_little_behind_keeps_what_it_has_not_read_through_another_s_trim(
    opened: PostgresOpener, by_proxy: ByProxy
) -> None:
    """Another store that keeps only 10 changes in its history trims the table behind it:
    still a store whose reader is a few seconds behind (its connections stall) reads every
    change it missed, in order, and does not fail."""
    proxy, open_behind = by_proxy
    trimmer = await opened(history_size=10)
    behind = await open_behind()
    failures = Failures(behind)
    delivered: list[Change] = []
    behind.feed.follow(delivered.append)
    first, _ = await create_one(trimmer, new_task())
    assert await behind.get(first.task_id) == first
    proxy.stall()
    for _ in range(2):  # the trimmer's history passes each burst: each is a trim
        await trimmer.create(burst(), admit)
    last, _ = await create_one(trimmer, new_task())
    proxy.resume()
    assert await behind.changes_since(last.revision, TaskFilter()) == []  # caught up
    assert [change.revision for change in delivered] == list(range(1, last.revision + 1))
    assert await behind.get(last.task_id) == last
    assert failures.errors == []


async def test_a_conveyord_left_behind_trimmed_changes_exits_and_names_the_gap(
    postgres_url: str, opened: PostgresOpener, conveyord: Callable[..., Conveyord]
) -> None:
    """A replica stopped (SIGSTOP) for longer than the table keeps changes, while another
    writes and trims, finds the gap once it runs again: it refuses what it is asked
    (UNAVAILABLE, not NOT_FOUND for a task it never saw), exits with the store-failed code,
    and its log names the revisions missing."""
    behind = conveyord("--store", postgres_url)
    clock = ManualClock()
    trimmer = await opened(history_size=10, clock=clock)
    async with grpc.aio.insecure_channel(behind.address) as channel:
        stub = TaskServiceStub(channel)
        first, _ = await create_one(trimmer, new_task(task_type=NOBODY_RUNS))
        await stub.Get(pb.GetRequest(task_id=first.task_id))  # caught up: it knows the task
        read = await revision(stub)
        assert read == await sql(postgres_url, "SELECT revision FROM conveyor_state")
        behind.process.send_signal(signal.SIGSTOP)
        try:
            last = await _trim_past(trimmer, clock, NOBODY_RUNS)
            kept = await sql(postgres_url, "SELECT min(revision) FROM conveyor_changes")
            assert kept > read + 1
        finally:
            behind.process.send_signal(signal.SIGCONT)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Get(pb.GetRequest(task_id=last.task_id), timeout=30)
    _assert_refused_by_a_failed_store(refused.value)
    assert behind.process.wait(timeout=30) == STORE_FAILED_EXIT
    log = behind.rest_of_log()
    assert f"changes jump from revision {read} to {kept}: the changes between were deleted" in log
    assert "the store failed: stopping" in log


def _assert_refused_by_a_failed_store(error: grpc.aio.AioRpcError) -> None:
    """Refused by the server's failed store (UNAVAILABLE, STORE_FAILED), or by a server that
    is already closing its port (UNAVAILABLE with no details, or CANCELLED): a client tries
    another replica. Never NOT_FOUND, nor INTERNAL."""
    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), error
    if rpc_status.from_call(error) is not None:
        assert error_reason(error) == "STORE_FAILED"
