"""The store seam: what the scheduler, the API and the event hub need from wherever tasks live.

A store owns the single revision counter. Every change it makes gets the next revision,
enters the bounded change history that Watch resumes from, and is published, once
committed and in revision order, on its change feed (feed.py), which the event hub follows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Protocol

import grpc

from conveyord.errors import ConveyorError
from conveyord.feed import ChangeFeed
from conveyord.model import Attempt, Change, Task, TaskFilter, TaskStatus

if TYPE_CHECKING:
    from conveyord.store.schedules import ScheduleBook
    from conveyord.tenants import Tenants

# Given a task's latest state, returns its next state, made with `Task.evolve` (a record no
# one else holds yet: the store stamps its revision on it), or None for no change.
Mutation = Callable[[Task], Task | None]


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """What a worker asks dispatch for: up to `count` tasks of `types` (None: any type),
    at most `limits[type]` of a limited type, each under a lease held by `holder` until
    `lease_until(task)`; the holder's handlers of `pausable` types can park at a pause point."""

    holder: str
    count: int
    types: frozenset[str] | None
    limits: Mapping[str, int]
    lease_until: Callable[[Task], float]
    now: float
    pausable: frozenset[str] = frozenset()
    tenant: str | None = None  # only this tenant's tasks (None: any tenant's, in turns)
    # The per-type caps themselves: `limits` counts this server's attempts only, so a store
    # shared with other servers applies these to the attempts of all of them.
    type_concurrency: Mapping[str, int] = dataclasses.field(default_factory=dict)


class StoreOpenError(Exception):
    """The store cannot be opened; `exit_code` tells conveyord how to exit."""

    exit_code = 5


class StoreTooNew(StoreOpenError):
    """The store was written by a newer conveyord: its schema is newer than this one knows."""

    exit_code = 6


class StoreError(ConveyorError):
    """Base of the errors a store raises for a request it cannot honour; each sets its own
    status code and reason."""


class TaskNotFound(StoreError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "TASK_NOT_FOUND"

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} not found")
        self.task_id = task_id

    def metadata(self) -> dict[str, str]:
        return {"task_id": self.task_id}


class RequestIdReused(StoreError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "REQUEST_ID_REUSED"

    def __init__(self, request_id: str, task_id: str) -> None:
        super().__init__(
            f"request_id {request_id!r} was already used for task {task_id} "
            "with a different request"
        )
        self.request_id = request_id
        self.task_id = task_id

    def metadata(self) -> dict[str, str]:
        return {"request_id": self.request_id, "task_id": self.task_id}


class StoreFailed(StoreError):
    """The store can no longer make changes durable (a failed write, or its file is gone):
    what was staged is not acknowledged, and the server must stop."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORE_FAILED"


class RevisionOutOfRange(StoreError):
    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "REVISION_OUT_OF_RANGE"

    def __init__(self, revision: int, oldest: int, latest: int) -> None:
        super().__init__(
            f"revision {revision} is outside the change history, which holds revisions "
            f"after {oldest} up to {latest}; Get or List again and watch from there"
        )
        self.revision, self.oldest, self.latest = revision, oldest, latest

    def metadata(self) -> dict[str, str]:
        return {"oldest": str(self.oldest), "latest": str(self.latest)}


class TaskStore(Protocol):
    """Where tasks live. Every method is safe to call from the event loop; none blocks it."""

    async def revision(self) -> int:
        """The revision of the latest committed change (asynchronous: a shared database
        answers it with a query)."""
        ...

    @property
    def feed(self) -> ChangeFeed:
        """Where every committed change is published, in revision order."""
        ...

    async def declare_task_types(self, task_types: AbstractSet[str]) -> None:
        """Remember task types that a worker runs, durably: Create accepts them from now
        on, even while no worker that runs them is connected."""
        ...

    async def declared_task_types(self) -> frozenset[str]:
        """Every task type ever declared."""
        ...

    async def create(
        self,
        tasks: Sequence[Task],
        admit: Callable[[Sequence[Task]], None],
        rates: Tenants | None = None,
    ) -> list[tuple[Task, bool]]:
        """Store new tasks, all or none, and return each with its revision, its `seq`, and
        `True`. The records given become the store's (it stamps their seq and revision).

        A task whose (tenant, request_id) is already known is not stored again: the task
        first created with it comes back with `False`; if that task was created from a
        different request, RequestIdReused is raised and nothing is stored. Before storing,
        `admit(the new tasks)` is called, which raises to refuse them (a full queue).

        With `rates`, the tasks it stores count against their tenants' rates, last: a
        tenant over its rate is TenantLimitReached, and nothing is stored. A shared store
        takes their tokens from buckets in its database, in the transaction that stores
        them, so that every server takes from the same and a request id that another
        server took meanwhile costs nothing.
        """
        ...

    async def get(self, task_id: str) -> Task | None:
        """The task's latest committed state, or None."""
        ...

    async def get_by_request(self, tenant: str, request_id: str) -> Task | None:
        """The task first created with this request id, or None: as far as this store has
        read (a shared store's view of the database may trail another server's creates)."""
        ...

    async def attempts(self, task_id: str) -> Sequence[Attempt]:
        """The task's ended attempts, oldest first (the latest 100): each is added by the
        committed change that ended it (Change.ended), and they go with the task."""
        ...

    async def update(self, task_id: str, mutation: Mutation, *, quiet: bool = False) -> Task:
        """Apply `mutation` to the task's latest state, atomically with respect to other updates.

        `mutation` returns the new state, or None to change nothing (the current state is
        returned); whatever it raises propagates and nothing changes. Raises TaskNotFound.
        A `quiet` change (a lease renewed) is a RENEWED change: stored and published on the
        feed like any other, but nothing a watcher sees changed, so no watcher gets it.
        """
        ...

    async def list(
        self, task_filter: TaskFilter, after_seq: int, limit: int, *, newest_first: bool = False
    ) -> tuple[Sequence[Task], int]:
        """Up to `limit` matching tasks created after `after_seq`, oldest first; the revision.

        `newest_first` turns the order around: the tasks created before `after_seq` (0:
        from the newest), newest first.
        """
        ...

    async def changes_since(self, revision: int, task_filter: TaskFilter) -> Sequence[Change]:
        """Matching changes after `revision`, oldest first; RevisionOutOfRange when the
        history no longer reaches back that far or `revision` is ahead of the store."""
        ...

    async def remove(self, task_id: str, check: Callable[[Task], None]) -> Change:
        """Remove a task now (a Delete), atomically with respect to updates: `check(its
        latest state)` raises to refuse (nothing changes). The removal is a REMOVED change,
        as at the end of retention, and frees the task's request_id. Raises TaskNotFound."""
        ...

    async def counts(
        self, task_filter: TaskFilter
    ) -> tuple[dict[tuple[str, TaskStatus], int], int]:
        """How many committed tasks there are of each (task type, status) that the filter's
        tenant, statuses and task type allow (its labels and id prefix are not looked at),
        without going through the tasks; and the revision they are of."""
        ...

    async def remove_finished(self, finished_before: float, limit: int) -> int:
        """Remove up to `limit` terminal tasks that ended before `finished_before`; each
        removal is a change. Returns how many were removed."""
        ...

    schedules: ScheduleBook
    """The schedules, kept in the same store as the tasks."""

    shared: bool
    """Whether other servers write to the same store (PostgreSQL): then each server's
    local worker holds leases of its own, which run out unless renewed."""

    on_failure: Callable[[Exception], None]
    """Called once when the store can no longer make changes durable: the server must stop."""

    on_commit: Callable[[int, float], None] | None
    """Called after each batch a durable store wrote, with its size (changes) and the
    seconds its write and sync took (for metrics); None: nobody asks."""

    @property
    def queued(self) -> int:
        """Tasks that are CREATED (runnable, or waiting for their next attempt) or PAUSED."""
        ...

    def queued_of(self, tenant: str) -> int:
        """The tasks of `tenant` that `queued` counts."""
        ...

    async def claim(self, request: Claim) -> Sequence[Task]:
        """Start the best runnable tasks that the request allows, each under a new lease
        held by `request.holder`, all at once and atomically: no task is claimed twice.
        Best is the highest priority after aging, then the earliest runnable."""
        ...

    async def update_where(self, task_filter: TaskFilter, mutation: Mutation) -> Sequence[Task]:
        """Apply `mutation` to every task the filter matches, as `update` does to one;
        the tasks it changed, in their new state. The tasks are those that match when it
        begins (a task created meanwhile is not touched), each mutated as it then stands;
        a large update is written in parts, with other calls served in between."""
        ...

    async def count(self, task_filter: TaskFilter) -> int:
        """How many tasks the filter matches."""
        ...

    async def expired_leases(self, now: float) -> Sequence[Task]:
        """The tasks whose attempt's lease (running, or parked) ran out by `now` (each
        once: the caller ends it)."""
        ...

    async def overdue(self, now: float) -> Sequence[Task]:
        """The CREATED tasks whose start deadline and the WAITING_INPUT tasks whose input
        deadline passed by `now` (each once: the caller fails it, lifecycle.overdue)."""
        ...

    def next_wakeup(self) -> float | None:
        """The earliest time at which a waiting task becomes runnable, a lease runs out or
        a start or input deadline passes, if any (dispatch sets one timer for it); it may be early,
        never late."""
        ...

    async def open(self) -> None:
        """Load what the store holds; called once, before anything else."""
        ...

    async def close(self) -> None:
        """Release what the store holds; safe to call twice."""
        ...
