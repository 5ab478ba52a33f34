"""
The ``twistd taskmesh-master`` command: options and service tree.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, cast

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.python import usage

from taskmesh._config import (
    PASSCODE_ENVIRONMENT_VARIABLE,
    ConfigError,
    MasterSettings,
    load_master_settings,
    require_signing,
    stomp_settings_from,
)
from taskmesh._secure import MASTER_TYPES, secure_connection
from taskmesh._service_tree import ConnectionService, build_connection_tree

from ._http import make_http_site
from ._service import MasterService


class Options(usage.Options):
    """
    Command-line options of ``twistd taskmesh-master``.

    Every option overrides a key of the configuration file. The file is read
    and every value, including the HTTP endpoint, is checked while the
    options are parsed.
    """

    synopsis = "[--config FILE] [options]"
    longdesc = (
        "Run the taskmesh master: dispatch tasks to slaves over a STOMP broker and"
        " serve the HTTP API. The broker passcode is never given on the command"
        f" line: it is read from the {PASSCODE_ENVIRONMENT_VARIABLE} environment"
        " variable, else from the file named by [broker] passcode_file, else from"
        " [broker] passcode in the configuration file."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            "INI configuration file, such as /etc/taskmesh/master.ini (default: built-in defaults).",
        ],
        [
            "broker",
            None,
            None,
            "Broker URI, overriding [broker] uri, for example tcp://127.0.0.1:61613.",
        ],
        ["login", None, None, "Broker login, overriding [broker] login."],
        ["namespace", None, None, "Destination namespace, overriding [broker] namespace."],
        [
            "http",
            None,
            None,
            "Twisted server endpoint of the HTTP API, overriding [master] http,"
            " for example tcp:8750:interface=127.0.0.1. An endpoint that listens"
            " outside loopback needs [master] http_token_file.",
        ],
        [
            "database",
            None,
            None,
            "SQLite file that keeps the requests, overriding [master] database,"
            " or :memory: to keep them only while the master runs.",
        ],
    ]

    def __init__(
        self, environ: Mapping[str, str] | None = None, *, require_signing: bool = True
    ) -> None:
        """
        Args:
            environ: the environment to read the passcode from (default:
                ``os.environ``).
            require_signing: reject a configuration without ``[security]``
                keys unless it sets ``allow_unsigned``; tests turn it off.
        """
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        self._environ = os.environ if environ is None else environ
        self._require_signing = require_signing
        self.settings: MasterSettings | None = None

    def postOptions(self) -> None:  # noqa: N802 (usage.Options method)
        overrides = {
            "broker.uri": self["broker"],
            "broker.login": self["login"],
            "broker.namespace": self["namespace"],
            "master.http": self["http"],
            "master.database": self["database"],
        }
        try:
            self.settings = load_master_settings(self["config"], overrides, self._environ)
            if self._require_signing:
                require_signing(self.settings.security, self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def build_master_service(
    settings: MasterSettings,
    connection: ConnectionService,
    *,
    clock: IReactorTime,
    reactor: IReactorCore,
) -> MultiService:
    """
    Build the master's service tree around an existing broker connection.

    The tree is a ``MultiService`` named ``taskmesh-master`` with the
    children ``stomp`` (the connection), ``check`` (the destination check),
    ``master`` and ``http``. It stops
    them in reverse order, each after the previous one has finished, so the
    connection closes last. ``reactor`` must also provide the interfaces that
    the HTTP endpoint needs, such as ``IReactorTCP``.
    """
    root = build_connection_tree("taskmesh-master", connection, settings.broker.namespace, clock=clock)

    master = MasterService(
        secure_connection(
            connection, settings.security, clock=clock, accept_types=MASTER_TYPES
        ),
        settings.broker.namespace,
        clock=clock,
        default_timeout=settings.default_timeout,
        max_finished=settings.max_finished,
        database=settings.database,
        default_max_attempts=settings.max_attempts,
        default_ttl=settings.default_ttl,
    )
    master.setName("master")  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
    master.setServiceParent(root)  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated

    site = make_http_site(master, token=settings.http_token)
    http = strports.service(settings.http_endpoint, site, reactor=reactor)
    http.setName("http")  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
    http.setServiceParent(root)  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
    return root


def makeService(options: Options) -> IService:  # noqa: N802 (name fixed by twistd)
    """
    Build the master's service tree on the global reactor.
    """
    from twisted.internet import reactor as global_reactor

    from taskmesh.stomp import StompClientService

    if options.settings is None:
        raise ValueError("makeService needs Options that were parsed first")
    reactor = cast(Any, global_reactor)
    connection = StompClientService(stomp_settings_from(options.settings.broker), reactor)
    return build_master_service(options.settings, connection, clock=reactor, reactor=reactor)
