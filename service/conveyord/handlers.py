"""Task handlers: the registry and context of conveyor.handlers, which the local worker
runs in the server and a worker process runs elsewhere. Kept here so that handler modules
written with `from conveyord import TaskContext, handler` keep working."""

from conveyor.handlers import (
    AttemptFailed,
    Failure,
    Handler,
    HandlerLoadError,
    HandlerRegistry,
    NonRetryableError,
    Refusal,
    TaskContext,
    WaitForInput,
    failure_message,
    failure_of,
    handler,
    is_async,
    report_problem,
    result_problem,
    run_on_thread,
)

__all__ = [
    "AttemptFailed", "Failure", "Handler", "HandlerLoadError", "HandlerRegistry",
    "NonRetryableError", "Refusal", "TaskContext", "WaitForInput", "failure_message",
    "failure_of", "handler", "is_async", "report_problem", "result_problem", "run_on_thread",
]  # fmt: skip
