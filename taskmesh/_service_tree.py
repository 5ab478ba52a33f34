"""
A service container whose shutdown waits for each child in turn.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.application.service import IService, IServiceCollection, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskmesh._checks import DestinationCheck
from taskmesh.stomp._interfaces import StompConnection


class ConnectionService(StompConnection, Protocol):
    """
    A broker connection that is also a service, such as
    :class:`taskmesh.stomp.StompClientService`.
    """

    def setName(self, name: str) -> Any: ...  # noqa: N802 (IService method)

    def setServiceParent(self, parent: IServiceCollection) -> Any: ...  # noqa: N802 (IService method)


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


def build_connection_tree(
    name: str, connection: ConnectionService, namespace: str, *, clock: IReactorTime
) -> SequentialMultiService:
    """
    Start a daemon's service tree with its first two children: ``stomp``
    (the broker connection) and ``check`` (the destination check).

    The daemon adds its own services after them, so they stop first and the
    connection closes last.
    """
    root = SequentialMultiService(name)
    connection.setName("stomp")
    connection.setServiceParent(root)

    check = DestinationCheck(connection, namespace, clock=clock)
    check.setName("check")  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
    check.setServiceParent(root)  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
    return root
