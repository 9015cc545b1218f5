"""Telling an observer how each RPC ended: its method, its status code and how long it took.

The observer is put around the method handlers when they are registered, not in a
grpc.aio interceptor: an interceptor runs for every call (its own coroutine, and the
handler looked up through it), while a wrapped handler costs only the call it wraps, and a
server that observes nothing wraps nothing. A streaming RPC (Watch, Connect) is told of
when it ends. A call refused before its handler runs (by the Authenticator interceptor,
which answers UNAUTHENTICATED or PERMISSION_DENIED itself) is not seen here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from conveyord.rpc import code_of

# Told of each call's end of one method: its status code and the seconds it took.
CallEnded = Callable[[grpc.StatusCode, float], None]
# Gives what is told of the calls of a method (the service, the method), once per method.
CallObserver = Callable[[str, str], CallEnded]

MethodHandlers = Mapping[str, "grpc.RpcMethodHandler[Any, Any]"]


def observed(
    service: str, handlers: MethodHandlers, observer: CallObserver
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The method handlers of `service`, each telling `observer` how its calls ended."""
    return {
        method: _observed(handler, observer(service, method))
        for method, handler in handlers.items()
    }


def _observed(
    handler: grpc.RpcMethodHandler[Any, Any], ended: CallEnded
) -> grpc.RpcMethodHandler[Any, Any]:
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _stream(handler.unary_stream, ended),
            handler.request_deserializer,
            handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        _unary(handler.unary_unary, ended),
        handler.request_deserializer,
        handler.response_serializer,
    )


def _unary(behaviour: Any, ended: CallEnded) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        began = time.perf_counter()
        try:
            response = await behaviour(request, context)
        except BaseException as error:
            ended(code_of(error, context), time.perf_counter() - began)
            raise
        ended(grpc.StatusCode.OK, time.perf_counter() - began)
        return response

    return call


def _stream(behaviour: Any, ended: CallEnded) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        began = time.perf_counter()
        try:
            async for response in behaviour(request, context):
                yield response
        except BaseException as error:
            ended(code_of(error, context), time.perf_counter() - began)
            raise
        ended(grpc.StatusCode.OK, time.perf_counter() - began)

    return call
