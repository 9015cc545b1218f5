"""The server: a grpc.aio server with TaskService, health and reflection, and its lifecycle.

`Server` puts the parts together (store -> hub, scheduler, API) and stops them in order:
health turns NOT_SERVING first, new tasks are refused, running tasks get a grace
period, then the RPCs still open are ended and the store is closed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from conveyord.allocator import trim_when_idle
from conveyord.api import SERVICE_NAME, TaskServiceApi, method_handlers, new_task_id
from conveyord.auth import Authenticator, JwtKeys, JwtSettings, TokenFile
from conveyord.calls import MethodHandlers, observed
from conveyord.handlers import HandlerRegistry
from conveyord.high_water import DEFAULT_HIGH_WATER, QueueMarks
from conveyord.hub import DEFAULT_WATCH_BUFFER, EventHub
from conveyord.limits import MAX_RECEIVE_BYTES
from conveyord.metrics import Metrics
from conveyord.model import Task
from conveyord.rpc_log import RpcLog
from conveyord.scheduler import Scheduler, SchedulerConfig
from conveyord.schedules.api import SERVICE_NAME as SCHEDULE_SERVICE_NAME
from conveyord.schedules.api import ScheduleServiceApi
from conveyord.schedules.api import method_handlers as schedule_method_handlers
from conveyord.schedules.runner import RunRequest, ScheduleRunner
from conveyord.store import DEFAULT_HISTORY_AGE, DEFAULT_HISTORY_SIZE, store_from_url
from conveyord.store.base import StoreFailed, TaskStore
from conveyord.store.postgres import PostgresStore
from conveyord.store.postgres_usage import SharedUsage
from conveyord.task_log import TaskLog
from conveyord.tenants import TenantLimits, Tenants
from conveyord.tls import CertificateFiles, TlsFiles, check_exposure
from conveyord.validation import NewTask
from conveyord.watchdog import DEFAULT_BLOCKED_LOOP_WARNING, LoopWatchdog
from conveyord.worker.remote import SessionTimings, WorkerSessions
from conveyord.worker_api import SERVICE_NAME as WORKER_SERVICE_NAME
from conveyord.worker_api import WorkerServiceApi
from conveyord.worker_api import method_handlers as worker_method_handlers

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:50051"

# Keep long, quiet Watch streams healthy through proxies and NATs: ping a quiet connection
# every 30 s and drop it if the ping goes unanswered for 10 s, and accept the pings of
# clients that do the same (one every 10 s at most, even with no call open).
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)
SERVER_OPTIONS = (
    *KEEPALIVE_OPTIONS,
    # One server answers for one store: gRPC sets SO_REUSEPORT by default, which would let
    # a second conveyord listen on the same port and take half the calls.
    ("grpc.so_reuseport", 0),
    # The largest request any method can legitimately receive; each method checks its own.
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `conveyord` can be told; `conveyord --help` documents each."""

    listen: str = DEFAULT_LISTEN
    store: str = "sqlite"
    handler_modules: tuple[str, ...] = ()
    builtin_handlers: bool = True
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    history_size: int = DEFAULT_HISTORY_SIZE
    history_age: float = DEFAULT_HISTORY_AGE
    watch_buffer: int = DEFAULT_WATCH_BUFFER
    shutdown_grace: float = 30.0
    blocked_loop_warning: float = DEFAULT_BLOCKED_LOOP_WARNING  # seconds; 0: never
    workers: SessionTimings = dataclasses.field(default_factory=SessionTimings)
    tls: TlsFiles | None = None  # None: plaintext (on loopback, or with `insecure`)
    token_file: Path | None = None  # None: callers are not authenticated by a token file
    jwt: JwtSettings | None = None  # None: nor by JWTs
    insecure: bool = False  # listen beyond loopback without TLS and authentication
    tenant_limits: TenantLimits = dataclasses.field(default_factory=TenantLimits)
    tenant_limits_file: Path | None = None  # each tenant's own limits, read on change
    reflection: bool = True  # serve gRPC reflection (open to every caller, as health is)
    queue_high_water: float = DEFAULT_HIGH_WATER  # of max_queued: health NOT_SERVING above
    metrics_address: str = ""  # HOST:PORT of the Prometheus endpoint; empty: no metrics
    tracing: bool = False  # OpenTelemetry spans of RPCs and attempts (needs the SDK set up)


class Server:
    """One conveyord: start it, then stop it (or use `async with`).

    `interceptors` run around every RPC (in order), for concerns such as authentication.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        registry: HandlerRegistry | None = None,
        store: TaskStore | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.registry = registry or HandlerRegistry.from_modules(
            config.handler_modules, builtins=config.builtin_handlers
        )
        self.store = store or store_from_url(
            config.store,
            history_size=config.history_size,
            history_age=config.history_age,
            aging_rate=config.scheduler.aging_per_minute / 60,
        )
        self.failed = False  # the store failed: the server must stop, and say so
        self.stop_requested = asyncio.Event()  # set by a signal or by a failed store
        self.store.on_failure = self._store_failed
        self.hub = EventHub(buffer=config.watch_buffer)  # its revision is set at start
        self.store.feed.follow(self.hub.publish)
        self.task_log = TaskLog() if TaskLog.wanted() else None
        if self.task_log is not None:
            self.store.feed.follow_steps(self.task_log)
        self.tenants = Tenants(config.tenant_limits, config.tenant_limits_file, clock)
        self.scheduler = Scheduler(
            self.store, self.registry, config.scheduler, clock=clock, tenants=self.tenants
        )
        # On a store shared with other servers, their watches and workers count too.
        self.usage = (
            SharedUsage(self.store, self.tenants, self.scheduler.worker.holder)
            if isinstance(self.store, PostgresStore)
            else None
        )
        self.scheduler.worker.tracing = config.tracing
        self.schedules = ScheduleRunner(self.store, self._make_runs, clock)
        self._schedule_api = ScheduleServiceApi(
            self.store, self.schedules, lambda: self.scheduler.task_types, clock
        )
        self.sessions = WorkerSessions(self.scheduler.dispatcher, self.store, config.workers)
        self.watchdog = LoopWatchdog(config.blocked_loop_warning)
        self.health = HealthServicer()
        self.marks = QueueMarks(
            lambda: self.store.queued,
            config.scheduler.max_queued,
            config.queue_high_water,
            self._task_service_serving,
        )
        self._health_updates: set[asyncio.Task[None]] = set()
        self.port = 0
        self.metrics = Metrics(config.metrics_address) if config.metrics_address else None
        if config.token_file is not None or config.jwt is not None:
            tokens = TokenFile(config.token_file) if config.token_file else None
            jwts = JwtKeys(config.jwt) if config.jwt else None
            interceptors = [Authenticator(tokens, jwts), *interceptors]
        interceptors = [*_observers(config), *interceptors]
        self._grpc = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Start serving; returns the port (useful with a listen address ending in :0)."""
        server = self._grpc
        api = TaskServiceApi(self.scheduler, self.hub, self.sessions)
        self._add_service(SERVICE_NAME, method_handlers(api))
        workers = WorkerServiceApi(
            self.scheduler.dispatcher, self.sessions, self.scheduler.declare_types, self.tenants
        )
        self._add_service(WORKER_SERVICE_NAME, worker_method_handlers(workers))
        self._add_service(SCHEDULE_SERVICE_NAME, schedule_method_handlers(self._schedule_api))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.config.reflection:
            service_names = (
                SERVICE_NAME,
                WORKER_SERVICE_NAME,
                SCHEDULE_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(service_names, server)
        await self.store.open()
        self.hub.revision = await self.store.revision()
        check_exposure(
            self.config.listen,
            self.config.tls,
            self.config.insecure,
            authenticated=self.config.token_file is not None or self.config.jwt is not None,
        )
        try:
            if self.config.tls is not None:
                credentials = CertificateFiles(self.config.tls).credentials()
                self.port = server.add_secure_port(self.config.listen, credentials)
            else:
                self.port = server.add_insecure_port(self.config.listen)
        except RuntimeError as error:  # grpc's way of saying the address is taken or bad
            raise OSError(f"cannot listen on {self.config.listen}: {error}") from error
        if self.metrics is not None:  # before the scheduler, so that recovery is counted
            await self.metrics.start(
                self.store, self.hub, self.scheduler.dispatcher, self.scheduler.clock
            )
        self.watchdog.start()  # before the scheduler, so that recovered tasks are tracked
        await self.scheduler.start()
        self.schedules.start()
        if self.usage is not None:
            await self.usage.start()
        await server.start()
        for service in ("", SERVICE_NAME, WORKER_SERVICE_NAME, SCHEDULE_SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.store.feed.follow(self.marks.changed)
        self.marks.changed()  # a queue recovered above the mark
        log.info(
            "conveyord listening on %s (port %d) with handlers: %s",
            self.config.listen,
            self.port,
            ", ".join(self.registry.task_types),
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop in order; safe to call twice (the second call waits for the first)."""
        if self._stopping is None:
            grace = self.config.shutdown_grace if grace is None else grace
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        self.schedules.stop()
        self._schedule_api.close()
        await self.scheduler.shutdown(grace)
        self.sessions.close()  # after the grace: remote workers finished what they could
        self.hub.close()
        await self.hub.wait_closed(timeout=1.0)
        await self._grpc.stop(grace=1.0)
        if self.usage is not None:
            await self.usage.stop()
        await self.store.close()
        await self.watchdog.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        log.info("conveyord stopped")

    @property
    def metrics_port(self) -> int:
        """The port of the metrics endpoint once started (0: no metrics)."""
        return self.metrics.port if self.metrics is not None else 0

    def _add_service(self, name: str, handlers: MethodHandlers) -> None:
        """Serve a service's methods, each telling the metrics how its calls end (if any)."""
        if self.metrics is not None:
            handlers = observed(name, handlers, self.metrics.rpc_ended)
        self._grpc.add_registered_method_handlers(name, handlers)

    async def _make_runs(self, requests: Sequence[RunRequest]) -> list[tuple[Task, bool]]:
        """The tasks of schedules' runs (their templates were checked when the schedule
        was made), created as Create would, each for its schedule's tenant (whose rate
        they do not count against: a run that a limit refused would be a run missed)."""
        now = self.scheduler.clock()
        timeout = self.config.scheduler.default_timeout
        tasks = [
            NewTask(request, timeout, self.scheduler.default_attempts).to_task(
                new_task_id(), now, tenant
            )
            for request, tenant in requests
        ]
        return await self.scheduler.create(tasks, charge=False)

    def _task_service_serving(self, serving: bool) -> None:
        """Say whether TaskService takes new work (the queue's marks were crossed)."""
        status = health_pb2.HealthCheckResponse.SERVING
        if not serving:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        log.warning(
            "the queue holds %d tasks: %s takes new work %s", self.store.queued, SERVICE_NAME,
            "again (below the low-water mark)" if serving else "no more (high-water mark)",
        )  # fmt: skip
        update = asyncio.ensure_future(self.health.set(SERVICE_NAME, status))
        self._health_updates.add(update)
        update.add_done_callback(self._health_updates.discard)

    def _store_failed(self, error: Exception) -> None:
        self.failed = True
        self.scheduler.refuse(StoreFailed(f"the store failed and the server is stopping: {error}"))
        self.stop_requested.set()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _observers(config: ServerConfig) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors that see every call whole, outermost (so that they see the calls
    that authentication refuses too): each only when it is on, so that it costs nothing
    otherwise."""
    observers: list[grpc.aio.ServerInterceptor] = []
    if config.tracing:
        from conveyord.tracing import TracingInterceptor

        observers.append(TracingInterceptor())
    if RpcLog.wanted():
        observers.append(RpcLog())
    return observers


async def serve(config: ServerConfig) -> bool:
    """Run a server until SIGTERM or SIGINT, then stop it gracefully; False if its store failed."""
    server = Server(config)
    try:
        await server.start()
    except BaseException:
        await server.store.close()
        raise
    trimmer = asyncio.create_task(trim_when_idle())  # what a burst freed goes back when quiet
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop_requested.set)
    await server.stop_requested.wait()
    log.info(
        "%s: stopping (%d running, %d queued, grace %g s)",
        "the store failed" if server.failed else "signal received",
        server.scheduler.running,
        server.scheduler.queued,
        config.shutdown_grace,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)  # a second signal stops at once
    await server.stop(grace=0 if server.failed else None)
    trimmer.cancel()
    return not server.failed
