"""The ids the server gives new tasks: random UUIDs in canonical form, one at a time or a
BatchCreate's at once."""

from __future__ import annotations

import uuid

from conveyord.api import new_task_id, new_task_ids


def test_task_ids_are_canonical_random_uuids_and_all_different() -> None:
    ids = [new_task_id(), *new_task_ids(1), *new_task_ids(1000)]
    for task_id in ids:
        parsed = uuid.UUID(task_id)
        assert str(parsed) == task_id
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
    assert len(set(ids)) == len(ids) == 1002
    assert new_task_ids(0) == []
