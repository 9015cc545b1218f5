"""The base of every error the server answers an RPC with, and the errors of no single layer.

Each subclass names its canonical gRPC status code and its google.rpc.ErrorInfo reason,
and gives the details its status carries, so that the API turns any of them into a
status the same way (rpc.status_of). The errors stay with the layer that raises them
(store/base.py, scheduler.py, hub.py, validation.py, api.py); a new one derives from
ConveyorError (or from a base such as StoreError) and sets `code` and `reason`.
"""

from __future__ import annotations

from typing import ClassVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2

ERROR_DOMAIN = "conveyor.v1"


class ConveyorError(Exception):
    """A failure the server answers with a status: `code`, the exception's text as its
    message, and `details()`.

    `reason` is the ErrorInfo reason (in ERROR_DOMAIN), its metadata is `metadata()`; an
    error whose reason is empty carries no ErrorInfo (InvalidArgument has a BadRequest).
    """

    code: ClassVar[grpc.StatusCode]
    reason: ClassVar[str]

    def metadata(self) -> dict[str, str]:
        """The ErrorInfo metadata: what a client needs to act on the error."""
        return {}

    def details(self) -> list[Message]:
        """The google.rpc details the status carries."""
        if not self.reason:
            return []
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata()
        )
        return [info]


class ShuttingDown(ConveyorError):
    """The server is stopping: it takes no new tasks, and its watches end."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"

    def __init__(self) -> None:
        super().__init__("the server is shutting down and takes no new tasks")
