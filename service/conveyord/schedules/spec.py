"""When a schedule runs: the nominal times of an interval, a daily time or a cron expression.

Daily times and cron expressions are read in the schedule's IANA zone by cronsim, which
follows Debian's cron through daylight saving time: a time that does not exist (clocks go
forward) runs at the first moment after the gap, a time that happens twice (clocks go back)
runs once, and an expression that fires more often than hourly follows the wall clock. An
interval is kept in real time. Times are seconds since the epoch, as everywhere in the server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError


class SpecError(ValueError):
    """A spec that cannot run: the message says why, for the field it names."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True, slots=True)
class Spec:
    """When a schedule runs: every `every` seconds from `phase` past the epoch, or on
    `cron` (a daily time is the cron expression of its hour and minute, `second` later), in
    `zone`, not before `start_at` nor after `end_at`; each run `jitter` seconds late at most."""

    every: float = 0.0
    phase: float = 0.0
    cron: str = ""
    second: int = 0
    zone: str = "UTC"
    start_at: float | None = None
    end_at: float | None = None
    jitter: float = 0.0
    max_runs: int | None = None

    def __post_init__(self) -> None:
        if self.cron:
            try:
                CronSim(self.cron, datetime.now(self.tz))
            except CronSimError as error:
                message = f"{self.cron!r} is not a cron expression: {error}"
                raise SpecError("cron", message) from None

    @property
    def tz(self) -> tzinfo:
        return zone(self.zone)

    def after(self, moment: float) -> float | None:
        """The first nominal time strictly after `moment` (and not before `start_at`), or
        None if there is none before `end_at`."""
        if self.start_at is not None and moment < self.start_at:
            moment = math.nextafter(self.start_at, -math.inf)
        found = self._next_interval(moment) if self.every else self._next_cron(moment)
        if found is None or (self.end_at is not None and found > self.end_at):
            return None
        return found

    def times(self, after: float, until: float) -> Iterator[float]:
        """The nominal times after `after`, up to and including `until`, in order."""
        moment = self.after(after)
        while moment is not None and moment <= until:
            yield moment
            moment = self.after(moment)

    def delay(self, schedule_id: str, nominal: float) -> float:
        """The jitter of one run: a fixed fraction of `jitter`, from the schedule and the
        nominal time, so that every server makes the run at the same moment."""
        if not self.jitter:
            return 0.0
        digest = hashlib.blake2b(f"{schedule_id}/{nominal!r}".encode(), digest_size=8).digest()
        return self.jitter * int.from_bytes(digest) / 2**64

    def _next_interval(self, moment: float) -> float:
        steps = math.floor((moment - self.phase) / self.every) + 1
        found = self.phase + steps * self.every
        while found <= moment:  # floating point: make sure it is strictly after
            steps += 1
            found = self.phase + steps * self.every
        return found

    def _next_cron(self, moment: float) -> float | None:
        """The next time of the cron expression (a daily time: its minute, then `second`)."""
        base = datetime.fromtimestamp(math.floor(moment - self.second), self.tz)
        try:
            found = next(iter(CronSim(self.cron, base)))
        except StopIteration:
            return None
        seconds = found.timestamp() + self.second
        if seconds <= moment:  # `base` lost its fraction of a second: the same time again
            try:
                found = next(iter(CronSim(self.cron, found)))
            except StopIteration:
                return None
            seconds = found.timestamp() + self.second
        return seconds


def zone(name: str) -> tzinfo:
    """The IANA zone of that name (UTC for an empty one); SpecError if none is known."""
    if not name or name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name no file can have
        raise SpecError("time_zone", f"{name[:64]!r} is not a known IANA time zone") from None


def daily_cron(hour: int, minute: int) -> str:
    """The cron expression of a daily time (its second is added apart)."""
    return f"{minute} {hour} * * *"
