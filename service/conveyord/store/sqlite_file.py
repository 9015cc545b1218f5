"""The SQLite file of a store: opening it for one server alone, and its schema, versioned
and migrated on open. A file that is locked, unreadable, corrupt, foreign or from a newer
server is refused with a clear message (each its own StoreOpenError) and never overwritten.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from conveyord.store.base import StoreOpenError, StoreTooNew

log = logging.getLogger(__name__)

APPLICATION_ID = 0x436F6E76  # "Conv": marks a file as a conveyor store

# Each entry upgrades the schema by one version; a file at version N gets entries N and on.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE tasks (task_id TEXT PRIMARY KEY, data TEXT NOT NULL);
    CREATE TABLE changes (
        revision INTEGER PRIMARY KEY, kind INTEGER NOT NULL, at REAL NOT NULL, data TEXT NOT NULL
    );
    CREATE TABLE state (
        id INTEGER PRIMARY KEY CHECK (id = 1), revision INTEGER NOT NULL, next_seq INTEGER NOT NULL
    );
    INSERT INTO state (id, revision, next_seq) VALUES (1, 0, 1);
    """,
    # The task types that workers declared, so that Create accepts them after a restart.
    """
    CREATE TABLE task_types (task_type TEXT PRIMARY KEY);
    """,
    # Schedules, each a JSON object of its fields.
    """
    CREATE TABLE schedules (schedule_id TEXT PRIMARY KEY, data TEXT NOT NULL);
    """,
    # Each task's ended attempts, keyed by the revision of the change that ended each.
    """
    CREATE TABLE attempts (
        task_id TEXT NOT NULL, revision INTEGER NOT NULL, data TEXT NOT NULL,
        PRIMARY KEY (task_id, revision)
    ) WITHOUT ROWID;
    """,
)


class StoreLocked(StoreOpenError):
    exit_code = 4


def connect(path: Path, migrations: Sequence[str]) -> tuple[sqlite3.Connection, tuple[int, int]]:
    """Connect, take the file for this server alone, and bring its schema up to date; the
    connection, and the identity of the file (device, inode) it opened."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreOpenError(
            f"cannot make the folder of store file {path}: {error.strerror or error}"
        ) from error
    try:
        connection = sqlite3.connect(path, timeout=0, isolation_level=None)
    except sqlite3.Error as error:
        raise StoreOpenError(f"cannot open store file {path}: {error}") from error
    try:
        connection.execute("PRAGMA locking_mode = EXCLUSIVE")
        connection.execute("BEGIN EXCLUSIVE")  # takes the lock, and keeps it
        _upgrade(connection, path, migrations)
        connection.execute("COMMIT")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
        identity = file_identity(path)
    except StoreOpenError:
        connection.close()
        raise
    except sqlite3.OperationalError as error:
        connection.close()
        if "locked" in str(error) or "busy" in str(error):
            raise StoreLocked(
                f"store file {path} is in use by another conveyord; "
                "give each server a store of its own"
            ) from error
        raise StoreOpenError(_cannot_open(path, error)) from error
    except sqlite3.DatabaseError as error:
        connection.close()
        raise StoreOpenError(
            f"store file {path} is not a SQLite database or is corrupt: {error}"
        ) from error
    return connection, identity


def _cannot_open(path: Path, error: sqlite3.Error) -> str:
    """Say why the file cannot be used, where SQLite's own words ("disk I/O error") hide it."""
    for place in (path, path.parent):
        if place.exists() and not os.access(place, os.W_OK):
            kind = "file" if place == path else "folder"
            if os.statvfs(place).f_flag & os.ST_RDONLY:
                why = "is on a read-only file system"
            else:
                why = f"is not writable by this user (uid {os.getuid()})"
            return f"store {kind} {place} {why}; the store must write there ({error})"
    return f"cannot use store file {path}: {error}"


def _upgrade(connection: sqlite3.Connection, path: Path, migrations: Sequence[str]) -> None:
    """Apply the migrations the file lacks; refuse a file that is foreign or newer."""
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    latest = len(migrations)
    if application_id != APPLICATION_ID:
        tables = connection.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        if tables or version:
            raise StoreOpenError(f"{path} is a SQLite file but not a conveyor store")
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    if version > latest:
        raise StoreTooNew(
            f"store file {path} has schema version {version}, newer than the "
            f"{latest} this conveyord knows; run a newer conveyord"
        )
    for number in range(version, latest):
        for statement in migrations[number].split(";"):
            if statement.strip():
                connection.execute(statement)
        if version:
            log.info("store %s upgraded to schema version %d", path, number + 1)
    if version != latest:
        connection.execute(f"PRAGMA user_version = {latest}")


def file_identity(path: Path) -> tuple[int, int]:
    """What tells one file from another at the same path: its device and inode."""
    status = path.stat()
    return status.st_dev, status.st_ino
