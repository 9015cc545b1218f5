"""The ready queue: priority, FIFO among equals, aging, per-type room, removal."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from conveyord.queue import ReadyQueue


def _drain(
    queue: ReadyQueue, has_room: Callable[[str], bool] = lambda task_type: True
) -> list[str]:
    order = []
    while (picked := queue.pop(has_room)) is not None:
        order.append(picked[0])
    return order


def test_higher_priority_first_and_first_come_first_served_among_equals() -> None:
    queue = ReadyQueue(aging_rate=0)
    for name, priority in [("a", 5), ("b", 10), ("c", 5), ("d", 1), ("e", 10)]:
        queue.push(name, "t", priority, queued_at=0)
    assert _drain(queue) == ["b", "e", "a", "c", "d"]


def test_a_task_that_waited_long_enough_overtakes_more_urgent_ones() -> None:
    queue = ReadyQueue(aging_rate=1 / 60)  # one level per minute
    queue.push("old_low", "t", 1, queued_at=0)
    queue.push("new_high", "t", 10, queued_at=8 * 60)  # 8 minutes later: old_low is at 9
    assert _drain(queue) == ["new_high", "old_low"]
    queue.push("old_low", "t", 1, queued_at=0)
    queue.push("newer_high", "t", 10, queued_at=10 * 60)  # 10 minutes later: old_low is at 11
    assert _drain(queue) == ["old_low", "newer_high"]


def test_a_type_without_room_is_passed_over_without_losing_its_place() -> None:
    queue = ReadyQueue(aging_rate=0)
    queue.push("busy1", "busy", 10, 0)
    queue.push("free1", "free", 1, 0)
    assert queue.pop(lambda task_type: task_type != "busy") == ("free1", "free")
    assert queue.pop(lambda task_type: task_type != "busy") is None
    assert queue.pop(lambda task_type: True) == ("busy1", "busy")


def test_a_discarded_task_never_comes_out() -> None:
    queue = ReadyQueue(aging_rate=0)
    for name in "abc":
        queue.push(name, "t", 5, 0)
    assert queue.discard("b")
    assert not queue.discard("b")
    assert len(queue) == 2 and "b" not in queue
    assert _drain(queue) == ["a", "c"]


@given(
    st.lists(
        st.tuples(st.integers(1, 10), st.floats(0, 3600), st.sampled_from("xyz")), max_size=60
    ),
    st.floats(0, 1),
)
def test_the_order_is_that_of_the_effective_priority_at_any_moment(
    tasks: list[tuple[int, float, str]], aging_rate: float
) -> None:
    queue = ReadyQueue(aging_rate)
    for index, (priority, queued_at, task_type) in enumerate(tasks):
        queue.push(str(index), task_type, priority, queued_at)
    now = 7200.0

    def effective(index: int) -> tuple[float, int]:
        priority, queued_at, _ = tasks[index]
        return (-(priority + aging_rate * (now - queued_at)), index)

    order = [int(task_id) for task_id in _drain(queue)]
    expected = sorted(range(len(tasks)), key=effective)
    # Equal effective priorities may tie within floating-point noise; compare the keys.
    assert [round(effective(i)[0], 6) for i in order] == [
        round(effective(i)[0], 6) for i in expected
    ]
