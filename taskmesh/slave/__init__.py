"""
The taskmesh slave: runs the tasks that a master broadcasts and replies with
progress, results and errors.

Write a handler as ``function(args, progress)`` returning a JSON value, raise
:class:`InvalidArguments` for bad arguments, and register it in the
``[handlers]`` section of the slave's configuration or in the
``taskmesh.handlers`` entry-point group.
"""

from ._handlers import (
    BUILTIN_TASKS,
    HANDLER_ENTRY_POINT_GROUP,
    Handler,
    HandlerFunction,
    HandlerLoadError,
    HandlerRegistry,
    HandlerSpec,
    InvalidArguments,
    ProgressReporter,
    load_operator_handlers,
    non_blocking,
    register_builtin_handlers,
)
from ._service import STATS_KEYS, SlaveService

__all__ = [
    "BUILTIN_TASKS",
    "HANDLER_ENTRY_POINT_GROUP",
    "STATS_KEYS",
    "Handler",
    "HandlerFunction",
    "HandlerLoadError",
    "HandlerRegistry",
    "HandlerSpec",
    "InvalidArguments",
    "ProgressReporter",
    "SlaveService",
    "load_operator_handlers",
    "non_blocking",
    "register_builtin_handlers",
]
