"""One INFO line per step of a task's life, from the change feed: created, started,
retried, ended.

It follows the feed (committed changes, in revision order), so the log says what watchers
see, and nothing that was not committed; the feed gives it the task as it stood before
each change, which tells an attempt's start from a report of progress, and its end from a
pause (after a restart too: the store's recovery of the attempts that ran changes tasks
that were restored leased). Each line's fields are keys in JSON and key=value in text
(conveyor.logs).
"""

from __future__ import annotations

import logging
from typing import Any

from conveyor.logs import Fields, LineWriter, line_writer
from conveyord.model import Change, ChangeKind, Task, TaskError

log = logging.getLogger("conveyord.tasks")


class TaskLog:
    """The feed follower (of its steps: each change with the task as it stood before it)
    that logs tasks' transitions to the `conveyord.tasks` logger."""

    def __init__(self) -> None:
        # Straight to conveyor.logs' handler when logging is its alone, else as records.
        self._write: LineWriter = line_writer(log) or _record

    @staticmethod
    def wanted() -> bool:
        """Whether its lines would be written (decided once: it is not followed otherwise)."""
        return log.isEnabledFor(logging.INFO)

    def __call__(self, change: Change, before: Task | None) -> None:
        task = change.task
        if change.kind is not ChangeKind.CHANGED:
            return
        if before is None:
            self._line("task created", task, priority=task.priority)
        held = before.lease_id if before is not None else ""
        if task.lease_id:  # an attempt holds the task: a new one if its lease is new
            if task.lease_id != held:
                self._line("task started", task, worker=task.lease_holder)
            return
        if task.terminal:
            if before is None or not before.terminal:
                self._ended(task)
        elif (
            held
            and before is not None
            and (task.attempt > before.attempt or task.interruptions > before.interruptions)
        ):
            self._retried(task, before)

    def _retried(self, task: Task, started: Task) -> None:
        """A failed (or interrupted) attempt, and the task queued for its next one."""
        error = task.error
        runnable_at = task.next_attempt_at or task.updated_at
        self._line(
            "task retried",
            task,
            attempt=started.attempt,
            next_attempt=task.attempt,
            worker=started.lease_holder,
            retry_in_seconds=round(max(0.0, runnable_at - task.updated_at), 6),
            **_error_fields(error),
        )

    def _ended(self, task: Task) -> None:
        fields: dict[str, Any] = {"status": task.status.name}
        fields.update(_error_fields(task.error))
        end = task.finished_at or task.updated_at
        fields["duration_seconds"] = round(end - task.created_at, 6)
        if task.started_at is not None:  # the last attempt's run
            fields["run_seconds"] = round(end - task.started_at, 6)
        self._line("task ended", task, **fields)

    def _line(self, message: str, task: Task, **fields: Any) -> None:
        """Log one transition of `task` at INFO, with the task's own fields first."""
        line = {
            "task_id": task.task_id,
            "task_type": task.task_type,
            "tenant": task.tenant,
            "attempt": task.attempt,
        }
        line.update(fields)
        self._write(message, line.items())


def _error_fields(error: TaskError | None) -> dict[str, str]:
    """What the log says of an attempt's error: its code and message, and for a handler's
    exception its type and traceback (as the task keeps them: the last 16 KiB)."""
    if error is None:
        return {}
    fields = {"error_code": error.code, "error_message": error.message}
    if error.error_type:
        fields["error_type"] = error.error_type
    if error.traceback:
        fields["traceback"] = error.traceback
    return fields


def _record(message: str, items: Fields) -> None:
    """Log a line as a record (when logging is set up otherwise than by
    conveyor.logs.configure, whose handler takes it without one: `line_writer`)."""
    log.info(message, extra=dict(items))
