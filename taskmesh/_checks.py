"""
A start-up check that the broker routes taskmesh's topics both ways.

Brokers reject a forbidden SUBSCRIBE or SEND with an ERROR frame, which the
STOMP client logs. Some misconfigurations give no error at all: a topic
prefix that the broker does not map (ActiveMQ Artemis without
``multicastPrefix=/topic/``) or a routing rule that drops the message. After
each new session this check sends a probe to ``/topic/NAMESPACE.probe`` and
waits for it to come back on its own subscription.
"""

from __future__ import annotations

import uuid

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskmesh._messages import validate_namespace
from taskmesh.stomp import StompConnection, StompError, StompMessage

PROBE_HEADER = "taskmesh-probe"
DEFAULT_PROBE_TIMEOUT = 10.0


class DestinationCheck(Service):
    """
    Check after every new broker session that a topic message comes back.

    The outcome is logged: once as info when the probe arrives, or as an error
    that names the destination and what to check when it does not.
    ``last_result`` is ``None`` before the first check, then ``"ok"`` or the
    error text.
    """

    log = Logger()

    def __init__(
        self,
        connection: StompConnection,
        namespace: str,
        *,
        clock: IReactorTime,
        timeout: float = DEFAULT_PROBE_TIMEOUT,
    ) -> None:
        self.connection = connection
        self.destination = f"/topic/{validate_namespace(namespace)}.probe"
        self.clock = clock
        self.timeout = timeout
        self.last_result: str | None = None
        self._waiting: dict[str, Deferred[None]] = {}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        self.connection.subscribe(self.destination, self._on_probe)
        self.connection.add_session_listener(self._on_session)
        if self.connection.is_connected:
            self._on_session()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        for waiting in list(self._waiting.values()):
            waiting.cancel()
        done: Deferred[None] = Deferred()
        done.callback(None)
        return done

    def check(self) -> Deferred[None]:
        """
        Send one probe and wait for it; the Deferred fires with the outcome logged.
        """
        return Deferred.fromCoroutine(self._check())

    def _on_session(self) -> None:
        if self.running:
            self.check()

    async def _check(self) -> None:
        probe_id = str(uuid.uuid4())
        arrived: Deferred[None] = Deferred()
        self._waiting[probe_id] = arrived
        arrived.addTimeout(self.timeout, self.clock)
        try:
            await self.connection.send(
                self.destination, b"{}", {PROBE_HEADER: probe_id}, receipt=True
            )
            await arrived
        except StompError as e:
            self._fail(f"cannot send to {self.destination}: {e}; grant write on the namespace's topics")
        except (CancelledError, TimeoutError):
            if self.running:
                self._fail(
                    f"a message sent to {self.destination} did not come back within"
                    f" {self.timeout:g} s; check that the broker routes /topic/ destinations"
                    " to subscribers (RabbitMQ: topic permissions on amq.topic; ActiveMQ"
                    " Artemis: multicastPrefix=/topic/ on the STOMP acceptor)"
                )
        else:
            if self.last_result != "ok":
                self.log.info("destination check passed: {destination} routes messages",
                              destination=self.destination)
            self.last_result = "ok"
        finally:
            self._waiting.pop(probe_id, None)

    def _on_probe(self, message: StompMessage) -> None:
        waiting = self._waiting.get(message.headers.get(PROBE_HEADER, ""))
        if waiting is not None and not waiting.called:
            waiting.callback(None)

    def _fail(self, reason: str) -> None:
        self.last_result = reason
        self.log.error("destination check failed: {reason}", reason=reason)
