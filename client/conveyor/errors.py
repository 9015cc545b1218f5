"""What the client raises: one base, a class per gRPC code a caller acts on, and task outcomes.

Every failed call is turned into an `RpcError` subclass by `from_rpc_error`, the one place
that maps gRPC codes to classes; the client raises it `from` the original `grpc.RpcError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.tasks import Task, TaskStatus


class ConveyorError(Exception):
    """The base of every error the client raises."""


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: its path (such as `task.priority`) and what is wrong."""

    field: str
    description: str


class RpcError(ConveyorError):
    """A call failed: the server refused it, or it could not reach the server.

    `code` is the gRPC status code and `message` the server's message. `reason`, `domain`
    and `metadata` come from the google.rpc.ErrorInfo the server sent, if any (reasons
    such as TASK_NOT_FOUND or QUEUE_FULL are stable). The subclasses name the codes a
    caller acts on; other codes (INTERNAL, UNIMPLEMENTED, ...) come as `RpcError` itself.
    """

    grpc_status_code: ClassVar[grpc.StatusCode | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        domain: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.grpc_status_code or grpc.StatusCode.UNKNOWN
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})


class InvalidArgument(RpcError):
    """The request was bad; `field_violations` names every bad field."""

    grpc_status_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self, message: str, *, field_violations: Sequence[FieldViolation] = (), **info: Any
    ) -> None:
        super().__init__(message, **info)
        self.field_violations = tuple(field_violations)


class NotFound(RpcError):
    """No such task (or it ended longer ago than the server keeps tasks)."""

    grpc_status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RpcError):
    """A request_id was used before for a different task request."""

    grpc_status_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RpcError):
    """The task is not in a state that allows the call, such as cancelling a completed task."""

    grpc_status_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(RpcError):
    """The server is at a limit (such as its queue); `retry_delay` is when to try again, if said."""

    grpc_status_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_delay: float | None = None, **info: Any) -> None:
        super().__init__(message, **info)
        self.retry_delay = retry_delay


class Unavailable(RpcError):
    """The server could not be reached, or is shutting down."""

    grpc_status_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RpcError):
    """The call's timeout passed before it completed."""

    grpc_status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(RpcError):
    """The call carried no valid credentials."""

    grpc_status_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RpcError):
    """The caller may not make this call."""

    grpc_status_code = grpc.StatusCode.PERMISSION_DENIED


class OutOfRange(RpcError):
    """A watch asked for a revision the server's history no longer holds (or does not hold yet).

    The client's watches handle it themselves; it reaches callers of the raw stubs only.
    """

    grpc_status_code = grpc.StatusCode.OUT_OF_RANGE


_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    cls.grpc_status_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        OutOfRange,
    )
    if cls.grpc_status_code is not None
}


def from_rpc_error(error: grpc.RpcError) -> RpcError:
    """The client's error for a failed gRPC call, with the google.rpc details it carried."""
    code = error.code()
    message = error.details() or code.name
    info: dict[str, Any] = {"code": code}
    violations: list[FieldViolation] = []
    retry_delay: float | None = None
    for detail in _details(error):
        error_info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        retry_info = error_details_pb2.RetryInfo()
        if detail.Unpack(error_info):
            info.update(
                reason=error_info.reason,
                domain=error_info.domain,
                metadata=dict(error_info.metadata),
            )
        elif detail.Unpack(bad_request):
            violations.extend(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
        elif detail.Unpack(retry_info):
            retry_delay = retry_info.retry_delay.ToTimedelta().total_seconds()
    cls = _BY_CODE.get(code, RpcError)
    if cls is InvalidArgument:
        return InvalidArgument(message, field_violations=violations, **info)
    if cls is ResourceExhausted:
        return ResourceExhausted(message, retry_delay=retry_delay, **info)
    return cls(message, **info)


def retry_delay_of(error: grpc.RpcError) -> float | None:
    """The seconds a RESOURCE_EXHAUSTED error's RetryInfo says to wait before trying again
    (None: it says nothing)."""
    if error.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    retry_info = error_details_pb2.RetryInfo()
    for detail in _details(error):
        if detail.Unpack(retry_info):
            return float(retry_info.retry_delay.ToTimedelta().total_seconds())
    return None


def _details(error: grpc.RpcError) -> list[Any]:
    """The google.protobuf.Any details of the error's google.rpc.Status, if it has one."""
    try:
        status = rpc_status.from_call(error)
    except (AttributeError, ValueError):  # not a call, or a status that contradicts the call's
        return []
    return list(status.details) if status is not None else []


class TaskFailed(ConveyorError):
    """The task ended FAILED; `task.error` holds its error code and message."""

    def __init__(self, task: Task) -> None:
        error = task.error
        why = f"{error.code}: {error.message}" if error else "no error given"
        super().__init__(f"task {task.task_id} ({task.task_type}) failed: {why}")
        self.task = task


class TaskCancelled(ConveyorError):
    """The task ended CANCELLED; `task.error.message` holds the reason given."""

    def __init__(self, task: Task) -> None:
        reason = task.error.message if task.error and task.error.message else "no reason given"
        super().__init__(f"task {task.task_id} ({task.task_type}) was cancelled: {reason}")
        self.task = task


class WaitTimeout(ConveyorError, TimeoutError):
    """A wait ran out of its `timeout` before the task ended; `task` is the last state seen."""

    def __init__(self, task_id: str, timeout: float | None, task: Task | None) -> None:
        within = f" within {timeout:g} s" if timeout is not None else ""
        seen = f"; last seen {task.status_label}" if task is not None else ""
        super().__init__(f"task {task_id} did not end{within}{seen}")
        self.task_id = task_id
        self.timeout = timeout
        self.task = task


def outcome(task: Task) -> Any:
    """The result of a COMPLETED task; TaskFailed or TaskCancelled for the other ends."""
    if task.status is TaskStatus.FAILED:
        raise TaskFailed(task)
    if task.status is TaskStatus.CANCELLED:
        raise TaskCancelled(task)
    return task.result
