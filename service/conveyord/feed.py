"""The change feed: every committed change, in revision order, to whoever follows it.

The store publishes to its feed once a change is committed (durable, for a durable store);
the event hub follows it to serve watchers, and so will dispatch (wake-ups, and signals to
the holders of leases) and metrics. `revision` is that of the latest change delivered, so
a heartbeat that carries it never runs ahead of what followers were given. A follower is
called on the event loop and must not block: it takes the change and returns.
"""

from __future__ import annotations

from collections.abc import Callable

from conveyord.model import Change

Follower = Callable[[Change], None]


class ChangeFeed:
    """Committed changes, in revision order, to every follower."""

    def __init__(self, revision: int = 0) -> None:
        self.revision = revision
        self._followers: list[Follower] = []

    def follow(self, follower: Follower) -> Callable[[], None]:
        """Call `follower` with every change published from now on; returns how to stop."""
        self._followers.append(follower)
        return lambda: self._followers.remove(follower)

    def publish(self, change: Change) -> None:
        """Deliver a committed change (called by the store, in revision order)."""
        self.revision = change.revision
        for follower in self._followers:
            follower(change)
