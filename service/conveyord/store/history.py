"""The change history that a Watch resumes from: every committed change after a revision,
bounded by count and by age.

The history holds the task changes after `compacted`, in revision order: one for each
revision, so that history[i] is revision compacted + 1 + i, unless the store gives revisions
to changes that are not the tasks' (a shared store's schedule changes), which leave gaps; a
change is then found by bisection. A change carries the revision of the same task's change
before it (`previous`), so one task's changes are found by following that chain back from
its latest, not by reading the whole history.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable, Iterable

from conveyord.model import Change, TaskFilter
from conveyord.store.base import RevisionOutOfRange


class ChangeHistory:
    """The latest changes, at most `size` of them and none older than `age` seconds."""

    def __init__(self, size: int, age: float, clock: Callable[[], float]) -> None:
        self._size = size
        self._age = age
        self._clock = clock
        self._changes: deque[Change] = deque()
        self._latest: dict[str, Change] = {}  # by task, its latest change in the history
        self.compacted = 0  # changes up to this revision have left the history

    def __len__(self) -> int:
        return len(self._changes)

    def latest_revision(self, task_id: str) -> int:
        """The revision of the task's latest change in the history (0: none)."""
        latest = self._latest.get(task_id)
        return 0 if latest is None else latest.revision

    def remember(self, change: Change) -> None:
        """Add a committed change (the next revision)."""
        self._changes.append(change)
        self._latest[change.task.task_id] = change

    def trim(self) -> None:
        """Let go of the changes beyond the size, and those older than the age."""
        oldest_kept = self._clock() - self._age
        changes = self._changes
        while changes and (len(changes) > self._size or changes[0].at < oldest_kept):
            oldest = changes.popleft()
            self.compacted = oldest.revision
            task_id = oldest.task.task_id
            if self._latest.get(task_id) is oldest:
                del self._latest[task_id]

    def since(self, revision: int, latest: int, task_filter: TaskFilter) -> list[Change]:
        """The changes after `revision` that the filter matches, oldest first (`latest`: the
        latest committed revision). RevisionOutOfRange if the history does not reach it."""
        self.trim()
        if revision < self.compacted or revision > latest:
            raise RevisionOutOfRange(revision, self.compacted, latest)
        if task_filter.task_id:  # one task's changes: its own, not the whole history's
            return self._chain(self._latest.get(task_filter.task_id), revision)
        tail = itertools.islice(self._changes, self._after(revision), None)
        return [change for change in tail if task_filter.matches(change.task)]

    def restore(self, changes: Iterable[Change], revision: int) -> None:
        """Fill the history from what a durable store read back, up to `revision`."""
        for change in changes:
            self.remember(change._replace(previous=self.latest_revision(change.task.task_id)))
        self.compacted = self._changes[0].revision - 1 if self._changes else revision

    def _chain(self, latest: Change | None, revision: int) -> list[Change]:
        """One task's changes after `revision`, oldest first: back from its latest change
        along `previous`."""
        found: list[Change] = []
        change = latest
        while change is not None and change.revision > revision:
            found.append(change)
            previous = change.previous
            change = None
            if previous > self.compacted:
                change = self._changes[self._after(previous - 1)]
                assert change.revision == previous, "a task's change is missing from the history"
        found.reverse()
        return found

    def _after(self, revision: int) -> int:
        """The index of the first change after `revision` (len: none): where it would be if
        no revision were missing, or else found by bisection."""
        changes = self._changes
        index = revision - self.compacted
        if index < len(changes) and changes[index].revision == revision + 1:
            return index
        return bisect.bisect_right(changes, revision, key=_revision_of)


def _revision_of(change: Change) -> int:
    return change.revision
