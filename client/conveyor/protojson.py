"""Between protobuf's JSON-like well-known types and plain Python values.

google.protobuf.Struct and Value hold numbers as doubles; a number that is whole (and
small enough to be exact) comes back as an `int`, as it would from a JSON parser.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from conveyor.limits import MAX_JSON_DEPTH

_EXACT = 2**53


def to_python(value: struct_pb2.Value) -> Any:
    """A Value as None, bool, int, float, str, list or dict."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) <= _EXACT else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [to_python(item) for item in value.list_value.values]
    return None


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: to_python(item) for key, item in struct.fields.items()}


def dict_to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def to_value(data: Any) -> struct_pb2.Value:
    """A JSON-like Python value as a Value (raises ValueError or TypeError otherwise)."""
    holder = struct_pb2.ListValue()
    holder.append(data)
    return holder.values[0]


def seconds_to_timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    whole, nanos = divmod(round(seconds * 1e9), 10**9)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=nanos)


def timestamp_to_datetime(timestamp: timestamp_pb2.Timestamp) -> datetime:
    return datetime.fromtimestamp(timestamp.seconds + timestamp.nanos / 1e9, UTC)


def json_problem(value: Any, path: str = "result", depth: int = 0) -> str | None:
    """Why `value` cannot travel as JSON (a google.protobuf.Value), or None if it can."""
    if value is None or isinstance(value, bool | str):
        return None
    if isinstance(value, int | float):
        return None if math.isfinite(value) else f"{path} is {value!r}, which JSON cannot hold"
    if depth >= MAX_JSON_DEPTH:
        return f"{path} nests deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has the key {key!r:.64}, but JSON keys are strings"
            if (problem := json_problem(item, f"{path}.{key:.64}", depth + 1)) is not None:
                return problem
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if (problem := json_problem(item, f"{path}[{index}]", depth + 1)) is not None:
                return problem
        return None
    return f"{path} is a {type(value).__name__}, which JSON cannot hold"
