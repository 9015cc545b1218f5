"""The schedule runner: makes each schedule's runs as their times fall due.

One timer serves every schedule (a heap of their next wake-up times). When it rings, each
schedule that is due is planned (rules.plan), its runs are made as tasks (idempotent by
their key), and the plan is recorded. The runner follows the task feed: when a schedule's
run ends, a run it buffered is made. Several runners on one store (replicas, or a restart
that overlaps) make each run once, with no leader: see rules.py.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable, Sequence

from conveyor.v1 import task_service_pb2 as tpb
from conveyord import lifecycle
from conveyord.errors import ConveyorError
from conveyord.model import UNFINISHED, Change, Task, TaskFilter
from conveyord.schedules import rules
from conveyord.schedules.model import NOMINAL_LABEL, SCHEDULE_LABEL, Overlap, Run, Schedule
from conveyord.schedules.rules import Plan, RunOrder
from conveyord.store.base import RequestIdReused, TaskStore

log = logging.getLogger(__name__)

RETRY_AFTER = 1.0  # seconds before a schedule whose runs could not be made is tried again
FIRE_BATCH = 200  # schedules fired together (their runs one batch of tasks): a few ms of work
# A run's validated CreateRequest, and the tenant whose task it makes (its schedule's).
RunRequest = tuple[tpb.CreateRequest, str]
# Makes tasks from RunRequests: each task, and whether it is new.
MakeTasks = Callable[[Sequence[RunRequest]], Awaitable[list[tuple[Task, bool]]]]


class ScheduleRunner:
    """Fires the schedules of a store."""

    def __init__(self, store: TaskStore, make_tasks: MakeTasks, clock: Callable[[], float]) -> None:
        self.store = store
        self.book = store.schedules
        self.make_tasks = make_tasks
        self.clock = clock
        self.started_at = 0.0
        self._heap: list[tuple[float, str]] = []  # (wake-up time, schedule id), maybe stale
        self._timer: asyncio.TimerHandle | None = None
        self._unfollow: list[Callable[[], None]] = []
        self._busy: dict[str, asyncio.Lock] = {}  # one plan at a time per schedule
        self._background: set[asyncio.Task[None]] = set()
        self._active = False

    def start(self) -> None:
        """Catch up on what fell due while no server ran, then fire as times fall due."""
        self._active = True
        self.started_at = self.clock()
        self._unfollow = [
            self.book.follow(self._schedule_changed),
            self.store.feed.follow(self._task_changed),
        ]
        for schedule in self.book.all():
            self._plan_wake(schedule)
        self._arm()

    def stop(self) -> None:
        self._active = False
        for unfollow in self._unfollow:
            unfollow()
        self._unfollow = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def clock_moved(self) -> None:
        """The clock jumped (a test's clock): fire what fell due by the new time."""
        self._arm()

    # -- what falls due ---------------------------------------------------------------

    def _plan_wake(self, schedule: Schedule) -> None:
        when = rules.wake_at(schedule)
        if when is not None:
            heapq.heappush(self._heap, (when, schedule.schedule_id))

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._active or not self._heap:
            return
        delay = max(0.0, self._heap[0][0] - self.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._ring)

    def _ring(self) -> None:
        self._timer = None
        now = self.clock()
        due: set[str] = set()
        while self._heap and self._heap[0][0] <= now:
            due.add(heapq.heappop(self._heap)[1])
        ordered = sorted(due)
        for start in range(0, len(ordered), FIRE_BATCH):
            self._in_background(self._fire_together(ordered[start : start + FIRE_BATCH]))
        self._arm()

    def _schedule_changed(self, schedule: Schedule, removed: bool) -> None:
        if not removed and self._active:
            self._plan_wake(schedule)
            if self._heap and self._heap[0][1] == schedule.schedule_id:
                self._arm()

    def _task_changed(self, change: Change) -> None:
        """A run that ended frees its schedule's buffer."""
        task = change.task
        if task.terminal and SCHEDULE_LABEL in task.labels and self._active:
            schedule = self.book.get(task.labels[SCHEDULE_LABEL])
            if schedule is not None and schedule.buffer:
                self._in_background(self._release(schedule.schedule_id))

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- firing -----------------------------------------------------------------------

    async def fire(self, schedule_id: str) -> None:
        """Make the runs that fell due for one schedule, until none is left."""
        async with self._lock(schedule_id):
            while (schedule := self.book.get(schedule_id)) is not None:
                running = await self.running(schedule)
                plan = rules.plan(schedule, self.clock(), running, self.started_at)
                if plan is None:
                    return
                if not await self.carry_out(plan):
                    heapq.heappush(self._heap, (self.clock() + RETRY_AFTER, schedule_id))
                    self._arm()
                    return

    async def _fire_together(self, schedule_ids: list[str]) -> None:
        """Fire the schedules that fell due at one moment: their runs are made as one batch
        of tasks (as a BatchCreate: one write for all), then each schedule records its plan.
        A schedule being fired by a call of its own is left to that call."""
        while schedule_ids:
            plans: list[Plan] = []
            held: list[asyncio.Lock] = []
            for schedule_id in schedule_ids:
                lock, schedule = self._lock(schedule_id), self.book.get(schedule_id)
                if lock.locked() or schedule is None:
                    continue
                await lock.acquire()  # free, so taken at once
                held.append(lock)
                running = await self.running(schedule)
                plan = rules.plan(schedule, self.clock(), running, self.started_at)
                if plan is not None:
                    plans.append(plan)
            try:
                if not await self._carry_out_together(plans):
                    for plan in plans:
                        heapq.heappush(
                            self._heap, (self.clock() + RETRY_AFTER, plan.before.schedule_id)
                        )
                    self._arm()
                    return
            finally:
                for lock in held:
                    lock.release()
            now = self.clock()
            schedule_ids = [
                plan.before.schedule_id
                for plan in plans
                if (latest := self.book.get(plan.before.schedule_id)) is not None
                and rules.due(latest, now)
            ]  # those with more times due than one plan deals with

    async def _carry_out_together(self, plans: Sequence[Plan]) -> bool:
        for plan in plans:
            if plan.cancel_running:
                await self._cancel_runs(plan.before)
        requests = [self._run_requests(plan.before, plan.runs) for plan in plans]
        try:
            made = await self._make([request for each in requests for request in each])
        except ConveyorError as error:  # the queue is full, the store failed, or shutting down
            log.warning("%d schedules: their runs could not be made: %s", len(plans), error)
            return False
        start = 0
        records = []
        for plan, each in zip(plans, requests, strict=True):
            records.append(self._record(plan, made[start : start + len(each)]))
            start += len(each)
        await asyncio.gather(*records)
        return True

    async def _release(self, schedule_id: str) -> None:
        """Make the first buffered run if the previous one has ended. Until a record lands:
        another server may have changed the schedule meanwhile (fired it, or released the
        same run: then the next plan finds its run going, and there is nothing to do)."""
        async with self._lock(schedule_id):
            while (schedule := self.book.get(schedule_id)) is not None:
                plan = rules.release(schedule, await self.running(schedule))
                if plan is None:
                    return
                try:
                    made = await self.make_runs(schedule, plan.runs)
                except ConveyorError as error:  # the queue is full, the store failed, or stopping
                    log.warning("schedule %s: a buffered run was not made: %s", schedule_id, error)
                    return
                if await self._record(plan, made) is not None:
                    return

    def _lock(self, schedule_id: str) -> asyncio.Lock:
        return self._busy.setdefault(schedule_id, asyncio.Lock())

    async def running(self, schedule: Schedule) -> bool:
        """Whether the schedule's latest run has not ended."""
        if schedule.last_run is None:
            return False
        task = await self.store.get(schedule.last_run.task_id)
        return task is not None and not task.terminal

    async def carry_out(self, plan: Plan) -> bool:
        """Cancel the running runs if the plan says so, make its runs, record it; False if
        the runs could not be made (they are tried again: the plan was not recorded)."""
        schedule = plan.before
        if plan.cancel_running:
            await self._cancel_runs(schedule)
        try:
            made = await self.make_runs(schedule, plan.runs)
        except ConveyorError as error:  # the queue is full, the store failed, or shutting down
            log.warning("schedule %s: its runs could not be made: %s", schedule.schedule_id, error)
            return False
        await self._record(plan, made)
        return True

    async def _record(
        self, plan: Plan, made: Sequence[tuple[Task, bool]], *, spec: bool = True
    ) -> Schedule | None:
        """Record the plan with its runs: those it made anew and, for the runs of the spec
        (not a trigger's or a backfill's, which may be asked for again), those it found made
        once their time had fallen due: by another server that made the same plan (whose
        record does not land, as only one record of a schedule's state does), or by this one
        before it stopped. One found made before its time (a backfill ahead of it) was
        counted then. None if the record did not land (the schedule was no longer as the plan
        found it)."""
        now = self.clock()
        runs = [
            Run(order.nominal, now, task.task_id)
            for order, (task, new) in zip(plan.runs, made, strict=True)
            if new or (spec and task.created_at >= order.nominal)
        ]
        landed = False

        def record(current: Schedule) -> Schedule | None:
            nonlocal landed
            recorded = rules.record(current, plan, runs, now)
            landed = recorded is not None
            return recorded

        after = await self.book.update(plan.before.schedule_id, record)
        return after if landed else None

    async def make_runs(
        self, schedule: Schedule, orders: Sequence[RunOrder]
    ) -> list[tuple[Task, bool]]:
        """The runs' tasks, made from the schedule's template (or found, if made before:
        then with False; also when made from another template, or at another moment, such as
        a repeated trigger)."""
        return await self._make(self._run_requests(schedule, orders))

    def _run_requests(self, schedule: Schedule, orders: Sequence[RunOrder]) -> list[RunRequest]:
        """The CreateRequests of a schedule's runs: its template, labelled, with their keys;
        each for the schedule's tenant."""
        if not orders:
            return []
        template = schedule.template.task
        requests = []
        for order in orders:
            task = tpb.CreateRequest(task=template, request_id=order.key)
            task.task.labels[SCHEDULE_LABEL] = schedule.schedule_id
            task.task.labels[NOMINAL_LABEL] = rules.nominal_text(order.nominal)
            requests.append((task, schedule.tenant))
        return requests

    async def _make(self, requests: list[RunRequest]) -> list[tuple[Task, bool]]:
        """Make the tasks together; one by one if one of them was made before from another
        request (a changed template, or a repeated trigger), which is then found."""
        if not requests:
            return []
        try:
            return await self.make_tasks(requests)
        except RequestIdReused:
            return [await self._make_or_find(request) for request in requests]

    async def _make_or_find(self, request: RunRequest) -> tuple[Task, bool]:
        try:
            ((task, new),) = await self.make_tasks([request])
        except RequestIdReused as reused:
            found = await self.store.get(reused.task_id)
            if found is None:
                raise
            return found, False
        return task, new

    async def _cancel_runs(self, schedule: Schedule) -> None:
        now = self.clock()
        reason = f"cancelled by schedule {schedule.schedule_id}: a new run is due (CANCEL_OTHER)"
        runs = TaskFilter(labels={SCHEDULE_LABEL: schedule.schedule_id}, statuses=UNFINISHED)

        def cancel(task: Task) -> Task | None:
            return None if task.terminal else lifecycle.cancel(task, reason, now)

        await self.store.update_where(runs, cancel)

    async def extra(
        self, schedule: Schedule, times: Sequence[float], keys: Sequence[str], overlap: Overlap
    ) -> tuple[Schedule, list[Task]]:
        """Runs beside the spec (a trigger, a backfill), under `overlap`: the schedule after
        them, and their tasks (none for a run skipped or buffered). Planned again until its
        record lands (another server may fire the schedule meanwhile); a run made in an
        earlier round counts as made anew."""
        fresh: set[str] = set()  # the runs' tasks made anew, in any round
        async with self._lock(schedule.schedule_id):
            while True:
                current = self.book.get(schedule.schedule_id) or schedule
                running = await self.running(current)
                plan = rules.plan_extra(current, times, keys, overlap, running)
                if plan.cancel_running:
                    await self._cancel_runs(current)
                made = await self.make_runs(current, plan.runs)
                fresh.update(task.task_id for task, new in made if new)
                made = [(task, task.task_id in fresh) for task, _ in made]
                recorded = await self._record(plan, made, spec=False)
                if recorded is not None:
                    return recorded, [task for task, _ in made]
