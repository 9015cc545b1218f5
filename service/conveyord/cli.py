"""The `conveyord` command: parse flags (each with an environment variable), then serve."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from conveyor import logs
from conveyor._version import add_version_option
from conveyor.handlers import (
    ENTRY_POINT_GROUP,
    comma_separated,
    handler_modules,
    import_from_cwd,
)
from conveyor.logs import LOG_FORMATS, LOG_LEVELS
from conveyord.allocator import tune_allocator, tune_collector
from conveyord.auth import JwtSettings
from conveyord.handlers import HandlerLoadError
from conveyord.high_water import DEFAULT_HIGH_WATER
from conveyord.hub import DEFAULT_WATCH_BUFFER
from conveyord.lifecycle import TypeRetry
from conveyord.metrics import parse_address
from conveyord.scheduler import SchedulerConfig
from conveyord.server import DEFAULT_LISTEN, ServerConfig, serve
from conveyord.store import (
    DEFAULT_HISTORY_AGE,
    DEFAULT_HISTORY_SIZE,
    StoreOpenError,
    default_store_path,
)
from conveyord.tenants import TenantLimits
from conveyord.tls import ExposureRefused, TlsError, TlsFiles
from conveyord.validation import MAX_ATTEMPTS
from conveyord.watchdog import DEFAULT_BLOCKED_LOOP_WARNING
from conveyord.worker.remote import SessionTimings

_DEFAULTS = SchedulerConfig()


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    return parse


def _not_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return value


def _not_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, not {text}")
    return value


def _type_limit(text: str) -> tuple[str, int]:
    task_type, _, limit = text.partition("=")
    if not task_type or not limit.isdigit() or int(limit) < 1:
        raise argparse.ArgumentTypeError(f"expected TYPE=N with N >= 1, not {text!r}")
    return task_type, int(limit)


def _address(text: str) -> str:
    """HOST:PORT, or empty (off)."""
    if text:
        try:
            parse_address(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _type_retry(text: str) -> tuple[str, TypeRetry]:
    """TYPE=ATTEMPTS[:INITIAL[:MULTIPLIER[:MAX]]]; a part left empty keeps the server's."""
    task_type, _, spec = text.partition("=")
    attempts, *backoff = spec.split(":")
    usage = f"expected TYPE=ATTEMPTS[:INITIAL[:MULTIPLIER[:MAX]]], not {text!r}"
    if not task_type or not attempts.isdigit() or len(backoff) > 3:
        raise argparse.ArgumentTypeError(usage)
    if not 1 <= int(attempts) <= MAX_ATTEMPTS:
        raise argparse.ArgumentTypeError(f"{text!r}: ATTEMPTS must be 1 to {MAX_ATTEMPTS}")
    parts: list[float | None] = []
    for name, part in zip(("INITIAL", "MULTIPLIER", "MAX"), backoff, strict=False):
        try:
            value = float(part) if part else None
        except ValueError:
            raise argparse.ArgumentTypeError(usage) from None
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise argparse.ArgumentTypeError(f"{text!r}: {name} must be a number of 0 or more")
        if name == "MULTIPLIER" and value == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: MULTIPLIER must be positive")
        parts.append(value)
    return task_type, TypeRetry(int(attempts), *parts)


def _env_list(name: str) -> list[str]:
    return comma_separated(os.environ.get(name, ""))


T = TypeVar("T")


def _env_items(parser: argparse.ArgumentParser, name: str, parse: Callable[[str], T]) -> list[T]:
    """The comma-separated items of $`name`, each parsed (exits with usage if one is bad)."""
    text = os.environ.get(name, "")
    try:
        return [parse(item) for item in comma_separated(text)]
    except argparse.ArgumentTypeError as error:
        parser.error(f"{name}={text!r}: {error}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyord",
        description="conveyord runs tasks in the background and lets other services follow them "
        "over gRPC (service conveyor.v1.TaskService, with health and reflection).",
        epilog="Every option can also be set with the environment variable named after it. "
        "Exit codes: 0 stopped on a signal, 1 the store failed while serving, 2 bad option or "
        "handler module, 3 cannot listen, 4 store in use by another conveyord, 5 store "
        "unreadable or corrupt, 6 store written by a newer conveyord. "
        "SIGTERM or SIGINT stops the server gracefully: health turns NOT_SERVING, new tasks are "
        "refused, running handlers are told to stop and get the shutdown grace period, and the "
        "attempts they stop go back to the queue without being used; a second signal stops at "
        "once.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def option(flag: str, env: str, help: str, **kwargs: Any) -> None:
        default = os.environ.get(env)
        if default is not None and "type" in kwargs:
            try:
                default = kwargs["type"](default)
            except (ValueError, argparse.ArgumentTypeError) as error:
                parser.error(f"{env}={default!r}: {error}")
        kwargs.setdefault("default", None)
        if default is not None:
            kwargs["default"] = default
        parser.add_argument(flag, help=f"{help} [env {env}]", **kwargs)

    def switch(flag: str, env: str, help: str) -> None:
        """A flag that is off unless given, or set by `env` (any value but empty or 0)."""
        on = os.environ.get(env, "") not in ("", "0")
        parser.add_argument(flag, action="store_true", default=on, help=f"{help} [env {env}=1]")

    add_version_option(parser, "conveyord", "conveyord")
    option(
        "--listen", "CONVEYORD_LISTEN", "address to listen on, HOST:PORT", default=DEFAULT_LISTEN
    )
    option("--tls-cert", "CONVEYORD_TLS_CERT", "the server's certificate chain, a PEM file")
    option("--tls-key", "CONVEYORD_TLS_KEY", "the server's private key, a PEM file")
    option(
        "--tls-client-ca",
        "CONVEYORD_TLS_CLIENT_CA",
        "require clients to present a certificate signed by this CA (PEM): mutual TLS. The "
        "TLS files are read again at the first new connection after they change",
    )
    option(
        "--token-file",
        "CONVEYORD_TOKEN_FILE",
        "authenticate callers with the bearer tokens of this JSON file (SHA-256 of each token, "
        "its name, tenant and permissions); read again when it changes",
    )
    option(
        "--jwt-keys",
        "CONVEYORD_JWT_KEYS",
        "authenticate callers with JWTs signed by the keys of this file (PEM public keys, or a "
        "JWKS); read again when it changes. Needs --jwt-issuer and --jwt-audience",
    )
    option("--jwt-issuer", "CONVEYORD_JWT_ISSUER", "the `iss` a JWT must have")
    option("--jwt-audience", "CONVEYORD_JWT_AUDIENCE", "the `aud` a JWT must have")
    switch(
        "--no-reflection",
        "CONVEYORD_NO_REFLECTION",
        "do not serve gRPC reflection, which tells any caller the services and their messages",
    )
    switch(
        "--insecure",
        "CONVEYORD_INSECURE",
        "listen beyond the loopback interface without TLS and authentication (refused otherwise)",
    )
    option(
        "--store",
        "CONVEYORD_STORE",
        "where tasks live: sqlite:PATH, sqlite (the file "
        f"{default_store_path()}), memory (forgotten at exit), or a PostgreSQL database "
        "that several conveyord share: postgresql://USER:PASSWORD@HOST:PORT/DATABASE "
        "(?pool_size=N: connections to it, 4 by default)",
        default="sqlite",
    )
    option(
        "--handlers",
        "CONVEYORD_HANDLERS",
        "comma-separated modules whose @handler functions to register",
        type=comma_separated,
        default=[],
    )
    switch(
        "--no-handler-entry-points",
        "CONVEYORD_NO_HANDLER_ENTRY_POINTS",
        "register only the --handlers modules, not also those that installed packages declare "
        f"in the {ENTRY_POINT_GROUP} entry point group",
    )
    switch(
        "--no-builtin-handlers",
        "CONVEYORD_NO_BUILTIN_HANDLERS",
        "do not register the built-in sleep, echo and fail handlers",
    )
    option(
        "--concurrency",
        "CONVEYORD_CONCURRENCY",
        "tasks this server's own handlers run at once (its local worker's slots)",
        type=_positive(int),
        default=_DEFAULTS.concurrency,
    )
    option(
        "--max-running",
        "CONVEYORD_MAX_RUNNING",
        "tasks running at once on all workers, this server's and remote ones (default: no "
        "cap beyond the workers' own slots)",
        type=_positive(int),
        default=_DEFAULTS.max_running,
    )
    parser.add_argument(
        "--type-concurrency",
        action="append",
        type=_type_limit,
        metavar="TYPE=N",
        default=_env_items(parser, "CONVEYORD_TYPE_CONCURRENCY", _type_limit),
        help="tasks of TYPE running at once (repeatable; 1 makes a one-at-a-time queue) "
        "[env CONVEYORD_TYPE_CONCURRENCY, comma-separated]",
    )
    parser.add_argument(
        "--type-retry",
        action="append",
        type=_type_retry,
        metavar="TYPE=ATTEMPTS[:INITIAL[:MULTIPLIER[:MAX]]]",
        default=_env_items(parser, "CONVEYORD_TYPE_RETRY", _type_retry),
        help="retry defaults of TYPE (repeatable): the attempts of its tasks whose request "
        "does not set max_attempts, and optionally the backoff of their retries, in seconds "
        "(a part left empty keeps the --retry-* value), such as email=5:10::600 [env "
        "CONVEYORD_TYPE_RETRY, comma-separated; the flags add to it, the last for a type wins]",
    )
    parser.add_argument(
        "--task-type",
        action="append",
        metavar="TYPE",
        default=_env_list("CONVEYORD_TASK_TYPES"),
        help="a task type run by workers outside this server (repeatable): Create accepts it, "
        "and its tasks wait for such a worker [env CONVEYORD_TASK_TYPES, comma-separated]",
    )
    option(
        "--max-queued",
        "CONVEYORD_MAX_QUEUED",
        "tasks waiting at most; beyond it Create answers RESOURCE_EXHAUSTED",
        type=_positive(int),
        default=_DEFAULTS.max_queued,
    )
    option(
        "--queue-high-water",
        "CONVEYORD_QUEUE_HIGH_WATER",
        "the share of --max-queued above which the health of conveyor.v1.TaskService turns "
        "NOT_SERVING (a load balancer sends new work elsewhere), SERVING again below 0.8 of it",
        type=_fraction,
        default=DEFAULT_HIGH_WATER,
        metavar="SHARE",
    )
    option(
        "--tenant-max-queued",
        "CONVEYORD_TENANT_MAX_QUEUED",
        "tasks waiting at most per tenant (default: no limit but --max-queued)",
        type=_not_negative_int,
    )
    option(
        "--tenant-rate",
        "CONVEYORD_TENANT_RATE",
        "tasks a tenant creates per second at most, sustained (a token bucket; default: no limit)",
        type=_positive(float),
    )
    option(
        "--tenant-burst",
        "CONVEYORD_TENANT_BURST",
        "tasks a tenant creates at once at most, the bucket's size (default: a second's worth)",
        type=_positive(int),
    )
    option(
        "--tenant-max-watches",
        "CONVEYORD_TENANT_MAX_WATCHES",
        "open Watch streams per tenant at most (default: no limit)",
        type=_not_negative_int,
    )
    option(
        "--tenant-max-workers",
        "CONVEYORD_TENANT_MAX_WORKERS",
        "connected workers per tenant at most (default: no limit)",
        type=_not_negative_int,
    )
    option(
        "--tenant-limits",
        "CONVEYORD_TENANT_LIMITS",
        'limits of each tenant, a JSON file: {"default": {...}, "tenants": {"NAME": '
        '{"max_queued": N, "rate": N, "burst": N, "max_watches": N, "max_workers": N}}}; a '
        "tenant's entry overrides the defaults. Read again when it changes",
    )
    option(
        "--default-timeout",
        "CONVEYORD_DEFAULT_TIMEOUT",
        "seconds an attempt may run when the task does not say",
        type=_positive(float),
        default=_DEFAULTS.default_timeout,
    )
    option(
        "--cancel-grace",
        "CONVEYORD_CANCEL_GRACE",
        "seconds a cancelled or timed-out handler has to stop before it is stopped regardless",
        type=_not_negative,
        default=_DEFAULTS.cancel_grace,
    )
    option(
        "--local-lease",
        "CONVEYORD_LOCAL_LEASE",
        "on a store shared with other servers (PostgreSQL): seconds a lease of this server's "
        "handlers lasts unless renewed (renewed every third of it); the tasks of a server "
        "that dies are retried once theirs run out",
        type=_positive(float),
        default=_DEFAULTS.local_lease,
    )
    option(
        "--aging",
        "CONVEYORD_AGING",
        "priority levels a queued task gains per minute of waiting (0: strict priority)",
        type=_not_negative,
        default=_DEFAULTS.aging_per_minute,
    )
    option(
        "--retry-initial",
        "CONVEYORD_RETRY_INITIAL",
        "seconds before the first retry",
        type=_not_negative,
        default=_DEFAULTS.retry_initial,
    )
    option(
        "--retry-multiplier",
        "CONVEYORD_RETRY_MULTIPLIER",
        "growth of the delay between retries",
        type=_positive(float),
        default=_DEFAULTS.retry_multiplier,
    )
    option(
        "--retry-max",
        "CONVEYORD_RETRY_MAX",
        "longest delay between retries, seconds",
        type=_not_negative,
        default=_DEFAULTS.retry_max,
    )
    option(
        "--retention",
        "CONVEYORD_RETENTION",
        "seconds a finished task is kept before it is removed",
        type=_not_negative,
        default=_DEFAULTS.retention,
    )
    option(
        "--sweep-interval",
        "CONVEYORD_SWEEP_INTERVAL",
        "seconds between two removals of expired tasks",
        type=_positive(float),
        default=_DEFAULTS.sweep_interval,
    )
    option(
        "--history-size",
        "CONVEYORD_HISTORY_SIZE",
        "changes kept for Watch to resume from, at most",
        type=_positive(int),
        default=DEFAULT_HISTORY_SIZE,
    )
    option(
        "--history-age",
        "CONVEYORD_HISTORY_AGE",
        "seconds a change is kept for Watch to resume from, at most",
        type=_positive(float),
        default=DEFAULT_HISTORY_AGE,
    )
    option(
        "--watch-buffer",
        "CONVEYORD_WATCH_BUFFER",
        "changes a watcher may fall behind before they are coalesced to the latest state of "
        "each task; a watcher still more than half that far behind is ended "
        "(RESOURCE_EXHAUSTED) to resume",
        type=_positive(int),
        default=DEFAULT_WATCH_BUFFER,
    )
    option(
        "--max-interruptions",
        "CONVEYORD_MAX_INTERRUPTIONS",
        "times a task's attempt may be stopped by a server's shutdown and queued again "
        "without using an attempt; past that, such a stop uses the attempt",
        type=_not_negative_int,
        default=_DEFAULTS.max_interruptions,
    )
    option(
        "--worker-lease",
        "CONVEYORD_WORKER_LEASE",
        "seconds a remote worker's lease lasts unless renewed (it renews every third of it)",
        type=_positive(float),
        default=SessionTimings.lease_duration,
    )
    option(
        "--worker-grace",
        "CONVEYORD_WORKER_GRACE",
        "seconds a remote worker whose connection broke keeps its attempts, for it to "
        "connect again; then they are retried elsewhere",
        type=_not_negative,
        default=SessionTimings.reconnect_grace,
    )
    option(
        "--shutdown-grace",
        "CONVEYORD_SHUTDOWN_GRACE",
        "seconds running tasks get to finish when the server stops",
        type=_not_negative,
        default=30.0,
    )
    option(
        "--blocked-loop-warning",
        "CONVEYORD_BLOCKED_LOOP_WARNING",
        "log a warning, naming the task, when an async handler (or anything else) blocks the "
        "event loop, and so every call, for longer than SECONDS (0: never)",
        type=_not_negative,
        default=DEFAULT_BLOCKED_LOOP_WARNING,
        metavar="SECONDS",
    )
    option(
        "--metrics-address",
        "CONVEYORD_METRICS_ADDRESS",
        "serve Prometheus metrics over HTTP at HOST:PORT (/metrics; port 0: any free port); "
        "unset or empty: no metrics, and none of their cost",
        type=_address,
        metavar="HOST:PORT",
    )
    option(
        "--log-level",
        "CONVEYORD_LOG_LEVEL",
        "what to log: debug adds a line for every RPC; info, a line for each step of every "
        "task (created, started, retried, ended)",
        type=str.lower,
        default="info",
        choices=LOG_LEVELS,
    )
    option(
        "--log-format",
        "CONVEYORD_LOG_FORMAT",
        "log lines as text (a message, then key=value) or as JSON objects (one a line)",
        type=str.lower,
        default="text",
        choices=LOG_FORMATS,
    )
    switch(
        "--tracing",
        "CONVEYORD_TRACING",
        "trace RPCs and task runs with OpenTelemetry (needs the `tracing` extra), exported as "
        "the OTEL_* environment variables say (OTLP over gRPC by default); a task's runs "
        "join the trace of the Create that made it",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    scheduler = SchedulerConfig(
        concurrency=args.concurrency,
        max_running=args.max_running,
        type_concurrency=dict(args.type_concurrency),
        worker_types=frozenset(args.task_type),
        max_queued=args.max_queued,
        default_timeout=args.default_timeout,
        cancel_grace=args.cancel_grace,
        local_lease=args.local_lease,
        aging_per_minute=args.aging,
        retry_initial=args.retry_initial,
        retry_multiplier=args.retry_multiplier,
        retry_max=args.retry_max,
        retention=args.retention,
        sweep_interval=args.sweep_interval,
        max_interruptions=args.max_interruptions,
        type_retry=dict(args.type_retry),
    )
    return ServerConfig(
        listen=args.listen,
        store=args.store,
        handler_modules=tuple(
            handler_modules(args.handlers, discover=not args.no_handler_entry_points)
        ),
        builtin_handlers=not args.no_builtin_handlers,
        scheduler=scheduler,
        history_size=args.history_size,
        history_age=args.history_age,
        watch_buffer=args.watch_buffer,
        shutdown_grace=args.shutdown_grace,
        blocked_loop_warning=args.blocked_loop_warning,
        workers=SessionTimings(lease_duration=args.worker_lease, reconnect_grace=args.worker_grace),
        tls=_tls(args),
        token_file=Path(args.token_file) if args.token_file else None,
        jwt=_jwt(args),
        insecure=args.insecure,
        tenant_limits=TenantLimits(
            max_queued=args.tenant_max_queued,
            rate=args.tenant_rate,
            burst=args.tenant_burst,
            max_watches=args.tenant_max_watches,
            max_workers=args.tenant_max_workers,
        ),
        tenant_limits_file=Path(args.tenant_limits) if args.tenant_limits else None,
        queue_high_water=args.queue_high_water,
        reflection=not args.no_reflection,
        metrics_address=args.metrics_address or "",
        tracing=args.tracing,
    )


def _jwt(args: argparse.Namespace) -> JwtSettings | None:
    if args.jwt_keys is None:
        if args.jwt_issuer or args.jwt_audience:
            raise ValueError("--jwt-issuer and --jwt-audience go with --jwt-keys")
        return None
    if not (args.jwt_issuer and args.jwt_audience):
        raise ValueError("--jwt-keys needs --jwt-issuer and --jwt-audience")
    return JwtSettings(Path(args.jwt_keys), args.jwt_issuer, args.jwt_audience)


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    client_ca = Path(args.tls_client_ca) if args.tls_client_ca else None
    return TlsFiles(Path(args.tls_cert), Path(args.tls_key), client_ca)


def _start_tracing() -> None:
    try:
        from conveyord.tracing import configure_sdk

        configure_sdk()
    except ImportError as error:
        raise ValueError(
            f"--tracing needs OpenTelemetry: pip install 'conveyor[tracing]' ({error})"
        ) from error


def main(argv: Sequence[str] | None = None) -> int:
    tune_allocator()  # before gRPC starts its threads: see conveyord/allocator.py
    tune_collector()
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    import_from_cwd()
    try:
        if args.tracing:
            _start_tracing()
        config = config_from_args(args)
        return 0 if asyncio.run(serve(config)) else 1
    except HandlerLoadError as error:
        print(f"conveyord: cannot load handlers: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # a malformed --store, or half the TLS options
        print(f"conveyord: {error}", file=sys.stderr)
        return 2
    except (OSError, ExposureRefused, TlsError) as error:
        print(f"conveyord: {error}", file=sys.stderr)
        return 3
    except StoreOpenError as error:
        print(f"conveyord: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
