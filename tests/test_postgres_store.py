"""The PostgreSQL store: its schema, and several stores on one database (as several conveyord
replicas use it): changes, revisions, claims and request ids across them, and a connection
killed under one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from conveyord.model import Change, Task, TaskFilter, TaskStatus
from conveyord.store import postgres, store_from_url
from conveyord.store.base import Claim, StoreOpenError, StoreTooNew
from conveyord.store.postgres import _FIRSTS, _READ, _WRITE, READ_LIMIT, PostgresStore, _Batch
from conveyord.store.postgres_schema import MIGRATIONS
from conveyord.store.postgres_usage import SharedUsage
from conveyord.tenants import TenantLimitReached, TenantLimits, Tenants, Usage
from tests.conftest import PostgresOpener
from tests.proxy import Proxy
from tests.support import eventually
from tests.test_store import admit, complete, create_one, new_task, start

Opener = PostgresOpener


async def sql(url: str, statement: str, *args: Any) -> Any:
    """Run one statement on its own connection; its first value."""
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(statement, *args)
    finally:
        await connection.close()


async def rows(url: str, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one query on its own connection; its rows, as tuples."""
    connection = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await connection.fetch(statement, *args)]
    finally:
        await connection.close()


def claim_of(holder: str, count: int, now: float = 5.0) -> Claim:
    return Claim(holder, count, None, {}, lambda task: now + 60, now=now)


async def test_a_database_of_a_newer_schema_is_refused(postgres_url: str, opened: Opener) -> None:
    store = await opened()
    await create_one(store, new_task())
    await store.close()
    await sql(postgres_url, "UPDATE conveyor_schema SET version = $1", len(MIGRATIONS) + 1)
    with pytest.raises(StoreTooNew, match=f"newer than the {len(MIGRATIONS)} this conveyord"):
        await opened()
    assert StoreTooNew.exit_code == 6
    assert await sql(postgres_url, "SELECT count(*) FROM conveyor_tasks") == 1


async def test_two_stores_opening_a_new_database_at_once_migrate_it_once(
    postgres_url: str,
) -> None:
    marker = "CREATE TABLE upgraded_marker (n integer); INSERT INTO upgraded_marker VALUES (1)"
    stores = [PostgresStore(postgres_url, migrations=(*MIGRATIONS, marker)) for _ in range(2)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        assert await sql(postgres_url, "SELECT count(*) FROM upgraded_marker") == 1
        assert await sql(postgres_url, "SELECT version FROM conveyor_schema") == len(MIGRATIONS) + 1
    finally:
        await asyncio.gather(*(store.close() for store in stores))


async def test_an_unreachable_server_is_a_clear_open_error() -> None:
    store = PostgresStore("postgresql://conveyor:secret@127.0.0.1:1/tasks")
    with pytest.raises(StoreOpenError, match="cannot open the store at") as raised:
        await store.open()
    assert raised.value.exit_code == 5
    assert "secret" not in str(raised.value)
    await store.close()


async def test_every_store_on_a_database_orders_the_queue_alike(opened: Opener) -> None:
    await opened(aging_rate=1 / 60)
    with pytest.raises(StoreOpenError, match="must use the same"):
        await opened(aging_rate=1 / 30)


async def test_a_change_through_one_store_reaches_the_other(opened: Opener) -> None:
    a, b = await opened(), await opened()
    seen: list[Change] = []
    b.feed.follow(seen.append)
    task, _ = await create_one(a, new_task())
    assert await b.get(task.task_id) == task  # caught up at once, without waiting for a poll
    running = await a.update(task.task_id, start)
    done = await b.update(task.task_id, complete)  # b changes what a made
    assert done.revision == running.revision + 1
    await a.changes_since(done.revision, TaskFilter())  # a known task is read from memory:
    assert await a.get(task.task_id) == done  # b's change is there once a has caught up
    assert [c.revision for c in seen] == [1, 2, 3]
    assert [c.task.status for c in seen] == [
        TaskStatus.CREATED, TaskStatus.RUNNING, TaskStatus.COMPLETED,
    ]  # fmt: skip


async def test_revisions_are_contiguous_and_alike_on_every_store(opened: Opener) -> None:
    a, b = await opened(), await opened()
    feeds: dict[str, list[Change]] = {"a": [], "b": []}
    a.feed.follow(feeds["a"].append)
    b.feed.follow(feeds["b"].append)

    async def write(store: PostgresStore) -> None:
        for _ in range(10):
            task, _ = await create_one(store, new_task())
            await asyncio.gather(*(store.update(task.task_id, _bump) for _ in range(3)))

    await asyncio.gather(*(write(store) for store in (a, b, a, b)))
    latest = max(await a.revision(), await b.revision())
    assert latest == 4 * 10 * 4
    for store in (a, b):
        await store.changes_since(latest, TaskFilter())  # caught up
    for changes in feeds.values():
        assert [c.revision for c in changes] == list(range(1, latest + 1))
    assert [(c.revision, c.task.task_id, c.task.progress) for c in feeds["a"]] == [
        (c.revision, c.task.task_id, c.task.progress) for c in feeds["b"]
    ]


def _bump(task: Task) -> Task:
    return task.evolve(progress=task.progress + 0.1)


async def test_claims_from_two_stores_at_once_never_take_one_task_twice(opened: Opener) -> None:
    a, b = await opened(), await opened()
    made = await a.create([new_task(priority=i % 10) for i in range(300)], admit)
    claims = [store.claim(claim_of(f"w-{i}", 7)) for i in range(30) for store in (a, b)]
    claimed = [task for tasks in await asyncio.gather(*claims) for task in tasks]
    claimed += await a.claim(claim_of("w-last", 300))
    ids = [task.task_id for task in claimed]
    assert len(ids) == len(set(ids)) == len(made)
    await b.changes_since(await a.revision(), TaskFilter())
    assert b.queued == a.queued == 0


async def test_a_type_cap_holds_across_every_store(opened: Opener) -> None:
    first, second = await opened(), await opened()
    for _ in range(12):
        await create_one(first, new_task(task_type="scarce"))
    # Each store's own limits would let it start 4: the cap is 3 in all.
    capped = [
        Claim(
            holder, 4, None, {"scarce": 4}, lambda task: 65.0, 5.0, type_concurrency={"scarce": 3}
        )
        for holder in ("a", "b", "a", "b")
    ]
    claims = await asyncio.gather(*(store.claim(claim) for store, claim in zip(
        (first, second, first, second), capped, strict=True
    )))  # fmt: skip
    claimed = [task.task_id for tasks in claims for task in tasks]
    assert len(claimed) == len(set(claimed)) == 3
    # One ends: one more may start, on either store.
    (done, *_) = (task for tasks in claims for task in tasks)
    holder_store = first if done.lease_holder == "a" else second
    await holder_store.update(done.task_id, complete)
    assert len(await second.claim(capped[1])) == 1
    assert await second.claim(capped[1]) == []


async def test_a_request_id_raced_from_two_stores_makes_one_task(opened: Opener) -> None:
    a, b = await opened(), await opened()
    creates = [create_one(store, new_task("once")) for _ in range(10) for store in (a, b)]
    results = await asyncio.gather(*creates)
    assert len({task.task_id for task, _ in results}) == 1
    assert [created for _, created in results].count(True) == 1


class Calls:
    """Counts the calls of one of a store's async methods (its look-ups of request ids,
    its reads of the changes table)."""

    def __init__(self, store: PostgresStore, method: str) -> None:
        self.count = 0
        self.done = asyncio.Event()  # a call has been answered
        self._method = getattr(store, method)
        setattr(store, method, self._counted)

    async def _counted(self, *args: Any) -> Any:
        self.count += 1
        answer = await self._method(*args)
        self.done.set()
        return answer


async def test_a_store_that_knows_every_task_looks_up_no_request_id(opened: Opener) -> None:
    """A store whose view is up to date knows which request ids are taken: it neither asks
    the database, batch after batch, nor makes a second task for one asked again."""
    store = await opened()
    look_ups = Calls(store, "_firsts")
    first, _ = await create_one(store, new_task("once"))
    made = await asyncio.gather(*(store.create([new_task(f"r{n}")], admit) for n in range(20)))
    assert all(created for ((_, created),) in made)
    assert await create_one(store, new_task("once")) == (first, False)
    assert look_ups.count == 0


async def test_a_store_reads_back_none_of_its_own_commits(
    opened: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every commit's notification reaches the store's own reader too, often before the
    writer has delivered the commit: the reader leaves those to the writer rather than read
    each change again from the database. Another store's commits it reads."""
    monkeypatch.setattr(postgres, "POLL_SECONDS", 3600.0)  # no read but on a wake-up
    store, other = await opened(), await opened()
    reads = Calls(store, "_read")
    made = await asyncio.gather(*(create_one(store, new_task(f"r{n}")) for n in range(20)))
    for task, _ in made[:5]:
        await store.update(task.task_id, start)
        await store.update(task.task_id, complete)
    assert reads.count == 0
    theirs, _ = await create_one(other, new_task("theirs"))
    await asyncio.wait_for(reads.done.wait(), 30)
    assert await store.get(theirs.task_id) == theirs


async def test_a_request_id_taken_by_a_task_the_view_has_not_read_is_looked_up_and_given_back(
    opened: Opener,
) -> None:
    """Another store's task holds the request id, and this store has not read it (its reader
    waits): the new task's row fails the write on the unique index, and the batch is run
    again, looking the request id up, at once: the first task comes back, and nothing is
    made twice."""
    a, b = await opened(), await opened()
    reading = asyncio.Event()
    read = b._read

    async def held() -> None:
        await reading.wait()
        await read()

    b._read = held  # before a's create, whose notice would wake it
    b._behind = lambda: False  # as if that notice had not come yet
    first, _ = await create_one(a, new_task("nightly"))
    look_ups = Calls(b, "_firsts")
    again = asyncio.ensure_future(create_one(b, new_task("nightly")))
    await asyncio.wait_for(look_ups.done.wait(), 30)
    reading.set()  # the answer waits for the reader to deliver the first task
    assert await again == (first, False)
    assert look_ups.count == 1
    assert await b.list(TaskFilter(), 0, 10) == ([first], await b.revision())


async def test_request_ids_are_looked_up_by_their_index_not_by_reading_the_table(
    postgres_url: str, opened: Opener
) -> None:
    """A create's look-up of the tasks that hold its request ids uses the index of request
    ids (a partial index, which the query must name the condition of): reading the whole
    table instead costs every batch of creates the size of the queue."""
    store = await opened()
    await store.create([new_task(f"r{n}") for n in range(5000)], admit)
    await sql(postgres_url, "ANALYZE conveyor_tasks")
    keys = [f"r{n}" for n in range(0, 5000, 500)]
    plan = await sql(postgres_url, f"EXPLAIN (FORMAT JSON) {_FIRSTS}", [""] * len(keys), keys)
    assert "conveyor_tasks_request" in plan
    assert "Seq Scan" not in plan


async def test_a_batch_finds_the_rows_it_changes_by_index_as_the_table_grows(
    postgres_url: str, opened: Opener
) -> None:
    """The statement that writes a batch is prepared once per connection, and its generic
    plan made with the statistics of the moment: analyzed while the table was small (as
    autovacuum does after its first 50 rows), a plan that reads the whole table to join the
    tasks it changes is the cheapest, and it would go on reading it, for every batch, as
    the table grows. It must find them through their key."""
    store = await opened()
    await store.create([new_task(f"r{n}") for n in range(50)], admit)
    await sql(postgres_url, "ANALYZE")
    async with store.pool.acquire() as connection:
        nodes = await generic_plan(connection, _WRITE, *store._arrays(_Batch({})))
    assert_found_by(nodes, "conveyor_tasks_pkey")


async def test_the_reader_finds_the_changes_after_its_revision_by_index_as_the_table_grows(
    postgres_url: str, opened: Opener
) -> None:
    """As a batch's statement, the reader's (on a connection of its own): a plan that reads
    the whole changes table would do so at every read."""
    store = await opened()
    store._read = nothing  # its connection is the test's
    await store.create([new_task(f"r{n}") for n in range(50)], admit)
    await sql(postgres_url, "ANALYZE")
    assert store._listener is not None
    nodes = await generic_plan(store._listener, _READ, 10, READ_LIMIT, [], [])
    assert_found_by(nodes, "conveyor_changes_pkey")


async def nothing() -> None:
    pass


async def generic_plan(connection: Any, statement: str, *args: Any) -> list[dict[str, Any]]:
    """The nodes of the plan that a prepared statement settles on (its generic plan)."""
    async with connection.transaction():
        await connection.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        plan = await connection.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *args)
    return list(plan_nodes(json.loads(plan)[0]["Plan"]))


def assert_found_by(nodes: list[dict[str, Any]], index: str) -> None:
    """The plan reads no table whole, and uses `index`."""
    assert [node for node in nodes if node["Node Type"] == "Seq Scan"] == []
    assert any(node.get("Index Name") == index for node in nodes)


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A plan's node and every node under it."""
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


async def test_changes_since_on_another_store_resumes_without_a_gap(opened: Opener) -> None:
    """As a Watch resumes on another replica: the history from the revision it had, then
    what that replica's feed delivers after it."""
    a, b = await opened(), await opened()
    first, _ = await create_one(a, new_task())
    resume_at = await a.revision()
    await a.update(first.task_id, start)
    second, _ = await create_one(a, new_task())
    await a.update(first.task_id, complete)
    latest = await a.revision()
    followed: list[Change] = []
    b.feed.follow(followed.append)
    history = list(await b.changes_since(resume_at, TaskFilter()))  # b may lag behind a
    await b.changes_since(latest, TaskFilter())  # ahead of b: it catches up first
    last = history[-1].revision if history else resume_at
    changes = history + [c for c in followed if c.revision > last]
    assert [c.revision for c in changes] == list(range(resume_at + 1, latest + 1))
    assert [c.task.task_id for c in changes] == [first.task_id, second.task_id, first.task_id]
    assert [c.revision for c in await b.changes_since(resume_at, TaskFilter())] == [2, 3, 4]


async def test_a_tenant_s_rate_is_one_bucket_for_every_store(
    postgres_url: str, opened: Opener
) -> None:
    a, b = await opened(), await opened()
    limits = TenantLimits(rate=0.01, burst=3)  # a token every 100 s: none comes back here
    rates_a, rates_b = Tenants(limits), Tenants(limits)  # each server's, alike
    await a.create([new_task(tenant="t"), new_task(tenant="t")], admit, rates_a)
    await b.create([new_task(tenant="t")], admit, rates_b)  # the burst's last token
    told: list[float] = []
    for store, rates in ((a, rates_a), (b, rates_b)):
        with pytest.raises(TenantLimitReached) as refused:
            await store.create([new_task(tenant="t")], admit, rates)
        told.append(refused.value.retry_after)
    # The next token comes in 100 s: the first refused is told so, the second (on the
    # other store) to come after it.
    assert told == [pytest.approx(100, abs=1), pytest.approx(200, abs=1)]
    await b.create([new_task(tenant="u")], admit, rates_b)  # another tenant's is its own
    await a.create([new_task(tenant="free")], admit, Tenants())  # no rate: no bucket
    counts = "SELECT tenant, count(*) FROM conveyor_tasks GROUP BY tenant ORDER BY tenant"
    assert await rows(postgres_url, counts) == [("free", 1), ("t", 3), ("u", 1)]
    buckets = "SELECT tenant FROM conveyor_tenant_buckets ORDER BY tenant"
    assert await rows(postgres_url, buckets) == [("t",), ("u",)]


async def test_a_request_id_another_store_took_meanwhile_costs_no_token(opened: Opener) -> None:
    a, b = await opened(), await opened()
    limits = TenantLimits(rate=0.01, burst=2)
    rates_a, rates_b = Tenants(limits), Tenants(limits)
    # Sent to both at once, before either knows it: each inserts, the database keeps one.
    made = await asyncio.gather(
        a.create([new_task("nightly")], admit, rates_a),
        b.create([new_task("nightly")], admit, rates_b),
    )
    ((first, new_a),), ((second, new_b),) = made
    assert first.task_id == second.task_id
    assert sorted([new_a, new_b]) == [False, True]
    await b.create([new_task()], admit, rates_b)  # the second token was left
    with pytest.raises(TenantLimitReached):
        await a.create([new_task()], admit, rates_a)


async def test_each_replica_counts_the_watches_and_workers_the_others_published(
    opened: Opener,
) -> None:
    a, b = await opened(), await opened()
    limits = TenantLimits(max_watches=2, max_workers=1)
    on_a, on_b = Tenants(limits), Tenants(limits)
    usage_a, usage_b = SharedUsage(a, on_a, "a"), SharedUsage(b, on_b, "b")
    with on_a.watching("t"), on_a.connected("t"), on_b.watching("t"):
        assert await usage_a.publish()
        assert await usage_b.publish()  # b's written, a's read
        assert on_b.elsewhere == {"t": Usage(watches=1, workers=1)}
        with pytest.raises(TenantLimitReached, match=r"2 open watches \(1 on other servers\)"):
            _enter(on_b.watching("t"))
        with pytest.raises(TenantLimitReached, match="1 open workers"):
            _enter(on_b.connected("t"))
        _enter(on_b.watching("u"))  # another tenant's counts are its own
        assert await usage_a.publish()
        assert on_a.elsewhere == {"t": Usage(watches=1, workers=0)}
    assert await usage_a.publish()  # a closed them: once it says so, b counts none
    assert await usage_b.publish()
    assert on_b.elsewhere == {}
    _enter(on_b.connected("t"))


async def test_a_replica_taken_for_dead_writes_its_counts_again(opened: Opener) -> None:
    a, b = await opened(), await opened()
    on_a, on_b = Tenants(), Tenants()
    usage_a, usage_b = SharedUsage(a, on_a, "a"), SharedUsage(b, on_b, "b")
    hasty = SharedUsage(b, Tenants(), "hasty", stale=0.0)  # any replica not in its round
    with on_a.watching("t"):
        assert await usage_a.publish()
        assert await hasty.publish()  # takes a for dead, and deletes its rows
        assert await usage_b.publish()
        assert on_b.elsewhere == {}
        assert await usage_a.publish()  # a finds itself gone, and says everything again
        assert await usage_b.publish()
        assert on_b.elsewhere == {"t": Usage(watches=1, workers=0)}


async def test_a_replica_that_cannot_reach_the_database_keeps_the_counts_it_last_read(
    postgres_url: str, opened: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    parts = urllib.parse.urlsplit(postgres_url)
    with Proxy(f"{parts.hostname}:{parts.port}", opaque=True) as proxy:
        a = await opened()
        b = await opened(url=parts._replace(netloc=f"{parts.username}@{proxy.address}").geturl())
        on_a, on_b = Tenants(), Tenants()
        usage_a, usage_b = SharedUsage(a, on_a, "a"), SharedUsage(b, on_b, "b")
        with on_a.watching("t"):
            assert await usage_a.publish()
            assert await usage_b.publish()
        assert await usage_a.publish()  # a has closed it, but b cannot read that
        proxy.refuse()
        with caplog.at_level(logging.WARNING, "conveyord.store.postgres_usage"):
            assert not await usage_b.publish()
            assert not await usage_b.publish()
        warnings = [r.getMessage() for r in caplog.records if r.name.endswith("postgres_usage")]
        assert len(warnings) == 1  # said once
        assert "counting the other replicas' as last read" in warnings[0]
        assert on_b.elsewhere == {"t": Usage(watches=1, workers=0)}
        proxy.release()
        assert await eventually(usage_b.publish)  # once its pool connects again
        assert on_b.elsewhere == {}


def _enter(context: contextlib.AbstractContextManager[None]) -> None:
    """Enter a context and leave it at once: a limit's check alone."""
    with context:
        pass


async def test_a_store_whose_connections_are_killed_carries_on(
    postgres_url: str, opened: Opener
) -> None:
    store = await opened()
    seen: list[Change] = []
    store.feed.follow(seen.append)
    task, _ = await create_one(store, new_task())
    killed = await sql(
        postgres_url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    assert killed >= 2  # the reader's, and the pool's
    running = await store.update(task.task_id, start)  # written on a new connection
    other = await opened()  # a write from elsewhere reaches it through its new reader
    done = await other.update(task.task_id, complete)
    assert await store.changes_since(done.revision, TaskFilter()) == []
    assert [c.revision for c in seen] == [1, running.revision, done.revision]
    assert await store.get(task.task_id) == done


async def test_the_url_s_pool_size_is_conveyord_s_and_the_rest_goes_to_the_database(
    postgres_url: str,
) -> None:
    store = store_from_url(f"{postgres_url}?pool_size=2&application_name=replica-a")
    assert isinstance(store, PostgresStore)
    await store.open()
    try:
        await create_one(store, new_task())
        names = await sql(
            postgres_url,
            "SELECT array_agg(DISTINCT application_name) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name <> ''",
        )
        assert names == ["replica-a"]
    finally:
        await store.close()
    for wrong in ("0", "two", "1&pool_size=2"):
        with pytest.raises(ValueError, match="pool_size must be a whole number"):
            store_from_url(f"{postgres_url}?pool_size={wrong}")


async def test_a_store_that_claims_in_the_database_keeps_no_ready_queue(opened: Opener) -> None:
    """Its claims are made in SQL: a ready queue in memory would only ever grow (entries
    leave it only when picked)."""
    store = await opened()
    for _ in range(20):
        await create_one(store, new_task())
    assert store.queued == 20
    assert len(store._index.ready) == 0
