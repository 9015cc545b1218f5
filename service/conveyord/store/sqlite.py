"""The durable store: tasks and their change history in a SQLite file.

Everything a client reads is served from memory (the core in `memory.py`); the file is
the journal that makes it survive a crash. Staged changes are written in batches by
one writer thread (group commit: while one batch is being written and synced, the next
one gathers), in write-ahead-log mode with a full sync at each commit, and a change is
committed to memory, answered and published to watchers only once it is on disk.

The file holds one conveyord at a time (SQLite's exclusive locking mode), carries its
schema version (`PRAGMA user_version`) and an application id, and is never overwritten:
a file that is locked, unreadable, corrupt, foreign or from a newer server stops the
start with a clear message (sqlite_file.py opens it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from conveyord.model import (
    Attempt,
    Change,
    ChangeKind,
    Task,
)
from conveyord.schedules.model import Schedule
from conveyord.store.base import StoreFailed
from conveyord.store.base import StoreOpenError as StoreOpenError  # re-exported
from conveyord.store.base import StoreTooNew as StoreTooNew
from conveyord.store.codec import decode, decode_attempt, encode, encode_attempt
from conveyord.store.memory import (
    DEFAULT_AGING_RATE,
    DEFAULT_HISTORY_AGE,
    DEFAULT_HISTORY_SIZE,
    MAX_KEPT_ATTEMPTS,
    MemoryStore,
)
from conveyord.store.schedules import ScheduleBook
from conveyord.store.schedules import decode as decode_schedule
from conveyord.store.schedules import encode as encode_schedule
from conveyord.store.sqlite_file import MIGRATIONS as MIGRATIONS  # re-exported
from conveyord.store.sqlite_file import StoreLocked as StoreLocked
from conveyord.store.sqlite_file import connect, file_identity

log = logging.getLogger(__name__)


class SqliteStore(MemoryStore):
    """A MemoryStore whose changes are journaled to a SQLite file before they count."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        history_size: int = DEFAULT_HISTORY_SIZE,
        history_age: float = DEFAULT_HISTORY_AGE,
        aging_rate: float = DEFAULT_AGING_RATE,
        migrations: Sequence[str] = MIGRATIONS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"clock": clock} if clock else {}
        super().__init__(
            history_size=history_size, history_age=history_age, aging_rate=aging_rate, **kwargs
        )
        self.path = Path(path)
        self._migrations = tuple(migrations)
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="conveyor-store")
        self._connection: sqlite3.Connection | None = None
        self._batch: list[Change] = []
        self._batch_done: asyncio.Future[None] | None = None
        self._in_flight: dict[str, asyncio.Future[None]] = {}  # task_id -> its latest batch
        self._writing: asyncio.Task[None] | None = None
        self._failure: Exception | None = None
        self._file_identity: tuple[int, int] | None = None
        self.schedules = ScheduleBook(self._persist_schedule)
        # The schedules' states to write (None: removed), encoded as the batch is written (a
        # state replaced before then, such as a decision by its runs made, is never encoded).
        self._schedule_rows: dict[str, Schedule | None] = {}

    # -- opening -----------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the file, upgrade its schema, and load what it holds."""
        loop = asyncio.get_running_loop()
        tasks, history, revision, next_seq = await loop.run_in_executor(self._writer, self._load)
        self._declared = await loop.run_in_executor(self._writer, self._load_task_types)
        self.schedules.load(await loop.run_in_executor(self._writer, self._load_schedules))
        attempts = await loop.run_in_executor(self._writer, self._load_attempts)
        self._restore(tasks, history, revision, next_seq - 1, attempts)
        self._history.trim()
        log.info(
            "store %s: %d tasks, revision %d, %d changes of history",
            self.path, len(self._tasks), revision, len(self._history),
        )  # fmt: skip

    def _load(self) -> tuple[list[Task], list[Change], int, int]:
        connection, self._file_identity = connect(self.path, self._migrations)
        try:
            revision, next_seq = connection.execute(
                "SELECT revision, next_seq FROM state"
            ).fetchone()
            tasks = [decode(data) for (data,) in connection.execute("SELECT data FROM tasks")]
            history = [
                Change(rev, ChangeKind(kind), decode(data), at)
                for rev, kind, at, data in connection.execute(
                    "SELECT revision, kind, at, data FROM changes ORDER BY revision"
                )
            ]
        except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as error:
            connection.close()
            raise StoreOpenError(f"store file {self.path} is corrupt: {error}") from error
        self._connection = connection
        return tasks, history, revision, next_seq

    def _load_schedules(self) -> list[Schedule]:
        assert self._connection is not None
        rows = self._connection.execute("SELECT data FROM schedules")
        try:
            return [decode_schedule(data) for (data,) in rows]
        except (ValueError, KeyError, TypeError) as error:
            raise StoreOpenError(
                f"store file {self.path} has a corrupt schedule: {error}"
            ) from error

    def _persist_schedule(self, schedule_id: str, schedule: Schedule | None) -> Awaitable[None]:
        """Stage a schedule's new state (None: its removal) in the batch being gathered (one
        transaction for the tasks' and the schedules' changes, batches written in order):
        done once it is on disk."""
        self._schedule_rows[schedule_id] = schedule
        return self._into_batch([])

    def _load_attempts(self) -> list[tuple[str, Attempt]]:
        assert self._connection is not None
        rows = self._connection.execute(
            "SELECT task_id, data FROM attempts ORDER BY task_id, revision"
        )
        try:
            return [(task_id, decode_attempt(data)) for task_id, data in rows]
        except (ValueError, KeyError, TypeError) as error:
            message = f"store file {self.path} has a corrupt attempt: {error}"
            raise StoreOpenError(message) from error

    def _load_task_types(self) -> set[str]:
        assert self._connection is not None
        return {name for (name,) in self._connection.execute("SELECT task_type FROM task_types")}

    # -- writing -----------------------------------------------------------------

    async def _persist_task_types(self, task_types: AbstractSet[str]) -> None:
        if self._failure is not None:
            raise StoreFailed(f"the store stopped after a failed write: {self._failure}")
        rows = [(name,) for name in sorted(task_types)]
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, self._write_task_types, rows)
        except sqlite3.Error as error:
            raise StoreFailed(f"writing to the store failed: {error}") from error

    def _write_task_types(self, rows: list[tuple[str]]) -> None:
        assert self._connection is not None
        self._connection.executemany(
            "INSERT OR IGNORE INTO task_types (task_type) VALUES (?)", rows
        )
        self._check_file()

    async def _persist(self, changes: list[Change]) -> None:
        """Add the changes to the batch being gathered and wait until it is on disk."""
        await self._into_batch(changes)

    def _into_batch(self, changes: list[Change]) -> asyncio.Future[None]:
        """Add the changes to the batch being gathered: done once it is on disk."""
        if self._failure is not None:
            raise StoreFailed(f"the store stopped after a failed write: {self._failure}")
        if self._batch_done is None:
            self._batch_done = asyncio.get_running_loop().create_future()
        done = self._batch_done
        self._batch.extend(changes)
        for change in changes:
            self._in_flight[change.task.task_id] = done
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write_batches())
        return asyncio.shield(done)

    async def _settled(self, task_id: str) -> None:
        done = self._in_flight.get(task_id)
        if done is not None:
            await asyncio.shield(done)

    async def _write_batches(self) -> None:
        """Write gathered batches one after the other until none is left."""
        loop = asyncio.get_running_loop()
        while self._batch or self._schedule_rows:
            batch, done, schedules = self._batch, self._batch_done, self._schedule_rows
            assert done is not None
            self._batch, self._batch_done, self._schedule_rows = [], None, {}
            state = (self._staged_revision, self._last_seq + 1, self._history.compacted)
            began = time.perf_counter()
            try:
                await loop.run_in_executor(self._writer, self._write, batch, state, schedules)
            except Exception as error:
                self._fail(error, done)
                return
            if self.on_commit is not None:
                self.on_commit(len(batch) + len(schedules), time.perf_counter() - began)
            self._commit(batch)
            for change in batch:
                if self._in_flight.get(change.task.task_id) is done:
                    del self._in_flight[change.task.task_id]
            done.set_result(None)

    def _fail(self, error: Exception, done: asyncio.Future[None]) -> None:
        """A write failed: refuse every further change, and tell the server, which must stop
        (on restart, the file holds every change that was answered)."""
        self._failure = error
        log.critical(
            "writing to store %s failed; no further change is accepted: %s: %s",
            self.path, type(error).__name__, error,
        )  # fmt: skip
        failure = StoreFailed(f"writing to the store failed: {error}")
        for pending in (done, self._batch_done):
            if pending is not None and not pending.done():
                pending.set_exception(failure)
                pending.exception()  # retrieved here too, in case no request waits on it
        self._batch, self._batch_done = [], None
        self.on_failure(error)

    def _write(
        self,
        batch: list[Change],
        state: tuple[int, int, int],
        schedules: dict[str, Schedule | None],
    ) -> None:
        """One transaction: the tasks' new rows, the changes, the counters, the trimmed
        history, and the schedules' new rows."""
        assert self._connection is not None
        revision, next_seq, compacted = state
        upserts: list[tuple[str, str]] = []
        deletes: list[tuple[str]] = []
        changes: list[tuple[int, int, float, str]] = []
        attempts: list[tuple[str, int, str]] = []
        for change in batch:
            data = encode(change.task)
            if change.kind is ChangeKind.REMOVED:
                deletes.append((change.task.task_id,))
            else:
                upserts.append((change.task.task_id, data))
            if change.ended is not None:
                ended = encode_attempt(change.ended)
                attempts.append((change.task.task_id, change.revision, ended))
            changes.append((change.revision, int(change.kind), change.at, data))
        connection = self._connection
        connection.execute("BEGIN")
        try:
            connection.executemany(
                "INSERT OR REPLACE INTO tasks (task_id, data) VALUES (?, ?)", upserts
            )
            connection.executemany("DELETE FROM tasks WHERE task_id = ?", deletes)
            if attempts:
                _write_attempts(connection, attempts)
            connection.executemany("DELETE FROM attempts WHERE task_id = ?", deletes)
            connection.executemany(
                "INSERT INTO changes (revision, kind, at, data) VALUES (?, ?, ?, ?)", changes
            )
            connection.execute("DELETE FROM changes WHERE revision <= ?", (compacted,))
            connection.execute("UPDATE state SET revision = ?, next_seq = ?", (revision, next_seq))
            if schedules:
                _write_schedules(connection, schedules)
            connection.execute("COMMIT")
        except BaseException:
            # A failed COMMIT may have rolled back already; a second error would hide the first.
            if connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
            raise
        self._check_file()

    def _check_file(self) -> None:
        """Refuse to acknowledge changes written to a file that is no longer the store's:
        deleted or replaced at its path, it would be lost or ignored at the next start."""
        try:
            identity = file_identity(self.path)
        except FileNotFoundError:
            identity = None
        if identity != self._file_identity:
            what = "deleted" if identity is None else "replaced by another file"
            raise StoreFailed(
                f"store file {self.path} was {what} while this server used it; the changes "
                "written since are not in it"
            )

    async def close(self) -> None:
        """Finish the writes under way, then close the file; safe to call twice."""
        if self._writing is not None and not self._writing.done():
            await asyncio.wait({self._writing})
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await asyncio.get_running_loop().run_in_executor(self._writer, connection.close)
        self._writer.shutdown(wait=True)


def _write_schedules(connection: sqlite3.Connection, rows: dict[str, Schedule | None]) -> None:
    connection.executemany(
        "INSERT OR REPLACE INTO schedules (schedule_id, data) VALUES (?, ?)",
        [(key, encode_schedule(data)) for key, data in rows.items() if data is not None],
    )
    connection.executemany(
        "DELETE FROM schedules WHERE schedule_id = ?",
        [(key,) for key, data in rows.items() if data is None],
    )


def _write_attempts(connection: sqlite3.Connection, rows: list[tuple[str, int, str]]) -> None:
    """Add ended attempts, and drop those of their tasks past the latest MAX_KEPT_ATTEMPTS."""
    connection.executemany(
        "INSERT OR REPLACE INTO attempts (task_id, revision, data) VALUES (?, ?, ?)", rows
    )
    connection.executemany(
        "DELETE FROM attempts WHERE task_id = ?1 AND revision <= (SELECT revision FROM "
        "attempts WHERE task_id = ?1 ORDER BY revision DESC LIMIT 1 OFFSET ?2)",
        [(task_id, MAX_KEPT_ATTEMPTS) for task_id in {row[0] for row in rows}],
    )
