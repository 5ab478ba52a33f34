"""
The taskmesh master: dispatch tasks to slaves and serve an HTTP API about them.
"""

from ._http import make_http_site
from ._records import AcceptedAttempt
from ._service import (
    MasterService,
    RequestAlreadyEnded,
    RequestNotFound,
    RequestRecord,
    SlaveInfo,
    SlaveProgress,
    StoreError,
    TaskOutcome,
    TaskState,
)

__all__ = [
    "AcceptedAttempt",
    "MasterService",
    "RequestAlreadyEnded",
    "RequestNotFound",
    "RequestRecord",
    "SlaveInfo",
    "SlaveProgress",
    "StoreError",
    "TaskOutcome",
    "TaskState",
    "make_http_site",
]
