"""The documented caps on what a task carries, enforced where each part enters.

A request over a cap is refused (INVALID_ARGUMENT naming the field, or RESOURCE_EXHAUSTED
for a message over its method's receive limit); a handler's result or report over a cap
fails the attempt with an error code of its own. Together they keep every task, every
answer and every List page within gRPC's default 4 MiB message limit, so that no stored
task can make a Get, a List or a Watch fail for its readers.
"""

from __future__ import annotations

from conveyor.limits import (  # the contract's caps, shared with the client's worker
    KIB,
    MAX_DETAIL_BYTES,
    MAX_JSON_DEPTH,
    MAX_MESSAGE,
    MAX_PARAMETERS_BYTES,
    MAX_RESULT_BYTES,
    MIB,
)
from conveyord.lifecycle import InputLimits

__all__ = [
    "INPUT_LIMITS",
    "KIB",
    "MAX_DETAIL_BYTES",
    "MAX_INPUT_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_MESSAGE",
    "MAX_PAGE_BYTES",
    "MAX_PARAMETERS_BYTES",
    "MAX_RECEIVE_BYTES",
    "MAX_RESULT_BYTES",
    "MAX_WAIT_SECONDS",
    "MIB",
    "RECEIVE_LIMITS",
]  # fmt: skip

# The furthest ahead a task may be asked to start, and the longest queue timeout: a year
# and a day (a yearly job fits; a time years ahead is a mistake).
MAX_WAIT_SECONDS = 366 * 24 * 3600.0

# One input sent to a task (SendInput), encoded; and what a task keeps of them together.
# Inputs are not part of a TaskResponse (only their count is), so they do not weigh on
# Get, List or Watch; an Assignment carries them with the task, within 4 MiB.
MAX_INPUT_BYTES = 64 * KIB
INPUT_LIMITS = InputLimits(count=1000, total_bytes=MIB)

# The most any answer may hold: a List page stops before a task that would pass it. A
# task is at most about 2.2 MiB (parameters, result, detail, labels, description), so a
# page always holds at least one.
MAX_PAGE_BYTES = 3 * MIB

# What each method can legitimately receive; a larger request is refused before it is
# parsed. The server's transport limit is the largest of them.
RECEIVE_LIMITS = {
    "Create": MAX_PARAMETERS_BYTES + 256 * KIB,
    "BatchCreate": 4 * MIB,
    "Get": 4 * KIB,
    "Cancel": 8 * KIB,
    "CancelMatching": 128 * KIB,
    "Pause": 8 * KIB,
    "Resume": 4 * KIB,
    "SendInput": MAX_INPUT_BYTES + 16 * KIB,
    "List": 128 * KIB,
    "Watch": 128 * KIB,
    "Rerun": 8 * KIB,
    "Delete": 4 * KIB,
    "ListTaskTypes": 4 * KIB,
    "CountTasks": 128 * KIB,
}
MAX_RECEIVE_BYTES = max(RECEIVE_LIMITS.values())
