"""What each tenant may use: its queued tasks, its rate of new tasks, its open watches and
its connected workers.

The limits of a tenant are the defaults (`conveyord --tenant-...` flags), or its own entry
in a limits file, read again when it changes:
`{"default": {"rate": 100}, "tenants": {"batch-jobs": {"max_queued": 1000000, "rate": 5000}}}`.
A tenant's entry replaces the defaults field by field: a field it leaves out keeps the
default.

Over a limit, a call is refused with RESOURCE_EXHAUSTED and a RetryInfo saying when to try
again (for the rate, when the bucket will hold enough; for the others, a second), before
anything changes.

With one store per server (memory, SQLite) every count is this server's, and exact. On a
store that several servers share (PostgreSQL), each limit holds across all of them:
- the rate exactly: a tenant has one bucket, a row in the database that each create takes
  its tokens from in its own transaction, by the database's clock (store/postgres.py);
- the queue cap as of this server's copy of the queue, which trails the others' commits by
  the few milliseconds of the change feed: a burst may overshoot by what the other servers
  admit meanwhile;
- the watches and workers as this server's own count, exact, plus the other servers' as
  last published (`elsewhere`, store/postgres_usage.py): up to two seconds old, so a tenant
  may overshoot by what it opened on other servers in that time, or be refused that much
  longer after it closed them there.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from conveyord.errors import ConveyorError
from conveyord.watched_file import WatchedFile

if TYPE_CHECKING:
    from conveyord.model import Task


@dataclasses.dataclass(frozen=True)
class TenantLimits:
    """One tenant's limits (None: no limit of that kind)."""

    max_queued: int | None = None  # its tasks queued (CREATED or PAUSED) at once
    rate: float | None = None  # tasks it creates per second, sustained (a token bucket)
    burst: int | None = None  # ... and at once (the bucket's size; default: a second's worth)
    max_watches: int | None = None  # its open Watch streams
    max_workers: int | None = None  # its connected workers

    @property
    def bucket(self) -> float:
        """How many tasks the bucket holds when full."""
        assert self.rate is not None
        return float(self.burst if self.burst is not None else max(1.0, self.rate))

    def over(self, other: TenantLimits) -> TenantLimits:
        """These limits where set, `other`'s elsewhere."""
        mine = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return dataclasses.replace(other, **mine)


def parse_limits(entry: Mapping[str, Any], where: str) -> TenantLimits:
    """A limits file's entry; ValueError naming the field that is wrong."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be an object")
    known = [field.name for field in dataclasses.fields(TenantLimits)]
    values: dict[str, Any] = {}
    for name, value in entry.items():
        if name not in known:
            raise ValueError(f"{where}.{name} is not a limit (known: {', '.join(known)})")
        if value is None:
            continue
        whole = name != "rate"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}.{name} must be a number, not {value!r}")
        if not math.isfinite(value) or value < 0 or (not whole and value == 0):
            raise ValueError(f"{where}.{name} must be a positive number, not {value}")
        if whole and value != int(value):
            raise ValueError(f"{where}.{name} must be a whole number, not {value}")
        values[name] = int(value) if whole else float(value)
    return TenantLimits(**values)


class LimitsFile(WatchedFile):
    """Per-tenant limits from a JSON file, read again when it changes, over `defaults` (the
    flags')."""

    def __init__(
        self,
        path: Path,
        defaults: TenantLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.defaults = defaults or TenantLimits()
        self.default: TenantLimits | None = None
        self.tenants: dict[str, TenantLimits] = {}
        self._merged: dict[str, TenantLimits] = {}
        super().__init__(path, clock)

    def _read(self) -> None:
        try:
            document = json.loads(self.path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path} is not JSON: {error}") from None
        if not isinstance(document, dict) or not isinstance(document.get("tenants", {}), dict):
            raise ValueError(f'{self.path}: expected {{"default": {{...}}, "tenants": {{...}}}}')
        default = document.get("default")
        tenants = {
            str(name): parse_limits(entry, f"tenants[{name!r}]")
            for name, entry in document.get("tenants", {}).items()
        }
        self.default = None if default is None else parse_limits(default, "default")
        self.tenants = tenants
        self._merged = {}

    def limits_of(self, tenant: str) -> TenantLimits:
        """The tenant's entry over the file's default over the flags' (merged once for each
        reading of the file: it is asked at every Create)."""
        self._fresh()
        found = self._merged.get(tenant)
        if found is None:
            defaults = self.defaults
            base = self.default.over(defaults) if self.default is not None else defaults
            own = self.tenants.get(tenant)
            found = self._merged[tenant] = own.over(base) if own else base
        return found


class TenantLimitReached(ConveyorError):
    """A tenant is at one of its limits; nothing was done. Try again after `retry_after`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "TENANT_LIMIT"

    def __init__(self, message: str, limit: str, retry_after: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after

    def metadata(self) -> dict[str, str]:
        return {"limit": self.limit}

    def details(self) -> list[Message]:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1_000_000, int(self.retry_after * 1e9)))
        return [*super().details(), error_details_pb2.RetryInfo(retry_delay=delay)]


_CRUMB = 1e-6  # seconds: what a clock's rounding (of times near 2e9 s) may leave a caller short


class Bucket:
    """A token bucket kept as the generic cell rate algorithm does: `full_at`, the time at
    which the bucket is full again (up to `size` tokens may be taken while it lies at most
    `size / rate` ahead).

    A refused caller is told to come back when its tokens will be there after those of the
    callers refused before it (`told`): callers refused together come back one after
    another, each in its turn, rather than all at the moment of the next token.
    """

    def __init__(self, full_at: float, told: float = -math.inf) -> None:
        self.full_at = full_at  # a new bucket is full: at the time it is made, or before
        self.told = told  # when the latest refused caller was told to come back

    def take(self, count: int, rate: float, size: float, now: float) -> float:
        """Take `count` tokens; 0.0 if taken, else the seconds until they are there."""
        start = max(self.full_at, now)
        # More than the bucket ever holds fits once it is full, and overdraws it.
        fits_at = start if count > size else start + (count - size) / rate
        if fits_at <= now + _CRUMB:
            self.full_at = start + count / rate
            return 0.0
        self.told = max(fits_at, self.told + min(count, size) / rate)
        return self.told - now


class Usage(NamedTuple):
    """What a tenant has open on a server, of what its limits count."""

    watches: int
    workers: int


IDLE = Usage(0, 0)


class Tenants:
    """Each tenant's limits, and what it uses of them now (its buckets, watches, workers)."""

    def __init__(
        self,
        defaults: TenantLimits = TenantLimits(),
        limits_file: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.defaults = defaults
        self._file = (
            LimitsFile(limits_file, self.defaults, clock) if limits_file is not None else None
        )
        self._clock = clock
        self._buckets: dict[str, Bucket] = {}
        self.watches: dict[str, int] = {}  # this server's open watches, by tenant
        self.workers: dict[str, int] = {}  # and its connected workers
        # The other servers' (on a shared store, as last read: store/postgres_usage.py).
        self.elsewhere: Mapping[str, Usage] = {}

    def limits(self, tenant: str) -> TenantLimits:
        if self._file is None:
            return self.defaults
        return self._file.limits_of(tenant)

    def charge(self, tasks: Sequence[Task]) -> None:
        """Count new tasks against their tenants' rates (this server's buckets), or refuse
        them (a create's tasks are one tenant's: schedules' runs, of several, are not
        charged)."""
        for tenant, count in collections.Counter(task.tenant for task in tasks).items():
            self.take(tenant, count)

    def take(self, tenant: str, count: int) -> None:
        """Count `count` new tasks against the tenant's rate, or refuse them all."""
        if not self.rated(tenant) or count == 0:
            return
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = Bucket(now)
        self.take_from(bucket, tenant, count, now)

    def rated(self, tenant: str) -> bool:
        """Whether the tenant has a rate (a bucket to take new tasks' tokens from)."""
        return self.limits(tenant).rate is not None

    def take_from(self, bucket: Bucket, tenant: str, count: int, now: float) -> None:
        """Take `count` tokens from the tenant's bucket as it stands at `now`, or refuse them
        all: this server's bucket at its clock, or one that a shared store keeps (its row,
        at the database's clock, locked by the transaction that stores the tasks)."""
        limits = self.limits(tenant)
        if limits.rate is None or count == 0:
            return
        wait = bucket.take(count, limits.rate, limits.bucket, now)
        if wait:
            raise TenantLimitReached(
                f"the tenant creates at most {limits.rate:g} tasks a second "
                f"(bursts of {limits.bucket:g}); {count} more fit in {wait:.3f} s",
                "rate",
                wait,
            )

    def check_queue(self, tenant: str, count: int, queued: int) -> None:
        """Refuse `count` new tasks if the tenant's queue has no room for them."""
        limit = self.limits(tenant).max_queued
        if limit is not None and queued + count > limit:
            raise TenantLimitReached(
                f"the tenant's queue has no room for {count} more tasks "
                f"(it holds {queued}; at most {limit})",
                "max_queued",
                1.0,
            )

    @contextlib.contextmanager
    def watching(self, tenant: str) -> Iterator[None]:
        """Count an open Watch stream of the tenant while it lasts, or refuse it."""
        limit, elsewhere = self.limits(tenant).max_watches, self.elsewhere.get(tenant, IDLE)
        with self._counted(self.watches, tenant, limit, "watches", elsewhere.watches):
            yield

    @contextlib.contextmanager
    def connected(self, tenant: str) -> Iterator[None]:
        """Count a connected worker of the tenant while it stays, or refuse it."""
        limit, elsewhere = self.limits(tenant).max_workers, self.elsewhere.get(tenant, IDLE)
        with self._counted(self.workers, tenant, limit, "workers", elsewhere.workers):
            yield

    def usage(self) -> dict[str, Usage]:
        """This server's open watches and connected workers, of each tenant that has any."""
        tenants = self.watches.keys() | self.workers.keys()
        return {t: Usage(self.watches.get(t, 0), self.workers.get(t, 0)) for t in tenants}

    @staticmethod
    @contextlib.contextmanager
    def _counted(
        counts: dict[str, int], tenant: str, limit: int | None, what: str, elsewhere: int
    ) -> Iterator[None]:
        count = counts.get(tenant, 0)
        if limit is not None and count + elsewhere >= limit:
            others = f" ({elsewhere} on other servers)" if elsewhere else ""
            raise TenantLimitReached(
                f"the tenant has {count + elsewhere} open {what}{others}; at most {limit}",
                f"max_{what}",
                1.0,
            )
        counts[tenant] = count + 1
        try:
            yield
        finally:
            counts[tenant] -= 1
            if not counts[tenant]:
                del counts[tenant]
