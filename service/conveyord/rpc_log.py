"""One DEBUG line per RPC: its method, the caller's tenant, the status code, the duration and
the task id when the call names one (or, for Create, makes one).

An interceptor that the server installs only when the `conveyord.rpc` logger is enabled
for DEBUG (decided once, at start): otherwise calls do not go through it at all. It is
the outermost interceptor, so a call that authentication refuses has its line too (with
the tenant that the caller turned out to have, if any).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from conveyor.v1 import task_service_pb2
from conveyord.auth import current_tenant
from conveyord.rpc import MethodWrapper, code_of

log = logging.getLogger("conveyord.rpc")

_CREATE = "/conveyor.v1.TaskService/Create"


class RpcLog(MethodWrapper):
    """Logs each call of every method when it ends."""

    @staticmethod
    def wanted() -> bool:
        return log.isEnabledFor(logging.DEBUG)

    def wrap(self, handler: Any, method: str) -> Any:
        return _logged(handler, method)


def _logged(handler: Any, method: str) -> Any:
    """The handler, logging each call when it ends."""
    if handler.response_streaming:
        stream = handler.unary_stream

        async def streamed(request: Any, context: Any) -> AsyncIterator[Any]:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                async for response in stream(request, context):
                    yield response
            except BaseException as error:
                code = code_of(error, context)
                raise
            finally:
                _line(method, code, start, _named_task(request))

        return grpc.unary_stream_rpc_method_handler(
            streamed, handler.request_deserializer, handler.response_serializer
        )
    unary = handler.unary_unary

    async def call(request: Any, context: Any) -> Any:
        start = time.perf_counter()
        task_id = _named_task(request)
        try:
            response = await unary(request, context)
        except BaseException as error:
            _line(method, code_of(error, context), start, task_id)
            raise
        if method == _CREATE and isinstance(response, bytes):
            task_id = task_service_pb2.CreateResponse.FromString(response).task.task_id
        _line(method, context.code() or grpc.StatusCode.OK, start, task_id)
        return response

    return grpc.unary_unary_rpc_method_handler(
        call, handler.request_deserializer, handler.response_serializer
    )


def _named_task(request: Any) -> str:
    """The task a request names: its task_id, or its lease's."""
    task_id = getattr(request, "task_id", "")
    if not task_id and hasattr(request, "lease"):
        task_id = request.lease.task_id
    return task_id if isinstance(task_id, str) else ""


def _line(method: str, code: grpc.StatusCode, start: float, task_id: str) -> None:
    service, _, name = method.lstrip("/").rpartition("/")
    fields: dict[str, Any] = {
        "method": name,
        "service": service,
        "tenant": current_tenant(),
        "code": code.name,
        "duration_ms": round((time.perf_counter() - start) * 1000, 3),
    }
    if task_id:
        fields["task_id"] = task_id
    log.debug("rpc %s %s", name, code.name, extra=fields)
