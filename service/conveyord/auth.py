"""Who calls, and what they may do: bearer tokens (from a token file, or signed JWTs), and
the permission each RPC needs.

A token file is JSON: `{"tokens": [{"name": "ci", "tenant": "team-a", "sha256": "<hex of the
token's SHA-256>", "permissions": ["read", "submit:resize,thumbnail", "worker:resize"]}]}`.
Tokens are stored hashed; one is revoked by removing it from the file, which is read again
(at the next call, once a second at most) when it changes. A permission may be limited to
task types (`submit:resize` creates only `resize` tasks; `worker:resize` runs only them).

A JWT is verified with PyJWT against the public keys of a file (PEM keys, or a JWKS), read
again when it changes: RS256, ES256 or EdDSA; its issuer, audience, expiry and not-before
are checked; its `sub` names the caller, and its `tenant` and `permissions` claims say the
rest, as a token file's entry does.

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
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conveyord.errors import ConveyorError
from conveyord.rpc import status_of
from conveyord.watched_file import WatchedFile

log = logging.getLogger(__name__)


class Permission(enum.Enum):
    READ = "read"  # Get, List, Watch, ListTaskTypes, CountTasks, and schedules' Get, List, Watch
    SUBMIT = "submit"  # Create, BatchCreate, SendInput, Rerun
    CONTROL = "control"  # Cancel, CancelMatching, Pause, Resume, Delete
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
        "Rerun": Permission.SUBMIT,  # of the task's type, as Create
        "Delete": Permission.CONTROL,
        "ListTaskTypes": Permission.READ,
        "CountTasks": Permission.READ,
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


@dataclasses.dataclass(frozen=True, eq=False)  # one object per caller of a token file
class Identity:
    """A caller: its name, its tenant, and its permissions, each with the task types it is
    limited to (None: any type)."""

    name: str
    tenant: str
    permissions: Mapping[Permission, frozenset[str] | None]
    lasting: bool = True  # the same object for every call of this caller (a token file's)

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


def current_tenant() -> str:
    """The current caller's tenant: only its tasks, schedules and workers exist for it ("" on
    a server where nobody signs in, and for the server's own work)."""
    identity = caller.get()
    return "" if identity is None else identity.tenant


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


class TokenFile(WatchedFile):
    """The callers of a token file, by the SHA-256 of their token; read again when it changes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._identities: dict[str, Identity] = {}
        self._certificates: dict[str, Identity] = {}
        super().__init__(path, clock)

    def identify(self, token: str) -> Identity | None:
        """The caller whose token this is, or None."""
        self._fresh()
        digest = hashlib.sha256(token.encode()).hexdigest()
        for known, identity in self._identities.items():
            if hmac.compare_digest(known, digest):
                return identity
        return None

    def _read(self) -> None:
        data = json.loads(self.path.read_text())
        identities, certificates = {}, {}
        for index, entry in enumerate(data.get("tokens", [])):
            try:
                identity = Identity(
                    str(entry["name"]), str(entry.get("tenant", "")),
                    parse_permissions(entry.get("permissions", [])),
                )  # fmt: skip
                if "certificate" in entry:  # a verified client certificate's common name
                    certificates[str(entry["certificate"])] = identity
                else:
                    identities[str(entry["sha256"]).lower()] = identity
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{self.path}: tokens[{index}]: {error}") from error
        self._identities, self._certificates = identities, certificates

    @property
    def has_certificates(self) -> bool:
        """Whether some caller is named by a client certificate rather than a token."""
        return bool(self._certificates)

    def by_certificate(self, common_name: str) -> Identity | None:
        """The caller that a verified client certificate of this common name stands for."""
        self._fresh()
        return self._certificates.get(common_name)


JWT_ALGORITHMS = ["RS256", "ES256", "EdDSA"]
_KEY_TYPES: Mapping[str, type[Any]] = {
    "RS256": rsa.RSAPublicKey,
    "ES256": ec.EllipticCurvePublicKey,
    "EdDSA": ed25519.Ed25519PublicKey,
}


@dataclasses.dataclass(frozen=True)
class JwtSettings:
    """Where the keys that sign callers' JWTs are, and the issuer and audience they must name."""

    keys: Path
    issuer: str
    audience: str


class JwtKeys(WatchedFile):
    """Verifies JWTs with the keys of a file (PEM public keys, or a JWKS), read again when
    the file changes."""

    def __init__(self, settings: JwtSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._keys: list[tuple[str | None, Any]] = []  # (key id, public key)
        super().__init__(settings.keys, clock)

    def identify(self, token: str) -> Identity:
        """The caller a valid JWT names; Unauthenticated saying what is wrong with it."""
        self._fresh()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"the bearer token is not a JWT: {error}") from None
        kid, algorithm = header.get("kid"), header.get("alg")
        if algorithm not in JWT_ALGORITHMS:
            raise Unauthenticated(f"a JWT signed with {algorithm!r}; {JWT_ALGORITHMS} are taken")
        problem: Exception | None = None
        for key_id, key in self._keys:
            if kid is not None and key_id is not None and key_id != kid:
                continue
            if not isinstance(key, _KEY_TYPES[algorithm]):
                continue
            try:
                claims = jwt.decode(
                    token, key, algorithms=JWT_ALGORITHMS, audience=self.settings.audience,
                    issuer=self.settings.issuer,
                    options={"require": ["exp", "iss", "aud", "sub"]},
                )  # fmt: skip
            except jwt.InvalidSignatureError as error:
                problem = error
                continue  # another key may have signed it
            except jwt.InvalidTokenError as error:
                raise Unauthenticated(f"the JWT is not valid: {error}") from None
            try:
                permissions = parse_permissions(claims.get("permissions", []))
            except ValueError as error:
                raise Unauthenticated(f"the JWT's permissions: {error}") from None
            tenant = str(claims.get("tenant", ""))
            return Identity(str(claims["sub"]), tenant, permissions, lasting=False)
        raise Unauthenticated(f"the JWT is not valid: {problem or 'no key of its kid'}")

    def _read(self) -> None:
        path = self.path
        text = path.read_text()
        if text.lstrip().startswith("{"):
            try:
                jwks = jwt.PyJWKSet.from_json(text)
            except jwt.PyJWKError as error:
                raise ValueError(f"{path}: not a JWKS: {error}") from error
            keys: list[tuple[str | None, Any]] = [(key.key_id, key.key) for key in jwks.keys]
        else:
            marker = "-----BEGIN PUBLIC KEY-----"
            blocks = [marker + part for part in text.split(marker)[1:]]
            keys = [(None, serialization.load_pem_public_key(b.encode())) for b in blocks]
        if not keys:
            raise ValueError(f"{path} holds no public key")
        self._keys = keys


class Authenticator(grpc.aio.ServerInterceptor):
    """Checks every call's bearer token (from a token file, or a JWT) and the permission
    its method needs; the caller is `caller` while the method runs."""

    def __init__(self, tokens: TokenFile | None, jwts: JwtKeys | None = None) -> None:
        self.tokens = tokens
        self.jwts = jwts
        # The handler that runs a method as a caller of the token file, made once per
        # method and caller (each is one Identity until the file changes).
        self._handlers: dict[tuple[str, Identity | None, Any], Any] = {}

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
            if identity is None:  # no token: the client certificate may stand for one
                by_certificate = partial(_by_certificate, handler, self.tokens, method, needed)
                return self._kept(details.method, None, handler, by_certificate)
            _check(identity, method, needed)
        except ConveyorError as refusal:
            return _refusing(handler, refusal)
        if not identity.lasting:
            return _as(handler, identity)  # a JWT's caller is a new object at each call
        return self._kept(details.method, identity, handler, partial(_as, handler, identity))

    def _kept(
        self, method: str, identity: Identity | None, handler: Any, wrap: Callable[[], Any]
    ) -> Any:
        """`wrap()`, made once per method, caller (None: a client certificate's, known when
        the call runs) and handler (what the interceptors after this one gave)."""
        key = (method, identity, handler)
        wrapped = self._handlers.get(key)
        if wrapped is None:
            if len(self._handlers) > 10_000:  # the token file changed often: start afresh
                self._handlers.clear()
            wrapped = self._handlers[key] = wrap()
        return wrapped

    def _identity(self, metadata: Iterable[tuple[str, Any]]) -> Identity | None:
        token = None
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer":
                    token = None
        if not token:
            if self.tokens is not None and self.tokens.has_certificates:
                return None  # the call's client certificate decides, once the call runs
            raise Unauthenticated(NO_TOKEN)
        token = token.strip()
        identity = self.tokens.identify(token) if self.tokens is not None else None
        if identity is None and self.jwts is not None and token.count(".") == 2:
            return self.jwts.identify(token)
        if identity is None:
            raise Unauthenticated("the bearer token is not known (or was revoked)")
        return identity


NO_TOKEN = "this server needs a bearer token: authorization: Bearer ..."


def _check(identity: Identity, method: str, needed: Permission | None) -> None:
    if needed is None or not identity.allows(needed):
        what = needed.value if needed else "a permission for it"
        raise PermissionDenied(
            f"{identity.name} may not call {method}: it needs the {what} permission",
            needed or Permission.ADMIN,
        )


def _by_certificate(
    handler: Any, tokens: TokenFile | None, method: str, needed: Permission | None
) -> Any:
    """The handler, run as the caller its verified client certificate stands for (read
    from the call's TLS peer when it runs); UNAUTHENTICATED if it stands for none."""

    def resolve(context: Any) -> Identity:
        names = context.auth_context().get("x509_common_name") or []
        found = tokens.by_certificate(names[0].decode()) if tokens and names else None
        if found is None:
            raise Unauthenticated(NO_TOKEN + ", or a client certificate the server knows")
        _check(found, method, needed)
        return found

    return _as(handler, resolve)


def _as(handler: Any, identity: Identity | Callable[[Any], Identity]) -> Any:
    """The handler, run with `identity` as the caller."""
    if handler.response_streaming:
        behaviour = handler.unary_stream

        async def stream(request: Any, context: Any) -> Any:
            await _run_as(identity, context)
            async for response in behaviour(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    unary = handler.unary_unary

    async def call(request: Any, context: Any) -> Any:
        await _run_as(identity, context)
        return await unary(request, context)

    return grpc.unary_unary_rpc_method_handler(
        call, handler.request_deserializer, handler.response_serializer
    )


async def _run_as(identity: Identity | Callable[[Any], Identity], context: Any) -> None:
    """Make the call's caller `identity`, or the one it resolves to (the call is aborted
    with the refusal if it resolves to none)."""
    if isinstance(identity, Identity):
        caller.set(identity)
        return
    try:
        caller.set(identity(context))
    except ConveyorError as refusal:
        status = status_of(refusal)
        assert status is not None
        await context.abort_with_status(status)


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
