"""The `conveyor` command: create, get, list, cancel, watch and wait for tasks from a shell
(and rerun, delete, count them, and list their types: `_ops_cli.py`).

For people it draws tables and live views; with `--json`, every command prints one JSON
object per line for scripts, its fields named as in the proto's JSON mapping (taskId), and
the exit code says how a followed task ended.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from itertools import islice
from typing import Any

from conveyor import _ops_cli, _requests, _schedule_cli, _worker_command
from conveyor._sync_client import Client
from conveyor._version import add_version_option
from conveyor._views import Output
from conveyor.errors import (
    ConveyorError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
    WaitTimeout,
)
from conveyor.tasks import Task, TaskStatus
from conveyor.tls import CA_ENV, CERT_ENV, KEY_ENV, Tls

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_NOT_FOUND = 4
EXIT_UNREACHABLE = 5
EXIT_TIMED_OUT = 6
EXIT_ERROR = 7
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as a Unix tool killed by SIGPIPE

RPC_TIMEOUT_ENV = "CONVEYOR_RPC_TIMEOUT"
JSON_ENV = "CONVEYOR_JSON"

# An ID may be the start of a task's id, as git and docker take a commit's or a container's:
# at least this many characters (as git asks, so that a small number is not taken for one).
MIN_ID_PREFIX = 4
_ID_PREFIX = re.compile(rf"[0-9a-f-]{{{MIN_ID_PREFIX},36}}")
ID_HELP = (
    f"the task's id, or its first {MIN_ID_PREFIX} or more characters (such as the 8 that "
    "the progress bar shows) when no other task's id starts with them"
)

EXIT_CODES = f"""exit codes:
  {EXIT_COMPLETED}    done; for wait, watch and create --wait/--watch: the task COMPLETED
  {EXIT_FAILED}    the task FAILED
  {EXIT_USAGE}    bad usage or input (a malformed -p, an ID prefix that several tasks' ids
       start with, or a request the server calls invalid)
  {EXIT_CANCELLED}    the task was CANCELLED
  {EXIT_NOT_FOUND}    no such task
  {EXIT_UNREACHABLE}    cannot reach the server
  {EXIT_TIMED_OUT}    timed out: the wait, the watch or a request to the server ran out of time
  {EXIT_ERROR}    any other error, such as a followed task last seen in a status this
       conveyor does not know (a newer server's), shown as UNKNOWN(N)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
  {EXIT_BROKEN_PIPE}  the reader of the output went away (as with | head)"""

# How a followed task ended; any other status (one not terminal, or UNKNOWN) is EXIT_ERROR.
_BY_OUTCOME = {
    TaskStatus.COMPLETED: EXIT_COMPLETED,
    TaskStatus.FAILED: EXIT_FAILED,
    TaskStatus.CANCELLED: EXIT_CANCELLED,
}

Command = Callable[[Client, argparse.Namespace, Output], int]


class UsageError(Exception):
    """Input the command cannot use, found after the arguments were parsed."""


class Interrupted(Exception):
    """Ctrl-C while following a task, which goes on: the message says how to follow it again."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check(parser, args)
    except SystemExit as exit:  # --help, or a usage error that argparse has reported
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE
    if args.command == "worker":
        return _worker(args)
    output = Output(json_lines=args.json)
    try:
        # A server that refuses the connection is reported at once, not after --rpc-timeout.
        with Client(
            args.server,
            timeout=args.rpc_timeout,
            tls=_tls(args),
            token=args.token,
            retry_refused=False,
        ) as client:
            code: int = args.run(client, args, output)
            return code
    except UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    except Interrupted as stopped:
        return _fail(str(stopped), EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # Nobody reads any more: end quietly, and keep Python's own flush at exit from failing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ConveyorError as error:
        return _fail(*_explain(error, _requests.target(args.server)))


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check alone; a usage error (exit 2) otherwise."""
    if args.command == "watch":
        if args.all == bool(args.task_id):
            parser.error("watch needs a task ID or --all, not both")
        if args.task_id and (args.status or args.type or args.labels):
            parser.error("watch: --status, --type and --label go with --all")
    if args.command == "create":
        if args.wait_timeout and not (args.wait or args.watch):
            parser.error("create: --wait-timeout goes with --wait or --watch")
        if (args.task_type is None) == (args.from_file is None):
            parser.error("create needs a task TYPE or --from-file, not both")
        one_task = [args.params, args.json_params, args.labels, args.priority, args.timeout]
        one_task += [args.max_attempts, args.description, args.request_id, args.wait, args.watch]
        if args.from_file is not None and any(one_task):
            parser.error("create --from-file: the options of one task go in the file")


def _fail(message: str, code: int) -> int:
    _warn(message)
    return code


def _warn(message: str) -> None:
    """A line for people and scripts alike, on standard error."""
    print(f"conveyor: {message}", file=sys.stderr)


def _explain(error: ConveyorError, server: str) -> tuple[str, int]:
    """What to tell the person, and the exit code, for an error."""
    match error:
        case Unavailable() if "connection refused" in error.message.lower():
            return (
                f"cannot reach the conveyor server at {server}: connection refused; is it "
                "running? Point --server or $CONVEYOR_SERVER at it.",
                EXIT_UNREACHABLE,
            )
        case Unavailable():
            return (
                f"cannot reach the conveyor server at {server} ({error.message}); is it "
                "running? Point --server or $CONVEYOR_SERVER at it.",
                EXIT_UNREACHABLE,
            )
        case InvalidArgument():
            return f"invalid request: {error.message}", EXIT_USAGE
        case NotFound():
            return error.message, EXIT_NOT_FOUND
        case WaitTimeout() | DeadlineExceeded():
            return f"timed out: {error}", EXIT_TIMED_OUT
        case _:
            return str(error), EXIT_ERROR


def resolve_id(client: Client, given: str) -> str:
    """The id of the task that an ID argument names: a whole id (in any form the server
    takes) as it is, else the id of the one task whose id starts with it."""
    try:
        uuid.UUID(given)
    except ValueError:
        pass
    else:
        return given
    prefix = given.lower()
    if not _ID_PREFIX.fullmatch(prefix):
        raise UsageError(
            f"{given[:64]!r} is not a task id, nor the first {MIN_ID_PREFIX} or more "
            "characters of one"
        )
    found = [task.task_id for task in islice(client.list(task_id_prefix=prefix, page_size=2), 2)]
    if not found:
        raise NotFound(
            f"task not found: no task's id starts with {prefix}", reason="TASK_NOT_FOUND"
        )
    if len(found) > 1:
        raise UsageError(
            f"the ID {prefix} is ambiguous: the ids of several tasks start with it, such as "
            f"{found[0]} and {found[1]}; give more of the id"
        )
    return found[0]


@contextmanager
def _goes_on(task_id: str) -> Iterator[None]:
    """Ctrl-C while following a task stops following it, not the task: say so, and how to
    follow it again."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; task {task_id} goes on: follow it with `conveyor watch {task_id}`"
        ) from None


def outcome_code(task: Task | None) -> int:
    """The exit code that says how a followed task ended: EXIT_ERROR when it did not end in
    a status known here (the watch ended first, or the task is in a newer server's status)."""
    return _BY_OUTCOME.get(task.status, EXIT_ERROR) if task is not None else EXIT_ERROR


# -- commands -----------------------------------------------------------------------


def _create(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.from_file is not None:
        return _create_many(client, args.from_file, out)
    parameters = {**_json_object(args.json_params, "--json-params"), **dict(args.params)}
    task = client.create(
        args.task_type,
        parameters,
        priority=args.priority,
        timeout_seconds=args.timeout,
        max_attempts=args.max_attempts,
        labels=dict(args.labels),
        description=args.description,
        request_id=args.request_id,
        start_at=args.start_at,
        start_after_seconds=args.start_after,
        queue_timeout_seconds=args.queue_timeout,
    )
    if args.watch:
        with _goes_on(task.task_id):
            out.note(f"created task {task.task_id} ({task.task_type})")
            return outcome_code(out.follow(client.watch(task.task_id, timeout=args.wait_timeout)))
    if not args.wait:
        out.task(task)
        return EXIT_COMPLETED
    with _goes_on(task.task_id):
        out.created(task)
        ended = client.wait(task.task_id, timeout=args.wait_timeout)
    out.task(ended)
    return outcome_code(ended)


def _create_many(client: Client, source: str, out: Output) -> int:
    """Create the tasks of a JSON Lines file, one object (create's arguments) a line."""
    specs = list(_json_lines(source))
    try:
        tasks = client.create_many(specs)
    except TypeError as error:  # an object with a key create() does not take
        raise UsageError(f"--from-file {source}: {error}") from error
    out.tasks(tasks)
    return EXIT_COMPLETED


def _json_lines(source: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON Lines file (- for standard input); blank lines are skipped."""
    try:
        if source == "-":
            lines = sys.stdin.readlines()
        else:
            with open(source, encoding="utf-8") as file:
                lines = file.readlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--from-file {source}: {error}") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as error:
            raise UsageError(f"--from-file {source}, line {number}: {error}") from error
        if not isinstance(item, dict):
            raise UsageError(f"--from-file {source}, line {number}: expected a JSON object")
        yield item


def _json_object(source: str | None, option: str) -> dict[str, Any]:
    """The JSON object of `option` (--json-params, --json): a file, or - for standard input."""
    if source is None:
        return {}
    try:
        if source == "-":
            data = json.load(sys.stdin)
        else:
            with open(source, encoding="utf-8") as file:
                data = json.load(file)
    except (OSError, ValueError) as error:
        raise UsageError(f"{option} {source}: {error}") from error
    if not isinstance(data, dict):
        raise UsageError(f"{option} {source}: expected a JSON object")
    return data


def _get(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.task(client.get(resolve_id(client, args.task_id), include_attempts=True))
    return EXIT_COMPLETED


def _list(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Newest first unless --oldest-first; with --limit, the first N in that order, asking
    the server for no more than that."""
    tasks = client.list(
        statuses=args.status,
        task_type=args.type,
        labels=dict(args.labels),
        newest_first=not args.oldest_first,
        page_size=min(args.limit, _requests.RELIST_PAGE_SIZE) if args.limit else None,
    )
    out.tasks(islice(tasks, args.limit))
    return EXIT_COMPLETED


def _cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    matching = bool(args.labels or args.type or args.dry_run)
    if args.task_id is not None:
        if matching:
            raise UsageError("give a task ID, or --label/--type (with --dry-run), not both")
        out.task(client.cancel(resolve_id(client, args.task_id), reason=args.reason))
        return EXIT_COMPLETED
    if not (args.labels or args.type):
        raise UsageError("give a task ID, or --label or --type to cancel the tasks that match")
    match = {"labels": dict(args.labels), "task_type": args.type}
    if not (args.dry_run or args.yes) and sys.stdin.isatty() and not _confirmed(client, match):
        _warn("nothing was cancelled")
        return EXIT_COMPLETED
    count = client.cancel_matching(**match, reason=args.reason, dry_run=args.dry_run)
    out.counted(count, dry_run=args.dry_run)
    return EXIT_COMPLETED


def _confirmed(client: Client, match: dict[str, Any]) -> bool:
    """Ask a person at a terminal before a bulk cancel, saying how many tasks it takes."""
    count = client.cancel_matching(**match, dry_run=True)
    if not count:
        return True  # nothing to ask about: the cancel answers 0
    noun = "task" if count == 1 else "tasks"
    sys.stderr.write(f"cancel {count} unfinished {noun} that match? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _pause(client: Client, args: argparse.Namespace, out: Output) -> int:
    task = client.pause(resolve_id(client, args.task_id), reason=args.reason)
    if task.pause_requested_at is not None:
        out.note(f"task {task.task_id} pauses at its handler's next pause point")
    elif task.status is not TaskStatus.PAUSED:
        cannot = ": its handler cannot pause" if task.status is TaskStatus.RUNNING else ""
        _warn(f"task {task.task_id} is {task.status_label}, not paused{cannot}")
    out.task(task)
    return EXIT_COMPLETED


def _send(client: Client, args: argparse.Namespace, out: Output) -> int:
    data = {**_json_object(args.json_input, "--json-input"), **dict(args.params)}
    sent = client.send_input(resolve_id(client, args.task_id), data, request_id=args.request_id)
    out.note(f"input {sent.sequence} sent to task {sent.task.task_id}")
    out.task(sent.task)
    return EXIT_COMPLETED


def _resume(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.task(client.resume(resolve_id(client, args.task_id)))
    return EXIT_COMPLETED


def _watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    if not args.all:
        task_id = resolve_id(client, args.task_id)
        with _goes_on(task_id):
            return outcome_code(out.follow(client.watch(task_id, timeout=args.timeout)))
    events = client.watch_all(
        statuses=args.status,
        task_type=args.type,
        labels=dict(args.labels),
        start_with=[TaskStatus.RUNNING],  # then every change after the List that found them
        timeout=args.timeout,
    )
    first = (
        "the running tasks, then " if not args.status or TaskStatus.RUNNING in args.status else ""
    )
    out.follow_all(events, f"watching {first}every change; Ctrl-C to stop")
    return EXIT_COMPLETED


def _wait(client: Client, args: argparse.Namespace, out: Output) -> int:
    task_id = resolve_id(client, args.task_id)
    with _goes_on(task_id):
        ended = client.wait(task_id, timeout=args.timeout)
    out.task(ended)
    return outcome_code(ended)


# -- arguments ----------------------------------------------------------------------


def _parameter(text: str) -> tuple[str, Any]:
    """KEY=VALUE; the value is JSON when it parses as JSON (1, true, [1,2]), else a string."""
    key, equals, raw = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _label(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


_FILTER_STATUSES = {s.name.lower(): s for s in TaskStatus if s is not TaskStatus.UNKNOWN}


def _status(text: str) -> TaskStatus:
    """A status to filter by: any but UNKNOWN, which no task is in on the server."""
    try:
        return _FILTER_STATUSES[text.lower()]
    except KeyError:
        names = ", ".join(_FILTER_STATUSES)
        raise argparse.ArgumentTypeError(f"expected one of {names}, not {text!r}") from None


_count = _worker_command.positive_int


def _not_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds from 0, not {text!r}")
    return value


def _time_of_day(text: str) -> datetime:
    """An ISO 8601 time (2026-12-24T18:00, with its zone, or else in the local one)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2026-12-24T18:00+01:00, not {text!r}"
        ) from None
    return when if when.tzinfo is not None else when.astimezone()


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def _common_options(parser: argparse.ArgumentParser, *, inherit: bool) -> None:
    """--server, --json and --rpc-timeout. With `inherit` (on a command), an option left
    out keeps the value given before the command's name."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if inherit else value

    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=default(None),
        help=f"the conveyor server (default: {_requests.DEFAULT_TARGET}, where `make serve` "
        f"starts it) [env {_requests.TARGET_ENV}]",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(os.environ.get(JSON_ENV, "") not in ("", "0")),
        help="print one JSON object per line (a task, or each state or event followed), "
        f"its fields named as in the proto's JSON mapping (taskId, createdAt) [env {JSON_ENV}=1]",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="talk TLS, trusting the system's roots (implied by --tls-ca) [env CONVEYOR_TLS=1]",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        default=default(None),
        help="the bearer token to call with [env CONVEYOR_TOKEN]",
    )
    for flag, what, env in (
        ("--tls-ca", "trust the server's certificate if this CA (PEM) signed it", CA_ENV),
        ("--tls-cert", "present this client certificate (PEM): mutual TLS", CERT_ENV),
        ("--tls-key", "the client certificate's private key (PEM)", KEY_ENV),
    ):
        parser.add_argument(flag, metavar="FILE", default=default(None), help=f"{what} [env {env}]")
    parser.add_argument(
        "--rpc-timeout",
        metavar="S",
        type=_positive,
        default=default(os.environ.get(RPC_TIMEOUT_ENV, "10")),
        help="seconds each request to the server may take, retries included, and that a "
        f"broken watch keeps trying to reconnect (default: 10) [env {RPC_TIMEOUT_ENV}]",
    )


def _params(parser: argparse.ArgumentParser, what: str) -> None:
    """`-p KEY=VALUE`, repeatable: the fields of a JSON object (parameters, an input)."""
    parser.add_argument(
        "-p",
        "--param",
        dest="params",
        metavar="KEY=VALUE",
        type=_parameter,
        action="append",
        default=[],
        help=f"{what}; VALUE is JSON when it parses as JSON (2, true, [1,2]), else a string",
    )


def _labels(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--label",
        dest="labels",
        metavar="KEY=VALUE",
        type=_label,
        action="append",
        default=[],
        help=f"{help}; repeat for several",
    )


def _seconds(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    parser.add_argument(flag, type=_positive, metavar="S", help=help)


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--status",
        type=_status,
        action="append",
        help="only tasks in this status (created, running, completed, failed, cancelled, "
        "paused); repeat for several",
    )
    parser.add_argument("--type", metavar="TYPE", help="only tasks of this type")
    _labels(parser, "only tasks with this label")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor",
        description="Create, follow and manage the tasks of a conveyor server.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version_option(parser, "conveyor", "conveyor")
    _common_options(parser, inherit=False)
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, inherit=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Command, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            parents=[common],
            help=help,
            description=help,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(run=run)
        return sub

    create = command("create", _create, "create a task")
    create.add_argument(
        "task_type", metavar="TYPE", nargs="?", help="the task's type, such as sleep"
    )
    create.add_argument(
        "--from-file",
        metavar="FILE",
        help="create many tasks from a JSON Lines FILE (- for stdin): one object a line, with "
        "the keys task_type, parameters, priority, timeout_seconds, max_attempts, labels, "
        "description, request_id, start_at (ISO 8601 with its zone), start_after_seconds and "
        "queue_timeout_seconds",
    )
    _params(create, "a parameter")
    create.add_argument(
        "--json-params", metavar="FILE", help="parameters from a JSON object in FILE (- for stdin)"
    )
    create.add_argument(
        "--priority", type=int, metavar="N", help="1 to 10, 10 the most urgent (default: 5)"
    )
    _seconds(create, "--timeout", "seconds one attempt of the task may run")
    create.add_argument("--max-attempts", type=int, metavar="N", help="attempts the task gets")
    _labels(create, "a label")
    create.add_argument("--description", metavar="TEXT", default="", help="free text for people")
    create.add_argument(
        "--request-id", metavar="ID", help="makes a repeated create return the same task"
    )
    start = create.add_mutually_exclusive_group()
    start.add_argument(
        "--start-after",
        type=_not_negative,
        metavar="S",
        help="start no sooner than S seconds from now",
    )
    start.add_argument(
        "--start-at",
        type=_time_of_day,
        metavar="TIME",
        help="start no sooner than TIME (ISO 8601; without a zone, local time)",
    )
    _seconds(
        create,
        "--queue-timeout",
        "fail the task (QUEUE_TIMEOUT) if it has not started S seconds after it could",
    )
    follow = create.add_mutually_exclusive_group()
    follow.add_argument("--wait", action="store_true", help="wait for the task to end")
    follow.add_argument("--watch", action="store_true", help="show its progress until it ends")
    _seconds(create, "--wait-timeout", "with --wait or --watch: give up after S seconds")

    get = command("get", _get, "show a task, its error's traceback and its attempts")
    get.add_argument("task_id", metavar="ID", help=ID_HELP)

    listing = command("list", _list, "list tasks, newest first")
    _filters(listing)
    listing.add_argument(
        "--limit",
        type=_count,
        metavar="N",
        help="the newest N tasks (the oldest, with --oldest-first)",
    )
    listing.add_argument("--oldest-first", action="store_true", help="list the oldest tasks first")

    cancel = command(
        "cancel", _cancel, "cancel a task, or every unfinished task with a label or of a type"
    )
    cancel.add_argument("task_id", metavar="ID", nargs="?", help=ID_HELP)
    cancel.add_argument(
        "--reason", metavar="TEXT", default="", help="why; kept as the task's error message"
    )
    _labels(cancel, "instead of an ID: cancel the unfinished tasks with this label")
    cancel.add_argument("--type", metavar="TYPE", help="instead of an ID: those of this type")
    cancel.add_argument(
        "--dry-run", action="store_true", help="with --label or --type: count, cancel nothing"
    )
    cancel.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="with --label or --type: do not ask first (it asks only at a terminal)",
    )

    pause = command(
        "pause",
        _pause,
        "pause a task: a queued one leaves the queue, keeping its place; a running one parks "
        "at its handler's next pause point, if its handler has them",
    )
    pause.add_argument("task_id", metavar="ID", help=ID_HELP)
    pause.add_argument("--reason", metavar="TEXT", default="", help="why; shown on the task")

    schedule = commands.add_parser(
        "schedule",
        help="make, show, change and fire schedules: tasks that run on a timetable",
        description="schedules: tasks run every interval, daily at a time, or on a cron "
        "expression, in a time zone",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    schedule.set_defaults(run=_schedule_cli.run)
    _schedule_cli.add_commands(
        schedule,
        common,
        {
            "params": _params,
            "labels": _labels,
            "seconds": _positive,
            "time": _time_of_day,
            "json_object": _json_object,
        },
    )

    resume = command(
        "resume", _resume, "resume a paused task: back in the queue where it stood, or running on"
    )
    resume.add_argument("task_id", metavar="ID", help=ID_HELP)

    send = command(
        "send", _send, "send an input to a task: a task waiting for input runs on with it"
    )
    send.add_argument("task_id", metavar="ID", help=ID_HELP)
    _params(send, "a field of the input")
    send.add_argument(
        "--json-input",
        metavar="FILE",
        help="the input: a JSON object in FILE (- for stdin)",
    )
    send.add_argument(
        "--request-id", metavar="ID", help="makes a repeated send keep the input once"
    )

    watch = command(
        "watch",
        _watch,
        "show a task's progress until it ends, or (--all) the running tasks and every change",
    )
    watch.add_argument("task_id", metavar="ID", nargs="?", help=f"the task to follow: {ID_HELP}")
    watch.add_argument(
        "--all",
        action="store_true",
        help="show the running tasks that match, then follow every change to those that match",
    )
    _filters(watch)
    _seconds(watch, "--timeout", "give up after S seconds")

    _ops_cli.add_commands(command, resolve_id, _status, ID_HELP)

    wait = command("wait", _wait, "wait for a task to end, and show it")
    wait.add_argument("task_id", metavar="ID", help=ID_HELP)
    _seconds(wait, "--timeout", "give up after S seconds")
    worker = command(
        "worker",
        _no_client,
        "run task handlers for the server, in this process, until SIGTERM or SIGINT (which "
        "drain: nothing new is taken, and what runs finishes)",
    )
    _worker_command.add_worker_options(worker)
    return parser


def _no_client(client: Client, args: argparse.Namespace, output: Output) -> int:
    raise AssertionError("`conveyor worker` runs without a Client: see main")


def _tls(args: argparse.Namespace) -> Tls | bool | None:
    """TLS as the options say; None (the environment decides) if none is given."""
    try:
        return _worker_command.tls_of(args)
    except ValueError as error:
        raise UsageError(str(error)) from error


def _worker(args: argparse.Namespace) -> int:
    """`conveyor worker`: `conveyor-worker`, with this command's connection options."""
    target = _requests.target(args.server)
    return _worker_command.run(
        args, prog="conveyor", target=target, tls=_tls(args), token=args.token
    )
