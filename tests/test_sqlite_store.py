"""The SQLite store: what survives a restart, schema versions, and files it must refuse."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conveyord.model import TaskError, TaskFilter
from conveyord.store.base import StoreFailed
from conveyord.store.sqlite import (
    MIGRATIONS,
    SqliteStore,
    StoreLocked,
    StoreOpenError,
    StoreTooNew,
)
from tests.test_store import complete, create_one, new_task, start

ROOT = Path(__file__).resolve().parent.parent


async def _opened(path: Path, **options: Any) -> SqliteStore:
    store = SqliteStore(path, **options)
    await store.open()
    return store


async def test_everything_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    store = await _opened(path)
    done, _ = await create_one(store, new_task("r1", parameters={"deep": {"list": [1, "a"]}}))
    await store.update(done.task_id, start)
    done = await store.update(done.task_id, complete)
    queued, _ = await create_one(store, new_task(labels={"k": "v"}, priority=9))
    revision = await store.revision()
    await store.close()

    store = await _opened(path)
    assert (await store.revision()) == revision
    assert await store.get(done.task_id) == done
    assert await store.get(queued.task_id) == queued
    assert [c.revision for c in await store.changes_since(0, TaskFilter())] == [1, 2, 3, 4]
    # The request_id is still known, creation order and revisions carry on.
    assert (await create_one(store, new_task("r1"))) == (done, False)
    later, _ = await create_one(store, new_task())
    assert later.revision == revision + 1 and later.seq > queued.seq
    await store.close()


async def test_sequence_numbers_are_never_reused_after_removals(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    store = await _opened(path)
    last, _ = await create_one(store, new_task())
    await store.update(last.task_id, start)
    await store.update(last.task_id, complete)
    await store.remove_finished(finished_before=10, limit=10)
    await store.close()
    store = await _opened(path)
    fresh, _ = await create_one(store, new_task())
    assert fresh.seq > last.seq
    await store.close()


async def test_an_older_file_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    store = await _opened(path)
    task, _ = await create_one(store, new_task())
    await store.close()
    newer = (*MIGRATIONS, "CREATE TABLE upgraded_marker (x INTEGER)")
    store = await _opened(path, migrations=newer)
    assert await store.get(task.task_id) == task
    await store.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == len(newer)
        assert connection.execute("SELECT count(*) FROM upgraded_marker").fetchone()[0] == 0


async def test_a_file_from_a_newer_server_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    store = await _opened(path)
    await create_one(store, new_task())
    await store.close()
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    connection.close()
    before = path.read_bytes()
    with pytest.raises(StoreTooNew, match=f"newer than the {len(MIGRATIONS)} this conveyord knows"):
        await _opened(path)
    assert path.read_bytes() == before


async def test_a_file_in_use_by_another_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    first = await _opened(path)
    with pytest.raises(StoreLocked, match="in use by another conveyord"):
        await _opened(path)
    task, _ = await create_one(first, new_task())  # the first one carries on
    assert await first.get(task.task_id) == task
    await first.close()


async def test_a_file_that_is_not_a_database_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    path.write_bytes(b"not a database at all, " * 200)
    before = path.read_bytes()
    with pytest.raises(StoreOpenError, match="not a SQLite database or is corrupt"):
        await _opened(path)
    assert path.read_bytes() == before


async def test_a_corrupt_store_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    store = await _opened(path)
    for _ in range(200):
        await create_one(store, new_task(description="x" * 200))
    await store.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[page : page + 512] = os.urandom(512)  # garble page 2, the root of the tasks' table
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(StoreOpenError):
        await _opened(path)
    assert path.read_bytes() == before


async def test_a_foreign_sqlite_file_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
    connection.close()
    before = path.read_bytes()
    with pytest.raises(StoreOpenError, match="not a conveyor store"):
        await _opened(path)
    assert path.read_bytes() == before


async def test_an_unreadable_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreOpenError, match="cannot"):
        await _opened(tmp_path)  # a directory


async def test_a_failed_write_refuses_every_later_change(tmp_path: Path) -> None:
    store = await _opened(tmp_path / "tasks.db")
    failures: list[Exception] = []
    store.on_failure = failures.append
    task, _ = await create_one(store, new_task())
    assert store._connection is not None
    store._writer.submit(store._connection.close).result()  # the disk goes away under the store
    with pytest.raises(StoreFailed):
        await store.update(task.task_id, start)
    with pytest.raises(StoreFailed):
        await create_one(store, new_task())
    assert len(failures) == 1
    assert await store.get(task.task_id) == task  # readers still see what was committed
    store._connection = None
    await store.close()


async def test_the_file_stays_bounded_under_a_steady_load(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    store = await _opened(path, history_size=200)

    async def one() -> None:
        task, _ = await create_one(store, new_task(description="d" * 500))
        await store.update(task.task_id, start)
        await store.update(task.task_id, complete)

    async def cycle(count: int) -> None:
        await asyncio.gather(*(one() for _ in range(count)))
        await store.remove_finished(finished_before=10, limit=10_000)

    def size() -> int:
        return sum(p.stat().st_size for p in tmp_path.iterdir())

    for _ in range(3):
        await cycle(500)
    warm = size()
    for _ in range(10):
        await cycle(500)
    assert size() <= warm * 1.25, (warm, size())
    await store.close()


def _conveyord(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyord", "--listen", "127.0.0.1:0", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip


def test_conveyord_exits_with_a_message_for_a_corrupt_store(tmp_path: Path) -> None:
    path = tmp_path / "bad.db"
    path.write_bytes(b"garbage" * 1000)
    result = _conveyord("--store", f"sqlite:{path}")
    assert result.returncode == 5
    assert "is not a SQLite database or is corrupt" in result.stderr
    assert "Traceback" not in result.stderr
    assert path.read_bytes() == b"garbage" * 1000


async def test_conveyord_exits_with_a_message_for_a_store_in_use(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    holder = await _opened(path)
    result = _conveyord("--store", f"sqlite:{path}")
    await holder.close()
    assert result.returncode == 4
    assert "in use by another conveyord" in result.stderr
    assert "Traceback" not in result.stderr


async def test_conveyord_exits_with_a_message_for_a_newer_store(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    await (await _opened(path)).close()
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA user_version = 99")
    connection.close()
    result = _conveyord("--store", f"sqlite:{path}")
    assert result.returncode == 6
    assert "schema version 99" in result.stderr


def test_conveyord_exits_with_a_message_for_a_folder_it_cannot_make(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the store's folder should be")
    result = _conveyord("--store", f"sqlite:{tmp_path / 'taken' / 'tasks.db'}")
    assert result.returncode == 5
    assert f"cannot make the folder of store file {tmp_path / 'taken' / 'tasks.db'}" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_a_malformed_store_option_is_refused() -> None:
    result = _conveyord("--store", "mysql://somewhere")
    assert result.returncode == 2
    assert "unknown store" in result.stderr


async def test_one_tasks_changes_replay_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    store = await _opened(path)
    a, _ = await create_one(store, new_task())
    await create_one(store, new_task())
    await store.update(a.task_id, start)
    await create_one(store, new_task())
    await store.update(a.task_id, complete)
    await store.close()

    store = await _opened(path)
    replayed = await store.changes_since(0, TaskFilter(task_id=a.task_id))
    assert [c.revision for c in replayed] == [1, 3, 5]
    assert [c.task.task_id for c in replayed] == [a.task_id] * 3
    await store.close()


async def test_declared_task_types_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    store = await _opened(path)
    await store.declare_task_types({"resize"})
    await store.close()
    store = await _opened(path)
    assert await store.declared_task_types() == {"resize"}
    await store.close()


async def test_a_failed_attempt_s_error_survives_a_restart_written_once(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    store = await _opened(path)
    error = TaskError("HANDLER_ERROR", "KeyError: 'k'", "KeyError", "Traceback\n" * 500, True)
    failed, _ = await create_one(store, new_task(error=error, last_attempt_error=error))
    await store.close()
    connection = sqlite3.connect(path)
    (data,) = connection.execute("SELECT data FROM tasks").fetchone()
    connection.close()
    assert data.count("Traceback") == 500  # once, not once for each of the two fields
    store = await _opened(path)
    again = await store.get(failed.task_id)
    assert again is not None and again.error == again.last_attempt_error == error
    await store.close()
