"""The task's state machine and the JSON check of results."""

from __future__ import annotations

import itertools

import pytest

from conveyord.model import TRANSITIONS, IllegalTransition, Task, TaskStatus, json_problem


def _task(status: TaskStatus) -> Task:
    return Task(
        task_id="t",
        seq=1,
        task_type="echo",
        description="",
        parameters={},
        priority=5,
        timeout_seconds=1,
        max_attempts=1,
        labels={},
        created_at=0,
        updated_at=0,
        status=status,
    )


ALLOWED = {
    (TaskStatus.CREATED, TaskStatus.RUNNING),
    (TaskStatus.CREATED, TaskStatus.CANCELLED),
    (TaskStatus.CREATED, TaskStatus.FAILED),  # not started within its queue timeout
    (TaskStatus.CREATED, TaskStatus.PAUSED),
    (TaskStatus.PAUSED, TaskStatus.CREATED),  # a held task resumed
    (TaskStatus.PAUSED, TaskStatus.CANCELLED),
    (TaskStatus.PAUSED, TaskStatus.RUNNING),  # a parked attempt resumed
    (TaskStatus.PAUSED, TaskStatus.FAILED),  # a parked attempt lost, with none left
    (TaskStatus.PAUSED, TaskStatus.COMPLETED),  # a parked attempt ended by its worker
    (TaskStatus.RUNNING, TaskStatus.COMPLETED),
    (TaskStatus.RUNNING, TaskStatus.FAILED),
    (TaskStatus.RUNNING, TaskStatus.CANCELLED),
    (TaskStatus.RUNNING, TaskStatus.CREATED),  # a retry
    (TaskStatus.RUNNING, TaskStatus.PAUSED),  # its handler parked
    (TaskStatus.RUNNING, TaskStatus.WAITING_INPUT),
    (TaskStatus.WAITING_INPUT, TaskStatus.CREATED),  # an input came
    (TaskStatus.WAITING_INPUT, TaskStatus.FAILED),  # none came in time
    (TaskStatus.WAITING_INPUT, TaskStatus.CANCELLED),
    (TaskStatus.WAITING_INPUT, TaskStatus.PAUSED),
}


@pytest.mark.parametrize(("old", "new"), list(itertools.permutations(TaskStatus, 2)))
def test_only_the_documented_transitions_are_allowed(old: TaskStatus, new: TaskStatus) -> None:
    if (old, new) in ALLOWED:
        assert _task(old).evolve(status=new).status is new
    else:
        with pytest.raises(IllegalTransition):
            _task(old).evolve(status=new)


def test_terminal_states_lead_nowhere() -> None:
    for status in TaskStatus:
        assert (not TRANSITIONS[status]) == status.terminal


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"a": [1, 2.5, "x", None, True, {"b": {}}]}, None),
        (float("nan"), "JSON cannot hold"),
        ({"a": {1: "x"}}, "result.a has the key 1"),
        ([1, object()], "result[1] is a object"),
        ({"when": b"bytes"}, "result.when is a bytes"),
    ],
)
def test_json_problem_names_what_cannot_travel(value: object, problem: str | None) -> None:
    found = json_problem(value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
