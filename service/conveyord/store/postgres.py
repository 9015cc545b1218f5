"""The shared store: tasks in a PostgreSQL database that several conveyord replicas use at once.

Each replica keeps the committed view in memory, as the SQLite store does, and serves Get,
List, Watch and the counts from it; the database is the arbiter of every write and the
source of every change. One writer per store runs the pending operations in batches, each
batch one transaction (group commit): it locks the rows it changes, applies each operation
to the task's latest state, claims with FOR UPDATE SKIP LOCKED, and last takes the next
revisions from a one-row counter whose lock orders the commits of every replica. One change
reader per store reads the changes table in revision order, this replica's changes and the
others', and applies each to the views and publishes it on the feed; a write is answered
once it is delivered, so a replica reads its own writes. (When a batch's revisions come
right after every one delivered, as they do unless another replica committed meanwhile, the
writer delivers them itself at its commit, and the reader passes over them.)

Schedules are changed the same way: a change is an operation of the writer's, applied to
the schedule's latest row, and written to the changes table with a revision of its own, from
which every replica's reader applies it to its schedule book. The revisions of the task
changes that the feed delivers then have gaps where schedules changed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

import asyncpg

from conveyord import lifecycle
from conveyord.lifecycle import Lease, new_lease_id
from conveyord.model import Change, ChangeKind, Task, TaskFilter
from conveyord.schedules.model import Schedule
from conveyord.store.base import (
    Claim,
    Mutation,
    RequestIdReused,
    StoreFailed,
    StoreOpenError,
    TaskNotFound,
)
from conveyord.store.codec import decode, decode_attempt, encode, encode_attempt
from conveyord.store.memory import (
    DEFAULT_AGING_RATE,
    DEFAULT_HISTORY_AGE,
    DEFAULT_HISTORY_SIZE,
    MAX_KEPT_ATTEMPTS,
    MemoryStore,
)
from conveyord.store.postgres_schema import CREATED, MIGRATIONS, RUNNING, fix_aging_rate, upgrade
from conveyord.store.schedules import ScheduleBook, ScheduleMutation, ScheduleNotFound
from conveyord.store.schedules import decode as decode_schedule
from conveyord.store.schedules import encode as encode_schedule
from conveyord.tenants import Bucket, Tenants

if TYPE_CHECKING:
    from conveyord.store.postgres_schema import Connection

log = logging.getLogger(__name__)

CHANNEL = "conveyor_changes"  # NOTIFY'd with the last revision of each commit
POLL_SECONDS = 1.0  # the reader reads at least this often, a notification missed or not
READ_LIMIT = 1000  # changes read at once
CATCH_UP_SECONDS = 5.0  # the longest a read waits for the reader to reach the database
CONNECT_SECONDS = 10.0
RECONNECT_SECONDS = 10.0  # the reader's connection is tried again this long, then it fails
RETRIES = 3  # a batch that fails before its COMMIT is run again this many times
MAX_BATCH = 1000  # operations in one transaction
TRIM_EVERY = 1000  # changes left behind the history before they are deleted from the table
# A change stays in the table at least this long (by its `at`), whatever the history of the
# replica that trims: another replica whose reader is less far behind (paused, on a slow
# host, its connection being made again) still reads it; one further behind finds the gap.
KEEP_CHANGES_SECONDS = 60.0
CLAIM_EXTRA = 16  # rows a claim fetches beyond twice its count, for its limits and turns
DEFAULT_POOL_SIZE = 4

# A database error: the batch is run again (deadlock, serialization, a lost connection).
_DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # a connection left broken by one of those
    OSError,
)
# The connection was lost: a COMMIT sent may or may not have been carried out.
_LOST = (
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # the server shut down, or killed it
)
_TASK_ROW = "task_id, seq, revision, data"
_SCHEDULE_ROW = "schedule_id, seq, revision, data"
# The kinds of a schedule's changes in the changes table, beside the tasks' (ChangeKind).
SCHEDULE_CHANGED = 16
SCHEDULE_REMOVED = 17

# --- the statements -----------------------------------------------------------------

_LOCK = f"""
SELECT {_TASK_ROW} FROM conveyor_tasks WHERE task_id = ANY($1::text[])
ORDER BY task_id FOR UPDATE
"""
# The tasks that hold the request ids new tasks ask for, found by the index of request ids
# (the WHERE repeats its condition, without which the planner reads the whole table). A new
# task's row is written with the batch's changes: if another replica takes its request id
# meanwhile, that insert fails on the unique index, and the batch is run again, to find the
# first task here.
_FIRSTS = f"""
SELECT t.tenant, t.request_id, {", ".join("t." + c for c in _TASK_ROW.split(", "))}
FROM conveyor_tasks t JOIN unnest($1::text[], $2::text[]) AS k(tenant, request_id)
    USING (tenant, request_id)
WHERE t.request_id <> ''
"""
_DELETE_TASKS = "DELETE FROM conveyor_tasks WHERE task_id = ANY($1::text[])"
_DELETE_ATTEMPTS = "DELETE FROM conveyor_attempts WHERE task_id = ANY($1::text[])"
# The store's statements find their rows by key, through an index. A prepared statement's
# generic plan, made once with the statistics of the moment (a table analyzed while small),
# would otherwise read the whole table (the tasks a batch changes, the changes after a
# revision), and go on doing so at every batch and every read as the table grows: no
# sequential scan where an index serves (but for the snapshot that reads whole tables,
# `_load`).
_SESSION_SETTINGS = {"enable_seqscan": "off"}
# The end of a batch, in one statement while the counter's row is locked: the revisions
# taken, the changes, the ended attempts (each task keeping its latest MAX_KEPT_ATTEMPTS:
# the `keep` latest before, which the DELETE sees, and the new ones), the new tasks' rows
# and the changed ones, the schedules' rows, the readers told. A negative seq or revision is
# an offset from the first revision taken (base + 1 is -1). Each row's data is that of its
# latest change (`n`, the change's place in the batch): sent once, with the changes.
_WRITE = """
WITH bump AS (
    UPDATE conveyor_state SET revision = revision + $1 WHERE id = 1
    RETURNING revision - $1 AS base
), c AS (
    SELECT * FROM unnest($2::smallint[], $3::float8[], $4::text[], $5::bigint[],
        $6::bigint[], $7::text[], $8::text[]) WITH ORDINALITY
        AS c(kind, at, task_id, seq, task_revision, data, ended, n)
), written AS (
    INSERT INTO conveyor_changes (revision, kind, at, task_id, seq, task_revision, data, ended)
    SELECT base + n, kind, at, task_id,
        CASE WHEN seq < 0 THEN base - seq ELSE seq END,
        CASE WHEN task_revision < 0 THEN base - task_revision ELSE task_revision END,
        data, ended
    FROM bump, c
), attempts AS (
    INSERT INTO conveyor_attempts (task_id, revision, data)
    SELECT task_id, base + n, ended FROM bump, c WHERE ended IS NOT NULL
), trimmed AS (
    DELETE FROM conveyor_attempts a USING unnest($25::text[], $26::int[]) AS t(task_id, keep)
    WHERE a.task_id = t.task_id AND a.revision <= (
        SELECT b.revision FROM conveyor_attempts b WHERE b.task_id = t.task_id
        ORDER BY b.revision DESC OFFSET t.keep LIMIT 1)
), made AS (
    INSERT INTO conveyor_tasks (task_id, seq, tenant, request_id, request_hash, task_type,
        status, dispatch_key, runnable_at, revision, data)
    SELECT c.task_id, base - c.seq, u.tenant, u.request_id, u.request_hash, u.task_type,
        u.status, u.dispatch_key, u.runnable_at, base + u.n, c.data
    FROM bump, unnest($9::bigint[], $10::smallint[], $11::float8[], $12::float8[],
        $13::text[], $14::text[], $15::bytea[], $16::text[])
        AS u(n, status, dispatch_key, runnable_at, tenant, request_id, request_hash, task_type)
    JOIN c ON c.n = u.n
), tasks AS (
    UPDATE conveyor_tasks AS t SET
        revision = base + u.n, status = u.status, dispatch_key = u.dispatch_key,
        runnable_at = u.runnable_at, data = c.data
    FROM bump, unnest($17::text[], $18::bigint[], $19::smallint[], $20::float8[],
        $21::float8[]) AS u(task_id, n, status, dispatch_key, runnable_at)
    JOIN c ON c.n = u.n
    WHERE t.task_id = u.task_id
), schedules AS (
    UPDATE conveyor_schedules AS s SET
        seq = CASE WHEN u.seq < 0 THEN base - u.seq ELSE u.seq END,
        revision = base + u.n, data = c.data
    FROM bump, unnest($22::text[], $23::bigint[], $24::bigint[]) AS u(schedule_id, seq, n)
    JOIN c ON c.n = u.n
    WHERE s.schedule_id = u.schedule_id
)
SELECT base, pg_notify($27, (base + $1)::text)::text FROM bump
"""
_LOCK_SCHEDULES = f"""
SELECT {_SCHEDULE_ROW} FROM conveyor_schedules WHERE schedule_id = ANY($1::text[])
ORDER BY schedule_id FOR UPDATE
"""
# A new schedule's row, its request id taken first (the rest comes with the changes).
_INSERT_SCHEDULE = """
INSERT INTO conveyor_schedules (schedule_id, tenant, request_id, seq, revision, data)
VALUES ($1, $2, $3, 0, 0, '')
ON CONFLICT (tenant, request_id) WHERE request_id <> '' DO NOTHING
RETURNING schedule_id
"""
_FIRST_SCHEDULE = f"""
SELECT {_SCHEDULE_ROW} FROM conveyor_schedules WHERE tenant = $1 AND request_id = $2
"""
_DELETE_SCHEDULES = "DELETE FROM conveyor_schedules WHERE schedule_id = ANY($1::text[])"
# The changes after a revision, in order; those of this replica's batches not yet read back
# (the ranges $3 to $4) without their data, which it keeps.
_READ = """
SELECT c.revision, kind, at, task_id, seq, task_revision,
    CASE WHEN r.first IS NULL THEN data END AS data,
    CASE WHEN r.first IS NULL THEN ended END AS ended
FROM conveyor_changes c
    LEFT JOIN unnest($3::bigint[], $4::bigint[]) AS r(first, last)
    ON c.revision BETWEEN r.first AND r.last
WHERE c.revision > $1 ORDER BY c.revision LIMIT $2
"""
# Only an unbroken run from the oldest change: `at` is each writer's own clock, not in
# revision order across replicas, and a hole would fail a replica reading past it.
_TRIM_CHANGES = """
DELETE FROM conveyor_changes WHERE revision IN (
    SELECT revision FROM conveyor_changes WHERE revision <= $1 AND revision < coalesce(
        (SELECT min(revision) FROM conveyor_changes WHERE at >= $2), $1 + 1)
    ORDER BY revision LIMIT 10000)
"""


# --- the operations a batch runs ----------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Op:
    """One call waiting for the writer; its future gets what the call returns."""

    future: asyncio.Future[Any] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()

    def locks(self) -> Iterable[str]:
        """The ids of the tasks whose rows it changes (claims and creates find their own)."""
        return ()


@dataclasses.dataclass(eq=False)
class _Create(_Op):
    tasks: Sequence[Task]  # the tasks not known to the cache when the call came
    # Each task's data (codec.encode), made by the call rather than by the writer: while
    # the database writes one batch, the calls of the next are made ready beside it.
    encoded: Sequence[str]
    rates: Tenants | None = None  # what its new tasks are charged to (None: not charged)


@dataclasses.dataclass(eq=False)
class _Update(_Op):
    task_id: str
    mutation: Mutation
    quiet: bool

    def locks(self) -> Iterable[str]:
        return (self.task_id,)


@dataclasses.dataclass(eq=False)
class _Remove(_Op):
    task_id: str
    check: Callable[[Task], None]

    def locks(self) -> Iterable[str]:
        return (self.task_id,)


@dataclasses.dataclass(eq=False)
class _UpdateMany(_Op):
    task_ids: Sequence[str]
    task_filter: TaskFilter
    mutation: Mutation

    def locks(self) -> Iterable[str]:
        return self.task_ids


@dataclasses.dataclass(eq=False)
class _RemoveFinished(_Op):
    task_ids: Sequence[str]
    finished_before: float

    def locks(self) -> Iterable[str]:
        return self.task_ids


@dataclasses.dataclass(eq=False)
class _ClaimOp(_Op):
    request: Claim


@dataclasses.dataclass(eq=False)
class _Rows(_Op):
    """Task types to declare."""

    task_types: AbstractSet[str] = frozenset()


@dataclasses.dataclass(eq=False)
class _ScheduleOp(_Op):
    """A change of one schedule (the id of a new one is its own)."""

    schedule_id: str


@dataclasses.dataclass(eq=False)
class _ScheduleCreate(_ScheduleOp):
    schedule: Schedule


@dataclasses.dataclass(eq=False)
class _ScheduleUpdate(_ScheduleOp):
    mutation: ScheduleMutation


@dataclasses.dataclass(eq=False)
class _ScheduleDelete(_ScheduleOp):
    pass


@dataclasses.dataclass(eq=False)
class _StagedSchedule:
    """A schedule's change a batch made: its new state (its last, if removed), with a
    provisional revision until the batch's revisions are known."""

    schedule: Schedule
    removed: bool
    at: float
    offset: int = 0  # its place among the batch's changes, once the tasks' are all staged
    stamped: Schedule | None = None  # with its seq and revision, once they are known
    revision: int = 0  # the change's, once known


@dataclasses.dataclass(eq=False)
class _Staged:
    """A change a batch made: its place in the batch (1: the first revision it takes)."""

    kind: ChangeKind
    task: Task
    at: float
    ended: Any  # Attempt | None
    offset: int
    previous: int  # the revision of the task's change before, or (< 0) its offset here
    change: Change | None = None  # once its revision is known


Answer = Callable[[], Any]  # what an operation returns, once its changes have revisions


class _Batch:
    """What one transaction has read and changed so far: each task's latest state."""

    def __init__(self, cached: Mapping[str, Task]) -> None:
        self.cached = cached
        self.latest: dict[str, Task | None] = {}  # None: not there (removed, or never)
        self.seen = 0  # the highest revision read: answers wait until it is delivered
        self.changes: list[_Staged] = []
        self.created: dict[str, int] = {}  # task_id: the offset of the change creating it
        self.last: dict[str, int] = {}  # task_id: the offset of its latest change
        self.answers: list[tuple[_Op, Answer | None, BaseException | None]] = []
        self.deferred: list[_Op] = []  # to run in the next batch
        self.task_types: set[str] = set()
        # Each schedule's latest state (None: not there), and the schedules' changes.
        self.schedules: dict[str, Schedule | None] = {}
        self.schedule_changes: list[_StagedSchedule] = []
        self.schedule_created: dict[str, _StagedSchedule] = {}
        self.claimed: collections.Counter[str] = collections.Counter()  # claims by type, so far
        self.last_revision = 0  # that of the batch's last change, once written
        self.encoded: dict[str, tuple[Task, str]] = {}  # task_id: a state, and its data

    def adopt_schedule(self, record: asyncpg.Record, book: ScheduleBook) -> Schedule:
        """A schedule's row as a Schedule: the book's if it is the same."""
        schedule_id, revision = record["schedule_id"], record["revision"]
        cached = book.get(schedule_id)
        if cached is not None and cached.revision == revision:
            schedule = cached
        else:
            schedule = _schedule_of(record, revision)
        self.schedules[schedule_id] = schedule
        self.seen = max(self.seen, revision)
        return schedule

    def stage_schedule(self, schedule: Schedule, at: float, *, removed: bool = False) -> Answer:
        """Stage a schedule's change; its answer (the schedule once stamped). A new state
        is given a provisional revision of its own (negative), so that a later mutation in
        the batch that expects the state before it (rules.decide) does not match it."""
        created = not removed and self.schedules.get(schedule.schedule_id) is None
        if not removed:
            schedule = schedule.evolve(revision=-1 - len(self.schedule_changes))
        entry = _StagedSchedule(schedule, removed, at)
        self.schedule_changes.append(entry)
        if created:
            self.schedule_created[schedule.schedule_id] = entry
        self.schedules[schedule.schedule_id] = None if removed else schedule
        return lambda: entry.stamped

    def made(self, schedule: Schedule) -> _StagedSchedule:
        """The change of this batch that made a schedule's state (its revision provisional)."""
        return self.schedule_changes[-1 - schedule.revision]

    def schedule_answer(self, schedule: Schedule) -> Answer:
        """What to answer with a schedule the batch found (maybe changed earlier in it)."""
        if schedule.revision >= 0:
            return lambda: schedule
        entry = self.made(schedule)
        return lambda: entry.stamped

    def adopt(self, record: asyncpg.Record) -> Task:
        """A row read from the database as a Task: the cached one if it is the same."""
        task_id, revision = record["task_id"], record["revision"]
        cached = self.cached.get(task_id)
        fresh = cached is not None and cached.revision == revision
        task = cached if fresh and cached is not None else _task_of(record)
        self.latest[task_id] = task
        self.seen = max(self.seen, revision)
        return task

    def stage(self, kind: ChangeKind, task: Task, at: float) -> tuple[ChangeKind, Task, Any]:
        """A change to stage once its operation succeeds, with the attempt it ends."""
        old = self.latest.get(task.task_id)
        ended = None
        if old is not None and old.lease_id and kind is not ChangeKind.REMOVED:
            ended = lifecycle.ended_attempt(old, task)
        # The task's change before: one of this batch (by its offset), or its revision.
        before = self.last.get(task.task_id, 0)
        previous = -before if before else (0 if old is None else old.revision)
        return kind, task, (at, ended, previous)

    def apply(self, staged: Iterable[tuple[ChangeKind, Task, Any]]) -> None:
        for kind, task, (at, ended, previous) in staged:
            entry = _Staged(kind, task, at, ended, len(self.changes) + 1, previous)
            self.changes.append(entry)
            if kind is ChangeKind.REMOVED:
                self.latest[task.task_id] = None
            else:
                if self.latest.get(task.task_id) is None and task.task_id not in self.last:
                    self.created.setdefault(task.task_id, entry.offset)
                self.latest[task.task_id] = task
                self.last[task.task_id] = entry.offset


class _Retry(Exception):
    """A batch failed before its COMMIT was sent: nothing of it was written."""


class PostgresStore(MemoryStore):
    """A MemoryStore whose every change is decided by a PostgreSQL database that several
    stores share, and read back from it in revision order. (Its `queued` counts come from
    memory: what other replicas queued or took in the last few milliseconds and this one has
    not read back yet is not counted, or still counted.)"""

    shared = True
    claims_in_memory = False

    def __init__(
        self,
        url: str,
        *,
        history_size: int = DEFAULT_HISTORY_SIZE,
        history_age: float = DEFAULT_HISTORY_AGE,
        aging_rate: float = DEFAULT_AGING_RATE,
        pool_size: int = DEFAULT_POOL_SIZE,
        migrations: Sequence[str] = MIGRATIONS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"clock": clock} if clock else {}
        super().__init__(
            history_size=history_size, history_age=history_age, aging_rate=aging_rate, **kwargs
        )
        self.url = url
        self.where = redacted(url)
        self._aging_rate = aging_rate
        self._pool_size = pool_size
        self._migrations = tuple(migrations)
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._pending: list[_Op] = []
        self._writing: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap by revision
        self._waiter_ids = itertools.count()
        self._own: dict[int, Change] = {}  # revision: this store's change, not yet read back
        self._failure: Exception | None = None
        self._heard = 0  # the latest revision known to be committed (a notification's, or
        # one that a batch of this store's or a catch-up saw): the reader reads up to it
        self._trimmed = 0  # changes up to this revision were trimmed from the table (but
        # those younger than KEEP_CHANGES_SECONDS, which a later trim deletes)
        self._served: dict[str, int] = {}  # tenant: the turn of claims it was last served at
        self._turns = itertools.count(1)
        self._own_schedules: dict[int, Schedule] = {}  # as _own, for schedules' changes
        self._own_batches: dict[int, int] = {}  # the last revision of each: the first
        self.schedules = ScheduleBook(decide=_SharedSchedules(self))

    # -- opening and closing ---------------------------------------------------------

    async def open(self) -> None:
        """Connect, bring the schema up to date, load a consistent snapshot, and start
        reading the changes that come after it."""
        try:
            self._listener = await self._connect_listener()
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self._pool_size, timeout=CONNECT_SECONDS,
                reset=_rolled_back, server_settings=_SESSION_SETTINGS,
            )  # fmt: skip
            async with self._pool.acquire() as connection:
                await upgrade(connection, self.where, self._migrations)
                await fix_aging_rate(connection, self.where, self._aging_rate)
            await self._listener.add_listener(CHANNEL, self._notified)  # before the snapshot
            await self._load()
        except StoreOpenError:
            await self._release()
            raise
        except (*_DB_ERRORS, ValueError) as error:
            await self._release()
            raise StoreOpenError(f"cannot open the store at {self.where}: {error}") from error
        self._reading = asyncio.create_task(self._read_forever())
        log.info(
            "store %s: %d tasks, revision %d, %d changes of history",
            self.where, len(self._tasks), self._revision, len(self._history),
        )  # fmt: skip

    async def _connect_listener(self) -> asyncpg.Connection:
        """The connection that listens for the commits' notifications and reads the
        changes."""
        return await asyncpg.connect(
            self.url, timeout=CONNECT_SECONDS, server_settings=_SESSION_SETTINGS
        )

    async def _load(self) -> None:
        """Fill the views from one REPEATABLE READ snapshot of the database."""
        assert self._pool is not None
        async with (
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            await connection.execute("SET LOCAL enable_seqscan = on")  # whole tables
            revision = await connection.fetchval("SELECT revision FROM conveyor_state")
            tasks = await connection.fetch(f"SELECT {_TASK_ROW} FROM conveyor_tasks")
            changes = await connection.fetch(_READ, 0, None, [], [])
            attempts = await connection.fetch(
                "SELECT task_id, data FROM conveyor_attempts ORDER BY task_id, revision"
            )
            types = await connection.fetch("SELECT task_type FROM conveyor_task_types")
            schedules = await connection.fetch(f"SELECT {_SCHEDULE_ROW} FROM conveyor_schedules")
        try:
            self._declared = {row[0] for row in types}
            self.schedules.load([_schedule_of(row, row["revision"]) for row in schedules])
            self._restore(
                [_task_of(row) for row in tasks],
                [_change_of(row) for row in changes if row["kind"] < SCHEDULE_CHANGED],
                revision,
                revision,
                [(row[0], decode_attempt(row[1])) for row in attempts],
            )
        except (ValueError, KeyError, TypeError) as error:
            raise StoreOpenError(f"the store at {self.where} is corrupt: {error}") from error
        self._history.trim()
        self._trimmed = self._history.compacted

    async def close(self) -> None:
        """Finish the writes under way and their answers, stop reading, and disconnect;
        safe to call twice."""
        if self._writing is not None and not self._writing.done():
            await asyncio.wait({self._writing})
        waiting = [future for _, _, future in self._waiters if not future.done()]
        if waiting and self._reading is not None and not self._reading.done():
            await asyncio.wait(waiting, timeout=CATCH_UP_SECONDS)
        if self._reading is not None:
            self._stopping = True  # not a cancel: asyncpg's and wait_for's may swallow it
            self._wake.set()
            _, running = await asyncio.wait({self._reading}, timeout=CONNECT_SECONDS)
            for task in running:
                task.cancel()
            self._reading = None
        await self._release()

    async def _release(self) -> None:
        listener, pool, self._listener, self._pool = self._listener, self._pool, None, None
        if listener is not None:
            with contextlib.suppress(*_DB_ERRORS):
                await asyncio.wait_for(listener.close(), CONNECT_SECONDS)
            listener.terminate()
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), CONNECT_SECONDS)
            except (*_DB_ERRORS, TimeoutError):
                pool.terminate()

    # -- reads -------------------------------------------------------------------------

    async def revision(self) -> int:
        """The latest revision this store's feed has delivered (not the database's, which
        may be ahead: a heartbeat must not carry a revision its watchers were not given)."""
        return self._revision

    async def get(self, task_id: str) -> Task | None:
        """From memory; a task not there may have just been made on another replica: the
        reader catches up with the database first."""
        task = self._tasks.get(task_id)
        if task is None:
            await self._catch_up()
            task = self._tasks.get(task_id)
        return task

    async def attempts(self, task_id: str) -> Sequence[Any]:
        if task_id not in self._tasks:
            await self._catch_up()
        return await super().attempts(task_id)

    async def changes_since(self, revision: int, task_filter: TaskFilter) -> Sequence[Change]:
        """From memory, once the reader has caught up if `revision` is ahead of it (another
        replica answered with it)."""
        if revision > self._revision:
            await self._catch_up()
        return await super().changes_since(revision, task_filter)

    async def declared_task_types(self) -> frozenset[str]:
        """Every replica's: read from the database."""
        pool = self._usable_pool()
        rows = await pool.fetch("SELECT task_type FROM conveyor_task_types")
        self._declared |= {row[0] for row in rows}
        return frozenset(self._declared)

    async def _catch_up(self) -> None:
        """Wait (a bounded time) until the reader has delivered what the database holds now;
        StoreFailed once the store has failed (its view no longer follows the database: a
        task it does not know may be in the changes it missed)."""
        if self._failure is not None:
            raise StoreFailed(f"the store stopped: {self._failure}")
        if self._pool is None:
            return
        try:
            current = await self._pool.fetchval("SELECT revision FROM conveyor_state")
        except _DB_ERRORS as error:
            log.warning("store %s: cannot read the revision: %s", self.where, error)
            return
        self._heard = max(self._heard, current)
        self._wake.set()
        delivered = self._delivered(current)
        await asyncio.wait({delivered}, timeout=CATCH_UP_SECONDS)
        if delivered.done():
            delivered.result()  # StoreFailed, if the store failed meanwhile

    @property
    def pool(self) -> asyncpg.Pool:
        """The store's connections, for what a replica keeps in the database beside the
        tasks (its usage of the tenants' limits: postgres_usage.py); StoreFailed once the
        store failed."""
        return self._usable_pool()

    def _usable_pool(self) -> asyncpg.Pool:
        if self._failure is not None:
            raise StoreFailed(f"the store stopped after a failed write: {self._failure}")
        assert self._pool is not None, "the store is not open"
        return self._pool

    # -- writes ------------------------------------------------------------------------

    async def create(
        self,
        tasks: Sequence[Task],
        admit: Callable[[Sequence[Task]], None],
        rates: Tenants | None = None,
    ) -> list[tuple[Task, bool]]:
        """As MemoryStore's, the tokens of the tenants' rates taken from the buckets in the
        database (`_charge`)."""
        known = [self._known_request(task) for task in tasks]
        new = [task for task, first in zip(tasks, known, strict=True) if first is None]
        admit(new)
        created: list[tuple[Task, bool]] = (
            await self._submit(_Create(new, [encode(task) for task in new], rates)) if new else []
        )
        made = iter(created)
        return [next(made) if first is None else (first, False) for first in known]

    async def update(self, task_id: str, mutation: Mutation, *, quiet: bool = False) -> Task:
        task: Task = await self._submit(_Update(task_id, mutation, quiet))
        return task

    async def remove(self, task_id: str, check: Callable[[Task], None]) -> Change:
        change: Change = await self._submit(_Remove(task_id, check))
        return change

    async def remove_finished(self, finished_before: float, limit: int) -> int:
        task_ids: list[str] = []
        while self._finished and len(task_ids) < limit and self._finished[0][0] < finished_before:
            _, task_id = self._finished.popleft()
            task = self._tasks.get(task_id)
            if task is not None and task.terminal:
                task_ids.append(task_id)
        if not task_ids:
            return 0
        removed: int = await self._submit(_RemoveFinished(task_ids, finished_before))
        return removed

    async def claim(self, request: Claim) -> list[Task]:
        self._index.promote(request.now, self._working)  # keeps next_wakeup from going stale
        claimed: list[Task] = await self._submit(_ClaimOp(request))
        return claimed

    async def update_where(self, task_filter: TaskFilter, mutation: Mutation) -> list[Task]:
        changed: list[Task] = []
        async for chunk in self._scan(task_filter):
            if chunk:
                ids = [task.task_id for task in chunk]
                changed.extend(await self._submit(_UpdateMany(ids, task_filter, mutation)))
        return changed

    async def _persist_task_types(self, task_types: AbstractSet[str]) -> None:
        await self._submit(_Rows(task_types=frozenset(task_types)))

    async def _submit(self, op: _Op) -> Any:
        """Queue an operation for the writer and wait for its answer."""
        if self._failure is not None:
            raise StoreFailed(f"the store stopped after a failed write: {self._failure}")
        self._pending.append(op)
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write_batches())
        return await asyncio.shield(op.future)

    async def _write_batches(self) -> None:
        """Write the pending operations, a batch at a time, until none is left."""
        while self._pending and self._failure is None:
            ops, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            began = time.perf_counter()
            try:
                batch = await self._write_with_retries(ops)
            except Exception as error:
                self._fail(error, ops)
                return
            self._pending[:0] = batch.deferred
            written = len(batch.changes) + len(batch.schedule_changes)
            if self.on_commit is not None and written:
                self.on_commit(written, time.perf_counter() - began)
            # Delivered in the loop's next turn, while the next batch waits on the database.
            asyncio.get_running_loop().call_soon(self._deliver_own, batch)
            revision = max(batch.seen, batch.last_revision)
            answered = functools.partial(_answer, batch.answers)
            self._delivered(revision).add_done_callback(answered)

    async def _write_with_retries(self, ops: list[_Op]) -> _Batch:
        """Write the batch, run again on a failure before its COMMIT (at once, looking up
        the request ids, when one of its new tasks asked for one that another replica's
        task holds)."""
        look_up = False
        attempt = 0
        while True:
            try:
                return await self._write_batch(ops, look_up)
            except _Retry as retry:
                if not look_up and _took_request_id(retry.__cause__):
                    look_up = True  # the view missed the task that holds it: at once
                    continue
                look_up = True
                if attempt >= RETRIES:
                    raise retry.__cause__ or retry from None
                attempt += 1
                log.warning(
                    "store %s: a write failed before its commit, trying again: %s",
                    self.where, retry.__cause__,
                )  # fmt: skip
                await asyncio.sleep(0.05 * 2 ** (attempt - 1))

    def _behind(self) -> bool:
        """Whether the view may not know a task in the database: the reader was told of
        changes it has not read, or a batch of this server's is not yet delivered."""
        return bool(self._own_batches) or self._heard > self._revision

    async def _write_batch(self, ops: list[_Op], look_up: bool) -> _Batch:
        """Run the operations as one transaction; _Retry if it failed before its COMMIT.
        `look_up`: find the tasks that hold the new tasks' request ids in the database even
        if the view seems to know them all."""
        batch = _Batch(self._tasks)
        committing = False
        try:
            async with self._usable_pool().acquire() as connection:
                transaction = connection.transaction()
                await transaction.start()
                try:
                    await self._run(batch, connection, ops, look_up)
                    await self._write_changes(batch, connection)
                    committing = True
                    await transaction.commit()
                except BaseException:
                    self._forget(batch)  # before another replica may take its revisions
                    if not committing:
                        with contextlib.suppress(Exception):  # the first error tells
                            await transaction.rollback()
                    raise
        except BaseException as error:
            self._forget(batch)
            if committing and isinstance(error, _LOST):  # the COMMIT sent: written or not
                raise
            if isinstance(error, _DB_ERRORS):  # nothing written (a refused COMMIT rolls back)
                raise _Retry() from error
            raise
        return batch

    def _forget(self, batch: _Batch) -> None:
        """Drop the changes of a batch that was not committed from what the reader reuses."""
        for entry in batch.changes:
            if entry.change is not None:
                self._own.pop(entry.change.revision, None)
        for staged in batch.schedule_changes:
            self._own_schedules.pop(staged.revision, None)
        self._own_batches.pop(batch.last_revision, None)

    async def _run(
        self, batch: _Batch, connection: Connection, ops: list[_Op], look_up: bool
    ) -> None:
        """Lock the rows the operations change, then apply the operations: creates first
        (none of the others can name a task that is being created), the others in order."""
        ids = sorted({task_id for op in ops for task_id in op.locks()})
        if ids:
            for record in await connection.fetch(_LOCK, ids):
                batch.adopt(record)
            for task_id in ids:
                batch.latest.setdefault(task_id, None)
        locked = sorted({
            op.schedule_id for op in ops if isinstance(op, _ScheduleUpdate | _ScheduleDelete)
        })  # fmt: skip
        if locked:
            for record in await connection.fetch(_LOCK_SCHEDULES, locked):
                batch.adopt_schedule(record, self.schedules)
        creates = [op for op in ops if isinstance(op, _Create)]
        await self._create(batch, connection, creates, look_up)
        for op in ops:
            if isinstance(op, _Create):
                continue
            try:
                answer, staged = await self._apply_op(batch, connection, op)
            except _DB_ERRORS:
                raise
            except Exception as error:  # the operation's own: it alone fails
                batch.answers.append((op, None, error))
                continue
            if batch.deferred and batch.deferred[-1] is op:
                continue  # answered by a later batch
            batch.answers.append((op, answer, None))
            batch.apply(staged)

    async def _apply_op(
        self, batch: _Batch, connection: Connection, op: _Op
    ) -> tuple[Answer, list[tuple[ChangeKind, Task, Any]]]:
        at = self._clock()
        if isinstance(op, _Update):
            current = batch.latest.get(op.task_id)
            if current is None:
                raise TaskNotFound(op.task_id)
            new = op.mutation(current)
            if new is None or new is current:
                return lambda: current, []
            kind = ChangeKind.RENEWED if op.quiet else ChangeKind.CHANGED
            return lambda: new, [batch.stage(kind, new, at)]
        if isinstance(op, _Remove):
            current = batch.latest.get(op.task_id)
            if current is None:
                raise TaskNotFound(op.task_id)
            op.check(current)
            staged = batch.stage(ChangeKind.REMOVED, current, at)
            return lambda: _change_made(batch, current.task_id), [staged]
        if isinstance(op, _UpdateMany):
            return _update_many(batch, op, at)
        if isinstance(op, _RemoveFinished):
            return _remove_finished(batch, op, at)
        if isinstance(op, _ClaimOp):
            return await self._claim(batch, connection, op.request, at)
        if isinstance(op, _ScheduleOp):
            return await self._change_schedule(batch, connection, op, at), []
        assert isinstance(op, _Rows)
        batch.task_types |= op.task_types
        return lambda: None, []

    async def _change_schedule(
        self, batch: _Batch, connection: Connection, op: _ScheduleOp, at: float
    ) -> Answer:
        """Apply a schedule's change to its latest state (its row, locked by `_run`)."""
        if isinstance(op, _ScheduleCreate):
            return await self._create_schedule(batch, connection, op, at)
        current = batch.schedules.get(op.schedule_id)
        if current is None:
            raise ScheduleNotFound(op.schedule_id)
        if isinstance(op, _ScheduleDelete):
            answer = batch.schedule_answer(current)
            batch.stage_schedule(current, at, removed=True)
            return answer
        assert isinstance(op, _ScheduleUpdate)
        new = op.mutation(current)
        if new is None or new is current:
            return batch.schedule_answer(current)
        return batch.stage_schedule(new, at)

    async def _create_schedule(
        self, batch: _Batch, connection: Connection, op: _ScheduleCreate, at: float
    ) -> Answer:
        """A new schedule, its request id taken in the database first: one another replica
        (or an earlier batch) took gives back the first schedule, or RequestIdReused; one
        that a create earlier in this batch takes waits for the next batch."""
        schedule = op.schedule
        key = (schedule.tenant, schedule.request_id)
        if schedule.request_id and any(
            (staged.schedule.tenant, staged.schedule.request_id) == key
            for staged in batch.schedule_created.values()
        ):
            batch.deferred.append(op)
            return lambda: None  # never used: the operation is answered by the next batch
        inserted = await connection.fetchval(
            _INSERT_SCHEDULE, schedule.schedule_id, schedule.tenant, schedule.request_id
        )
        if inserted is None:
            row = await connection.fetchrow(_FIRST_SCHEDULE, *key)
            if row is None:  # the holder was removed between the insert and the look-up
                raise StoreFailed(f"request_id {schedule.request_id!r} was taken and freed at once")
            first = batch.adopt_schedule(row, self.schedules)
            if first.request_hash != schedule.request_hash:
                raise RequestIdReused(schedule.request_id, first.schedule_id)
            return lambda: (first, False)
        made = batch.stage_schedule(schedule, at)
        return lambda: (made(), True)

    async def _create(
        self, batch: _Batch, connection: Connection, ops: list[_Create], look_up: bool
    ) -> None:
        """Stage the new tasks of every create: a request id that another replica took
        gives back the first task (or fails the create with RequestIdReused); one asked
        for twice in this batch waits for the next. The rows are written at the end. The
        tasks it makes are charged to their tenants' rates (`_charge`).

        The holders of request ids are looked up in the database only if `look_up` or the
        view is behind it: the view knows every task but those of changes not yet read,
        and a new task's row whose request id one of those holds fails the write on the
        unique index (the batch is then run again, looking up). Most batches save the
        look-up's round trip, and the database an index search for every request id."""
        taken: dict[tuple[str, str], _Create] = {}
        inserting: list[_Create] = []
        for op in ops:
            keys = [(task.tenant, task.request_id) for task in op.tasks if task.request_id]
            if any(key in taken for key in keys):
                batch.deferred.append(op)
                continue
            taken.update(dict.fromkeys(keys, op))
            inserting.append(op)
        keyed = [task for op in inserting for task in op.tasks if task.request_id]
        firsts = {}
        if look_up or self._behind():  # (after BEGIN: the batch before is delivered)
            firsts = await self._firsts(batch, connection, keyed)
        buckets = await _lock_buckets(connection, inserting, firsts)
        at = self._clock()
        for op in inserting:
            try:
                results = _created(op.tasks, firsts)
                _charge(op, results, buckets)
            except Exception as error:
                batch.answers.append((op, None, error))
                continue
            staged = [batch.stage(ChangeKind.CHANGED, task, at) for task, new in results if new]
            batch.encoded.update(
                (task.task_id, (task, data))
                for task, data in zip(op.tasks, op.encoded, strict=True)
            )
            batch.apply(staged)
            batch.answers.append((op, functools.partial(list, results), None))
        await _keep_buckets(connection, buckets)

    async def _firsts(
        self, batch: _Batch, connection: Connection, keyed: list[Task]
    ) -> dict[tuple[str, str], Task]:
        """The tasks that hold the request ids that new ones ask for."""
        if not keyed:
            return {}
        rows = await connection.fetch(
            _FIRSTS, [t.tenant for t in keyed], [t.request_id for t in keyed]
        )
        return {(row["tenant"], row["request_id"]): batch.adopt(row) for row in rows}

    async def _claim(
        self, batch: _Batch, connection: Connection, request: Claim, at: float
    ) -> tuple[Answer, list[tuple[ChangeKind, Task, Any]]]:
        """The best runnable tasks, locked and skipping those others hold (no replica waits
        for another's, and none is handed out twice); the request's limits and the tenants'
        turns are applied to what was fetched."""
        request = await self._capped(batch, connection, request)
        full = [task_type for task_type, limit in request.limits.items() if limit <= 0]
        query = _claim_query(request, full, sorted(batch.latest))
        rows = [] if query is None else await connection.fetch(query[0], *query[1])
        candidates = [batch.adopt(row) for row in rows]
        staged: list[tuple[ChangeKind, Task, Any]] = []
        for task in self._pick(candidates, request):
            pausable = task.task_type in request.pausable
            lease = Lease(new_lease_id(), request.holder, request.lease_until(task), pausable)
            started = lifecycle.claim(task, lease, request.now)
            if started is not None:
                staged.append(batch.stage(ChangeKind.CHANGED, started, at))
                batch.claimed[started.task_type] += 1
        claimed = [task for _, task, _ in staged]
        return lambda: claimed, staged

    @staticmethod
    async def _capped(batch: _Batch, connection: Connection, request: Claim) -> Claim:
        """The claim with its per-type limits lowered to what the caps leave across every
        server: the attempts RUNNING of each capped type, counted under a lock that every
        capped claim takes (so two servers never both fill the last slot), and those this
        batch claimed already. (An attempt parked at a pause point counts on its own server
        only.)"""
        capped = {
            task_type: cap
            for task_type, cap in request.type_concurrency.items()
            if request.types is None or task_type in request.types
        }
        if not capped:
            return request
        await connection.execute("SELECT pg_advisory_xact_lock($1)", TYPE_CAPS_LOCK)
        rows = await connection.fetch(_RUNNING_BY_TYPE, sorted(capped))
        running = {row["task_type"]: row["count"] for row in rows}
        limits = dict(request.limits)
        for task_type, cap in capped.items():
            left = cap - running.get(task_type, 0) - batch.claimed[task_type]
            limits[task_type] = min(limits.get(task_type, left), left)
        return dataclasses.replace(request, limits=limits)

    def _pick(self, candidates: list[Task], request: Claim) -> list[Task]:
        """Up to `request.count` of the candidates (in dispatch order), at most
        `limits[type]` of a limited type, tenants taking turns: each next task is the best
        of the tenant served least recently by this store. Only the fetched rows take part,
        so between tenants the turns are approximate (see CLAIM_EXTRA)."""
        lanes: dict[str, deque[Task]] = {}
        for task in candidates:
            lanes.setdefault(task.tenant, deque()).append(task)
        taken: dict[str, int] = {}
        picked: list[Task] = []
        while len(picked) < request.count and lanes:
            tenant = min(lanes, key=lambda t: self._served.get(t, 0))
            lane = lanes[tenant]
            while lane and taken.get(lane[0].task_type, 0) >= request.limits.get(
                lane[0].task_type, request.count
            ):
                lane.popleft()
            if not lane:
                del lanes[tenant]
                continue
            task = lane.popleft()
            picked.append(task)
            taken[task.task_type] = taken.get(task.task_type, 0) + 1
            self._served[tenant] = next(self._turns)
        return picked

    async def _write_changes(self, batch: _Batch, connection: Connection) -> None:
        """Write what the batch changed: the removed rows first, then in one statement
        under the counter's lock the revisions, changes, attempts and task rows, and the
        notification."""
        if batch.task_types:
            await connection.execute(
                "INSERT INTO conveyor_task_types SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                sorted(batch.task_types),
            )
        gone = sorted({
            staged.schedule.schedule_id for staged in batch.schedule_changes
            if staged.removed and batch.schedules.get(staged.schedule.schedule_id) is None
        })  # fmt: skip
        if gone:
            await connection.execute(_DELETE_SCHEDULES, gone)
        if not (batch.changes or batch.schedule_changes):
            return
        removed = sorted({
            entry.task.task_id for entry in batch.changes
            if entry.kind is ChangeKind.REMOVED and batch.latest.get(entry.task.task_id) is None
        })  # fmt: skip
        if removed:
            await connection.execute(_DELETE_TASKS, removed)
        base = await connection.fetchval(_WRITE, *self._arrays(batch))
        if removed:  # after the write, which adds the attempts the batch ended
            await connection.execute(_DELETE_ATTEMPTS, removed)
        self._stamp(batch, base)

    def _arrays(self, batch: _Batch) -> list[Any]:
        """The arguments of the final statement: the changes' columns (the tasks', then the
        schedules'), the new tasks', the changed tasks', the changed schedules'."""
        changes = [_change_row(batch, entry) for entry in batch.changes]
        first = len(changes) + 1
        for offset, staged in enumerate(batch.schedule_changes, first):
            staged.offset = offset
            changes.append(_schedule_change_row(batch, staged))
        made, updated = self._task_rows(batch)
        schedules = [
            (schedule_id, _schedule_seq_code(batch, state), batch.made(state).offset)
            for schedule_id, state in batch.schedules.items()
            if state is not None and state.revision < 0  # changed, not removed
        ]
        return [
            len(changes), *_columns(changes, 7), *_columns(made, 8), *_columns(updated, 5),
            *_columns(schedules, 3), *_columns(_trims(batch), 2), CHANNEL,
        ]  # fmt: skip

    def _task_rows(self, batch: _Batch) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The rows of the tasks the batch made, and of those it changed: each its latest
        state's queue columns and the place of its latest change (whose data it takes)."""
        made: list[tuple[Any, ...]] = []
        updated: list[tuple[Any, ...]] = []
        for task_id, offset in batch.last.items():
            task = batch.latest[task_id]
            if task is None:
                continue
            queue = (
                int(task.status), self._aging_rate * task.queued_since - task.priority,
                task.next_attempt_at,
            )  # fmt: skip
            if task_id not in batch.created:
                updated.append((task_id, offset, *queue))
            else:
                identity = (task.tenant, task.request_id, task.request_hash, task.task_type)
                made.append((offset, *queue, *identity))  # its id and seq: its change's
        return made, updated

    def _stamp(self, batch: _Batch, base: int) -> None:
        """Give the batch's tasks their revisions and seqs, and keep its changes for the
        reader to deliver as they are."""
        for entry in batch.changes:
            revision = base + entry.offset
            task = entry.task
            if entry.kind is not ChangeKind.REMOVED:
                task.revision = revision
            created = batch.created.get(task.task_id)
            if created is not None:
                task.seq = base + created
            previous = base - entry.previous if entry.previous < 0 else entry.previous
            entry.change = Change(revision, entry.kind, task, entry.at, previous, entry.ended)
            self._own[revision] = entry.change
        for staged in batch.schedule_changes:
            staged.revision = base + staged.offset
            schedule = staged.schedule
            if schedule.revision < 0:  # a state this batch made: this change's, or before
                first = batch.schedule_created.get(schedule.schedule_id)
                seq = base + first.offset if first is not None else schedule.seq
                schedule = schedule.evolve(seq=seq, revision=base + batch.made(schedule).offset)
            staged.stamped = schedule
            self._own_schedules[staged.revision] = schedule
        batch.last_revision = base + len(batch.changes) + len(batch.schedule_changes)
        if batch.last_revision > base:
            self._own_batches[batch.last_revision] = base + 1

    # -- the change reader -------------------------------------------------------------

    def _notified(self, connection: Any, pid: int, channel: str, payload: object) -> None:
        """A commit's notification, with its last revision: the reader is woken, unless
        this server has delivered that far (its own commit, delivered by the writer)."""
        try:
            revision = int(str(payload))
        except (ValueError, TypeError):  # not a store's: a read tells what is new
            revision = self._revision + 1
        self._heard = max(self._heard, revision)
        if revision > self._revision:
            self._wake.set()

    async def _read_forever(self) -> None:
        """Read the changes as they come: when woken with a revision not yet delivered (a
        notification's; the writer's, or a catch-up's), and at least every POLL_SECONDS. A
        wake-up for a commit that the writer has delivered meanwhile (its own, whose
        notification came first) reads nothing, nor one for a commit of its own that the
        writer is about to deliver."""
        must_read = False  # (the listener was in place before the snapshot was read)
        while not self._stopping:
            if not must_read:
                woken = await _woken(self._wake, POLL_SECONDS)
                must_read = not woken or not self._own_up_to(self._heard)
            if self._stopping:
                return
            if not must_read:
                continue
            must_read = False
            try:
                await self._read()
            except _DB_ERRORS as error:
                if not await self._reconnect(error):
                    return
                must_read = True  # notifications may have been missed
            except Exception as error:
                self._fail(error, [])
                return

    def _own_up_to(self, revision: int) -> bool:
        """Whether every revision after the delivered one, up to `revision`, is of this
        store's own batches (committed or committing, in revision order), which the writer
        delivers itself."""
        after = self._revision
        for last, first in self._own_batches.items():
            if after >= revision:
                break
            if last <= after:
                continue
            if first > after + 1:
                return False
            after = last
        return after >= revision

    async def _read(self) -> None:
        assert self._listener is not None
        while True:
            own = self._own_batches
            rows = await self._listener.fetch(
                _READ, self._revision, READ_LIMIT, list(own.values()), list(own)
            )
            for row in rows:
                if row["revision"] > self._revision:  # else the writer delivered it
                    self._apply(row)
            if rows:
                for last in [last for last in own if last <= self._revision]:
                    del own[last]
                self._history.trim()
                self._settle()
            if len(rows) < READ_LIMIT:
                break
        if self._history.compacted - self._trimmed >= TRIM_EVERY:
            await self.trim_changes()

    async def trim_changes(self) -> None:
        """Delete from the changes table those this store's history has passed and that are
        older than KEEP_CHANGES_SECONDS (an unbroken run from the oldest). The reader does it
        every TRIM_EVERY changes."""
        if self._pool is None:
            return
        compacted = self._history.compacted
        await self._pool.execute(_TRIM_CHANGES, compacted, self._clock() - KEEP_CHANGES_SECONDS)
        self._trimmed = max(self._trimmed, compacted)

    def _apply(self, row: asyncpg.Record) -> None:
        """Apply one change read back, the next revision, to both views, and publish it."""
        revision = row["revision"]
        if revision != self._revision + 1:
            raise StoreFailed(
                f"the store's changes jump from revision {self._revision} to {revision}: the "
                "changes between were deleted before this server read them"
            )
        if row["kind"] >= SCHEDULE_CHANGED:
            schedule = self._own_schedules.pop(revision, None)
            if schedule is None or schedule.schedule_id != row["task_id"]:
                schedule = _schedule_of(_with_data(row), row["task_revision"])
            self._apply_schedule(revision, schedule, row["kind"] == SCHEDULE_REMOVED)
            return
        change = self._own.pop(revision, None)
        if change is None or change.task.task_id != row["task_id"]:
            change = _change_of(_with_data(row))
        self._apply_change(revision, change)

    def _apply_change(self, revision: int, change: Change) -> None:
        """Apply a task's change, the next revision, to both views, and publish it."""
        old = self._set_working(change.kind, change.task)
        self._staged_revision = revision
        previous = 0 if old is None else old.revision
        self._commit_one(
            change if change.previous == previous else change._replace(previous=previous)
        )

    def _apply_schedule(self, revision: int, schedule: Schedule, removed: bool) -> None:
        """Apply a schedule's change, the next revision, to the book (not the feed: no task
        changed)."""
        self._revision = self._staged_revision = revision
        self.schedules.apply(schedule, removed)

    def _deliver_own(self, batch: _Batch) -> None:
        """Deliver a committed batch's changes, as the reader would, if they are the next
        revisions (every one before them delivered): no round trip to read them back, and
        the reader passes over them. The reader is woken for what is left to read."""
        count = len(batch.changes) + len(batch.schedule_changes)
        if count and self._revision == batch.last_revision - count:
            removed = {staged.revision: staged.removed for staged in batch.schedule_changes}
            for revision in range(batch.last_revision - count + 1, batch.last_revision + 1):
                change = self._own.pop(revision, None)
                if change is not None:
                    self._apply_change(revision, change)
                else:
                    schedule = self._own_schedules.pop(revision)
                    self._apply_schedule(revision, schedule, removed[revision])
            self._own_batches.pop(batch.last_revision, None)
            self._history.trim()
            self._settle()
        self._heard = max(self._heard, batch.seen, batch.last_revision)
        if self._revision < self._heard:
            self._wake.set()

    async def _reconnect(self, error: BaseException) -> bool:
        """Connect the reader again after its connection failed; False (the store failed)
        if it cannot within RECONNECT_SECONDS."""
        log.warning("store %s: the change reader lost its connection: %s", self.where, error)
        deadline = asyncio.get_running_loop().time() + RECONNECT_SECONDS
        while True:
            if self._listener is not None:
                self._listener.terminate()
                self._listener = None
            try:
                self._listener = await self._connect_listener()
                await self._listener.add_listener(CHANNEL, self._notified)
                return True
            except _DB_ERRORS as again:
                if asyncio.get_running_loop().time() > deadline:
                    self._fail(again, [])
                    return False
                await asyncio.sleep(0.2)

    def _delivered(self, revision: int) -> asyncio.Future[None]:
        """Done once the reader has delivered `revision` (at once if it has)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._failure is not None:
            future.set_exception(StoreFailed(f"the store stopped: {self._failure}"))
        elif revision <= self._revision:
            future.set_result(None)
        else:
            heapq.heappush(self._waiters, (revision, next(self._waiter_ids), future))
        return future

    def _settle(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._revision:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)

    def _fail(self, error: Exception, ops: Iterable[_Op]) -> None:
        """The store can no longer tell what was written: refuse every further change, fail
        what waits, and tell the server, which must stop."""
        if self._failure is not None:
            return
        self._failure = error
        log.critical(
            "store %s failed; no further change is accepted: %s: %s",
            self.where, type(error).__name__, error,
        )  # fmt: skip
        failure = StoreFailed(f"writing to the store failed: {error}")
        pending, self._pending = [*ops, *self._pending], []
        futures = [op.future for op in pending] + [f for _, _, f in self._waiters]
        self._waiters = []
        for future in futures:
            if not future.done():
                future.set_exception(failure)
                future.exception()  # retrieved here too, in case no request waits on it
        self.on_failure(error)


# --- helpers --------------------------------------------------------------------------


def redacted(url: str) -> str:
    """The URL without its password, to name the database in messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


async def _woken(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` passes, then clear it; whether it was set
    (asyncio.wait rather than wait_for, which in Python 3.11 may swallow a cancellation that
    comes as the event is set)."""
    if not event.is_set():
        waiting = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({waiting}, timeout=timeout)
        finally:
            waiting.cancel()
    woken = event.is_set()
    event.clear()
    return woken


def _task_of(row: asyncpg.Record) -> Task:
    task = decode(row["data"])
    task.seq, task.revision = row["seq"], row["revision"]
    return task


def _with_data(row: asyncpg.Record) -> asyncpg.Record:
    """A change read back with its data: this replica's own are read without, as it keeps
    them until then."""
    if row["data"] is None:
        raise StoreFailed(f"this server's change at revision {row['revision']} was not kept")
    return row


def _change_of(row: asyncpg.Record) -> Change:
    task = decode(row["data"])
    task.seq, task.revision = row["seq"], row["task_revision"]
    ended = decode_attempt(row["ended"]) if row["ended"] else None
    return Change(row["revision"], ChangeKind(row["kind"]), task, row["at"], 0, ended)


def _schedule_of(row: asyncpg.Record, revision: int) -> Schedule:
    return decode_schedule(row["data"]).evolve(seq=row["seq"], revision=revision)


def _schedule_seq_code(batch: _Batch, schedule: Schedule) -> int:
    """The schedule's seq, or (negative) the offset of the change creating it in this batch."""
    created = batch.schedule_created.get(schedule.schedule_id)
    return -created.offset if created is not None else schedule.seq


class _SharedSchedules:
    """How a PostgresStore's schedule book makes its changes: through the store's writer."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def create(self, schedule: Schedule) -> tuple[Schedule, bool]:
        made: tuple[Schedule, bool] = await self._store._submit(
            _ScheduleCreate(schedule.schedule_id, schedule)
        )
        return made

    async def update(self, schedule_id: str, mutation: ScheduleMutation) -> Schedule:
        changed: Schedule = await self._store._submit(_ScheduleUpdate(schedule_id, mutation))
        return changed

    async def delete(self, schedule_id: str) -> Schedule:
        removed: Schedule = await self._store._submit(_ScheduleDelete(schedule_id))
        return removed

    async def catch_up(self) -> None:
        await self._store._catch_up()


def _answer(
    answers: list[tuple[_Op, Answer | None, BaseException | None]], done: asyncio.Future[None]
) -> None:
    """Answer a batch's operations once its changes are delivered (or the store failed)."""
    failure = done.exception()
    for op, answer, error in answers:
        if op.future.done():
            continue
        if error is None and failure is None and answer is not None:
            op.future.set_result(answer())
        else:
            op.future.set_exception(error or failure or StoreFailed("no answer"))
            if error is None:
                op.future.exception()


def _created(
    tasks: Sequence[Task], firsts: Mapping[tuple[str, str], Task]
) -> list[tuple[Task, bool]]:
    """Each task of a create, new (True) or the first with its request id (False);
    RequestIdReused if that one came from a different request."""
    results: list[tuple[Task, bool]] = []
    for task in tasks:
        first = firsts.get((task.tenant, task.request_id)) if task.request_id else None
        if first is None:
            results.append((task, True))
        elif first.request_hash != task.request_hash:
            raise RequestIdReused(task.request_id, first.task_id)
        else:
            results.append((first, False))
    return results


def _update_many(
    batch: _Batch, op: _UpdateMany, at: float
) -> tuple[Answer, list[tuple[ChangeKind, Task, Any]]]:
    staged: list[tuple[ChangeKind, Task, Any]] = []
    for task_id in op.task_ids:
        current = batch.latest.get(task_id)
        if current is None or not op.task_filter.matches(current):
            continue
        new = op.mutation(current)
        if new is not None and new is not current:
            staged.append(batch.stage(ChangeKind.CHANGED, new, at))
    changed = [task for _, task, _ in staged]
    return lambda: changed, staged


def _remove_finished(
    batch: _Batch, op: _RemoveFinished, at: float
) -> tuple[Answer, list[tuple[ChangeKind, Task, Any]]]:
    staged: list[tuple[ChangeKind, Task, Any]] = []
    for task_id in op.task_ids:
        current = batch.latest.get(task_id)
        if current is None or not current.terminal:
            continue
        if (current.finished_at or current.updated_at) >= op.finished_before:
            continue
        staged.append(batch.stage(ChangeKind.REMOVED, current, at))
    count = len(staged)
    return lambda: count, staged


def _change_made(batch: _Batch, task_id: str) -> Change:
    """The change a removal made, once it has its revision."""
    for entry in reversed(batch.changes):
        if entry.task.task_id == task_id and entry.change is not None:
            return entry.change
    raise AssertionError(f"no change of {task_id} in the batch")


def _change_row(batch: _Batch, entry: _Staged) -> tuple[Any, ...]:
    """A task's change as the changes' columns."""
    task = entry.task
    # A removal's is that of the task's change before it (of this batch: an offset).
    revision = entry.previous if entry.kind is ChangeKind.REMOVED else -entry.offset
    ended = None if entry.ended is None else encode_attempt(entry.ended)
    encoded = batch.encoded.get(task.task_id)
    data = encoded[1] if encoded is not None and encoded[0] is task else encode(task)
    return (
        int(entry.kind), entry.at, task.task_id, _seq_code(batch, task), revision, data, ended,
    )  # fmt: skip


def _schedule_change_row(batch: _Batch, staged: _StagedSchedule) -> tuple[Any, ...]:
    """A schedule's change as the changes' columns."""
    schedule = staged.schedule
    if not staged.removed:
        kind, revision = SCHEDULE_CHANGED, -staged.offset
    elif schedule.revision < 0:  # removed after a change of this batch: that one's
        kind, revision = SCHEDULE_REMOVED, -batch.made(schedule).offset
    else:
        kind, revision = SCHEDULE_REMOVED, schedule.revision
    return (
        kind, staged.at, schedule.schedule_id, _schedule_seq_code(batch, schedule), revision,
        encode_schedule(schedule), None,
    )  # fmt: skip


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[Sequence[Any]]:
    """Rows as columns: the arrays a statement unnests."""
    return list(zip(*rows, strict=True)) if rows else [()] * width


def _seq_code(batch: _Batch, task: Task) -> int:
    """The task's seq, or (negative) the offset of the change creating it in this batch."""
    created = batch.created.get(task.task_id)
    return -created if created is not None else task.seq


# The tenants' buckets (tenants.Bucket) that creates take tokens from, made (full) if new,
# locked in tenant order (so that two replicas never wait on each other), each with the
# database's clock once it is locked: every replica's arithmetic on a bucket uses that one.
_LOCK_BUCKETS = """
INSERT INTO conveyor_tenant_buckets AS b (tenant)
SELECT tenant FROM unnest($1::text[]) AS n(tenant) ORDER BY tenant
ON CONFLICT (tenant) DO UPDATE SET full_at = b.full_at
RETURNING tenant, full_at, told, extract(epoch FROM clock_timestamp())::float8 AS now
"""
_KEEP_BUCKETS = """
UPDATE conveyor_tenant_buckets AS b SET full_at = k.full_at, told = k.told
FROM unnest($1::text[], $2::float8[], $3::float8[]) AS k(tenant, full_at, told)
WHERE b.tenant = k.tenant
"""
_Buckets = dict[str, tuple[Bucket, float]]  # tenant: its bucket, and the database's time


async def _lock_buckets(
    connection: Connection, creates: Sequence[_Create], firsts: Mapping[tuple[str, str], Task]
) -> _Buckets:
    """The buckets of the rated tenants of the tasks that the creates make (not those whose
    request ids `firsts` holds), locked until the transaction ends (none, and no statement,
    if no such tenant has a rate)."""
    tenants: set[str] = set()
    for op in creates:
        if op.rates is not None:
            made = {t.tenant for t in op.tasks if (t.tenant, t.request_id) not in firsts}
            tenants.update(tenant for tenant in made if op.rates.rated(tenant))
    if not tenants:
        return {}
    rows = await connection.fetch(_LOCK_BUCKETS, sorted(tenants))
    return {row["tenant"]: (Bucket(row["full_at"], row["told"]), row["now"]) for row in rows}


def _charge(op: _Create, results: list[tuple[Task, bool]], buckets: _Buckets) -> None:
    """Take the tokens of the tasks the create makes (not those another create made with
    their request ids) from their tenants' buckets; TenantLimitReached if one has too few
    (the create is then refused, and makes nothing)."""
    if op.rates is None:
        return
    made = collections.Counter(task.tenant for task, new in results if new)
    for tenant, count in made.items():
        if tenant in buckets:
            bucket, now = buckets[tenant]
            op.rates.take_from(bucket, tenant, count, now)


async def _keep_buckets(connection: Connection, buckets: _Buckets) -> None:
    """Write back what the creates took from the buckets (and the refusals' turns)."""
    if buckets:
        states = [bucket for bucket, _ in buckets.values()]
        await connection.execute(
            _KEEP_BUCKETS, list(buckets), [b.full_at for b in states], [b.told for b in states]
        )


async def _rolled_back(connection: asyncpg.Connection) -> None:
    """How a connection goes back to the pool: out of any transaction. (asyncpg's own reset
    also drops session state, which this store never sets: a round trip for every batch.)"""
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


# Taken by every claim of a capped task type, until its transaction ends: the count of
# running attempts it reads stays true until its own claims are committed.
TYPE_CAPS_LOCK = 0x63617073  # "caps" (the schema's migration lock is another)
_RUNNING_BY_TYPE = (
    "SELECT task_type, count(*) AS count FROM conveyor_tasks "
    f"WHERE status = {RUNNING} AND task_type = ANY($1::text[]) GROUP BY task_type"
)


def _claim_query(
    request: Claim, full: list[str], touched: list[str]
) -> tuple[str, list[Any]] | None:
    """The claim's SELECT: runnable tasks in dispatch order, of the request's types and
    tenant, none this batch already holds, a few more than asked, locked (None: no type of
    the request has room).

    Each wanted type is read from its own part of the `(task_type, dispatch_key, seq)`
    index, in order, as far as the limit and no further; a scan of many types at once
    would read and sort every queued task of them (and of a full type) for each claim."""
    args: list[Any] = [request.now, touched, 2 * request.count + CLAIM_EXTRA]
    where = [
        f"status = {CREATED}", "(runnable_at IS NULL OR runnable_at <= $1)",
        "NOT (task_id = ANY($2::text[]))",
    ]  # fmt: skip
    if request.tenant is not None:
        args.append(request.tenant)
        where.append(f"tenant = ${len(args)}")
    if request.types is None:  # any type: the queue's own order, less the full types
        if full:
            args.append(full)
            where.append(f"NOT (task_type = ANY(${len(args)}::text[]))")
        return _locked_in_order(where), args
    wanted = sorted(request.types.difference(full))
    if not wanted:
        return None
    if len(wanted) == 1:
        args.append(wanted[0])
        return _locked_in_order([*where, f"task_type = ${len(args)}"]), args
    args.append(wanted)
    each = _locked_in_order([*where, "task_type = wanted.task_type"], f"{_TASK_ROW}, dispatch_key")
    query = (
        f"SELECT picked.* FROM unnest(${len(args)}::text[]) AS wanted(task_type), "
        f"LATERAL ({each}) AS picked ORDER BY picked.dispatch_key, picked.seq LIMIT $3"
    )
    return query, args


def _took_request_id(error: BaseException | None) -> bool:
    """Whether a write failed because a new task's request id is another task's."""
    return (
        isinstance(error, asyncpg.UniqueViolationError)
        and error.constraint_name == "conveyor_tasks_request"
    )


def _locked_in_order(where: list[str], columns: str = _TASK_ROW) -> str:
    """The best queued rows that `where` allows, up to the claim's limit ($3), locked, and
    skipping those another transaction holds."""
    return (
        f"SELECT {columns} FROM conveyor_tasks WHERE {' AND '.join(where)} "
        "ORDER BY dispatch_key, seq LIMIT $3 FOR UPDATE SKIP LOCKED"
    )


def _trims(batch: _Batch) -> list[tuple[str, int]]:
    """Each task that ended attempts in the batch, and how many of its attempts before to
    keep (so that it keeps its latest MAX_KEPT_ATTEMPTS)."""
    new: dict[str, int] = {}
    for entry in batch.changes:
        if entry.ended is not None and batch.latest.get(entry.task.task_id) is not None:
            new[entry.task.task_id] = new.get(entry.task.task_id, 0) + 1
    return [(task_id, max(MAX_KEPT_ATTEMPTS - count, 0)) for task_id, count in new.items()]
