"""Every RPC of every service, sent many generated and malformed requests (hypothesis): raw
bytes that are not protobuf at all, and messages built from the .proto's descriptors with
extreme values (deeply nested and huge Structs, NaN and infinite numbers, extreme integers,
unknown enum numbers, long strings, many repeated and map entries). No answer is INTERNAL or
UNKNOWN, the server keeps serving, and its memory stays about flat.

CONVEYOR_FUZZ_EXAMPLES sets the examples per RPC (default 60 here; a few thousand for a
long run)."""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, struct_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.v1 import schedule_service_pb2, task_service_pb2, worker_service_pb2
from tests.processes import Conveyord

EXAMPLES = int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES", "60"))
ALLOWED_LEAK = 40 * 1024 * 1024  # bytes of resident memory the whole run may add
FD = descriptor.FieldDescriptor


def _methods() -> Iterator[tuple[str, descriptor.MethodDescriptor]]:
    for module in (task_service_pb2, worker_service_pb2, schedule_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield f"/{service.full_name}/{method.name}", method


METHODS = list(_methods())

_INTS = st.one_of(
    st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, -1, 2**31 - 1, -(2**31), 7, 10**9])
)
_INT64S = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 2**63 - 1]))
_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, 5e-324]),
)
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "0f0e0d0c-0b0a-4908-8706-050403020100", "echo", "x" * 5000, "\x00"]),
)


def _value(depth: int) -> st.SearchStrategy[struct_pb2.Value]:
    leaves = st.one_of(
        st.none().map(lambda _: struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)),
        _FLOATS.map(lambda f: struct_pb2.Value(number_value=f)),
        _TEXT.map(lambda s: struct_pb2.Value(string_value=s)),
        st.booleans().map(lambda b: struct_pb2.Value(bool_value=b)),
    )
    if depth <= 0:
        return leaves
    return st.one_of(leaves, _struct(depth - 1).map(lambda s: struct_pb2.Value(struct_value=s)))


def _struct(depth: int) -> st.SearchStrategy[struct_pb2.Struct]:
    def build(fields: dict[str, struct_pb2.Value]) -> struct_pb2.Struct:
        struct = struct_pb2.Struct()
        for key, value in fields.items():
            struct.fields[key].CopyFrom(value)
        return struct

    return st.dictionaries(st.text(max_size=8), _value(depth), max_size=6).map(build)


def _deep(levels: int) -> struct_pb2.Struct:
    """A Struct nested `levels` deep (past the server's cap of 32)."""
    struct = struct_pb2.Struct()
    inner = struct
    for _ in range(levels):
        inner = inner.fields["a"].struct_value
    return struct


def _huge() -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    for index in range(20_000):
        struct.fields[f"k{index}"].number_value = index
    return struct


_STRUCTS = st.one_of(_struct(3), st.sampled_from([_deep(34), _huge()]))


def _scalar(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _INTS
    if kind in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return _INT64S
    if kind in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if kind in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return _FLOATS.filter(
            lambda f: kind == FD.TYPE_DOUBLE or abs(f) < 3e38 or not math.isfinite(f)
        )
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_STRING:
        return _TEXT
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=40)
    if kind == FD.TYPE_ENUM:
        return st.one_of(
            st.sampled_from([v.number for v in field.enum_type.values] if field.enum_type else [0]),
            st.integers(-5, 99),
        )
    raise AssertionError(f"no strategy for {field.full_name}")


def _message(message_type: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = GetMessageClass(message_type)
    if message_type.full_name == "google.protobuf.Struct":
        return _STRUCTS
    if message_type.full_name == "google.protobuf.Value":
        return _value(2)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for field in message_type.fields:
            if not draw(st.booleans()):
                continue
            with contextlib.suppress(ValueError, TypeError, DecodeError):  # one it cannot hold
                _fill(draw, message, field, depth)
        return message

    return build()


def _fill(draw: st.DrawFn, message: Message, field: descriptor.FieldDescriptor, depth: int) -> None:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key_field, value_field = entry.fields
        container = getattr(message, field.name)
        for _ in range(draw(st.sampled_from([1, 3, 70]))):
            key = draw(_scalar(key_field))
            if value_field.message_type is None:
                container[key] = draw(_scalar(value_field))
            else:
                container[key].CopyFrom(draw(_message(value_field.message_type, depth + 1)))
        return
    count = draw(st.sampled_from([1, 2, 1100])) if field.is_repeated else 0
    if field.message_type is not None:
        if depth > 3:
            return
        values = [draw(_message(field.message_type, depth + 1)) for _ in range(min(count, 3) or 1)]
        if field.is_repeated:
            getattr(message, field.name).extend(values * (count // len(values) if count > 3 else 1))
        else:
            getattr(message, field.name).CopyFrom(values[0])
        return
    if field.is_repeated:
        getattr(message, field.name).extend([draw(_scalar(field)) for _ in range(min(count, 50))])
    else:
        setattr(message, field.name, draw(_scalar(field)))


class Server:
    """A conveyord process whose log is drained (so that it never blocks on a full pipe)."""

    def __init__(self, start: Callable[..., Conveyord]) -> None:
        self.process = start("--task-type", "fuzz.type")
        self.channel = grpc.insecure_channel(self.process.address)
        self.drainer = threading.Thread(target=self._drain, daemon=True)
        self.drainer.start()

    def _drain(self) -> None:
        stream = self.process.process.stderr
        assert stream is not None
        for _ in stream:
            pass

    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def send(self, method: descriptor.MethodDescriptor, path: str, request: bytes) -> None:
        """Send `request` as raw bytes; fail on an INTERNAL or UNKNOWN answer."""
        channel: Any = self.channel
        try:
            if method.server_streaming:
                call = channel.unary_stream(path)(request, timeout=0.3)
                for _ in call:
                    break
                call.cancel()
            else:
                channel.unary_unary(path)(request, timeout=5)
        except grpc.RpcError as error:
            code = error.code()
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                f"{path} answered {code}: {error.details()}"
            )


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server(Conveyord)
    yield running
    running.channel.close()
    process = running.process.process
    process.kill()
    process.wait()
    running.drainer.join(timeout=10)  # it reads to the end of the log, then stops
    if process.stderr is not None:
        process.stderr.close()


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


@pytest.mark.parametrize(("path", "method"), METHODS, ids=[path for path, _ in METHODS])
def test_no_request_breaks_an_rpc(
    server: Server, path: str, method: descriptor.MethodDescriptor
) -> None:
    @FUZZ
    @given(raw=st.binary(max_size=300), message=_message(method.input_type))
    def one(raw: bytes, message: Message) -> None:
        server.send(method, path, raw)
        server.send(method, path, message.SerializeToString())

    one()


def test_the_server_still_serves_and_its_memory_stayed_about_flat(server: Server) -> None:
    before = server.rss()
    for path, method in METHODS:  # one more round, measured
        server.send(method, path, b"\xff\xfe\x00garbage")
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    assert server.rss() - before < ALLOWED_LEAK
