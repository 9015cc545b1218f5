"""The PostgreSQL store when the database lets it down.

A replica a little behind keeps every change it has not read, whatever another replica
trims from the changes table.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from conveyord.model import Change, Task, TaskFilter
from conveyord.store.postgres import TRIM_EVERY, PostgresStore
from tests.conftest import PostgresOpener
from tests.proxy import Proxy
from tests.test_store import admit, create_one, new_task

# Enough changes in one batch that a store keeping 10 in its history trims the table after it.
BURST = TRIM_EVERY + 100
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


# --- a replica left behind -------------------------------------------------------------


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
