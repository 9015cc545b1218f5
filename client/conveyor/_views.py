"""How the command line shows tasks: a JSON object per line for scripts, and for people a
detail block, a table, or (on a terminal) a live progress bar or a live table.

The JSON objects name their fields as the proto's JSON mapping does (lowerCamelCase, the
`json_name` that protobuf.json_format prints: taskId, createdAt), whatever the command;
every field is there, null when unset; statuses go by name (COMPLETED), times in RFC 3339.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
)
from rich.progress import Task as Bar
from rich.table import Table
from rich.text import Text

from conveyor.tasks import EventKind, Task, TaskAttempt, TaskError, TaskEvent, TaskStatus

STATUS_STYLES = {
    TaskStatus.UNKNOWN: "bold",  # a newer server's status: shown as UNKNOWN(its number)
    TaskStatus.CREATED: "cyan",
    TaskStatus.RUNNING: "yellow",
    TaskStatus.COMPLETED: "green",
    TaskStatus.FAILED: "red",
    TaskStatus.CANCELLED: "magenta",
    TaskStatus.PAUSED: "blue",
    TaskStatus.WAITING_INPUT: "bold cyan",
}
PIPE_WIDTH = 240  # off a terminal (unless $COLUMNS says), rich would wrap tables at 80 columns
WIDE_SCREEN = 120  # enough for every column of a table of tasks
WHOLE_IDS = 100  # narrower, a table shows the first 8 characters of an id, as the bar does
SHORT_ID = 8  # what the commands take as an id as long as no other task's starts alike
_AFTER_UNDERSCORE = re.compile(r"_([a-z0-9])")


def json_name(name: str) -> str:
    """A field's name as the proto's JSON mapping spells it: task_id -> taskId."""
    return _AFTER_UNDERSCORE.sub(lambda match: match.group(1).upper(), name)


def json_names(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with its own keys (not those of the values inside) spelled by `json_name`."""
    return {json_name(key): value for key, value in data.items()}


def record_json(value: Any) -> Any:
    """A dataclass of the client's (and those inside it) as JSON, its fields named as the
    proto's JSON names them; lists, enums and times as `task_json` gives them."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            json_name(field.name): record_json(getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
    return _json_value(value)


def task_json(task: Task) -> dict[str, Any]:
    """The task as a JSON object, named as the proto's JSON: statuses by name (UNKNOWN(9)
    for one not known), times in ISO 8601."""
    data = {
        field.name: _json_value(getattr(task, field.name))
        for field in dataclasses.fields(task)
        if field.name != "proto"
    }
    data["status"] = task.status_label
    return json_names(data)


def event_json(event: TaskEvent) -> dict[str, Any]:
    return {"kind": event.kind.name, "revision": event.revision, "task": task_json(event.task)}


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, enum.Enum):
        return value.name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # an error, an attempt
        return record_json(value)
    if isinstance(value, list | tuple):  # attempts, workers
        return [_json_value(item) for item in value]
    return value


def status_text(task: Task) -> Text:
    return Text(task.status_label, style=STATUS_STYLES[task.status])


def elapsed(task: Task) -> timedelta:
    """How long the task has run (or waited, before it started), to its end or to now."""
    start = task.started_at or task.created_at
    end = task.finished_at or datetime.now(UTC)
    return max(end - start, timedelta(0))


def _clock(span: timedelta) -> str:
    minutes, seconds = divmod(int(span.total_seconds()), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{seconds:02}"


def _time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _percent(task: Task) -> str:
    return f"{task.progress:.0%}"


def ending(task: Task) -> Text:
    """One line on how a task ended: its result, or why it failed or was cancelled."""
    how = ""
    if task.status is TaskStatus.COMPLETED:
        how = f" in {elapsed(task).total_seconds():.1f} s; result: {json.dumps(task.result)}"
    elif task.error is not None:  # a cancel's code says what the status says already
        code = "" if task.error.code == task.status.name else f"{task.error.code}: "
        how = f": {code}{task.error.message}"
    return Text.assemble(status_text(task), how)


def _error_details(error: TaskError, name: str) -> Iterator[tuple[str, str]]:
    """An error's lines of a task's details: code and message, what failed, where."""
    yield name, f"{error.code}: {error.message}"
    if error.error_type:
        yield "error type", error.error_type + (" (not retried)" if error.non_retryable else "")
    if error.traceback:
        yield "traceback", error.traceback.rstrip("\n")


def _attempt_line(attempt: TaskAttempt) -> str:
    """One ended attempt, on one line: number, outcome, start, run time, worker, error."""
    took = (attempt.ended_at - attempt.started_at).total_seconds()
    line = (
        f"{attempt.number}  {attempt.outcome.name:<11}  {_time(attempt.started_at)}  "
        f"{took:.1f} s  {attempt.worker}"
    )
    if attempt.error is not None:
        line += f"  {attempt.error.code}: {attempt.error.message}".split("\n")[0]
    return line


@dataclasses.dataclass(frozen=True)
class _Column:
    """A column of the table of tasks. The table lays out every column at the width of its
    header and cells, but TYPE and MESSAGE, which share what is left (MESSAGE first gives
    way), cut with an ellipsis: one line a task, at any width."""

    header: str
    cell: Callable[[Task], str | Text]
    optional: bool = False  # shown only on a wide screen
    justify: Literal["left", "right"] = "left"


def _id_cell(task: Task) -> str:
    return task.task_id


def _short_id_cell(task: Task) -> str:
    return task.task_id[:SHORT_ID]


_COLUMNS = [
    _Column("ID", _id_cell),
    _Column("TYPE", lambda task: task.task_type),
    _Column("STATUS", status_text),
    _Column("PROGRESS", _percent, justify="right"),
    _Column("PRIORITY", lambda task: str(task.priority), optional=True, justify="right"),
    _Column("CREATED", lambda task: _time(task.created_at), optional=True),
    _Column("MESSAGE", lambda task: task.message),
]
_SHARED = ("TYPE", "MESSAGE")  # the columns that give way, in this order of priority
_GAP = 2  # between two columns


def _fitted(width: int, columns: list[_Column], rows: list[list[str | Text]]) -> list[int]:
    """The width of each column: as wide as its header and cells, but that TYPE and MESSAGE
    share the room left when it is short: TYPE keeps half of it, or all that MESSAGE
    leaves, and MESSAGE takes the rest."""
    widths = [len(column.header) for column in columns]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    at = {column.header: index for index, column in enumerate(columns)}
    fixed = sum(
        w for column, w in zip(columns, widths, strict=True) if column.header not in _SHARED
    )
    room = width - fixed - _GAP * (len(columns) - 1)
    kind, message = widths[at["TYPE"]], widths[at["MESSAGE"]]
    if kind + message > room:
        kind = min(kind, max(room - message, room // 2, 4))
        widths[at["TYPE"]], widths[at["MESSAGE"]] = kind, max(room - kind, 1)
    return widths


class _ElapsedColumn(ProgressColumn):
    """The task's own running time (not the view's), ticking while it runs."""

    def render(self, task: Bar) -> Text:
        state: Task = task.fields["state"]
        return Text(_clock(elapsed(state)), style="progress.elapsed")


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """Leave a closed pipe to the command, which ends the same way whatever was writing."""
        self.quiet = True
        raise BrokenPipeError


class Output:
    """Where a command writes: JSON lines (`json_lines`), or text and live views for people."""

    def __init__(self, *, json_lines: bool) -> None:
        self.json_lines = json_lines
        self.console = _Console(highlight=False, markup=False)
        if not self.console.is_terminal and "COLUMNS" not in os.environ:
            self.console.width = PIPE_WIDTH

    def _json(self, data: Mapping[str, Any]) -> None:
        """One JSON object on a line of its own; its keys named as the proto's JSON names
        them (dry_run is printed dryRun), so that every command's output is alike."""
        sys.stdout.write(json.dumps(json_names(data)) + "\n")
        sys.stdout.flush()

    def task(self, task: Task) -> None:
        """A task in full."""
        if self.json_lines:
            self._json(task_json(task))
            return
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for name, value in self._details(task):
            grid.add_row(name, value)
        self.console.print(grid)

    def _details(self, task: Task) -> Iterator[tuple[str, str | Text]]:
        yield "task", task.task_id
        yield "type", task.task_type
        if task.description:
            yield "description", task.description
        yield "status", status_text(task)
        yield "progress", f"{_percent(task)}  {task.message}".rstrip()
        if task.progress_detail:
            yield "detail", json.dumps(task.progress_detail)
        if task.status is TaskStatus.COMPLETED:
            yield "result", json.dumps(task.result)
        if task.error is not None:
            yield from _error_details(task.error, "error")
        elif task.last_attempt_error is not None:  # completed after a failed attempt
            yield from _error_details(task.last_attempt_error, "last error")
        if task.checkpoint is not None:
            yield "checkpoint", json.dumps(task.checkpoint)
        if task.parameters:
            yield "parameters", json.dumps(task.parameters)
        if task.labels:
            yield "labels", " ".join(f"{k}={v}" for k, v in sorted(task.labels.items()))
        yield "priority", str(task.priority)
        yield "attempt", f"{task.attempt} of {task.max_attempts}"
        yield "created", _time(task.created_at)
        if task.started_at:
            yield "started", _time(task.started_at)
        if task.finished_at:
            yield "finished", _time(task.finished_at)
        if task.next_attempt_at:
            first = task.attempt == 1 and task.started_at is None
            yield "starts" if first else "next attempt", _time(task.next_attempt_at)
        if task.start_deadline:
            yield "start deadline", _time(task.start_deadline)
        if task.paused_at:
            yield "paused", f"{_time(task.paused_at)}: {task.pause_reason}"
        if task.pause_requested_at:
            yield "pause asked", f"{_time(task.pause_requested_at)}: {task.pause_reason}"
        if task.status is TaskStatus.WAITING_INPUT:
            label = f" [{task.input_label}]" if task.input_label else ""
            yield "waits for", f"{task.input_prompt or 'input'}{label}"
        if task.input_deadline:
            yield "input by", _time(task.input_deadline)
        if task.input_count:
            yield "inputs", str(task.input_count)
        if task.cancel_requested_at:
            yield "cancel asked", _time(task.cancel_requested_at)
        if task.attempts:
            yield "attempts", "\n".join(_attempt_line(attempt) for attempt in task.attempts)

    def note(self, text: str) -> None:
        """A line for people only; scripts get the same from the JSON that follows."""
        if not self.json_lines:
            self.console.print(text)

    def counted(self, count: int, *, dry_run: bool) -> None:
        """How many tasks a cancel by filter cancelled (or would)."""
        if self.json_lines:
            self._json({"count": count, "dry_run": dry_run})
        else:
            noun = "task" if count == 1 else "tasks"
            self.console.print(
                f"{count} {noun} would be cancelled" if dry_run else f"cancelled {count} {noun}"
            )

    def created(self, task: Task) -> None:
        """The news that a task was created, before following it."""
        if self.json_lines:
            self._json(task_json(task))
        else:
            self.note(f"created task {task.task_id} ({task.task_type})")

    def tasks(self, tasks: Iterable[Task]) -> None:
        """Tasks as JSON lines, or as one aligned table."""
        if self.json_lines:
            for task in tasks:
                self._json(task_json(task))
            return
        self.console.print(self._table(tasks))

    def _table(self, tasks: Iterable[Task]) -> Table:
        """An aligned table that fits the screen, one line a task: the columns that are nice
        to have only when it is wide, and ids in full only when there is room for them."""
        width = self.console.width
        columns = [c for c in _COLUMNS if not c.optional or width >= WIDE_SCREEN]
        if width < WHOLE_IDS:
            columns[0] = dataclasses.replace(columns[0], cell=_short_id_cell)
        rows = [[column.cell(task) for column in columns] for task in tasks]
        widths = _fitted(width, columns, rows)
        table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, _GAP // 2))
        for column, column_width in zip(columns, widths, strict=True):
            table.add_column(
                column.header,
                width=column_width,
                no_wrap=True,
                overflow="ellipsis",
                justify=column.justify,
            )
        for row in rows:
            table.add_row(*row)
        return table

    def follow(self, states: Iterable[Task]) -> Task | None:
        """Show each state of a task as it comes; returns the last one."""
        if self.json_lines:
            return self._follow_lines(states, self._json_state)
        if not self.console.is_terminal:
            return self._follow_lines(states, self._plain_state)
        return self._follow_live(states)

    def _follow_lines(self, states: Iterable[Task], show: Callable[[Task], None]) -> Task | None:
        last = None
        for last in states:
            show(last)
        if last is not None and not self.json_lines:
            self.console.print(ending(last))
        return last

    def _json_state(self, task: Task) -> None:
        self._json(task_json(task))

    def _plain_state(self, task: Task) -> None:
        self.console.print(
            f"{_time(task.updated_at)}  {task.status_label:<9}  {_percent(task):>4}  {task.message}"
        )

    def _follow_live(self, states: Iterable[Task]) -> Task | None:
        progress = Progress(
            SpinnerColumn(finished_text="•"),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            TaskProgressColumn(),
            _ElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            TextColumn("{task.fields[message]}", markup=False),
            console=self.console,
        )
        last = None
        with progress:
            bar = None
            for last in states:
                if bar is None:
                    description = f"{last.task_type} {last.task_id[:8]}"
                    bar = progress.add_task(
                        description, total=1.0, state=last, status="", message=""
                    )
                progress.update(
                    bar,
                    completed=last.progress,
                    status=f"[{STATUS_STYLES[last.status]}]{last.status_label}[/]",
                    message=last.message,
                    state=last,
                )
        if last is not None:
            self.console.print(ending(last))
        return last

    def follow_all(self, events: Iterable[TaskEvent], heading: str) -> None:
        """Show each change to the watched tasks as it comes, until interrupted."""
        if self.json_lines:
            for event in events:
                self._json(event_json(event))
            return
        self.console.print(heading)
        if not self.console.is_terminal:
            for event in events:
                self._plain_event(event)
            return
        rows: dict[str, Task] = {}
        with Live(self._table([]), console=self.console, auto_refresh=False) as live:
            for event in events:
                if event.kind is EventKind.REMOVED:
                    rows.pop(event.task.task_id, None)
                else:
                    rows[event.task.task_id] = event.task
                live.update(self._live_table(rows), refresh=True)

    def _live_table(self, rows: dict[str, Task]) -> Table:
        """The most recently changed tasks, as many as the terminal shows."""
        room = max(self.console.size.height - 3, 1)
        return self._table(heapq.nlargest(room, rows.values(), key=lambda task: task.revision))

    def _plain_event(self, event: TaskEvent) -> None:
        task = event.task
        self.console.print(
            f"{_time(task.updated_at)}  {event.kind.name:<8} {task.task_id}  {task.task_type}  "
            f"{task.status_label:<9}  {_percent(task):>4}  {task.message}"
        )
