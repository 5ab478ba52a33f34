"""
The ``twistd taskmesh-slave`` command: options and service tree.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any, Iterable, Mapping, cast

from twisted.application.service import IService, MultiService
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from taskmesh._config import (
    PASSCODE_ENVIRONMENT_VARIABLE,
    ConfigError,
    SlaveSettings,
    load_slave_settings,
    require_signing,
    stomp_settings_from,
)
from taskmesh._secure import SLAVE_TYPES, secure_connection
from taskmesh._service_tree import ConnectionService, build_connection_tree

from ._handlers import (
    HandlerLoadError,
    HandlerRegistry,
    HandlerSpec,
    load_operator_handlers,
    register_builtin_handlers,
)
from ._service import SlaveService


class Options(usage.Options):
    """
    Command-line options of ``twistd taskmesh-slave``.

    Every option overrides a key of the configuration file. The file is read
    and every value is checked while the options are parsed.
    """

    synopsis = "[--config FILE] [options]"
    longdesc = (
        "Run a taskmesh slave: receive tasks from the master over a STOMP broker,"
        " run them and send back progress and results. The broker passcode is"
        f" never given on the command line: it is read from the {PASSCODE_ENVIRONMENT_VARIABLE}"
        " environment variable, else from the file named by [broker] passcode_file,"
        " else from [broker] passcode in the configuration file."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            "INI configuration file, such as /etc/taskmesh/slave.ini (default: built-in defaults).",
        ],
        [
            "broker",
            None,
            None,
            "Broker URI, overriding [broker] uri, for example tcp://127.0.0.1:61613.",
        ],
        ["login", None, None, "Broker login, overriding [broker] login."],
        ["namespace", None, None, "Destination namespace, overriding [broker] namespace."],
        ["slave-id", None, None, "Slave id, overriding [slave] id (default: the host name)."],
        [
            "concurrency",
            None,
            None,
            "Maximum number of tasks run at once, overriding [slave] concurrency.",
        ],
    ]

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
        *,
        require_signing: bool = True,
    ) -> None:
        """
        Args:
            environ: the environment to read the passcode from (default:
                ``os.environ``).
            entry_points: handler entry points (default: the installed ones
                in the ``taskmesh.handlers`` group).
        """
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        self._environ = os.environ if environ is None else environ
        self._entry_points = entry_points
        # Reject a configuration without [security] keys unless it sets
        # allow_unsigned; tests turn this off.
        self._require_signing = require_signing
        self.settings: SlaveSettings | None = None
        self.handler_specs: list[HandlerSpec] = []

    def postOptions(self) -> None:  # noqa: N802 (usage.Options method)
        overrides = {
            "broker.uri": self["broker"],
            "broker.login": self["login"],
            "broker.namespace": self["namespace"],
            "slave.id": self["slave-id"],
            "slave.concurrency": self["concurrency"],
        }
        try:
            self.settings = load_slave_settings(self["config"], overrides, self._environ)
            if self._require_signing:
                require_signing(self.settings.security, self["config"])
            self.handler_specs = load_operator_handlers(self.settings.handlers, self._entry_points)
        except (ConfigError, HandlerLoadError) as e:
            raise usage.UsageError(str(e)) from None


def build_slave_service(
    settings: SlaveSettings,
    handler_specs: Iterable[HandlerSpec],
    connection: ConnectionService,
    *,
    clock: IReactorTime,
    reactor: IReactorFromThreads,
    thread_pool: ThreadPool | None = None,
) -> MultiService:
    """
    Build the slave's service tree around an existing broker connection.

    The tree is a ``MultiService`` named ``taskmesh-slave`` with the children
    ``stomp`` (the connection), ``check`` (the destination check) and
    ``slave``. It stops ``slave`` first and closes the connection only after
    the slave has announced ``down``.
    """
    registry = HandlerRegistry()
    register_builtin_handlers(registry, clock)
    for spec in handler_specs:
        registry.register(spec.name, spec.function, blocking=spec.blocking)

    root = build_connection_tree("taskmesh-slave", connection, settings.broker.namespace, clock=clock)
    slave = SlaveService(
        secure_connection(
            connection, settings.security, clock=clock, accept_types=SLAVE_TYPES
        ),
        settings.broker.namespace,
        settings.slave_id,
        registry,
        clock=clock,
        reactor=reactor,
        announce_interval=settings.announce_interval,
        concurrency=settings.concurrency,
        tags=settings.tags,
        grace_period=settings.grace_period,
        thread_pool=thread_pool,
    )
    slave.setName("slave")  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
    slave.setServiceParent(root)  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
    return root


def makeService(options: Options) -> IService:  # noqa: N802 (name fixed by twistd)
    """
    Build the slave's service tree on the global reactor.
    """
    from twisted.internet import reactor as global_reactor

    from taskmesh.stomp import StompClientService

    if options.settings is None:
        raise ValueError("makeService needs Options that were parsed first")
    reactor = cast(Any, global_reactor)
    connection = StompClientService(stomp_settings_from(options.settings.broker), reactor)
    return build_slave_service(
        options.settings, options.handler_specs, connection, clock=reactor, reactor=reactor
    )
