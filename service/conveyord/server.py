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
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from conveyord.api import SERVICE_NAME, TaskServiceApi, method_handlers
from conveyord.handlers import HandlerRegistry
from conveyord.hub import EventHub
from conveyord.scheduler import Scheduler, SchedulerConfig
from conveyord.store.base import TaskStore
from conveyord.store.memory import DEFAULT_HISTORY_AGE, DEFAULT_HISTORY_SIZE, MemoryStore

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:50051"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `conveyord` can be told; `conveyord --help` documents each."""

    listen: str = DEFAULT_LISTEN
    handler_modules: tuple[str, ...] = ()
    builtin_handlers: bool = True
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    history_size: int = DEFAULT_HISTORY_SIZE
    history_age: float = DEFAULT_HISTORY_AGE
    shutdown_grace: float = 30.0


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
    ) -> None:
        self.config = config
        self.registry = registry or HandlerRegistry.from_modules(
            config.handler_modules, builtins=config.builtin_handlers
        )
        self.store = store or MemoryStore(
            history_size=config.history_size, history_age=config.history_age
        )
        self.hub = EventHub(self.store.revision)
        self.store.set_listener(self.hub.publish)
        self.scheduler = Scheduler(self.store, self.registry, config.scheduler)
        self.health = HealthServicer()
        self.port = 0
        self._grpc = grpc.aio.server(interceptors=interceptors)
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Start serving; returns the port (useful with a listen address ending in :0)."""
        server = self._grpc
        api = TaskServiceApi(self.scheduler, self.hub)
        server.add_registered_method_handlers(SERVICE_NAME, method_handlers(api))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        service_names = (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(service_names, server)
        try:
            self.port = server.add_insecure_port(self.config.listen)
        except RuntimeError as error:  # grpc's way of saying the address is taken or bad
            raise OSError(f"cannot listen on {self.config.listen}: {error}") from error
        await self.scheduler.start()
        await server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
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
        await self.scheduler.shutdown(grace)
        self.hub.close()
        await self._grpc.stop(grace=1.0)
        await self.store.close()
        log.info("conveyord stopped")

    async def wait(self) -> None:
        await self._grpc.wait_for_termination()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def serve(config: ServerConfig) -> None:
    """Run a server until SIGTERM or SIGINT, then stop it gracefully."""
    server = Server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info(
        "signal received: stopping (%d running, %d queued, grace %g s)",
        server.scheduler.running,
        server.scheduler.queued,
        config.shutdown_grace,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)  # a second signal stops at once
    await server.stop()
