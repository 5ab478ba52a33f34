"""
A service container whose shutdown waits for each child in turn.
"""

from __future__ import annotations

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger


class SequentialMultiService(MultiService):
    """
    A ``MultiService`` that stops its children one at a time, last added
    first, and waits for each child's ``stopService`` Deferred before stopping
    the next.

    Twisted's ``MultiService`` calls every child's ``stopService`` at once,
    so a broker connection added first would close while a later child still
    sends its final messages. A child whose stop fails is logged, and the
    remaining children are still stopped.
    """

    log = Logger()

    def __init__(self, name: str | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        if name is not None:
            self.setName(name)  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        children: list[IService] = list(self)
        for child in reversed(children):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping service {name} failed", name=child.name)
