"""The event hub: fans each committed change out to the watchers it concerns.

The store feeds it (`publish`) in revision order; anything else that learns of changes
in revision order could feed it the same way. Watchers of one task are found by the
task's id and watchers of many tasks by their filter's task type, so a change costs
nothing for watchers of other tasks. Each change is handed to every watcher as one
`Delivery`, whose wire form is encoded once, by the first watcher that sends it.

A slow watcher never holds anything else up. Its buffer is bounded: when it holds more
than `limit` changes, they are coalesced to the latest change of each task (a terminal
state is never dropped); if that still fills more than half of it, the watcher is cut
loose (`WatcherTooSlow`) and resumes from the last revision it received. Half, so that
coalescing happens at most once every `limit / 2` changes rather than on every one.
Changes are shared: a buffered change costs a watcher one reference, not a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import grpc

from conveyord.errors import ConveyorError, ShuttingDown
from conveyord.model import Change, ChangeKind, TaskFilter

DEFAULT_WATCH_BUFFER = 1_000


class HubClosed(ShuttingDown):
    """The hub was closed (the server is stopping) while a watcher waited."""


class WatcherTooSlow(ConveyorError):
    """A watcher fell too far behind; it should resume from `revision`, the last it got."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "WATCHER_TOO_SLOW"

    def __init__(self, limit: int, revision: int = 0) -> None:
        super().__init__(
            f"the watcher fell more than {limit} changes behind; "
            f"resume with since_revision {revision}"
        )
        self.limit = limit
        self.revision = revision

    def metadata(self) -> dict[str, str]:
        return {"resume_revision": str(self.revision)}


class Delivery:
    """One change on its way to watchers, with its wire form once someone has encoded it."""

    __slots__ = ("change", "wire")

    def __init__(self, change: Change) -> None:
        self.change = change
        self.wire: bytes | None = None

    def encoded(self, encode: Callable[[Change], bytes]) -> bytes:
        if self.wire is None:
            self.wire = encode(self.change)
        return self.wire


class Subscription:
    """One watcher's view of the hub: the changes that match its filter, in revision order."""

    def __init__(self, hub: EventHub, task_filter: TaskFilter, limit: int) -> None:
        self.filter = task_filter
        self.limit = limit
        self._hub = hub
        self._pending: deque[Delivery] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._too_slow = False

    def push(self, delivery: Delivery) -> bool:
        """Buffer a change for the watcher; False once it is too slow to keep."""
        self._pending.append(delivery)
        if len(self._pending) > self.limit:
            self._coalesce()
        self._wake()
        return not self._too_slow

    def _coalesce(self) -> None:
        """Keep the latest change of each task and every terminal state; give up on the
        watcher if that still fills more than half the buffer."""
        latest = {d.change.task.task_id: d for d in self._pending}
        kept = deque(
            d
            for d in self._pending
            if latest[d.change.task.task_id] is d
            or (d.change.kind is ChangeKind.CHANGED and d.change.task.terminal)
        )
        self._hub.coalesced += 1
        if len(kept) > self.limit // 2:
            self._too_slow = True
            self._hub.cut += 1
            self._pending.clear()
        else:
            self._pending = kept

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout: float) -> Delivery | None:
        """The next change, or None when `timeout` seconds pass without one."""
        if not self._pending:
            self._raise_if_ended()
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            timer = loop.call_later(timeout, self._wake)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._pending:
                self._raise_if_ended()
                return None
        return self._pending.popleft()

    def _raise_if_ended(self) -> None:
        if self._too_slow:
            raise WatcherTooSlow(self.limit)
        if self._closed:
            raise HubClosed()

    def end(self) -> None:
        """Wake the watcher so that it sees the hub is closed."""
        self._closed = True
        self._wake()

    def close(self) -> None:
        self._hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class EventHub:
    """Delivers changes to subscriptions; `revision` is that of the latest change published."""

    def __init__(self, revision: int = 0, *, buffer: int = DEFAULT_WATCH_BUFFER) -> None:
        self.revision = revision
        self.buffer = buffer
        self._by_task: dict[str, set[Subscription]] = {}
        self._by_type: dict[str, set[Subscription]] = {}  # watchers of many tasks of one type
        self._broad: set[Subscription] = set()  # watchers of many tasks of any type
        self._closed = False
        self._gone = asyncio.Event()  # set once the hub is closed and every watcher has left
        self.coalesced = 0  # times a watcher's buffer was coalesced
        self.cut = 0  # watchers cut loose as too slow

    def subscribe(self, task_filter: TaskFilter) -> Subscription:
        if self._closed:
            raise HubClosed()
        subscription = Subscription(self, task_filter, self.buffer)
        self._group(task_filter, create=True).add(subscription)  # type: ignore[union-attr]
        return subscription

    def _group(self, task_filter: TaskFilter, *, create: bool = False) -> set[Subscription] | None:
        if task_filter.task_id:
            index, key = self._by_task, task_filter.task_id
        elif task_filter.task_type:
            index, key = self._by_type, task_filter.task_type
        else:
            return self._broad
        return index.setdefault(key, set()) if create else index.get(key)

    def unsubscribe(self, subscription: Subscription) -> None:
        group = self._group(subscription.filter)
        if group is None:
            return
        if self._closed:
            self._gone_soon()
        group.discard(subscription)
        if not group and group is not self._broad:
            index = self._by_task if subscription.filter.task_id else self._by_type
            index.pop(subscription.filter.task_id or subscription.filter.task_type, None)

    @property
    def watchers(self) -> int:
        groups = [self._broad, *self._by_task.values(), *self._by_type.values()]
        return sum(len(group) for group in groups)

    def publish(self, change: Change) -> None:
        """Hand a committed change to every subscription it concerns."""
        self.revision = change.revision
        if change.kind is ChangeKind.RENEWED:
            return  # nothing a watcher sees changed
        task = change.task
        delivery: Delivery | None = None
        too_slow: list[Subscription] = []
        for group in (
            self._by_task.get(task.task_id),
            self._by_type.get(task.task_type),
            self._broad,
        ):
            for subscription in group or ():
                if subscription.filter.matches(task):
                    delivery = delivery or Delivery(change)
                    if not subscription.push(delivery):
                        too_slow.append(subscription)
        for subscription in too_slow:
            self.unsubscribe(subscription)

    def close(self) -> None:
        """End every subscription: their watchers see HubClosed once they have drained."""
        self._closed = True
        groups = [self._broad, *self._by_task.values(), *self._by_type.values()]
        for subscription in [s for group in groups for s in group]:
            subscription.end()
        self._check_gone()

    async def wait_closed(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until every watcher has seen the end and left,
        so that their streams end with SHUTTING_DOWN before the server cuts them off."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._gone.wait(), timeout)

    def _gone_soon(self) -> None:
        """Check once this unsubscription is done whether the last watcher left."""
        asyncio.get_running_loop().call_soon(self._check_gone)

    def _check_gone(self) -> None:
        if self._closed and not self.watchers:
            self._gone.set()
