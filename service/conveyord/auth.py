"""Who calls, and what they may do: bearer tokens from a token file, and permissions per RPC.

A token file is JSON: `{"tokens": [{"name": "ci", "tenant": "team-a", "sha256": "<hex of the
token's SHA-256>", "permissions": ["read", "submit:resize,thumbnail", "worker:resize"]}]}`.
Tokens are stored hashed; one is revoked by removing it from the file, which is read again
(at the next call, once a second at most) when it changes. A permission may be limited to
task types (`submit:resize` creates only `resize` tasks; `worker:resize` runs only them).

Every call of TaskService, WorkerService and ScheduleService carries `authorization: Bearer
<token>`: without a valid one it is UNAUTHENTICATED, without the permission its method
needs PERMISSION_DENIED, each saying what was missing. Health and reflection stay open.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from conveyord.errors import ConveyorError
from conveyord.rpc import status_of

log = logging.getLogger(__name__)

RELOAD_EVERY = 1.0  # seconds: how often the token file's change is looked for, at most


class Permission(enum.Enum):
    READ = "read"  # Get, List, Watch, and schedules' Get, List, Watch
    SUBMIT = "submit"  # Create, BatchCreate, SendInput
    CONTROL = "control"  # Cancel, CancelMatching, Pause, Resume
    WORKER = "worker"  # take and report tasks (WorkerService)
    SCHEDULES = "schedules"  # make, change, fire and delete schedules
    ADMIN = "admin"  # everything


# The permission each method needs, by full method name's service and method.
REQUIRED: Mapping[str, Mapping[str, Permission]] = {
    "conveyor.v1.TaskService": {
        "Create": Permission.SUBMIT,
        "BatchCreate": Permission.SUBMIT,
        "SendInput": Permission.SUBMIT,
        "Get": Permission.READ,
        "List": Permission.READ,
        "Watch": Permission.READ,
        "Cancel": Permission.CONTROL,
        "CancelMatching": Permission.CONTROL,
        "Pause": Permission.CONTROL,
        "Resume": Permission.CONTROL,
    },
    "conveyor.v1.WorkerService": {
        name: Permission.WORKER
        for name in ("Connect", "Report", "Renew", "Finish", "FinishMany", "Drain")
    },
    "conveyor.v1.ScheduleService": {
        "GetSchedule": Permission.READ,
        "ListSchedules": Permission.READ,
        "WatchSchedules": Permission.READ,
        **{
            name: Permission.SCHEDULES
            for name in (
                "CreateSchedule",
                "UpdateSchedule",
                "DeleteSchedule",
                "PauseSchedule",
                "UnpauseSchedule",
                "TriggerSchedule",
                "BackfillSchedule",
            )
        },
    },
}


@dataclasses.dataclass(frozen=True)
class Identity:
    """A caller: its name, its tenant, and its permissions, each with the task types it is
    limited to (None: any type)."""

    name: str
    tenant: str
    permissions: Mapping[Permission, frozenset[str] | None]

    def allows(self, permission: Permission) -> bool:
        return Permission.ADMIN in self.permissions or permission in self.permissions

    def types_for(self, permission: Permission) -> frozenset[str] | None:
        """The task types `permission` is limited to (None: any)."""
        if Permission.ADMIN in self.permissions:
            return None
        return self.permissions.get(permission)


caller: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("caller", default=None)


class Unauthenticated(ConveyorError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ConveyorError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"

    def __init__(self, message: str, permission: Permission) -> None:
        super().__init__(message)
        self.permission = permission

    def metadata(self) -> dict[str, str]:
        return {"permission": self.permission.value}


def require_types(permission: Permission, task_types: Iterable[str]) -> None:
    """Refuse a call of the current caller for task types its permission does not cover."""
    identity = caller.get()
    if identity is None:
        return  # no authentication on this server
    allowed = identity.types_for(permission)
    if allowed is None:
        return
    outside = sorted(set(task_types) - allowed)
    if outside:
        raise PermissionDenied(
            f"{identity.name} may {permission.value} only task types "
            f"{', '.join(sorted(allowed))}, not {', '.join(outside)}",
            permission,
        )


def parse_permissions(texts: Iterable[str]) -> dict[Permission, frozenset[str] | None]:
    """`read`, `submit:resize,thumbnail` ... as permissions and their task types; ValueError."""
    found: dict[Permission, frozenset[str] | None] = {}
    for text in texts:
        name, _, types = str(text).partition(":")
        try:
            permission = Permission(name.strip())
        except ValueError:
            known = ", ".join(p.value for p in Permission)
            raise ValueError(f"{text!r} is not a permission (known: {known})") from None
        found[permission] = (
            frozenset(t.strip() for t in types.split(",") if t.strip()) if types else None
        )
    return found


class TokenFile:
    """The callers of a token file, by the SHA-256 of their token; read again when it changes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._identities: dict[str, Identity] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        self._load()

    def identify(self, token: str) -> Identity | None:
        """The caller whose token this is, or None."""
        if self._clock() - self._checked >= RELOAD_EVERY:
            self._reload()
        digest = hashlib.sha256(token.encode()).hexdigest()
        for known, identity in self._identities.items():
            if hmac.compare_digest(known, digest):
                return identity
        return None

    def _reload(self) -> None:
        self._checked = self._clock()
        try:
            stat = self.path.stat()
            if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                self._load()
                log.info("token file %s changed: %d tokens", self.path, len(self._identities))
        except (OSError, ValueError) as error:
            log.error("the token file changed but cannot be read; the old tokens stay: %s", error)

    def _load(self) -> None:
        stat = self.path.stat()
        data = json.loads(self.path.read_text())
        identities = {}
        for index, entry in enumerate(data.get("tokens", [])):
            try:
                identity = Identity(
                    str(entry["name"]), str(entry.get("tenant", "")),
                    parse_permissions(entry.get("permissions", [])),
                )  # fmt: skip
                identities[str(entry["sha256"]).lower()] = identity
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{self.path}: tokens[{index}]: {error}") from error
        self._identities = identities
        self._stamp = (stat.st_mtime_ns, stat.st_size)


class Authenticator(grpc.aio.ServerInterceptor):
    """Checks every call's bearer token and the permission its method needs; the caller is
    `caller` while the method runs."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        service, _, method = details.method.lstrip("/").partition("/")
        needed = REQUIRED.get(service, {}).get(method)
        handler = await continuation(details)
        if handler is None or (service not in REQUIRED):
            return handler  # health, reflection: open
        try:
            identity = self._identity(details.invocation_metadata or ())
            if needed is None or not identity.allows(needed):
                what = needed.value if needed else "a permission for it"
                raise PermissionDenied(
                    f"{identity.name} may not call {method}: it needs the {what} permission",
                    needed or Permission.ADMIN,
                )
        except ConveyorError as refusal:
            return _refusing(handler, refusal)
        return _as(handler, identity)

    def _identity(self, metadata: Iterable[tuple[str, Any]]) -> Identity:
        token = None
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer":
                    token = None
        if not token:
            raise Unauthenticated("this server needs a bearer token: authorization: Bearer ...")
        identity = self.tokens.identify(token.strip())
        if identity is None:
            raise Unauthenticated("the bearer token is not known (or was revoked)")
        return identity


def _as(handler: Any, identity: Identity) -> Any:
    """The handler, run with `identity` as the caller."""
    if handler.response_streaming:
        behaviour = handler.unary_stream

        async def stream(request: Any, context: Any) -> Any:
            caller.set(identity)
            async for response in behaviour(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    unary = handler.unary_unary

    async def call(request: Any, context: Any) -> Any:
        caller.set(identity)
        return await unary(request, context)

    return grpc.unary_unary_rpc_method_handler(
        call, handler.request_deserializer, handler.response_serializer
    )


def _refusing(handler: Any, refusal: ConveyorError) -> Any:
    status = status_of(refusal)
    assert status is not None

    async def refuse(request: Any, context: Any) -> None:
        await context.abort_with_status(status)

    make = (
        grpc.unary_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(refuse)
