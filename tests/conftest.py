"""Test fixtures: a real conveyord on a real port (port 0), in a thread with its own event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from conveyor.v1 import task_service_pb2_grpc
from conveyord.handlers import HandlerRegistry
from conveyord.scheduler import SchedulerConfig
from conveyord.server import Server, ServerConfig
from conveyord.store.postgres import PostgresStore
from tests.postgres import PostgresNotFound, PostgresServer
from tests.processes import Conveyord

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

TEST_HANDLERS = "tests.handlers"


class ManualClock:
    """The server's clock in tests where time matters: it moves only when told."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now


class ServerThread:
    """Runs a `Server` on a loop of its own, so that tests may block without stalling it.
    With a ManualClock, `advance` moves the server's time. Its own worker runs the handlers
    of `handler_modules`."""

    def __init__(
        self,
        config: ServerConfig,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        clock: ManualClock | None = None,
        handler_modules: Sequence[str] = (TEST_HANDLERS,),
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.clock = clock
        registry = HandlerRegistry.from_modules(list(handler_modules))
        self.server: Server = self.call(self._make(config, registry, interceptors, clock))
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"

    @staticmethod
    async def _make(
        config: ServerConfig,
        registry: HandlerRegistry,
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        clock: ManualClock | None,
    ) -> Server:
        return Server(
            config, registry=registry, interceptors=interceptors, clock=clock or time.time
        )

    def advance(self, seconds: float) -> None:
        """Move the server's ManualClock on; what fell due by then is done (at once, or in
        the loop's next turns)."""
        self.call(self._advance(seconds))

    async def _advance(self, seconds: float) -> None:
        assert self.clock is not None, "the server was started without a ManualClock"
        self.clock.now += seconds
        self.server.scheduler.dispatcher.clock_moved()
        self.server.schedules.clock_moved()

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float = 0) -> None:
        if self.loop.is_running():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


SERVER_SETTINGS = (
    "history_size",
    "history_age",
    "store",
    "watch_buffer",
    "workers",
    "tls",
    "insecure",
    "token_file",
    "jwt",
    "tenant_limits",
    "tenant_limits_file",
    "queue_high_water",
    "reflection",
    "metrics_address",
)


def server_config(**settings: Any) -> ServerConfig:
    """A server config for tests: port 0, the memory store, fast retries, plus the settings
    given (those of ServerConfig named in SERVER_SETTINGS, the rest of SchedulerConfig)."""
    server = {"store": "memory", **{k: settings.pop(k) for k in SERVER_SETTINGS if k in settings}}
    base = SchedulerConfig(retry_initial=0.05, cancel_grace=0.2)
    return ServerConfig(
        listen="127.0.0.1:0",
        scheduler=dataclasses.replace(base, **settings),
        shutdown_grace=0,
        **server,
    )


@pytest.fixture(autouse=True, scope="session")
def _no_store_in_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the default store path of every server the tests start out of the user's home."""
    previous = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data-home"))
    yield
    if previous is None:
        del os.environ["XDG_DATA_HOME"]
    else:
        os.environ["XDG_DATA_HOME"] = previous


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """Start servers with scheduler settings (and interceptors) of the test's choosing.

    All of them stop at the end of the test.
    """
    started: list[ServerThread] = []

    def start(
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        clock: ManualClock | None = None,
        **settings: Any,
    ) -> ServerThread:
        running = ServerThread(server_config(**settings), interceptors, clock)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    return start_server()


@pytest.fixture
async def channel(server: ServerThread) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> TaskServiceAsyncStub:
    return task_service_pb2_grpc.TaskServiceStub(channel)


@pytest.fixture
def conveyord() -> Iterator[Callable[..., Conveyord]]:
    started: list[Conveyord] = []

    def start(*args: str, **options: Any) -> Conveyord:
        process = Conveyord(*args, **options)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
        process.process.wait()
        if process.process.stderr:
            process.process.stderr.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session, started on first use, in a temporary
    directory removed at the end. Without PostgreSQL installed, the tests that use it fail
    (they are not skipped): the message says how to install it or leave them out."""
    missing: PostgresNotFound | None = None
    try:
        server = PostgresServer()
    except PostgresNotFound as error:
        missing = error
    if missing is not None:  # out of the except block: its message once, not twice
        pytest.fail(str(missing), pytrace=False)
    with server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a database of the test's own, new and empty, dropped after it."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url.rsplit("/", 1)[1])


PostgresOpener = Callable[..., Any]  # opens a PostgresStore on the test's database


@pytest.fixture
async def opened(postgres_url: str) -> AsyncIterator[PostgresOpener]:
    """Opens PostgreSQL stores (as several replicas would) on the test's database (or at
    another `url` of it), and closes them all at the end."""
    stores: list[PostgresStore] = []

    async def make(url: str = postgres_url, **options: Any) -> PostgresStore:
        store = PostgresStore(url, **options)
        await store.open()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `postgresql` every test that uses the PostgreSQL server, so that
    `-m 'not postgresql'` leaves out all of them, marked by hand or not."""
    for item in items:
        if "postgres_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgresql)
