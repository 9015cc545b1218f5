"""The change feed: every committed change, in revision order, to whoever follows it.

The store publishes to its feed once a change is committed (durable, for a durable store);
the event hub follows it to serve watchers, and so do dispatch (wake-ups, and signals to
the holders of leases) and metrics. `revision` is that of the latest change delivered, so
a heartbeat that carries it never runs ahead of what followers were given. A follower is
called on the event loop and must not block: it takes the change and returns.

A follower of steps (`follow_steps`) is also given the task as it stood before the change
(None for a new task), as readers saw it: what moved (an attempt started, a task left the
queue) is then known without keeping a copy of every task's state beside the store's.
"""

from __future__ import annotations

from collections.abc import Callable

from conveyord.model import Change, Task

Follower = Callable[[Change], None]
StepFollower = Callable[[Change, Task | None], None]  # the change, and the task before it


class ChangeFeed:
    """Committed changes, in revision order, to every follower."""

    def __init__(self, revision: int = 0) -> None:
        self.revision = revision
        self._followers: list[Follower] = []
        self._step_followers: list[StepFollower] = []

    def follow(self, follower: Follower) -> Callable[[], None]:
        """Call `follower` with every change published from now on; returns how to stop."""
        self._followers.append(follower)
        return lambda: self._followers.remove(follower)

    def follow_steps(self, follower: StepFollower) -> Callable[[], None]:
        """Call `follower` with every change published from now on and the task as it stood
        before it; returns how to stop."""
        self._step_followers.append(follower)
        return lambda: self._step_followers.remove(follower)

    @property
    def followers(self) -> int:
        """How many follow it, of either kind."""
        return len(self._followers) + len(self._step_followers)

    def publish(self, change: Change, before: Task | None = None) -> None:
        """Deliver a committed change (called by the store, in revision order), with the
        task's committed state before it (None: the task is new)."""
        self.revision = change.revision
        for follower in self._followers:
            follower(change)
        for step_follower in self._step_followers:
            step_follower(change, before)
