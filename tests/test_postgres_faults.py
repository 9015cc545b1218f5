"""The PostgreSQL store when the database lets it down.

A replica whose unread changes were deleted from the changes table fails loudly (a conveyord
exits, naming the gap) rather than skip them or answer from a view with a hole in it; a
replica a little behind keeps every change it has not read, whatever another replica trims.
A connection lost while COMMIT is in flight fails the store, written or not (it cannot
tell), and a restart reads what the database holds: the write there once, or not at all.
One lost before COMMIT is run again, and answered as if nothing had happened.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_status import rpc_status

from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub
from conveyord.model import Change, Task, TaskFilter
from conveyord.store.base import StoreFailed
from conveyord.store.postgres import CHANNEL, KEEP_CHANGES_SECONDS, TRIM_EVERY, PostgresStore
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
    last, _ = await create_one(trimmer, new_task(task_type=task_type))
    # Its reader trims too, once it has read past TRIM_EVERY changes, but when is its own
    # affair: this trim is done when it returns.
    await trimmer.trim_changes()
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


async def test_a_store_trims_the_changes_its_history_passed_once_they_are_old(
    postgres_url: str, opened: PostgresOpener
) -> None:
    """With no one asking, a store's reader deletes from the table the changes its history
    (10 here) has passed and that are older than the table keeps: the first burst, not the
    second, which is younger."""
    clock = ManualClock()
    trimmer = await opened(history_size=10, clock=clock)
    trims: asyncio.Queue[None] = asyncio.Queue()  # one for each trim the reader has done
    trim = trimmer.trim_changes

    async def heard_trim() -> None:
        await trim()
        trims.put_nowait(None)

    trimmer.trim_changes = heard_trim
    await trimmer.create(burst(), admit)
    clock.now += KEEP_CHANGES_SECONDS + 1
    await trimmer.create(burst(), admit)
    kept = 1
    while kept <= BURST:  # a trim may be begun before the second burst is written
        await asyncio.wait_for(trims.get(), 30)
        kept = await sql(postgres_url, "SELECT min(revision) FROM conveyor_changes")
    assert kept == BURST + 1  # the first of the second burst


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


# --- a connection lost under a write ---------------------------------------------------

HELD = "held"  # the request id of the task whose write the database kills


async def _kill_first_write(url: str, when: str) -> None:
    """Make the database end the connection of the write of the task whose request id is
    HELD, the first time it gets there: at its insert (`before` its COMMIT), or as COMMIT
    runs the transaction's deferred triggers (`during` it), before it is committed. The
    `held_writes` sequence counts the times a write got there."""
    trigger = {
        "before": "CREATE TRIGGER kill_held AFTER INSERT ON conveyor_tasks",
        "during": "CREATE CONSTRAINT TRIGGER kill_held AFTER INSERT ON conveyor_tasks "
        "DEFERRABLE INITIALLY DEFERRED",
    }[when]
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"""
            CREATE SEQUENCE held_writes;
            CREATE FUNCTION kill_held() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('held_writes') = 1 THEN
                    PERFORM pg_terminate_backend(pg_backend_pid());
                END IF;
                RETURN NULL;
            END $$;
            {trigger} FOR EACH ROW WHEN (NEW.request_id = '{HELD}') EXECUTE FUNCTION kill_held();
        """)  # fmt: skip
    finally:
        await connection.close()


async def _held_writes(url: str) -> int:
    """How many times a write of the HELD task got to the trigger."""
    value: int = await sql(
        url, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM held_writes"
    )
    return value


async def _rows_of(url: str, request_id: str) -> list[str]:
    """The ids of the tasks in the database with this request id."""
    ids: list[str] = await sql(
        url, "SELECT coalesce(array_agg(task_id), '{}') FROM conveyor_tasks WHERE request_id = $1",
        request_id,
    )  # fmt: skip
    return ids


async def test_a_connection_killed_during_commit_fails_the_store_and_nothing_is_written(
    postgres_url: str, opened: PostgresOpener
) -> None:
    """The database ends the writer's connection as it runs COMMIT (nothing committed): the
    store cannot know that, so it fails rather than answer or try again; every call of the
    batch gets StoreFailed, and so does every later change. A restart finds no trace of the
    write, and the create sent again makes the task once."""
    store = await opened()
    failures = Failures(store)
    await _kill_first_write(postgres_url, "during")
    held, other = new_task(HELD), new_task("other")
    results = await asyncio.gather(
        create_one(store, held), create_one(store, other), return_exceptions=True
    )
    assert [type(result) for result in results] == [StoreFailed, StoreFailed]
    error = await failures.first()
    assert "terminating connection due to administrator command" in str(error)
    assert await _held_writes(postgres_url) == 1  # its COMMIT was sent once, never again
    with pytest.raises(StoreFailed):
        await create_one(store, new_task())
    assert await _rows_of(postgres_url, HELD) == await _rows_of(postgres_url, "other") == []
    restarted = await opened()
    assert await restarted.get(held.task_id) is None
    made, created = await create_one(restarted, new_task(HELD))
    assert created
    assert await _rows_of(postgres_url, HELD) == [made.task_id]


async def test_a_connection_lost_after_its_commit_went_fails_the_store_and_a_restart_has_it(
    postgres_url: str, opened: PostgresOpener, by_proxy: ByProxy
) -> None:
    """The writer's COMMIT reaches the database, which commits, and the connection breaks
    before the answer comes back: the store fails (the caller gets StoreFailed, not the
    task); a restart has the task, once, and the create sent again with its request id gets
    that task, not a second one."""
    proxy, open_through = by_proxy
    store = await open_through()
    failures = Failures(store)
    committed = asyncio.Event()
    listener = await asyncpg.connect(postgres_url)  # hears each commit of the store's
    await listener.add_listener(CHANNEL, lambda *_: committed.set())
    try:
        sent = proxy.hold_answer(b"COMMIT")
        held = new_task(HELD)
        creating = asyncio.ensure_future(create_one(store, held))
        await asyncio.wait_for(committed.wait(), 30)
        assert await asyncio.to_thread(sent.wait, 30)  # the COMMIT went through the proxy
        assert not creating.done()  # and no answer came back
        proxy.cut()
        with pytest.raises(StoreFailed):
            await creating
    finally:
        await listener.close()
    error = await failures.first()
    assert isinstance(error, asyncpg.InterfaceError | asyncpg.PostgresConnectionError), error
    assert await _rows_of(postgres_url, HELD) == [held.task_id]
    restarted = await opened()
    found = await restarted.get(held.task_id)
    assert found is not None and found.request_id == HELD
    again, created = await create_one(restarted, new_task(HELD))
    assert (again.task_id, created) == (held.task_id, False)
    assert await _rows_of(postgres_url, HELD) == [held.task_id]


async def test_a_connection_killed_before_commit_is_written_once_on_the_next_try(
    postgres_url: str, opened: PostgresOpener
) -> None:
    """The database ends the writer's connection in the middle of a batch (a create and an
    update), before its COMMIT: the batch is run again on another connection and committed
    once; both calls are answered as if nothing had happened, and neither change is made
    twice."""
    store = await opened()
    failures = Failures(store)
    existing, _ = await create_one(store, new_task())
    await _kill_first_write(postgres_url, "before")
    batches: list[int] = []
    store.on_commit = lambda changes, seconds: batches.append(changes)
    held = new_task(HELD)
    (made, created), bumped = await asyncio.gather(
        create_one(store, held), store.update(existing.task_id, _bump)
    )
    assert await _held_writes(postgres_url) == 2  # killed at the first try, written at the next
    assert batches == [2]  # one commit, of both changes
    assert (made.task_id, created) == (held.task_id, True)
    assert bumped.progress == pytest.approx(0.1)  # bumped once
    assert await _rows_of(postgres_url, HELD) == [held.task_id]
    restarted = await opened()
    assert await restarted.get(held.task_id) == made
    assert await restarted.get(existing.task_id) == bumped
    assert failures.errors == []


def _bump(task: Task) -> Task:
    return task.evolve(progress=task.progress + 0.1)
