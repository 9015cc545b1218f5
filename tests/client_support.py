"""Support for the client's tests: both clients behind one face, and a server-side observer.

`Twin` lets one test cover `Client` and `AsyncClient` alike. The blocking client may be
called from an async test: the server runs on a thread and loop of its own, so a blocked
test loop stalls nothing but the test.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import socket
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Sequence,
)
from concurrent import futures
from typing import Any, cast

import grpc

from conveyor import AsyncClient, Client
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import (
    TaskServiceServicer,
    TaskServiceStub,
    add_TaskServiceServicer_to_server,
)

KINDS = ["Client", "AsyncClient"]


class Twin:
    """A client of either kind; `await twin.method(...)` calls it and collects any iterator."""

    def __init__(self, client: Client | AsyncClient) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self.collect(name, *args, **kwargs)

        return call

    async def collect(
        self, name: str, *args: Any, each: Callable[[Any], Any] | None = None, **kwargs: Any
    ) -> Any:
        """Call a method; iterate what it returns, handing each item to `each` until it says stop.

        A method that returns a plain value (or an awaitable of one) gives that value.
        """
        result = getattr(self.client, name)(*args, **kwargs)
        if inspect.isawaitable(result):
            return await result
        items: list[Any] = []
        # The clients' methods return generators, typed as mere iterators.
        if isinstance(result, AsyncIterator):
            async with contextlib.aclosing(cast("AsyncGenerator[Any, None]", result)) as stream:
                async for item in stream:
                    items.append(item)
                    if each is not None and each(item):
                        break
        elif isinstance(result, Iterator):
            with contextlib.closing(cast("Generator[Any, None, None]", result)) as stream:
                for item in stream:
                    items.append(item)
                    if each is not None and each(item):
                        break
        else:
            return result
        return items


@contextlib.asynccontextmanager
async def open_twin(kind: str, target: str | None, **options: Any) -> AsyncIterator[Twin]:
    if kind == "Client":
        with Client(target, **options) as client:
            yield Twin(client)
    else:
        async with AsyncClient(target, **options) as client:
            yield Twin(client)


@contextlib.contextmanager
def direct_stub(address: str) -> Iterator[TaskServiceStub]:
    """A blocking stub straight to the server, to act behind a client's back or check on it."""
    with grpc.insecure_channel(address) as channel:
        yield TaskServiceStub(channel)


def server_record(address: str, task_id: str, since_revision: int) -> list[task_pb2.TaskResponse]:
    """Every state of a task after `since_revision`, as the server's own history has them."""
    with direct_stub(address) as stub:
        request = pb.WatchRequest(task_id=task_id, since_revision=since_revision)
        return [response.task for response in stub.Watch(request, timeout=30)]


def store_revision(address: str) -> int:
    with direct_stub(address) as stub:
        return stub.List(pb.ListRequest(page_size=1), timeout=10).revision


def closed_port_address() -> str:
    """An address where nothing listens (a port just freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def first_item(stream: Iterator[Any] | AsyncIterator[Any]) -> Awaitable[Any]:
    """Start taking the first item of either kind of iterator, without waiting for it."""
    if isinstance(stream, AsyncIterator):
        return asyncio.ensure_future(anext(stream))
    return asyncio.ensure_future(asyncio.to_thread(next, stream))


class Calls(grpc.aio.ServerInterceptor):
    """Counts the server's calls by method, signals each method's first call, refuses some."""

    def __init__(self, refuse: dict[str, grpc.StatusCode] | None = None) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.arrived: collections.defaultdict[str, threading.Event] = collections.defaultdict(
            threading.Event
        )
        self._refuse = refuse or {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        method = details.method.rsplit("/", 1)[-1]
        self.counts[method] += 1
        self.arrived[method].set()
        code = self._refuse.get(method)
        if code is None:
            return await continuation(details)

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(code, f"{method} is turned off here")

        handler = await continuation(details)
        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return make(refuse)


class ScriptedServer(TaskServiceServicer):
    """A stand-in server on a real port that answers with hand-built messages, such as a
    newer server's: `task` to every Get and List, `events` to every Watch.

    A Watch gets the events after its since_revision (all of them without one), then its
    stream stays open, as a real server's does, until the client leaves, unless `hold` is
    False: then it ends, as a real one ends the watch of a task that ended.
    """

    def __init__(
        self,
        task: task_pb2.TaskResponse,
        events: Sequence[pb.WatchResponse] = (),
        *,
        hold: bool = True,
    ) -> None:
        self.task, self.events, self.hold = task, list(events), hold
        self.watches: list[pb.WatchRequest] = []
        self._stopped = threading.Event()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        add_TaskServiceServicer_to_server(self, self._server)
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self) -> ScriptedServer:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._server.stop(0).wait(10)

    def Create(self, request: pb.CreateRequest, context: grpc.ServicerContext) -> pb.CreateResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def BatchCreate(
        self, request: pb.BatchCreateRequest, context: grpc.ServicerContext
    ) -> pb.BatchCreateResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def CancelMatching(
        self, request: pb.CancelMatchingRequest, context: grpc.ServicerContext
    ) -> pb.CancelMatchingResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def Pause(self, request: pb.PauseRequest, context: grpc.ServicerContext) -> pb.PauseResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def Resume(self, request: pb.ResumeRequest, context: grpc.ServicerContext) -> pb.ResumeResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def SendInput(
        self, request: pb.SendInputRequest, context: grpc.ServicerContext
    ) -> pb.SendInputResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def Rerun(self, request: pb.RerunRequest, context: grpc.ServicerContext) -> pb.RerunResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def ListTaskTypes(
        self, request: pb.ListTaskTypesRequest, context: grpc.ServicerContext
    ) -> pb.ListTaskTypesResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def CountTasks(
        self, request: pb.CountTasksRequest, context: grpc.ServicerContext
    ) -> pb.CountTasksResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetResponse:
        return pb.GetResponse(task=self.task)

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        return pb.ListResponse(tasks=[self.task], revision=self.task.revision)

    def Watch(
        self, request: pb.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchResponse]:
        self.watches.append(request)
        since = request.since_revision if request.HasField("since_revision") else None
        for event in self.events:
            if since is None or event.revision > since:
                yield event
        while self.hold and context.is_active() and not self._stopped.wait(0.05):
            pass
