"""`conveyor schedule ...`: make, show, change and fire schedules from a shell."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rich.table import Table

from conveyor._sync_client import Client
from conveyor._views import Output
from conveyor.errors import NotFound
from conveyor.schedules import Overlap, Schedule

Run = Callable[[Client, argparse.Namespace, Output], int]
OVERLAPS = {policy.name.lower().replace("_", "-"): policy for policy in Overlap}
ID_HELP = "the schedule's id, or its first 4 or more characters"


def add_commands(
    schedule: argparse.ArgumentParser,
    common: argparse.ArgumentParser,
    parse: dict[str, Callable[..., Any]],
) -> None:
    """The actions of `conveyor schedule`; `parse` holds what the other commands' options
    share: argument types (seconds, time, json_object) and option makers (params, labels)."""
    actions = schedule.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, run: Run, help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(run_action=run)
        return sub

    create = action("create", _create, "make a schedule that runs a task")
    create.add_argument("task_type", metavar="TYPE", help="the type of the task each run creates")
    _spec_options(create, parse)
    update = action("update", _update, "replace a schedule's spec, task and policy")
    update.add_argument("schedule_id", metavar="ID", help=ID_HELP)
    update.add_argument("task_type", metavar="TYPE", help="the type of the task each run creates")
    _spec_options(update, parse)
    listing = action("list", _list, "list the schedules, oldest first")
    listing.add_argument("--type", metavar="TYPE", help="only those whose runs have this type")
    parse["labels"](listing, "only those whose runs carry this label")
    for name, run, help in [
        ("get", _get, "show a schedule: its next run times, last run and counters"),
        ("unpause", _unpause, "run a paused schedule again, from now on"),
        ("delete", _delete, "delete a schedule (the tasks it made stay)"),
    ]:
        action(name, run, help).add_argument("schedule_id", metavar="ID", help=ID_HELP)
    pause = action("pause", _pause, "make no runs until unpaused")
    pause.add_argument("schedule_id", metavar="ID", help=ID_HELP)
    pause.add_argument("--note", default="", metavar="TEXT", help="why; shown on the schedule")
    trigger = action("trigger", _trigger, "make one run now")
    trigger.add_argument("schedule_id", metavar="ID", help=ID_HELP)
    _overlap_option(trigger, "(default: allow-all)")
    backfill = action("backfill", _backfill, "make the runs a window of time would have made")
    backfill.add_argument("schedule_id", metavar="ID", help=ID_HELP)
    backfill.add_argument("--from", dest="start", type=parse["time"], required=True, metavar="TIME")
    backfill.add_argument("--to", dest="end", type=parse["time"], required=True, metavar="TIME")
    _overlap_option(backfill, "(default: allow-all)")


def _spec_options(parser: argparse.ArgumentParser, parse: dict[str, Callable[..., Any]]) -> None:
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--every", type=parse["seconds"], metavar="S", help="every S seconds")
    when.add_argument("--daily", metavar="HH:MM[:SS]", help="each day at this time")
    when.add_argument("--cron", metavar="EXPR", help='a cron expression, such as "0 9 * * MON-FRI"')
    parser.add_argument("--zone", default="", metavar="ZONE", help="IANA time zone (default UTC)")
    parse["params"](parser, "a parameter of the task")
    parser.add_argument("--json-params", metavar="FILE", help="parameters from a JSON object")
    _overlap_option(parser, "when the previous run still goes (default: skip)")
    parser.add_argument("--catchup-window", type=parse["seconds"], metavar="S")
    parser.add_argument("--catchup-limit", type=int, metavar="N")
    parser.add_argument("--max-runs", type=int, metavar="N", help="make at most N runs")
    parser.add_argument("--jitter", type=parse["seconds"], metavar="S")
    parser.add_argument("--priority", type=int, metavar="N")
    parser.add_argument("--timeout", type=parse["seconds"], metavar="S", help="of each run")
    parser.add_argument("--max-attempts", type=int, metavar="N")
    parse["labels"](parser, "a label of each run")
    parser.add_argument("--description", default="", metavar="TEXT")
    parser.add_argument("--request-id", metavar="ID", help="makes a repeated create return it")
    parser.set_defaults(json_object=parse["json_object"])


def _overlap_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--overlap", choices=sorted(OVERLAPS), help=f"what to do {help}")


def run(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`conveyor schedule ACTION`."""
    code: int = args.run_action(client, args, out)
    return code


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "parameters": {**args.json_object(args.json_params, "--json-params"), **dict(args.params)},
        "every": args.every, "daily": args.daily, "cron": args.cron, "time_zone": args.zone,
        "overlap": OVERLAPS[args.overlap] if args.overlap else None,
        "catchup_window": args.catchup_window, "catchup_limit": args.catchup_limit,
        "max_runs": args.max_runs, "jitter": args.jitter, "priority": args.priority,
        "timeout_seconds": args.timeout, "max_attempts": args.max_attempts,
        "labels": dict(args.labels), "description": args.description,
    }  # fmt: skip


def _create(client: Client, args: argparse.Namespace, out: Output) -> int:
    spec = _spec(args)
    made = client.schedules.create(args.task_type, request_id=args.request_id, **spec)
    _show(out, made)
    return 0


def _update(client: Client, args: argparse.Namespace, out: Output) -> int:
    schedule_id = _resolve(client, args.schedule_id)
    _show(out, client.schedules.update(schedule_id, args.task_type, **_spec(args)))
    return 0


def _get(client: Client, args: argparse.Namespace, out: Output) -> int:
    _show(out, client.schedules.get(_resolve(client, args.schedule_id)))
    return 0


def _list(client: Client, args: argparse.Namespace, out: Output) -> int:
    schedules = list(client.schedules.list(task_type=args.type, labels=dict(args.labels)))
    if out.json_lines:
        for schedule in schedules:
            out._json(schedule_json(schedule))
        return 0
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "TYPE", "WHEN", "NEXT RUN", "RUNS", "STATE"):
        table.add_column(column)
    for schedule in schedules:
        nxt = schedule.next_run_times[0] if schedule.next_run_times else None
        table.add_row(
            schedule.schedule_id[:8],
            schedule.task_type,
            schedule.when,
            _local(nxt) if nxt else "-",
            str(schedule.run_count),
            _state(schedule),
        )
    out.console.print(table)
    return 0


def _pause(client: Client, args: argparse.Namespace, out: Output) -> int:
    _show(out, client.schedules.pause(_resolve(client, args.schedule_id), note=args.note))
    return 0


def _unpause(client: Client, args: argparse.Namespace, out: Output) -> int:
    _show(out, client.schedules.unpause(_resolve(client, args.schedule_id)))
    return 0


def _delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    schedule_id = _resolve(client, args.schedule_id)
    client.schedules.delete(schedule_id)
    out.note(f"deleted schedule {schedule_id}")
    return 0


def _trigger(client: Client, args: argparse.Namespace, out: Output) -> int:
    overlap = OVERLAPS[args.overlap] if args.overlap else None
    task = client.schedules.trigger(_resolve(client, args.schedule_id), overlap=overlap)
    if task is None:
        out.note("no run was made: the overlap policy skipped or buffered it")
        return 0
    out.task(task)
    return 0


def _backfill(client: Client, args: argparse.Namespace, out: Output) -> int:
    overlap = OVERLAPS[args.overlap] if args.overlap else None
    schedule_id = _resolve(client, args.schedule_id)
    tasks = client.schedules.backfill(schedule_id, args.start, args.end, overlap=overlap)
    out.tasks(tasks)
    return 0


def _resolve(client: Client, given: str) -> str:
    """A schedule's id from a whole id or the start of one (at least 4 characters)."""
    if len(given) >= 36:
        return given
    found = [s.schedule_id for s in client.schedules.list() if s.schedule_id.startswith(given)]
    if len(given) < 4 or len(found) != 1:
        if not found:
            raise NotFound(f"no schedule's id starts with {given}", reason="SCHEDULE_NOT_FOUND")
        raise NotFound(f"the ids of several schedules start with {given}; give more of it")
    return found[0]


def _show(out: Output, schedule: Schedule) -> None:
    if out.json_lines:
        out._json(schedule_json(schedule))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    zone = _zone(schedule.time_zone)
    rows = [
        ("id", schedule.schedule_id),
        ("task", f"{schedule.task_type} {json.dumps(schedule.parameters)}"),
        ("when", schedule.when),
        ("overlap", schedule.overlap.name),
        ("state", _state(schedule) + (f": {schedule.note}" if schedule.note else "")),
    ]
    for moment in schedule.next_run_times:
        shown = _local(moment)
        if zone is not None:
            shown += f"  ({moment.astimezone(zone).strftime('%Y-%m-%d %H:%M:%S %Z')})"
        rows.append(("next run", shown))
    if schedule.last_run is not None:
        last = schedule.last_run
        rows.append(("last run", f"{_local(last.nominal_time)}: task {last.task_id}"))
    rows.append(("runs", str(schedule.run_count)))
    if schedule.running_task_ids:
        rows.append(("running", " ".join(schedule.running_task_ids)))
    for name, count in (
        ("skipped", schedule.skipped),
        ("buffered", schedule.buffered),
        ("dropped", schedule.buffer_dropped),
        ("missed", schedule.missed),
    ):
        if count:
            rows.append((name, str(count)))
    for name, value in rows:
        grid.add_row(name, value)
    out.console.print(grid)


def schedule_json(schedule: Schedule) -> dict[str, Any]:
    """A schedule as one JSON object, for scripts."""
    return {
        "schedule_id": schedule.schedule_id,
        "task_type": schedule.task_type,
        "parameters": schedule.parameters,
        "when": schedule.when,
        "time_zone": schedule.time_zone,
        "overlap": schedule.overlap.name,
        "paused": schedule.paused,
        "note": schedule.note,
        "next_run_times": [t.isoformat() for t in schedule.next_run_times],
        "run_count": schedule.run_count,
        "running_task_ids": schedule.running_task_ids,
        "skipped": schedule.skipped,
        "buffer_dropped": schedule.buffer_dropped,
        "missed": schedule.missed,
        "buffered": schedule.buffered,
        "ended": schedule.ended,
    }


def _state(schedule: Schedule) -> str:
    return "paused" if schedule.paused else "ended" if schedule.ended else "active"


def _local(moment: datetime) -> str:
    """A time in this machine's zone, with its offset."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def _zone(name: str) -> ZoneInfo | None:
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None
