"""A remote worker's outbox: the assignments granted while its stream was busy go out as one
message (or one each, to a worker that does not batch), in order, split at about 1 MiB, and
never after a later stop or the stream's end."""

from __future__ import annotations

import pytest

from conveyor.v1 import task_pb2
from conveyor.v1 import worker_service_pb2 as wpb
from conveyord.worker.remote import ASSIGNMENTS_BYTES, Outbox


def _assignment(lease_id: str, padding: int = 0) -> bytes:
    task = task_pb2.TaskResponse(description="x" * padding)
    return wpb.Assignment(lease_id=lease_id, task=task).SerializeToString()


def _lease_ids(message: object) -> list[str]:
    assert isinstance(message, bytes)
    response = wpb.ConnectResponse.FromString(message)
    assert response.WhichOneof("message") == "assignments"
    return [a.lease_id for a in response.assignments.assignments]


async def test_assignments_granted_together_go_out_as_one_message_in_order() -> None:
    outbox = Outbox()
    stop = b"stop"
    outbox.put(stop)
    for task_id in ("a1", "a2", "a3"):
        outbox.assign(_assignment(task_id))
    outbox.put(None)
    assert await outbox.get(1.0) == stop
    assert _lease_ids(await outbox.get(1.0)) == ["a1", "a2", "a3"]
    assert await outbox.get(1.0) is None


async def test_a_large_round_is_split_and_what_follows_waits_for_it() -> None:
    outbox = Outbox()
    half = ASSIGNMENTS_BYTES // 2
    for task_id in ("b1", "b2", "b3"):
        outbox.assign(_assignment(task_id, padding=half))
    outbox.put(b"stop")
    assert _lease_ids(await outbox.get(1.0)) == ["b1"]  # b2 would take it over 1 MiB
    assert _lease_ids(await outbox.get(1.0)) == ["b2"]
    assert _lease_ids(await outbox.get(1.0)) == ["b3"]
    assert await outbox.get(1.0) == b"stop"


async def test_an_empty_outbox_times_out() -> None:
    with pytest.raises(TimeoutError):
        await Outbox().get(0.01)


async def test_to_a_worker_that_does_not_batch_each_assignment_goes_alone() -> None:
    outbox = Outbox(batch=False)
    for task_id in ("c1", "c2"):
        outbox.assign(_assignment(task_id))
    outbox.put(b"stop")
    for task_id in ("c1", "c2"):
        message = await outbox.get(1.0)
        assert isinstance(message, bytes)
        response = wpb.ConnectResponse.FromString(message)
        assert response.WhichOneof("message") == "assignment"
        assert response.assignment.lease_id == task_id
    assert await outbox.get(1.0) == b"stop"
