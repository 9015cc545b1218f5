"""`conveyor rerun`, `delete`, `types` and `count`: the operator's commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from rich.table import Table

from conveyor._sync_client import Client
from conveyor._views import Output, record_json, task_json
from conveyor.tasks import TaskCounts, TaskStatus, TaskType, TaskWorker

Run = Callable[[Client, argparse.Namespace, Output], int]
Resolve = Callable[[Client, str], str]
EXIT_OK = 0


def add_commands(
    command: Callable[[str, Run, str], argparse.ArgumentParser],
    resolve: Resolve,
    status: Callable[[str], TaskStatus],
    id_help: str,
) -> None:
    """The operator's commands, made with `command(name, run, help)`; `resolve` turns an ID
    argument (explained by `id_help`) into a task id, and `status` parses a --status."""
    rerun = command(
        "rerun",
        lambda client, args, out: _rerun(client, args, out, resolve),
        "create a new task from the request of a task that ended, and show it",
    )
    rerun.add_argument("task_id", metavar="ID", help=id_help)
    rerun.add_argument(
        "--request-id", metavar="ID", help="makes a repeated rerun return the same new task"
    )
    delete = command(
        "delete",
        lambda client, args, out: _delete(client, args, out, resolve),
        "delete a task that ended: it is gone, and its request id is free again",
    )
    delete.add_argument("task_id", metavar="ID", help=id_help)
    command("types", _types, "list the task types the server knows, and the workers serving each")
    count = command("count", _count, "count the tasks by type and status, without listing them")
    count.add_argument(
        "--status",
        type=status,
        action="append",
        help="only tasks in this status; repeat for several",
    )
    count.add_argument("--type", metavar="TYPE", help="only tasks of this type")


def _rerun(client: Client, args: argparse.Namespace, out: Output, resolve: Resolve) -> int:
    task = client.rerun(resolve(client, args.task_id), request_id=args.request_id)
    out.note(f"task {task.task_id} reruns task {task.rerun_of}")
    out.task(task)
    return EXIT_OK


def _delete(client: Client, args: argparse.Namespace, out: Output, resolve: Resolve) -> int:
    task = client.delete(resolve(client, args.task_id))
    if out.json_lines:
        out._json({"deleted": True, **task_json(task)})
    else:
        out.console.print(f"deleted task {task.task_id} ({task.task_type}, {task.status_label})")
    return EXIT_OK


def _types(client: Client, args: argparse.Namespace, out: Output) -> int:
    task_types = client.list_task_types()
    if out.json_lines:
        for task_type in task_types:
            out._json(record_json(task_type))
        return EXIT_OK
    table = Table(box=None, header_style="bold", pad_edge=False)
    for header in ("TYPE", "ACCEPTED", "WORKERS"):
        table.add_column(header, no_wrap=header != "WORKERS")
    for task_type in task_types:
        table.add_row(
            task_type.task_type, "yes" if task_type.accepted else "no", _workers(task_type)
        )
    out.console.print(table)
    return EXIT_OK


def _workers(task_type: TaskType) -> str:
    return ", ".join(map(_worker, task_type.workers)) or "none connected"


def _worker(worker: TaskWorker) -> str:
    traits = [f"{worker.free_slots} of {worker.slots} slots free"]
    traits += ["pausable"] * worker.pausable + ["draining"] * worker.draining
    return f"{worker.worker_id} ({', '.join(traits)})"


def _count(client: Client, args: argparse.Namespace, out: Output) -> int:
    counts = client.count_tasks(statuses=args.status, task_type=args.type)
    if out.json_lines:
        out._json(_counts_json(counts))
        return EXIT_OK
    statuses = sorted({status for by_status in counts.by_type.values() for status in by_status})
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("TYPE", no_wrap=True)
    for header in [*(status.name for status in statuses), "TOTAL"]:
        table.add_column(header, justify="right")
    for task_type, by_status in sorted(counts.by_type.items()):
        row = [by_status.get(status, 0) for status in statuses]
        table.add_row(task_type, *map(str, [*row, sum(row)]))
    table.add_row("TOTAL", *map(str, [*map(counts.of_status, statuses), counts.total]))
    out.console.print(table)
    return EXIT_OK


def _counts_json(counts: TaskCounts) -> dict[str, Any]:
    """The counts as CountTasksResponse has them: one entry per type and status."""
    entries = [
        {"taskType": task_type, "status": status.name, "count": count}
        for task_type, by_status in sorted(counts.by_type.items())
        for status, count in sorted(by_status.items())
    ]
    return {"counts": entries, "total": counts.total, "revision": counts.revision}
