"""conveyor: the client of the conveyor task service; the generated contract is `conveyor.v1`.

`Client` (blocking) and `AsyncClient` (asyncio) have the same methods: create, get, list,
cancel, watch, watch_all, wait, poll, result and revision, and the operator's rerun, delete,
list_task_types and count_tasks. They return plain Python
(`Task`, `TaskEvent`) and raise subclasses of `ConveyorError`. `handler` and `TaskContext`
write task handlers, which run in conveyord or in a worker process (`conveyor.worker`).
"""

from conveyor._async_client import AsyncClient
from conveyor._sync_client import Client
from conveyor.errors import (
    AlreadyExists,
    ConveyorError,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    RpcError,
    TaskCancelled,
    TaskFailed,
    Unauthenticated,
    Unavailable,
    WaitTimeout,
)
from conveyor.handlers import AttemptFailed, NonRetryableError, TaskContext, handler
from conveyor.schedules import Overlap, Schedule, ScheduleEvent, ScheduleEventKind, ScheduleRun
from conveyor.tasks import (
    AttemptOutcome,
    EventKind,
    InputSent,
    Task,
    TaskAttempt,
    TaskCounts,
    TaskError,
    TaskEvent,
    TaskStatus,
    TaskType,
    TaskWorker,
)
from conveyor.tls import Tls

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AttemptFailed",
    "AttemptOutcome",
    "Client",
    "ConveyorError",
    "DeadlineExceeded",
    "EventKind",
    "FailedPrecondition",
    "FieldViolation",
    "InputSent",
    "InvalidArgument",
    "NonRetryableError",
    "NotFound",
    "OutOfRange",
    "Overlap",
    "PermissionDenied",
    "ResourceExhausted",
    "RpcError",
    "Schedule",
    "ScheduleEvent",
    "ScheduleEventKind",
    "ScheduleRun",
    "Task",
    "TaskAttempt",
    "TaskCancelled",
    "TaskContext",
    "TaskCounts",
    "TaskError",
    "TaskEvent",
    "TaskFailed",
    "TaskStatus",
    "TaskType",
    "TaskWorker",
    "Tls",
    "Unauthenticated",
    "Unavailable",
    "WaitTimeout",
    "handler",
]
