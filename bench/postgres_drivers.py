"""Which asyncio driver for the PostgreSQL store: asyncpg against psycopg 3 (as it comes, and in
its pipeline mode where that saves round trips) on what a task store sends, in one run; then
both as a PgBouncer before 1.21 in transaction mode needs them (no prepared statements).

The shapes: (a) a write, 16 at once: a transaction that inserts a task, bumps the store's
revision (one row, which every write locks) and inserts a change; (b) 1,000 tasks inserted in
one transaction, by executemany and by COPY; (c) claims, 16 at once: SELECT ... FOR UPDATE
SKIP LOCKED of 10 queued tasks, then an UPDATE of them; (d) a read of one task by its key,
16 at once. Each driver has a pool of 16 connections over TCP to a server of this run's own
(tests/postgres.py) on the servers' cores. Beside each rate is this process's CPU time per
call, the driver's own cost, which a rate hides where the server is the bottleneck.

Commits are not flushed to disk (fsync off, as in the tests): with them, this host's disk
set the write rate for both drivers alike, and moved it by a third between runs. Drivers
take turns, in rounds, each on a fresh copy of one prepared database; the best rate and the
least CPU of each over the rounds count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import asyncpg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from bench.harness import SERVER_CORES, Load, best, closed_loop, ms, ratio
from tests.postgres import PostgresServer

CONCURRENCY = 16
BATCH = 1000
CLAIM = 10
QUEUED = 200_000  # tasks in the prepared database, queued: what claims take and reads find
BODY = bytes(range(200))  # about the size of a small task's record
# The shapes each driver runs: the ways of its own (psycopg's pipeline mode changes nothing
# for a single statement, executemany or COPY; the PgBouncer set-ups only the statements').
ALL_SHAPES = frozenset({"read", "write", "insert", "copy", "claim"})
STATEMENTS = frozenset({"read", "write", "claim"})

SCHEMA = f"""
CREATE TABLE tasks (
    id bigint PRIMARY KEY,
    task_type text NOT NULL,
    status smallint NOT NULL,
    priority smallint NOT NULL,
    lease_owner text,
    lease_until double precision,
    body bytea NOT NULL
);
CREATE INDEX tasks_queued ON tasks (priority DESC, id) WHERE status = 0;
CREATE TABLE revision (id integer PRIMARY KEY, value bigint NOT NULL);
INSERT INTO revision VALUES (1, 0);
CREATE TABLE changes (revision bigint PRIMARY KEY, task_id bigint NOT NULL, body bytea NOT NULL);
INSERT INTO tasks (id, task_type, status, priority, body)
    SELECT n, 'noop', 0, n % 10 + 1, '\\x{BODY.hex()}' FROM generate_series(1, {QUEUED}) n
"""
COLUMNS = ("id", "task_type", "status", "priority", "body")
INSERT_TASK = (
    "INSERT INTO tasks (id, task_type, status, priority, body) VALUES ($1, $2, $3, $4, $5)"
)
BUMP = "UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value"
INSERT_CHANGE = "INSERT INTO changes (revision, task_id, body) VALUES ($1, $2, $3)"
SELECT_QUEUED = (
    "SELECT id FROM tasks WHERE status = 0 ORDER BY priority DESC, id LIMIT $1 "
    "FOR UPDATE SKIP LOCKED"
)
LEASE = "UPDATE tasks SET status = 1, lease_owner = $1, lease_until = $2 WHERE id = ANY($3)"
READ = (
    "SELECT id, task_type, status, priority, lease_owner, lease_until, body FROM tasks "
    "WHERE id = $1"
)

Row = tuple[int, str, int, int, bytes]


def percent_s(statement: str) -> str:
    """A statement with asyncpg's $1, $2... placeholders in psycopg's style (each once, in
    order, in these statements)."""
    return re.sub(r"\$\d+", "%s", statement)


class Driver(Protocol):
    """One way to send the shapes' statements."""

    name: str
    baseline: str  # the asyncpg set-up it is compared with ("" for asyncpg's own)
    shapes: frozenset[str]  # those measured with it

    def open(self, url: str) -> contextlib.AbstractAsyncContextManager[Driver]: ...
    async def write(self, task_id: int) -> None: ...
    async def insert(self, rows: Sequence[Row]) -> None: ...
    async def copy(self, rows: Sequence[Row]) -> None: ...
    async def claim(self, owner: str) -> int: ...
    async def read(self, task_id: int) -> None: ...


class Asyncpg:
    """asyncpg: a statement a round trip, each prepared once per connection and kept; or,
    without its statement cache (what a PgBouncer before 1.21 in transaction mode needs),
    described in a round trip of its own before every call."""

    def __init__(self, cache: bool = True) -> None:
        self.cache = cache
        self.name = "asyncpg" if cache else "asyncpg, no statement cache"
        self.baseline = ""
        self.shapes = ALL_SHAPES if cache else STATEMENTS
        self.pool: asyncpg.Pool | None = None

    @contextlib.asynccontextmanager
    async def open(self, url: str) -> AsyncIterator[Driver]:
        async with asyncpg.create_pool(
            url,
            min_size=CONCURRENCY,
            max_size=CONCURRENCY,
            statement_cache_size=100 if self.cache else 0,  # 100: asyncpg's default
        ) as self.pool:
            yield self
        self.pool = None

    def _pool(self) -> asyncpg.Pool:
        assert self.pool is not None
        return self.pool

    async def write(self, task_id: int) -> None:
        async with self._pool().acquire() as connection, connection.transaction():
            await connection.execute(INSERT_TASK, task_id, "noop", 0, 5, BODY)
            revision = await connection.fetchval(BUMP)
            await connection.execute(INSERT_CHANGE, revision, task_id, BODY)

    async def insert(self, rows: Sequence[Row]) -> None:
        async with self._pool().acquire() as connection, connection.transaction():
            await connection.executemany(INSERT_TASK, rows)

    async def copy(self, rows: Sequence[Row]) -> None:
        async with self._pool().acquire() as connection, connection.transaction():
            await connection.copy_records_to_table("tasks", records=rows, columns=COLUMNS)

    async def claim(self, owner: str) -> int:
        async with self._pool().acquire() as connection, connection.transaction():
            ids = [row[0] for row in await connection.fetch(SELECT_QUEUED, CLAIM)]
            await connection.execute(LEASE, owner, time.time() + 30, ids)
        return len(ids)

    async def read(self, task_id: int) -> None:
        await self._pool().fetchrow(READ, task_id)


class Psycopg:
    """psycopg 3 (its C implementation, psycopg[binary]) with psycopg-pool: a statement is
    prepared once it has run 5 times on a connection, or never (what a PgBouncer before 1.21
    in transaction mode needs). In pipeline mode, statements whose results are not needed yet
    go out together: in a write, BEGIN, the task and the revision, then the change and
    COMMIT; in a claim, BEGIN and the SELECT, then the UPDATE and COMMIT."""

    def __init__(self, pipeline: bool = False, prepare: bool = True) -> None:
        self.pipeline = pipeline
        self.prepare = prepare
        self.name = (
            "psycopg" + (" pipeline" if pipeline else "") + ("" if prepare else ", unprepared")
        )
        self.baseline = "asyncpg" if prepare else "asyncpg, no statement cache"
        # executemany pipelines its rows by itself, and COPY cannot run in pipeline mode.
        self.shapes = frozenset({"write", "claim"}) if pipeline else STATEMENTS
        if prepare and not pipeline:
            self.shapes = ALL_SHAPES
        self.pool: AsyncConnectionPool[AsyncConnection[TupleRow]] | None = None

    @contextlib.asynccontextmanager
    async def open(self, url: str) -> AsyncIterator[Driver]:
        # Transactions where asked for, as asyncpg's.
        settings: dict[str, Any] = {"autocommit": True}
        if not self.prepare:
            settings["prepare_threshold"] = None
        pool = AsyncConnectionPool(
            url, min_size=CONCURRENCY, max_size=CONCURRENCY, open=False, kwargs=settings
        )
        await pool.open(wait=True)
        self.pool = pool
        try:
            yield self
        finally:
            await pool.close()
            self.pool = None

    @contextlib.asynccontextmanager
    async def _transaction(self, pipeline: bool = True) -> AsyncIterator[AsyncConnection[TupleRow]]:
        """A connection of the pool in a transaction, in pipeline mode if so made (and not
        told otherwise)."""
        assert self.pool is not None
        async with self.pool.connection() as connection:
            if self.pipeline and pipeline:
                mode: contextlib.AbstractAsyncContextManager[object] = connection.pipeline()
            else:
                mode = contextlib.nullcontext()
            async with mode, connection.transaction():
                yield connection

    async def write(self, task_id: int) -> None:
        async with self._transaction() as connection:
            await connection.execute(_INSERT_TASK, (task_id, "noop", 0, 5, BODY))
            revision = await (await connection.execute(BUMP)).fetchone()
            assert revision is not None
            await connection.execute(_INSERT_CHANGE, (revision[0], task_id, BODY))

    async def insert(self, rows: Sequence[Row]) -> None:
        async with self._transaction(False) as connection, connection.cursor() as cursor:
            await cursor.executemany(_INSERT_TASK, rows)

    async def copy(self, rows: Sequence[Row]) -> None:
        async with self._transaction(False) as connection, connection.cursor() as cursor:
            statement = f"COPY tasks ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)"
            async with cursor.copy(statement) as copy:
                copy.set_types(["int8", "text", "int2", "int2", "bytea"])
                for row in rows:
                    await copy.write_row(row)

    async def claim(self, owner: str) -> int:
        async with self._transaction() as connection:
            selected = await connection.execute(_SELECT_QUEUED, (CLAIM,))
            ids = [row[0] for row in await selected.fetchall()]
            await connection.execute(_LEASE, (owner, time.time() + 30, ids))
        return len(ids)

    async def read(self, task_id: int) -> None:
        assert self.pool is not None
        async with self.pool.connection() as connection:
            await (await connection.execute(_READ, (task_id,))).fetchone()


_INSERT_TASK, _INSERT_CHANGE, _SELECT_QUEUED, _LEASE, _READ = map(
    percent_s, (INSERT_TASK, INSERT_CHANGE, SELECT_QUEUED, LEASE, READ)
)


def rows(first: int, count: int) -> list[Row]:
    return [(task_id, "noop", 0, 5, BODY) for task_id in range(first, first + count)]


@dataclasses.dataclass(frozen=True)
class Measured:
    """One shape's calls with one driver: their load, and this process's CPU time per call
    (the driver's own cost, which the rate hides where the server is the bottleneck)."""

    load: Load
    cpu_per_call: float


async def measure(driver: Driver, calls: dict[str, int]) -> dict[str, Measured]:
    """Every shape with one driver, on a database of its own (reads first, before the
    writes add to it; claims last, as they take what is queued)."""
    ids = itertools.count(QUEUED + 1)  # the writes' tasks
    batches = itertools.count(10**9, BATCH)  # the inserted batches', far from those
    measured: dict[str, Measured] = {}

    async def repeat(call: Callable[[], Awaitable[object]], count: int, at_once: int) -> Measured:
        await closed_loop(call, concurrency=at_once, calls=max(1, count // 10))  # warm-up
        cpu = time.process_time()
        load = await closed_loop(call, concurrency=at_once, calls=count)
        return Measured(load, (time.process_time() - cpu) / count)

    randoms = random.Random(1)
    shapes: list[tuple[str, Callable[[], Awaitable[object]], int]] = [
        ("read", lambda: driver.read(randoms.randint(1, QUEUED)), CONCURRENCY),
        ("write", lambda: driver.write(next(ids)), CONCURRENCY),
        ("insert", lambda: driver.insert(rows(next(batches), BATCH)), 1),
        ("copy", lambda: driver.copy(rows(next(batches), BATCH)), 1),
        ("claim", lambda: driver.claim("bench"), CONCURRENCY),
    ]
    for shape, call, at_once in shapes:
        if shape in driver.shapes:
            measured[shape] = await repeat(call, calls[shape], at_once)
    return measured


SHAPES = {  # key: (what a call is, how many rows a call counts for)
    "write": ("(a) write transactions/s, 16 at once", 1),
    "insert": ("(b) rows/s, 1,000 by executemany in one transaction", BATCH),
    "copy": ("(b) rows/s, 1,000 by COPY in one transaction", BATCH),
    "claim": (f"(c) claims/s ({CLAIM} tasks each), 16 at once", 1),
    "read": ("(d) reads by key/s, 16 at once", 1),
}


PSYCOPG = ("psycopg", "psycopg pipeline")


def drivers() -> list[Driver]:
    """asyncpg and psycopg as they come, psycopg in pipeline mode, then both as a PgBouncer
    before 1.21 in transaction mode needs them."""
    return [
        Asyncpg(), Psycopg(), Psycopg(pipeline=True),
        Asyncpg(cache=False), Psycopg(prepare=False),
    ]  # fmt: skip


async def run(quick: bool) -> dict[str, Any]:
    calls = (
        {"read": 1000, "write": 300, "insert": 3, "copy": 3, "claim": 300}
        if quick
        else {"read": 4000, "write": 1500, "insert": 10, "copy": 10, "claim": 1200}
    )
    rounds = 1 if quick else 2
    measured: dict[str, list[dict[str, Measured]]] = {}
    baselines: dict[str, str] = {}
    with PostgresServer(cpus=SERVER_CORES) as server:
        template = "bench_template"
        server.create_database(template)
        server.sql(SCHEMA, database=template)
        server.sql("VACUUM ANALYZE", database=template)  # not in SCHEMA's one transaction
        for _ in range(rounds):
            for driver in drivers():
                url = server.create_database(template=template)
                async with driver.open(url):
                    measured.setdefault(driver.name, []).append(await measure(driver, calls))
                baselines[driver.name] = driver.baseline
                server.drop_database(url.rsplit("/", 1)[1])
    results: dict[str, Any] = {"server_version": server.version}
    for shape, (_, per_call) in SHAPES.items():
        figures: dict[str, Any] = {}
        for name, of_driver in measured.items():
            if shape in of_driver[0]:
                of_shape = [each[shape] for each in of_driver]
                load = best([each.load for each in of_shape])
                figures[name] = {
                    "per_second": load.rate * per_call,
                    "p50": load.percentile(0.5),
                    "p99": load.percentile(0.99),
                    "cpu_per_call": min(each.cpu_per_call for each in of_shape),
                }
        for name, figure in figures.items():
            if baseline := figures.get(baselines[name]):
                figure["asyncpg_to_this"] = baseline["per_second"] / figure["per_second"]
                figure["cpu_to_asyncpg"] = figure["cpu_per_call"] / baseline["cpu_per_call"]
        # asyncpg against psycopg at its best (in pipeline mode where that is faster).
        psycopg = max(figures[name]["per_second"] for name in PSYCOPG if name in figures)
        figures["asyncpg_to_psycopg"] = figures["asyncpg"]["per_second"] / psycopg
        results[shape] = figures
    return results


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [[
        "shape", "driver", "per second", "p50", "p99", "client CPU per call",
        "asyncpg's rate / this", "CPU / asyncpg's",
    ]]  # fmt: skip
    for shape, (title, _) in SHAPES.items():
        for name, figure in results[shape].items():
            if not isinstance(figure, dict):
                continue
            compared = "asyncpg_to_this" in figure
            rows.append([
                title, name, f"{figure['per_second']:,.0f}", ms(figure["p50"]), ms(figure["p99"]),
                f"{figure['cpu_per_call'] * 1e6:,.0f} µs",
                ratio(figure["asyncpg_to_this"]) if compared else "",
                ratio(figure["cpu_to_asyncpg"]) if compared else "",
            ])  # fmt: skip
            title = ""
    return rows
