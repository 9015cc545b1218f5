"""A schedule as the server keeps it: its spec, policy and task template, and its state."""

from __future__ import annotations

import dataclasses
import enum
import functools
import operator
from typing import Any

from conveyor.v1 import schedule_service_pb2 as spb
from conveyord.schedules.spec import Spec

SCHEDULE_LABEL = "conveyor/schedule"
NOMINAL_LABEL = "conveyor/nominal-time"
MAX_BUFFER = 1000  # runs waiting for the previous one to end (BUFFER_ALL)


@functools.lru_cache(maxsize=4096)
def _parsed(request: bytes) -> spb.ScheduleRequest:
    return spb.ScheduleRequest.FromString(request)


class Overlap(enum.IntEnum):
    """Mirrors conveyor.v1.OverlapPolicy, without the prefix."""

    SKIP = 1
    BUFFER_ONE = 2
    BUFFER_ALL = 3
    CANCEL_OTHER = 4
    ALLOW_ALL = 5


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """What to do with a run that falls due while the previous one runs, and with the runs
    that fell due while no server ran (seconds, and how many)."""

    overlap: Overlap = Overlap.SKIP
    catchup_window: float = 3600.0
    catchup_limit: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class RunOrder:
    """A run to make: the time it stands for, and its task's request id (its idempotency
    key: the same for every server that makes it)."""

    nominal: float
    key: str


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """A run a schedule made: the time it stands for, when it was made, its task."""

    nominal: float
    made_at: float
    task_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """One schedule at one revision. Every change makes a new one (`evolve`)."""

    schedule_id: str
    seq: int  # creation order, the key List pages by
    request: bytes  # the ScheduleRequest, as made or last updated (validated)
    spec: Spec
    policy: Policy
    created_at: float
    updated_at: float
    cursor: float  # the latest nominal time dealt with (made, skipped, buffered or missed)
    tenant: str = ""  # whose schedule it is: its creator's tenant, and its runs'
    request_id: str = ""
    request_hash: bytes = b""
    paused: bool = False
    note: str = ""
    buffer: tuple[float, ...] = ()  # nominal times waiting for the previous run to end
    # Runs decided (in order) whose making is not recorded yet: any server makes them.
    pending: tuple[RunOrder, ...] = ()
    cancelling: bool = False  # the pending runs cancel the earlier ones (CANCEL_OTHER)
    spec_runs: int = 0  # runs made from the spec (for max_runs)
    run_count: int = 0  # all runs made: from the spec, triggers and backfills
    skipped: int = 0
    buffer_dropped: int = 0
    missed: int = 0
    last_run: Run | None = None
    revision: int = 0

    @property
    def ended(self) -> bool:
        """Its spec makes no more runs: `max_runs` made, or no time left before `end_at`."""
        limit = self.spec.max_runs
        if limit is not None and self.spec_runs >= limit:
            return True
        return self.spec.after(self.cursor) is None

    @property
    def template(self) -> spb.ScheduleRequest:
        """The ScheduleRequest it was made from, parsed (once per request: read, never
        change, what this returns)."""
        return _parsed(self.request)

    def evolve(self, **changes: Any) -> Schedule:
        """A copy with `changes`, as `dataclasses.replace` makes it at twice the cost: a
        schedule changes half a dozen times each time it fires."""
        copy = Schedule(*_all_fields(self))
        for name, value in changes.items():
            object.__setattr__(copy, name, value)  # a copy no one else holds yet
        return copy


_all_fields = operator.attrgetter(*(field.name for field in dataclasses.fields(Schedule)))
