"""Where tasks live: the seam (`base`), in memory (`memory`), in a SQLite file (`sqlite`),
in a PostgreSQL database that several servers share (`postgres`)."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from conveyord.store.base import StoreOpenError, TaskStore
from conveyord.store.memory import (
    DEFAULT_AGING_RATE,
    DEFAULT_HISTORY_AGE,
    DEFAULT_HISTORY_SIZE,
    MemoryStore,
)
from conveyord.store.postgres import DEFAULT_POOL_SIZE, PostgresStore
from conveyord.store.sqlite import SqliteStore

POSTGRES_SCHEMES = ("postgresql", "postgres")


def default_store_path() -> Path:
    """$XDG_DATA_HOME/conveyor/conveyor.db (XDG_DATA_HOME defaults to ~/.local/share)."""
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "conveyor" / "conveyor.db"


def store_from_url(
    url: str,
    *,
    history_size: int = DEFAULT_HISTORY_SIZE,
    history_age: float = DEFAULT_HISTORY_AGE,
    aging_rate: float = DEFAULT_AGING_RATE,
) -> TaskStore:
    """`memory`, `sqlite` (the default path), `sqlite:PATH`, or a PostgreSQL URL
    (`postgresql://user@host:port/database`, or `postgres://...`); ValueError for anything
    else."""
    kind, _, path = url.partition(":")
    if kind in POSTGRES_SCHEMES and path.startswith("//"):
        url, pool_size = _pool_size(url)
        return PostgresStore(
            url, history_size=history_size, history_age=history_age, aging_rate=aging_rate,
            pool_size=pool_size,
        )  # fmt: skip
    if kind == "memory" and not path:
        return MemoryStore(
            history_size=history_size, history_age=history_age, aging_rate=aging_rate
        )
    if kind == "sqlite":
        location = Path(path).expanduser() if path else default_store_path()
        return SqliteStore(
            location, history_size=history_size, history_age=history_age, aging_rate=aging_rate
        )
    raise ValueError(
        f"unknown store {url!r}: use memory, sqlite, sqlite:PATH or "
        "postgresql://user@host:port/database"
    )


def _pool_size(url: str) -> tuple[str, int]:
    """The URL without its `pool_size` parameter (conveyord's, not the database's), and
    that size (DEFAULT_POOL_SIZE if not given)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    sizes = [value for key, value in query if key == "pool_size"]
    if not sizes:
        return url, DEFAULT_POOL_SIZE
    if len(sizes) > 1 or not sizes[0].isdigit() or int(sizes[0]) < 1:
        raise ValueError(f"pool_size must be a whole number of at least 1, not {sizes[-1]!r}")
    rest = urllib.parse.urlencode([(key, value) for key, value in query if key != "pool_size"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), int(sizes[0])


__all__ = [
    "DEFAULT_AGING_RATE",
    "DEFAULT_HISTORY_AGE",
    "DEFAULT_HISTORY_SIZE",
    "MemoryStore",
    "PostgresStore",
    "SqliteStore",
    "StoreOpenError",
    "TaskStore",
    "default_store_path",
    "store_from_url",
]
