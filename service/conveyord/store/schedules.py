"""Where schedules live: a small book beside the tasks, in the same store.

A change is a mutation of the latest state, as for tasks. In a store of one server's own,
the book holds the latest state: a change is applied to it at once (so that the next change
builds on it) and its write staged, then made durable (`persist`, which a durable store
batches: many schedules firing together make one write, and writes reach the disk in the
order they were staged, the tasks' with the schedules'), and only then answered and heard
of by the book's listeners. In a store that several servers share, the latest state is the
store's: the book hands each change to the store (`Decide`), which applies it to the latest
state there, and the book learns of it (`apply`), as every server's book does, in the order
of the store's changes; the change is answered once this server's book has it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

from conveyord.schedules.model import Overlap, Policy, Run, RunOrder, Schedule
from conveyord.schedules.spec import Spec
from conveyord.store.base import RequestIdReused, StoreError

ScheduleMutation = Callable[[Schedule], Schedule | None]
# Makes a schedule's new state durable, or its removal (None) by id: the write is staged when
# it is called (a write staged after it does not reach the disk before it), and the awaitable
# is done once it is durable.
Persist = Callable[[str, Schedule | None], Awaitable[None]]
Listener = Callable[[Schedule, bool], None]  # a schedule's new state; True: it was removed


class Decide(Protocol):
    """How a store shared with other servers makes a schedule change: against the latest
    state in the store, answered once the change (or, if none, the state it found) is in
    this server's book."""

    async def create(self, schedule: Schedule) -> tuple[Schedule, bool]:
        """As ScheduleBook.create, the seq and revision the store's."""

    async def update(self, schedule_id: str, mutation: ScheduleMutation) -> Schedule:
        """As ScheduleBook.update."""

    async def delete(self, schedule_id: str) -> Schedule:
        """As ScheduleBook.delete."""

    async def catch_up(self) -> None:
        """Wait (a bounded time) until the book has every change the store holds now."""


class ScheduleNotFound(StoreError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "SCHEDULE_NOT_FOUND"

    def __init__(self, schedule_id: str) -> None:
        super().__init__(f"schedule {schedule_id} not found")
        self.schedule_id = schedule_id

    def metadata(self) -> dict[str, str]:
        return {"schedule_id": self.schedule_id}


async def _in_memory(schedule_id: str, schedule: Schedule | None) -> None:
    """Persist nothing: an in-memory store's schedules live as long as it does."""


class ScheduleBook:
    """The schedules by id, in creation order, with their request ids."""

    def __init__(self, persist: Persist = _in_memory, *, decide: Decide | None = None) -> None:
        self._persist = persist
        self._decide = decide  # a shared store's: it makes the changes, `apply` learns them
        self._schedules: dict[str, Schedule] = {}
        self._request_ids: dict[tuple[str, str], str] = {}  # (tenant, request id): id
        self._last_seq = 0
        self._revision = 0
        self._listeners: list[Listener] = []

    def load(self, schedules: Sequence[Schedule]) -> None:
        """Take what a durable store held when it opened."""
        for schedule in sorted(schedules, key=lambda s: s.seq):
            self._schedules[schedule.schedule_id] = schedule
            if schedule.request_id:
                self._request_ids[(schedule.tenant, schedule.request_id)] = schedule.schedule_id
            self._last_seq = max(self._last_seq, schedule.seq)
            self._revision = max(self._revision, schedule.revision)

    def follow(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with every change once it is durable; returns how to stop."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def create(self, schedule: Schedule) -> tuple[Schedule, bool]:
        """Keep a new schedule (its seq and revision stamped); a known request id returns
        the schedule first made with it and False (RequestIdReused for another request)."""
        if self._decide is not None:
            return await self._decide.create(schedule)
        key = (schedule.tenant, schedule.request_id)
        if schedule.request_id and key in self._request_ids:
            first = self._schedules[self._request_ids[key]]
            if first.request_hash != schedule.request_hash:
                raise RequestIdReused(schedule.request_id, first.schedule_id)
            return first, False
        self._last_seq += 1
        if schedule.request_id:
            self._request_ids[(schedule.tenant, schedule.request_id)] = schedule.schedule_id
        return await self._commit(schedule.evolve(seq=self._last_seq)), True

    def get(self, schedule_id: str) -> Schedule | None:
        return self._schedules.get(schedule_id)

    async def find(self, schedule_id: str) -> Schedule | None:
        """As `get`; a schedule not there may have just been made on another server of a
        shared store: the book catches up with the store first."""
        schedule = self._schedules.get(schedule_id)
        if schedule is None and self._decide is not None:
            await self._decide.catch_up()
            schedule = self._schedules.get(schedule_id)
        return schedule

    def all(self) -> list[Schedule]:
        """Every schedule, oldest first (the order they were kept in: by seq)."""
        return list(self._schedules.values())

    def page(
        self, after_seq: int, limit: int, wanted: Callable[[Schedule], bool] = lambda s: True
    ) -> list[Schedule]:
        """Up to `limit` schedules made after `after_seq` that are `wanted`, oldest first."""
        return [s for s in self.all() if s.seq > after_seq and wanted(s)][:limit]

    async def update(self, schedule_id: str, mutation: ScheduleMutation) -> Schedule:
        """Apply `mutation` to the latest state (None: no change); ScheduleNotFound."""
        if self._decide is not None:
            return await self._decide.update(schedule_id, mutation)
        current = self._schedules.get(schedule_id)
        if current is None:
            raise ScheduleNotFound(schedule_id)
        new = mutation(current)
        if new is None or new is current:
            return current
        return await self._commit(new)

    def update_at_once(
        self, changes: Sequence[tuple[str, ScheduleMutation]]
    ) -> tuple[list[Schedule | None], asyncio.Future[None]]:
        """As `update` for each (schedule id, mutation), in order, in a book of this server's
        own store only (not shared): each change is applied to the latest state, and its
        write staged, before this returns, so that a write staged after them (a task made on
        the strength of them) is not durable before them. Each schedule's latest state
        (None: not found), and their writes: done once they are durable and the listeners
        were told of each (in the order of the changes, as `update`'s), to be awaited."""
        assert self._decide is None, "a shared store's changes are the store's to apply"
        states: list[Schedule | None] = []
        applied: list[tuple[Schedule, Awaitable[None]]] = []
        for schedule_id, mutation in changes:
            current = self._schedules.get(schedule_id)
            new = None if current is None else mutation(current)
            if new is None or new is current:
                states.append(current)
                continue
            stamped, write = self._apply(new)
            states.append(stamped)
            applied.append((stamped, write))
        return states, asyncio.ensure_future(self._all_told(applied))

    async def delete(self, schedule_id: str) -> Schedule:
        if self._decide is not None:
            return await self._decide.delete(schedule_id)
        current = self._schedules.pop(schedule_id, None)
        if current is None:
            raise ScheduleNotFound(schedule_id)
        self._request_ids.pop((current.tenant, current.request_id), None)
        await self._persist(schedule_id, None)
        for listener in list(self._listeners):
            listener(current, True)
        return current

    def apply(self, schedule: Schedule, removed: bool) -> None:
        """Take a change that a shared store made (this server's or another's), in the
        order of the store's changes, and tell the listeners."""
        schedule_id = schedule.schedule_id
        if removed:
            current = self._schedules.pop(schedule_id, None)
            if current is None:
                return
            self._request_ids.pop((current.tenant, current.request_id), None)
        else:
            if schedule_id not in self._schedules and schedule.request_id:
                self._request_ids[(schedule.tenant, schedule.request_id)] = schedule_id
            self._schedules[schedule_id] = schedule
            self._last_seq = max(self._last_seq, schedule.seq)
            self._revision = max(self._revision, schedule.revision)
        for listener in list(self._listeners):
            listener(schedule, removed)

    async def _commit(self, schedule: Schedule) -> Schedule:
        """Apply a change at once, then wait until it is durable, then tell the listeners."""
        stamped, write = self._apply(schedule)
        await self._all_told([(stamped, write)])
        return stamped

    def _apply(self, schedule: Schedule) -> tuple[Schedule, Awaitable[None]]:
        """Apply a change at once and stage its write: the state, and its write."""
        self._revision += 1
        stamped = schedule.evolve(revision=self._revision)
        self._schedules[stamped.schedule_id] = stamped
        return stamped, self._persist(stamped.schedule_id, stamped)

    async def _all_told(self, applied: Sequence[tuple[Schedule, Awaitable[None]]]) -> None:
        """Wait until changes applied are durable (every one: a failed write fails them
        all), then tell the listeners of each, in order."""
        await asyncio.gather(*(write for _, write in applied))
        for stamped, _ in applied:
            for listener in list(self._listeners):
                listener(stamped, False)


def encode(schedule: Schedule) -> str:
    """A schedule as a JSON object of its fields (built field by field: a schedule is
    written each time it fires, and `dataclasses.asdict` copies deeply)."""
    record: dict[str, Any] = {name: getattr(schedule, name) for name in _FIELDS}
    record["request"] = schedule.request.hex()
    record["request_hash"] = schedule.request_hash.hex()
    record["spec"] = {name: getattr(schedule.spec, name) for name in _SPEC_FIELDS}
    policy = schedule.policy
    record["policy"] = [int(policy.overlap), policy.catchup_window, policy.catchup_limit]
    record["buffer"] = list(schedule.buffer)
    last = schedule.last_run
    record["last_run"] = None if last is None else [last.nominal, last.made_at, last.task_id]
    if schedule.pending:
        record["pending"] = [[order.nominal, order.key] for order in schedule.pending]
    else:  # left out, as in the rows of the versions before it
        del record["pending"], record["cancelling"]
    return json.dumps(record, separators=(",", ":"))


def decode(data: str) -> Schedule:
    record = json.loads(data)
    record["request"] = bytes.fromhex(record["request"])
    record["request_hash"] = bytes.fromhex(record["request_hash"])
    record["spec"] = Spec(**record["spec"])
    overlap, window, limit = record["policy"]
    record["policy"] = Policy(Overlap(overlap), window, limit)
    record["buffer"] = tuple(record["buffer"])
    record["last_run"] = Run(*record["last_run"]) if record["last_run"] else None
    record["pending"] = tuple(RunOrder(*order) for order in record.get("pending", ()))
    return Schedule(**record)


_FIELDS = tuple(field.name for field in dataclasses.fields(Schedule))
_SPEC_FIELDS = tuple(field.name for field in dataclasses.fields(Spec))
