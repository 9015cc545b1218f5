"""conveyord: the conveyor server. Handlers use `handler` and `TaskContext` from here."""

from conveyord.handlers import HandlerRegistry, TaskContext, handler

__all__ = ["HandlerRegistry", "TaskContext", "handler"]
