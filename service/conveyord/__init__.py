"""conveyord: the conveyor server. Handlers use `handler`, `TaskContext` and the errors that
fail an attempt (`AttemptFailed`, `NonRetryableError`) from here."""

from conveyord.handlers import (
    AttemptFailed,
    HandlerRegistry,
    NonRetryableError,
    TaskContext,
    handler,
)

__all__ = ["AttemptFailed", "HandlerRegistry", "NonRetryableError", "TaskContext", "handler"]
