"""`conveyor-worker` (and `conveyor worker`): run the handlers of some modules for a server.

It needs only the client (no `cli` extra), so that the image and a lean install run workers.
The modules are those of --handlers and those that installed distributions declare in the
`conveyor.handlers` entry point group. Every option has an environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from conveyor import _requests, logs
from conveyor._version import add_version_option
from conveyor.handlers import (
    ENTRY_POINT_GROUP,
    HandlerLoadError,
    HandlerRegistry,
    comma_separated,
    handler_modules,
    import_from_cwd,
)
from conveyor.tls import CA_ENV, CERT_ENV, KEY_ENV, TLS_ENV, Tls
from conveyor.worker import Worker, WorkerRefused

HANDLERS_ENV = "CONVEYOR_WORKER_HANDLERS"
CONCURRENCY_ENV = "CONVEYOR_WORKER_CONCURRENCY"
WORKER_ID_ENV = "CONVEYOR_WORKER_ID"
NO_ENTRY_POINTS_ENV = "CONVEYOR_NO_HANDLER_ENTRY_POINTS"
LOG_FORMAT_ENV = "CONVEYOR_LOG_FORMAT"
EXIT_USAGE = 2


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1, not {text!r}")
    return int(text)


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The options of a worker, for `conveyor-worker` and `conveyor worker` alike."""
    parser.add_argument(
        "--handlers",
        metavar="MODULE",
        action="append",
        default=comma_separated(os.environ.get(HANDLERS_ENV, "")),
        help="a module whose @handler functions to run (repeatable); the same modules as "
        f"conveyord --handlers [env {HANDLERS_ENV}, comma-separated]",
    )
    parser.add_argument(
        "--no-handler-entry-points",
        action="store_true",
        default=os.environ.get(NO_ENTRY_POINTS_ENV, "") not in ("", "0"),
        help="run only the --handlers modules, not also those that installed packages declare "
        f"in the {ENTRY_POINT_GROUP} entry point group [env {NO_ENTRY_POINTS_ENV}=1]",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=os.environ.get(CONCURRENCY_ENV, "8"),
        metavar="N",
        help=f"attempts run at once (default: 8) [env {CONCURRENCY_ENV}]",
    )
    parser.add_argument(
        "--worker-id",
        metavar="ID",
        default=os.environ.get(WORKER_ID_ENV) or None,
        help="this worker's identity, unique to the process (default: host/pid/random) "
        f"[env {WORKER_ID_ENV}]",
    )
    parser.add_argument(
        "--log-format",
        choices=logs.LOG_FORMATS,
        default=os.environ.get(LOG_FORMAT_ENV, "text"),
        help="log lines as text (a message, then key=value) or JSON objects; a handler's own "
        f"lines carry its task_id and attempt (default: text) [env {LOG_FORMAT_ENV}]",
    )


def run(
    args: argparse.Namespace, *, prog: str, target: str, tls: Tls | bool | None, token: str | None
) -> int:
    """Run the worker that `args` describe until SIGTERM or SIGINT has drained it."""
    logs.configure("info", args.log_format)
    import_from_cwd()
    modules = handler_modules(args.handlers, discover=not args.no_handler_entry_points)
    if not modules:
        return _fail(
            prog,
            f"no handler modules: name them with --handlers (or ${HANDLERS_ENV}), or install a "
            f"package that declares them in the {ENTRY_POINT_GROUP} entry point group",
        )
    try:
        registry = HandlerRegistry.from_modules(modules, builtins=False)
        worker = Worker(
            target, registry, concurrency=args.concurrency, worker_id=args.worker_id, tls=tls,
            token=token,
        )  # fmt: skip
    except (HandlerLoadError, ValueError) as error:
        return _fail(prog, str(error))
    logging.getLogger("conveyor.worker").info(
        "worker %s for %s: %s from %s, %d at once",
        worker.worker_id, worker.target, ", ".join(registry.task_types), ", ".join(modules),
        args.concurrency,
    )  # fmt: skip
    try:
        asyncio.run(worker.run_until_signal())
    except WorkerRefused as error:
        return _fail(prog, f"the server refused this worker: {error}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor-worker",
        description="Run task handlers for a conveyor server, in this process, until SIGTERM "
        "or SIGINT (which drain: nothing new is taken, and what runs finishes).",
    )
    add_version_option(parser, "conveyor-worker", "conveyor")
    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        help=f"the conveyor server (default: {_requests.DEFAULT_TARGET}) "
        f"[env {_requests.TARGET_ENV}]",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"the bearer token to call with [env {_requests.TOKEN_ENV}]",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help=f"talk TLS, trusting the system's roots [env {TLS_ENV}=1]",
    )
    for flag, what, env in (
        ("--tls-ca", "trust the server's certificate if this CA (PEM) signed it", CA_ENV),
        ("--tls-cert", "present this client certificate (PEM): mutual TLS", CERT_ENV),
        ("--tls-key", "the client certificate's private key (PEM)", KEY_ENV),
    ):
        parser.add_argument(flag, metavar="FILE", help=f"{what} [env {env}]")
    add_worker_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tls = tls_of(args)
    except ValueError as error:
        return _fail("conveyor-worker", str(error))
    target = _requests.target(args.server)
    return run(args, prog="conveyor-worker", target=target, tls=tls, token=args.token)


def tls_of(args: argparse.Namespace) -> Tls | bool | None:
    """TLS as the options say; None (the environment decides) if none is given."""
    if args.tls_ca or args.tls_cert or args.tls_key:
        return Tls(args.tls_ca, args.tls_cert, args.tls_key)
    return True if args.tls else None


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return EXIT_USAGE
