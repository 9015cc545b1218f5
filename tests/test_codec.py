"""The durable stores' JSON form of a task: what goes in comes out, and a field at its
default is left out of the text."""

from __future__ import annotations

import dataclasses
import json
import math

from conveyord.model import (
    TASK_FIELDS,
    Attempt,
    AttemptOutcome,
    Task,
    TaskError,
    TaskInput,
    TaskStatus,
)  # fmt: skip
from conveyord.store.codec import decode, decode_attempt, encode, encode_attempt


def fresh_task() -> Task:
    return Task(
        task_id="t1", seq=1, task_type="echo", description="", parameters={}, priority=0,
        timeout_seconds=30.0, max_attempts=1, labels={}, created_at=100.0, updated_at=100.0,
        request_id="r1", request_hash=b"\x01\x02", queued_at=100.0,
    )  # fmt: skip


def busy_task() -> Task:
    """A task with every field away from its default."""
    error = TaskError("HANDLER_ERROR", "boom", "KeyError", "Traceback ...", True)
    return dataclasses.replace(
        fresh_task(),
        description="d", parameters={"n": 1.5, "deep": [1, {"x": None}]}, priority=3,
        labels={"team": "a"}, tenant="acme", trace_parent="00-ab-cd-01",
        status=TaskStatus.FAILED, progress=0.5, message="m", progress_detail={"step": 2},
        result={"ok": False}, error=error, attempt=3, next_attempt_at=101.0,
        start_deadline=102.0, paused_at=103.0, pause_reason="p", pause_requested_at=104.0,
        pausable=True, paused_seconds=1.25, inputs=(TaskInput("i1", {"a": 1}, 105.0, 9),),
        input_prompt="?", input_label="l", input_deadline=106.0, started_at=107.0,
        finished_at=108.0, cancel_requested_at=109.0, cancel_reason="c", interruptions=2,
        last_attempt_error=TaskError("TIMEOUT", "slow"), checkpoint={}, lease_id="L",
        lease_holder="h", lease_expires_at=110.0, queue_timeout=5.0, rerun_of="t0",
        revision=7,
    )  # fmt: skip


def test_a_task_with_every_field_set_comes_back_equal() -> None:
    task = busy_task()
    assert decode(encode(task)) == task
    assert set(json.loads(encode(task))) == set(TASK_FIELDS)


def test_a_fresh_task_is_written_without_its_default_fields() -> None:
    task = fresh_task()
    record = json.loads(encode(task))
    assert decode(encode(task)) == task
    assert "progress_detail" not in record and "lease_holder" not in record
    assert record["status"] == int(TaskStatus.CREATED)  # always written
    assert record["request_hash"] == "0102"


def test_the_same_error_twice_is_written_once() -> None:
    error = TaskError("HANDLER_ERROR", "boom", "KeyError", "a long traceback")
    task = dataclasses.replace(fresh_task(), error=error, last_attempt_error=error)
    assert json.loads(encode(task))["last_attempt_error"] is True
    back = decode(encode(task))
    assert back == task and back.last_attempt_error is back.error


def test_a_record_with_every_field_as_written_before_reads_the_same() -> None:
    """Records that earlier versions wrote hold every field, the defaults too."""
    task = fresh_task()
    full = {name: getattr(task, name) for name in TASK_FIELDS}
    full |= {"status": 1, "request_hash": "0102", "error": None, "last_attempt_error": None}
    full["inputs"] = []
    assert decode(json.dumps(full)) == task


def test_numbers_that_json_has_no_words_for_come_back() -> None:
    """NaN and the infinities (a Struct's number may be either) are kept, not made null."""
    task = dataclasses.replace(
        fresh_task(), parameters={"nan": math.nan, "big": math.inf, "low": -math.inf}
    )
    back = decode(encode(task)).parameters
    assert math.isnan(back["nan"]) and back["big"] == math.inf and back["low"] == -math.inf


def test_null_a_lone_surrogate_and_other_scripts_come_back() -> None:
    task = dataclasses.replace(
        fresh_task(),
        parameters={"none": None, "text": "naïve 東京 \x00\x1f"},
        error=TaskError("HANDLER_ERROR", "boom", "OSError", "File '/tmp/\udcff', line 1"),
    )
    assert decode(encode(task)) == task


def test_an_attempt_comes_back_equal() -> None:
    attempt = Attempt(2, 10.0, 11.5, "worker-\udcff", AttemptOutcome.FAILED, TaskError("E", "m"))
    assert decode_attempt(encode_attempt(attempt)) == attempt
