"""The schedule runner: makes each schedule's runs as their times fall due.

One timer serves every schedule (a heap of their next wake-up times). When it rings, each
schedule that is due is planned (rules.plan), the plan is decided (recorded with its runs
pending), then the runs are made as tasks (idempotent by their key) and recorded made. A
release of a buffered run, a trigger and a backfill take the same path. The runner follows
the task feed and the schedules: when a schedule's run ends, or a buffer is decided behind a
run that has ended, a buffered run is released; runs left pending by a server that stopped
are made by another. Several runners on one store (replicas, or a restart that overlaps)
decide each time once and make each run once, with no leader: see rules.py.
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
from conveyord.schedules.model import NOMINAL_LABEL, SCHEDULE_LABEL, Overlap, RunOrder, Schedule
from conveyord.schedules.rules import Plan
from conveyord.store.base import RequestIdReused, TaskStore
from conveyord.store.schedules import ScheduleMutation, ScheduleNotFound

log = logging.getLogger(__name__)

RETRY_AFTER = 1.0  # seconds before a schedule whose runs could not be made is tried again
FIRE_BATCH = 200  # schedules fired together (their runs one batch of tasks): a few ms of work
# A run's validated CreateRequest, and the tenant whose task it makes (its schedule's).
RunRequest = tuple[tpb.CreateRequest, str]
# Makes tasks from RunRequests: each task, and whether it is new.
MakeTasks = Callable[[Sequence[RunRequest]], Awaitable[list[tuple[Task, bool]]]]
# What to decide for a schedule as it stands (None: nothing): a fire, a release, a trigger.
Planner = Callable[[Schedule], Awaitable[Plan | None]]
# A decision that landed: the schedule's state before it, and the state it recorded.
Decision = tuple[Schedule, Schedule]


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
            self._look_at(schedule)
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
        """Wake when its next time falls due; soon, if it has runs pending that no call of
        this runner is making (another server decided them, and may stop before it makes
        them)."""
        when = rules.wake_at(schedule)
        if schedule.pending and not self._lock(schedule.schedule_id).locked():
            soon = self.clock() + RETRY_AFTER
            when = soon if when is None else min(when, soon)
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
            self._look_at(schedule)
            if self._heap and self._heap[0][1] == schedule.schedule_id:
                self._arm()

    def _look_at(self, schedule: Schedule) -> None:
        """Plan its wake-up; a buffer may be released at once: it may have been decided
        behind a run that had ended (by a server that had not read the end yet)."""
        self._plan_wake(schedule)
        if schedule.buffer and not schedule.pending:
            self._in_background(self._release(schedule.schedule_id))

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

    # -- deciding and making runs -----------------------------------------------------------

    async def fire(self, schedule_id: str) -> None:
        """Make the runs that fell due for one schedule (and any left pending), until none
        is left."""
        async with self._lock(schedule_id):
            await self._settle_or_retry([schedule_id], self._due)

    async def _fire_together(self, schedule_ids: list[str]) -> None:
        """Fire the schedules that fell due at one moment: their decisions are recorded
        together, and their runs made as one batch of tasks (as a BatchCreate: one write for
        all). A schedule that another call holds is fired on its own once that call is done
        (which may have planned before this moment, and so left its times due)."""
        held = [i for i in dict.fromkeys(schedule_ids) if not self._lock(i).locked()]
        for schedule_id in set(schedule_ids).difference(held):
            self._in_background(self.fire(schedule_id))
        for schedule_id in held:
            await self._lock(schedule_id).acquire()  # free, so taken at once
        try:
            await self._settle_or_retry(held, self._due)
        finally:
            for schedule_id in held:
                self._lock(schedule_id).release()

    async def _release(self, schedule_id: str) -> None:
        """Make the first buffered run if the previous one has ended."""
        async with self._lock(schedule_id):
            await self._settle_or_retry([schedule_id], self._released)

    async def _due(self, schedule: Schedule) -> Plan | None:
        return rules.plan(schedule, self.clock(), await self.running(schedule), self.started_at)

    async def _released(self, schedule: Schedule) -> Plan | None:
        return rules.release(schedule, await self.running(schedule))

    def _lock(self, schedule_id: str) -> asyncio.Lock:
        return self._busy.setdefault(schedule_id, asyncio.Lock())

    async def running(self, schedule: Schedule) -> bool:
        """Whether the schedule's latest run has not ended (a run decided and perhaps not
        made yet has not)."""
        if schedule.pending:
            return True
        if schedule.last_run is None:
            return False
        task = await self.store.get(schedule.last_run.task_id)
        return task is not None and not task.terminal

    async def _settle_or_retry(self, schedule_ids: list[str], planner: Planner) -> None:
        """Settle the schedules; if their runs could not be made, try again soon."""
        try:
            await self._settle(schedule_ids, planner)
        except ConveyorError as error:  # the queue is full, the store failed, or stopping
            log.warning("%d schedules: their runs could not be made: %s", len(schedule_ids), error)
            self._retry(schedule_ids)

    def _retry(self, schedule_ids: Sequence[str]) -> None:
        for schedule_id in schedule_ids:
            heapq.heappush(self._heap, (self.clock() + RETRY_AFTER, schedule_id))
        self._arm()

    async def _settle(
        self,
        schedule_ids: Sequence[str],
        planner: Planner,
        decided: dict[str, Decision] | None = None,
    ) -> None:
        """Decide and make runs for schedules whose locks this runner holds, until none has
        anything left: each round decides (together) for those with no runs pending, then
        makes every pending run (one batch) and records them made. Given `decided`, each
        decision that lands goes there, and that schedule is not planned again.
        ConveyorError if runs could not be made (they stay pending)."""
        active = list(dict.fromkeys(schedule_ids))
        while active:
            plans = []
            for schedule_id in active:
                schedule = self.book.get(schedule_id)
                if schedule is None or schedule.pending or schedule_id in (decided or {}):
                    continue
                plan = await planner(schedule)
                if plan is not None:
                    plans.append(plan)
            states, writes = await self._decide_all(plans)
            if decided is not None:
                for plan, state in zip(plans, states, strict=True):
                    if state is not None:
                        decided[state.schedule_id] = (plan.before, state)
            pending = [s for i in active if (s := self.book.get(i)) is not None and s.pending]
            try:
                await self._carry_out(pending)
            finally:
                await asyncio.gather(*writes)
            again = [plan.before.schedule_id for plan in plans]
            active = list(dict.fromkeys(again + [s.schedule_id for s in pending]))

    async def _decide_all(
        self, plans: Sequence[Plan]
    ) -> tuple[list[Schedule | None], list[Awaitable[object]]]:
        """Decide the plans (_decide): the state each recorded (None: it did not land), and
        the writes still to wait for (to be awaited, whatever happens meanwhile).

        In a shared store, each decision is the database's, and its runs are made once it is
        recorded there: the decisions are written together, and waited for. In a store of
        this server's own, the book is where every runner on the store decides (a second
        runner, or an API call): a decision applied to it (at once, checked against the state
        the plan found) holds for every runner from then on, durable or not. Its runs are
        made at once, without waiting for the write: the store writes in the order of
        staging, so the decision is on disk with its runs or before them (a crash may leave
        it pending, to be made and counted; never its runs made but not decided). A burst of
        schedules firing then makes each batch's runs as soon as it is planned, rather than
        after every batch of the burst is decided and written."""
        if self.store.shared:
            return list(await asyncio.gather(*(self._decide(plan) for plan in plans))), []
        decisions = [await self._decision(plan) for plan in plans]
        changes = [(plan.before.schedule_id, d) for plan, d in zip(plans, decisions, strict=True)]
        after, writes = self.book.update_at_once(changes)
        states = [
            state if decision.state is not None else None
            for state, decision in zip(after, decisions, strict=True)
        ]
        return states, [writes]

    async def _decide(self, plan: Plan) -> Schedule | None:
        """Record the plan with its runs pending, if the schedule is still as it found it:
        the state recorded, or None."""
        decide = await self._decision(plan)
        after = await self._update(plan.before.schedule_id, decide)
        return after if decide.state is not None else None

    async def _decision(self, plan: Plan) -> _Decision:
        """The mutation that decides the plan (rules.decide). A run already made is left out:
        this runner has read every run made before the state the plan found, as that state
        came after them (a run another runner made under a decision of its own came after
        that decision, which the plan would have found, and so not landed on)."""
        schedule = plan.before
        made_before = [
            order.key
            for order in plan.runs
            if await self.store.get_by_request(schedule.tenant, order.key) is not None
        ]
        return _Decision(plan, made_before, self.clock())

    async def _carry_out(self, schedules: Sequence[Schedule]) -> None:
        """Make the schedules' pending runs (one batch of tasks), cancel the runs before them
        of those that cancel (CANCEL_OTHER: the new run is made first, so that a server
        late to carry the same decision out cannot cancel a run decided after it), and
        record them made. ConveyorError if they could not be made."""
        requests = [self._run_requests(schedule, schedule.pending) for schedule in schedules]
        made = await self._make([request for each in requests for request in each])
        start, records = 0, []
        for schedule in schedules:
            tasks = [task for task, _ in made[start : start + len(schedule.pending)]]
            start += len(schedule.pending)
            if schedule.cancelling:
                await self._cancel_before(schedule, tasks)
            by_key = {order.key: task for order, task in zip(schedule.pending, tasks, strict=True)}
            records.append(self._record_made(schedule.schedule_id, by_key))
        await asyncio.gather(*records)

    async def _record_made(self, schedule_id: str, tasks: dict[str, Task]) -> None:
        now = self.clock()
        await self._update(schedule_id, lambda current: rules.made(current, tasks, now))

    async def _update(self, schedule_id: str, mutation: ScheduleMutation) -> Schedule | None:
        """Change the schedule: its latest state; None if it was deleted meanwhile."""
        try:
            return await self.book.update(schedule_id, mutation)
        except ScheduleNotFound:
            return None

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

    async def _cancel_before(self, schedule: Schedule, runs: Sequence[Task]) -> None:
        """Cancel the schedule's unfinished runs made before `runs` (CANCEL_OTHER)."""
        now = self.clock()
        first, ours = min(run.seq for run in runs), {run.task_id for run in runs}
        reason = f"cancelled by schedule {schedule.schedule_id}: a new run is due (CANCEL_OTHER)"
        unfinished = TaskFilter(labels={SCHEDULE_LABEL: schedule.schedule_id}, statuses=UNFINISHED)

        def cancel(task: Task) -> Task | None:
            if task.terminal or task.seq >= first or task.task_id in ours:
                return None
            return lifecycle.cancel(task, reason, now)

        await self.store.update_where(unfinished, cancel)

    async def extra(
        self, schedule: Schedule, times: Sequence[float], keys: Sequence[str], overlap: Overlap
    ) -> tuple[Schedule, list[Task]]:
        """Runs beside the spec (a trigger, a backfill), under `overlap`: the schedule after
        them, and their tasks (none for a run skipped or buffered). Decided once as a fire
        is (another server may fire the schedule meanwhile: the decision that lands first
        holds, and a later round plans from it); a run made before (the same trigger or
        backfill asked again) is answered, not decided again. ConveyorError if its runs
        could not be made (the queue is full): the decision is then taken back."""
        schedule_id, tenant = schedule.schedule_id, schedule.tenant
        found: dict[str, Task] = {}

        async def planner(current: Schedule) -> Plan | None:
            for key in keys:
                if key not in found and (task := await self.store.get_by_request(tenant, key)):
                    found[key] = task
            rest = [(t, k) for t, k in zip(times, keys, strict=True) if k not in found]
            if not rest:
                return None
            rest_times, rest_keys = [t for t, _ in rest], [k for _, k in rest]
            running = await self.running(current)
            return rules.plan_extra(current, rest_times, rest_keys, overlap, running)

        decided: dict[str, Decision] = {}
        async with self._lock(schedule_id):
            try:
                await self._settle([schedule_id], planner, decided)
            except ConveyorError:
                if not await self._withdraw(decided.get(schedule_id)):
                    self._retry([schedule_id])
                raise
        ours = {order.key for order in decided[schedule_id][1].pending} if decided else set()
        tasks = [
            found.get(key) or await self.store.get_by_request(tenant, key)
            for key in keys
            if key in found or key in ours
        ]
        after = self.book.get(schedule_id) or schedule
        return after, [task for task in tasks if task is not None]

    async def _withdraw(self, decision: Decision | None) -> bool:
        """Take back a trigger's or backfill's decision whose runs could not be made, if the
        schedule is still as it left it (no server recorded them made meanwhile); whether it
        was taken back. If not, its runs are made later, as a fire's are. (One that another
        server made in the same milliseconds, and had not recorded, would stay uncounted.)"""
        if decision is None:
            return False
        before, recorded = decision
        withdrawn = False

        def withdraw(current: Schedule) -> Schedule | None:
            nonlocal withdrawn
            withdrawn = current.revision == recorded.revision
            return before if withdrawn else None

        await self._update(before.schedule_id, withdraw)
        return withdrawn


class _Decision:
    """A mutation that decides a plan (rules.decide), and the state it recorded (None: it did
    not land)."""

    def __init__(self, plan: Plan, made_before: Sequence[str], now: float) -> None:
        self.plan, self.made_before, self.now = plan, made_before, now
        self.state: Schedule | None = None

    def __call__(self, current: Schedule) -> Schedule | None:
        self.state = rules.decide(current, self.plan, self.made_before, self.now)
        return self.state
