"""How a failed call is tried again: exponential backoff with full jitter, within a deadline.

Only failures that mean "the call did not get through, and trying again is safe" are
retried: UNAVAILABLE for the idempotent calls (Get, List, and Create with its
request_id). A broken Watch stream is re-opened on more codes, because a watch resumes
from its last revision and so can never do anything twice: INTERNAL and CANCELLED are
also how a connection reset or a proxy ending a stream (RST_STREAM) reach the client. The
delays start below `initial` (0.1 s), grow `multiplier` (2) times up to `maximum` (5 s), and
each is drawn at random between 0 and that ceiling ("full jitter"), so that clients that
failed together do not come back together.

A client made with `retry_refused=False` (the command line's) does not retry a first try
that found nothing listening at the server's address (connection refused): a person wants
to hear at once that the server is not running, not after the whole timeout.

A refusal for a limit (RESOURCE_EXHAUSTED: a full queue, a tenant's rate) changed nothing,
so any call may be tried again; when it carries a RetryInfo, the client waits what it says
(and up to a tenth more, at random) and tries again, up to `MAX_TOLD_WAITS` times within the
deadline, before it raises ResourceExhausted.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import grpc

from conveyor._deadline import Deadline
from conveyor.errors import retry_delay_of

MAX_TOLD_WAITS = 3  # tries again after a RetryInfo, at most, in one call


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Which codes are retried, and the ceilings of the delays between tries."""

    codes: frozenset[grpc.StatusCode]
    initial: float = 0.1
    multiplier: float = 2.0
    maximum: float = 5.0


UNARY_RETRY = RetryPolicy(frozenset({grpc.StatusCode.UNAVAILABLE}))
NO_RETRY = RetryPolicy(frozenset())
STREAM_RETRY = RetryPolicy(
    frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED})
)


def refused(error: grpc.RpcError) -> bool:
    """The call found nothing listening at the server's address (gRPC says so only in the
    details of UNAVAILABLE)."""
    return (
        error.code() == grpc.StatusCode.UNAVAILABLE
        and "connection refused" in (error.details() or "").lower()
    )


class Backoff:
    """The delays of one run of retries; it gives up when the next try would start too late.

    Unless `retry_refused`, it gives up at once when the first try was refused.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        deadline: Deadline,
        *,
        jitter: Callable[[], float] = random.random,
        retry_refused: bool = True,
    ) -> None:
        self._policy = policy
        self._deadline = deadline
        self._jitter = jitter
        self._ceiling = policy.initial
        self._retried: grpc.RpcError | None = None
        self._told_waits = 0
        self._first = not retry_refused  # still to see the first failure, and to judge it

    def delay_after(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before trying again after `error`, or None to give up."""
        first, self._first = self._first, False
        if first and refused(error):
            return None
        told = retry_delay_of(error)
        if told is not None:
            return self._told(told)
        if error.code() not in self._policy.codes:
            return None
        self._retried = error
        return self.next_delay()

    def _told(self, delay: float) -> float | None:
        """The server's delay, with a little jitter; None past MAX_TOLD_WAITS or the deadline."""
        self._told_waits += 1
        delay *= 1.0 + 0.1 * self._jitter()
        remaining = self._deadline.remaining()
        if self._told_waits > MAX_TOLD_WAITS or (remaining is not None and delay >= remaining):
            return None
        return delay

    def reported(self, error: grpc.RpcError) -> grpc.RpcError:
        """The error to raise on giving up after `error`.

        When the deadline cut the retries short, the error they were retrying says more
        (a server that cannot be reached is not a slow one).
        """
        if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED and self._retried is not None:
            return self._retried
        return error

    def next_delay(self) -> float | None:
        """Seconds to wait before the next try, or None when it would start past the deadline."""
        delay = self._jitter() * self._ceiling
        self._ceiling = min(self._ceiling * self._policy.multiplier, self._policy.maximum)
        remaining = self._deadline.remaining()
        return None if remaining is not None and delay >= remaining else delay
