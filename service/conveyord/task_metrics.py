"""The metrics of tasks' lives, kept by following the store's change feed.

Each committed change comes with the task as it stood before it (`ChangeFeed.follow_steps`),
so what moved is read from the two states: a task created, an attempt started (a new lease)
or ended (its lease gone: how long it ran, how it ended), a task retried (its attempt number
went up), ended (its status). Counted from the feed, these agree with what watchers see.
The queue's depth (by type and priority) and its oldest task (by type) are kept as tasks
enter and leave it, so that reading them costs the size of the answer, not of the queue.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram

from conveyord.model import Change, ChangeKind, ErrorCode, Task, TaskStatus
from conveyord.store.index import Deadlines

# Queue wait, from 1 ms to 30 min.
QUEUE_WAIT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
)  # fmt: skip
# A run, or a task from its creation to its end: the same, and up to two hours.
TASK_BUCKETS = (*QUEUE_WAIT_BUCKETS, 3600.0, 7200.0)

# The error codes that say that something took too long, by what the wait was for.
TIMEOUTS = {
    ErrorCode.DEADLINE_EXCEEDED: "attempt",
    ErrorCode.QUEUE_TIMEOUT: "queue",
    ErrorCode.INPUT_TIMEOUT: "input",
}

Child = TypeVar("Child", Counter, Histogram)


class Labelled(Generic[Child]):
    """A metric's children by label values, each looked up once: `labels()` validates and
    locks at every call, which the feed's followers cannot afford on every change."""

    def __init__(self, family: Child) -> None:
        self._family: Child = family
        self._children: dict[tuple[str, ...], Child] = {}

    def __call__(self, *values: str) -> Child:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._family.labels(*values)
        return child


class TaskMetrics:
    """Counters and histograms of tasks, and the queue's state, from the change feed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, text: str, *labels: str) -> Labelled[Counter]:
            return Labelled(Counter(name, text, labels, registry=registry))

        def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Labelled[Histogram]:
            return Labelled(Histogram(name, text, ["type"], registry=registry, buckets=buckets))

        self.created = counter("conveyor_tasks_created", "Tasks created.", "type")
        self.started = counter("conveyor_tasks_started", "Attempts started.", "type")
        self.finished = counter(
            "conveyor_tasks_finished", "Tasks that ended, by final status.", "type", "status"
        )
        self.retried = counter(
            "conveyor_tasks_retried", "Failed attempts followed by another.", "type"
        )
        self.timed_out = counter(
            "conveyor_tasks_timed_out",
            "Attempts past their timeout, and tasks past their start or input deadline.",
            "type",
            "timeout",
        )
        self.interrupted = counter(
            "conveyor_tasks_interrupted", "Attempts stopped by a server's shutdown.", "type"
        )
        self.queue_wait = histogram(
            "conveyor_queue_wait_seconds",
            "From the time a task could run (after a delayed start or a retry's backoff) "
            "to the start of its attempt.",
            QUEUE_WAIT_BUCKETS,
        )
        self.run_time = histogram(
            "conveyor_task_run_seconds", "How long each attempt ran.", TASK_BUCKETS
        )
        self.end_to_end = histogram(
            "conveyor_task_end_to_end_seconds",
            "From a task's creation to its end.",
            TASK_BUCKETS,
        )
        self.depth: dict[tuple[str, int], int] = {}  # queued (CREATED) tasks, by type, priority
        self._oldest: dict[str, Deadlines] = {}  # the queued tasks of a type, by queued_since

    def seed(self, queued: Iterable[Task]) -> None:
        """Count the tasks already queued when the server started."""
        for task in queued:
            self._enqueue(task)

    def changed(self, change: Change, before: Task | None) -> None:
        """Follow one committed change (a feed's step follower)."""
        if change.kind is not ChangeKind.CHANGED:
            return  # a renewed lease, or a removed task: nothing moved
        task = change.task
        if before is None:
            self.created(task.task_type).inc()
        elif before.status is TaskStatus.CREATED:
            self._dequeue(before)
        if task.status is TaskStatus.CREATED:
            self._enqueue(task)
        if task.lease_id and task.lease_id != (before.lease_id if before else ""):
            self._started(task, before)
        if change.ended is not None and before is not None:  # the store saw an attempt end
            self._attempt_ended(before, task)
        if before is not None and task.attempt > before.attempt:
            self.retried(task.task_type).inc()
        if task.terminal and (before is None or not before.terminal):
            self._ended(task)

    def _started(self, task: Task, before: Task | None) -> None:
        self.started(task.task_type).inc()
        if before is not None and before.status is TaskStatus.CREATED and task.started_at:
            wait = max(0.0, task.started_at - before.queued_since)
            self.queue_wait(task.task_type).observe(wait)

    def _attempt_ended(self, before: Task, task: Task) -> None:
        """The attempt `before` held a lease for ended (`task` is what followed it)."""
        if before.started_at is not None:
            ran = task.updated_at - before.started_at - before.paused_seconds
            self.run_time(task.task_type).observe(max(0.0, ran))
        if task.error is None or task.error is before.error:
            return  # it completed, or waits for input: no error of its own
        code = task.error.code
        if code == ErrorCode.INTERRUPTED:
            self.interrupted(task.task_type).inc()
        elif code == ErrorCode.DEADLINE_EXCEEDED:
            self.timed_out(task.task_type, TIMEOUTS[code]).inc()

    def _ended(self, task: Task) -> None:
        self.finished(task.task_type, task.status.name).inc()
        ended = task.finished_at if task.finished_at is not None else task.updated_at
        self.end_to_end(task.task_type).observe(max(0.0, ended - task.created_at))
        code = task.error.code if task.error is not None else ""
        if code in (ErrorCode.QUEUE_TIMEOUT, ErrorCode.INPUT_TIMEOUT):
            self.timed_out(task.task_type, TIMEOUTS[code]).inc()

    def _enqueue(self, task: Task) -> None:
        key = (task.task_type, task.priority)
        self.depth[key] = self.depth.get(key, 0) + 1
        oldest = self._oldest.get(task.task_type)
        if oldest is None:
            oldest = self._oldest[task.task_type] = Deadlines()
        oldest.set(task.task_id, task.queued_since)

    def _dequeue(self, task: Task) -> None:
        key = (task.task_type, task.priority)
        self.depth[key] -= 1
        self._oldest[task.task_type].drop(task.task_id)

    def oldest_ages(self, now: float) -> dict[str, float]:
        """Per task type, how long its oldest queued task has been runnable (0: none is)."""
        ages: dict[str, float] = {}
        for task_type, queued in self._oldest.items():
            since = queued.next()
            ages[task_type] = 0.0 if since is None else max(0.0, now - since)
        return ages
