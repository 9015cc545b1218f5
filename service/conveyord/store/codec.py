"""How a durable store writes a task and an ended attempt: each as compact JSON text, the
same in a SQLite file and in a PostgreSQL database, written and read by orjson (a few times
quicker than the json module) but where the two would differ (`dumps`, `loads`).

A task's fields that hold their defaults are left out (most of them, for most of a task's
life): the text is less than half as long, and quicker to write, store and read back. A
record that has them all, as earlier versions wrote, reads the same."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import orjson

from conveyord.model import (
    TASK_FIELDS,
    Attempt,
    AttemptOutcome,
    Task,
    TaskError,
    TaskInput,
    TaskStatus,
)

_ERROR_FIELDS = ("error", "last_attempt_error")


def _fields_but_defaults() -> Callable[[Task], dict[str, Any]]:
    """A function giving a task's fields but those at their defaults, in field order: made
    from source, field by field, as dataclasses makes a class's __init__. It takes a third
    of the time of a loop over the fields, and a task is written at every change."""
    fields = [field for field in dataclasses.fields(Task) if field.name in TASK_FIELDS]
    required = [field.name for field in fields if field.default is dataclasses.MISSING]
    optional = [field for field in fields if field.default is not dataclasses.MISSING]
    lines = [
        "def fields_but_defaults(task):",
        "    record = {" + ", ".join(f"{name!r}: task.{name}" for name in required) + "}",
    ]
    for field in optional:  # each compared with its default, named _<field> in the source
        lines += [
            f"    value = task.{field.name}",
            f"    if value is not _{field.name} and value != _{field.name}:",
            f"        record[{field.name!r}] = value",
        ]
    lines.append("    return record")
    namespace: dict[str, Any] = {f"_{field.name}": field.default for field in optional}
    exec("\n".join(lines), namespace)  # our own source, of the field names alone
    made: Callable[[Task], dict[str, Any]] = namespace["fields_but_defaults"]
    return made


_fields_but_defaults_of = _fields_but_defaults()


def encode(task: Task) -> str:
    """A task as a JSON object of its fields but those at their defaults (its latest error
    once, when the last attempt's error is the same)."""
    record = _fields_but_defaults_of(task)
    record["status"] = int(task.status)
    record["request_hash"] = task.request_hash.hex()
    if task.error is not None:
        record["error"] = _error_row(task.error)
    if task.last_attempt_error is not None:
        if task.last_attempt_error is task.error:
            record["last_attempt_error"] = True  # the same as `error`: a traceback written once
        else:
            record["last_attempt_error"] = _error_row(task.last_attempt_error)
    if task.inputs:
        record["inputs"] = [dataclasses.astuple(sent) for sent in task.inputs]
    return dumps(record)


def decode(data: str) -> Task:
    record = loads(data)
    record["status"] = TaskStatus(record["status"])
    record["request_hash"] = bytes.fromhex(record["request_hash"])
    for name in _ERROR_FIELDS:
        if record.get(name) is True:
            record[name] = record["error"]  # written once, as `error`
        elif record.get(name):
            record[name] = TaskError(*record[name])
    record["inputs"] = tuple(TaskInput(*sent) for sent in record.get("inputs", ()))
    if "owner" in record:  # written before tenants had that name
        record["tenant"] = record.pop("owner")
    return Task(**{name: record[name] for name in TASK_FIELDS if name in record})


def _error_row(error: TaskError | None) -> list[Any] | None:
    """An error as a JSON list of its fields, without the trailing ones left empty."""
    if error is None:
        return None
    # Field by field: dataclasses.astuple deep-copies, at every write of a task that failed.
    row = [error.code, error.message, error.error_type, error.traceback, error.non_retryable]
    while len(row) > 2 and not row[-1]:
        row.pop()
    return row


def encode_attempt(attempt: Attempt) -> str:
    return dumps([
        attempt.number, attempt.started_at, attempt.ended_at, attempt.holder,
        int(attempt.outcome), _error_row(attempt.error),
    ])  # fmt: skip


def decode_attempt(data: str) -> Attempt:
    number, started_at, ended_at, holder, outcome, error = loads(data)
    return Attempt(
        number, started_at, ended_at, holder, AttemptOutcome(outcome),
        TaskError(*error) if error else None,
    )  # fmt: skip


def dumps(value: Any) -> str:
    """Compact JSON text, as the json module writes it where orjson would not: orjson writes a
    NaN or an infinity (which a task's JSON-like fields may hold) as null, so a text with a
    null in it is written again by json, which keeps them; and orjson refuses a string with a
    lone surrogate (a traceback's file name may hold one) and an integer beyond 64 bits."""
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:
        text = b"null"
    if b"null" in text:
        return json.dumps(value, separators=(",", ":"))
    return text.decode()


def loads(text: str) -> Any:
    """A JSON text's value; the json module reads what orjson does not (NaN, Infinity, an
    escaped lone surrogate), as `dumps` may have written it."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
