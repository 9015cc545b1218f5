"""The event hub: fans each committed change out to the watchers it concerns.

The store feeds it (`publish`) in revision order; anything else that learns of changes
in revision order could feed it the same way. Watchers of one task are found by the
task's id, so a change costs nothing for the watchers of other tasks; watchers of many
tasks are checked against their filter.
"""

from __future__ import annotations

import asyncio
from collections import deque

from conveyord.model import Change, TaskFilter


class HubClosed(Exception):
    """The hub was closed (the server is stopping) while a watcher waited."""


class Subscription:
    """One watcher's view of the hub: the changes that match its filter, in revision order."""

    def __init__(self, hub: EventHub, task_filter: TaskFilter) -> None:
        self.filter = task_filter
        self._hub = hub
        self._pending: deque[Change] = deque()
        self._ready = asyncio.Event()
        self._closed = False

    def push(self, change: Change) -> None:
        self._pending.append(change)
        self._ready.set()

    async def next(self, timeout: float) -> Change | None:
        """The next change, or None when `timeout` seconds pass without one."""
        while not self._pending:
            if self._closed:
                raise HubClosed()
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return None
        return self._pending.popleft()

    def end(self) -> None:
        """Wake the watcher so that it sees the hub is closed."""
        self._closed = True
        self._ready.set()

    def close(self) -> None:
        self._hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class EventHub:
    """Delivers changes to subscriptions; `revision` is that of the latest change published."""

    def __init__(self, revision: int = 0) -> None:
        self.revision = revision
        self._by_task: dict[str, set[Subscription]] = {}
        self._broad: set[Subscription] = set()
        self._closed = False

    def subscribe(self, task_filter: TaskFilter) -> Subscription:
        if self._closed:
            raise HubClosed()
        subscription = Subscription(self, task_filter)
        if task_filter.task_id:
            self._by_task.setdefault(task_filter.task_id, set()).add(subscription)
        else:
            self._broad.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        task_id = subscription.filter.task_id
        if not task_id:
            self._broad.discard(subscription)
            return
        watchers = self._by_task.get(task_id)
        if watchers is not None:
            watchers.discard(subscription)
            if not watchers:
                del self._by_task[task_id]

    @property
    def watchers(self) -> int:
        return len(self._broad) + sum(len(s) for s in self._by_task.values())

    def publish(self, change: Change) -> None:
        """Hand a committed change to every subscription it concerns."""
        self.revision = change.revision
        for subscription in self._by_task.get(change.task.task_id, ()):
            subscription.push(change)
        for subscription in self._broad:
            if subscription.filter.matches(change.task):
                subscription.push(change)

    def close(self) -> None:
        """End every subscription: their watchers see HubClosed once they have drained."""
        self._closed = True
        for subscription in [*self._broad, *(s for group in self._by_task.values() for s in group)]:
            subscription.end()
