"""The in-memory store: fast, and forgets everything when the server stops."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence

from sortedcontainers import SortedDict

from conveyord.model import Change, ChangeKind, Task, TaskFilter
from conveyord.store.base import (
    ChangeListener,
    Mutation,
    RequestIdReused,
    RevisionOutOfRange,
    TaskNotFound,
)

DEFAULT_HISTORY_SIZE = 100_000
DEFAULT_HISTORY_AGE = 600.0


class MemoryStore:
    """Tasks in dictionaries, a revision counter, and a bounded change history."""

    def __init__(
        self,
        *,
        history_size: int = DEFAULT_HISTORY_SIZE,
        history_age: float = DEFAULT_HISTORY_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tasks: dict[str, Task] = {}
        self._by_seq: SortedDict[int, str] = SortedDict()
        self._request_ids: dict[tuple[str, str], str] = {}
        self._finished: deque[tuple[float, str]] = deque()  # (finished_at, task_id), oldest first
        self._history: deque[Change] = deque()
        self._history_size = history_size
        self._history_age = history_age
        self._compacted = 0  # changes up to this revision have left the history
        self._revision = 0
        self._seq = itertools.count(1)
        self._clock = clock
        self._listener: ChangeListener = lambda change: None

    @property
    def revision(self) -> int:
        return self._revision

    def set_listener(self, listener: ChangeListener) -> None:
        self._listener = listener

    async def create(self, task: Task, admit: Callable[[], None]) -> tuple[Task, bool]:
        key = (task.owner, task.request_id)
        if task.request_id and (first_id := self._request_ids.get(key)) is not None:
            first = self._tasks[first_id]
            if first.request_hash != task.request_hash:
                raise RequestIdReused(task.request_id, first_id)
            return first, False
        admit()
        task = task.evolve(seq=next(self._seq))
        stored = self._commit(ChangeKind.CHANGED, task)
        self._by_seq[stored.seq] = stored.task_id
        if stored.request_id:
            self._request_ids[key] = stored.task_id
        return stored, True

    async def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    async def update(self, task_id: str, mutation: Mutation) -> Task:
        current = self._tasks.get(task_id)
        if current is None:
            raise TaskNotFound(task_id)
        new = mutation(current)
        if new is None:
            return current
        stored = self._commit(ChangeKind.CHANGED, new)
        if stored.terminal and not current.terminal:
            self._finished.append((stored.finished_at or stored.updated_at, task_id))
        return stored

    async def list(
        self, task_filter: TaskFilter, after_seq: int, limit: int
    ) -> tuple[Sequence[Task], int]:
        page: list[Task] = []
        for seq in self._by_seq.irange(minimum=after_seq, inclusive=(False, True)):
            task = self._tasks[self._by_seq[seq]]
            if task_filter.matches(task):
                page.append(task)
                if len(page) == limit:
                    break
        return page, self._revision

    async def changes_since(self, revision: int, task_filter: TaskFilter) -> Sequence[Change]:
        self._trim_history()
        if revision < self._compacted or revision > self._revision:
            raise RevisionOutOfRange(revision, self._compacted, self._revision)
        # The history holds every revision after _compacted, one change each.
        start = revision - self._compacted
        tail = itertools.islice(self._history, start, None)
        return [change for change in tail if task_filter.matches(change.task)]

    async def remove_finished(self, finished_before: float, limit: int) -> int:
        removed = 0
        while self._finished and removed < limit and self._finished[0][0] < finished_before:
            _, task_id = self._finished.popleft()
            task = self._tasks.pop(task_id, None)
            if task is None:
                continue
            del self._by_seq[task.seq]
            if task.request_id:
                self._request_ids.pop((task.owner, task.request_id), None)
            self._commit(ChangeKind.REMOVED, task, keep=False)
            removed += 1
        return removed

    async def close(self) -> None:
        pass

    def _commit(self, kind: ChangeKind, task: Task, *, keep: bool = True) -> Task:
        """Give the change the next revision, record it, and tell the listener."""
        self._revision += 1
        if kind is ChangeKind.CHANGED:
            task = task.evolve(revision=self._revision)
        if keep:
            self._tasks[task.task_id] = task
        change = Change(self._revision, kind, task, self._clock())
        self._history.append(change)
        self._trim_history()
        self._listener(change)
        return task

    def _trim_history(self) -> None:
        oldest_kept = self._clock() - self._history_age
        history = self._history
        while history and (len(history) > self._history_size or history[0].at < oldest_kept):
            self._compacted = history.popleft().revision
