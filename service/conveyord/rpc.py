"""What every service of the server shares in how an RPC is received and answered.

The method handlers are built here rather than by the generated `add_...Servicer_to_server`
so that a request whose bytes do not parse gets INVALID_ARGUMENT instead of INTERNAL, a
request larger than its method can legitimately receive gets RESOURCE_EXHAUSTED before
it is parsed, and a known failure (a ConveyorError) becomes its canonical status with
google.rpc details. Behaviours answer with their response already encoded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import message
from google.rpc import status_pb2
from grpc_status import rpc_status

from conveyord.errors import ConveyorError

Request = TypeVar("Request", bound=message.Message)


class MalformedRequest(ConveyorError):
    """Stands in for a request whose bytes did not parse, so that the RPC refuses it cleanly."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = ""  # no details: there are no fields to point at

    def __init__(self, name: str) -> None:
        super().__init__(f"the request is not a valid {name} message")


class RequestTooLarge(ConveyorError):
    """Stands in for a request larger than its method can legitimately receive."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "REQUEST_TOO_LARGE"

    def __init__(self, name: str, size: int, limit: int) -> None:
        super().__init__(f"the {name} is {size} bytes; at most {limit} are accepted")
        self.limit = limit

    def metadata(self) -> dict[str, str]:
        return {"limit_bytes": str(self.limit)}


def status_of(error: Exception) -> grpc.Status | None:
    """The gRPC status that answers a known failure, or None for an unexpected one."""
    if not isinstance(error, ConveyorError):
        return None
    return _status(error)


def _status(error: ConveyorError) -> grpc.Status:
    status = status_pb2.Status(code=error.code.value[0], message=str(error))
    for detail in error.details():
        status.details.add().Pack(detail)
    return cast(grpc.Status, rpc_status.to_status(status))


def deserializer(cls: type[Request], limit: int) -> Callable[[bytes], Request | ConveyorError]:
    """Parse a request, or stand in for one that is too large for its method or malformed
    with the error that refuses it."""
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Request | ConveyorError:
        if len(data) > limit:
            return RequestTooLarge(name, len(data), limit)
        try:
            return cls.FromString(data)
        except message.DecodeError:
            return MalformedRequest(name)

    return parse


def unary(
    behaviour: Callable[[Any], Awaitable[bytes]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        if isinstance(request, ConveyorError):  # it could not be read
            await context.abort_with_status(_status(request))
        try:
            return await behaviour(request)
        except Exception as error:
            status = status_of(error)
            if status is None:
                raise
        # grpc.aio keeps an aborted RPC's AbortError in a reference cycle that only the full
        # garbage collector frees (its traceback holds this frame, which holds the request):
        # abort outside the except block and without the request, so that a refused 4 MiB
        # request is freed at once rather than whenever the collector runs.
        del request
        await context.abort_with_status(status)
        raise AssertionError("unreachable: abort raises")

    return handle


def stream(
    behaviour: Callable[[Any], AsyncIterator[bytes]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]:
    async def handle(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        if isinstance(request, ConveyorError):  # it could not be read
            await context.abort_with_status(_status(request))
        try:
            async for response in behaviour(request):
                yield response
        except Exception as error:
            status = status_of(error)
            if status is None:
                raise
        else:
            return
        del request  # abort outside the except block, without the request: see unary
        await context.abort_with_status(status)

    return handle


def unary_method(
    behaviour: Callable[[Any], Awaitable[bytes]], request: type[message.Message], limit: int
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary method: `behaviour` answers a parsed request of type `request`."""
    return grpc.unary_unary_rpc_method_handler(
        unary(behaviour), request_deserializer=deserializer(request, limit)
    )


def stream_method(
    behaviour: Callable[[Any], AsyncIterator[bytes]], request: type[message.Message], limit: int
) -> grpc.RpcMethodHandler[Any, Any]:
    """A server-streaming method: `behaviour` yields the encoded responses."""
    return grpc.unary_stream_rpc_method_handler(
        stream(behaviour), request_deserializer=deserializer(request, limit)
    )


def code_of(error: BaseException, context: Any) -> grpc.StatusCode:
    """The status a call that raised `error` ends with: the one it aborted with, CANCELLED
    if the caller went away, UNKNOWN for an unexpected exception (as grpc answers it)."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):  # the caller went away
        return grpc.StatusCode.CANCELLED
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


class MethodWrapper(grpc.aio.ServerInterceptor):
    """An interceptor that wraps each method's handler in `wrap` once, keeping the wrapped
    handler: a call then costs a lookup, not a new wrapping."""

    MAX_KEPT = 10_000  # wrapped handlers kept (the one of a caller's identity: see auth.py)

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, Any], Any] = {}  # by (method, handler): wrapped

    def wrap(self, handler: Any, method: str) -> Any:
        """The handler of `method` that calls go through instead of `handler`."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        # The handler that reaches this interceptor may differ by caller (authentication
        # wraps it per identity), so the wrapped one is kept by both.
        key = (details.method, handler)
        wrapped = self._handlers.get(key)
        if wrapped is None:
            if len(self._handlers) >= self.MAX_KEPT:
                self._handlers.clear()
            wrapped = self._handlers[key] = self.wrap(handler, details.method)
        return wrapped
