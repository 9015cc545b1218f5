"""Task handlers: the registry and context of conveyor.handlers, which the local worker
runs in the server and a worker process runs elsewhere. Kept here so that handler modules
written with `from conveyord import TaskContext, handler` keep working."""

from conveyor.handlers import (
    Handler,
    HandlerLoadError,
    HandlerRegistry,
    Refusal,
    TaskContext,
    WaitForInput,
    failure_message,
    handler,
    is_async,
    report_problem,
    result_problem,
    run_on_thread,
)

__all__ = [
    "Handler", "HandlerLoadError", "HandlerRegistry", "Refusal", "TaskContext",
    "WaitForInput", "failure_message", "handler", "is_async", "report_problem", "result_problem",
    "run_on_thread",
]  # fmt: skip
