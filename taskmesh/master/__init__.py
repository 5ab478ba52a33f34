"""
The taskmesh master: dispatch tasks to slaves and serve an HTTP API about them.
"""

from ._http import make_http_site
from ._service import (
    MasterService,
    RequestRecord,
    SlaveInfo,
    SlaveProgress,
    TaskOutcome,
    TaskState,
)

__all__ = [
    "MasterService",
    "RequestRecord",
    "SlaveInfo",
    "SlaveProgress",
    "TaskOutcome",
    "TaskState",
    "make_http_site",
]
