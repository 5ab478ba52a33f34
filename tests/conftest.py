"""Shared pytest fixtures for the taskmesh test suite."""

import importlib.util
import os
from pathlib import Path

import pytest

# --- Private ActiveMQ broker -------------------------------------------------
#
# The session fixture "activemq" starts one ActiveMQ Classic broker from the
# shipped etc/activemq/activemq.xml on a free loopback port (see
# scripts/brokers.py). Mark tests that use it with @pytest.mark.broker so that
# "pytest -m 'not broker'" can deselect them.


def _load_brokers_module():
    path = Path(__file__).resolve().parent.parent / "scripts" / "brokers.py"
    spec = importlib.util.spec_from_file_location("brokers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


brokers = _load_brokers_module()


@pytest.fixture(scope="session")
def activemq(tmp_path_factory):
    """A running private ActiveMQ, shared by the whole test session.

    The value is a brokers.ActiveMQ with host, port, uri, login, passcode,
    namespace and log_path, and with start(), stop(), kill() and restart().
    A test that stops or kills the broker must start it again before it ends.

    When ActiveMQ is not installed, dependent tests are skipped, or fail when
    the environment variable CI is "true". A broker that is installed but
    fails to start always fails the tests.
    """
    broker = brokers.ActiveMQ(tmp_path_factory.mktemp("activemq"))
    # pytest.fail is called outside the except clauses, so that the report
    # shows the reason alone and no chained traceback.
    problem = None
    try:
        broker.start()
    except brokers.BrokerUnavailable as error:
        problem = f"ActiveMQ is unavailable: {error}"
        must_fail = os.environ.get("CI") == "true"
    except brokers.BrokerStartError as error:
        problem = str(error)
        must_fail = True
    if problem is not None:
        if must_fail:
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)

    yield broker

    broker.stop()


# --- Private ActiveMQ brokers with STOMP over TLS ----------------------------
#
# "tls_files" generates a private CA, an unrelated CA, broker key stores and a
# client certificate (see tests/certificates.py). "activemq_tls" starts a
# second ActiveMQ from etc/activemq/activemq-tls.xml whose certificate names
# localhost and 127.0.0.1, and "activemq_wrong_host" a third one, for the
# tests of one module, whose certificate names only wrong.example. Both also
# listen for plain STOMP on broker.uri, and for STOMP over TLS on
# broker.ssl_uri. Skip and failure rules are those of "activemq".


def _start_or_skip(broker, name):
    """Start broker, or skip the test (fail it with CI=true) when it is not installed."""
    problem = None
    try:
        broker.start()
    except brokers.BrokerUnavailable as error:
        problem = f"{name} is unavailable: {error}"
        must_fail = os.environ.get("CI") == "true"
    except brokers.BrokerStartError as error:
        problem = str(error)
        must_fail = True
    if problem is not None:
        if must_fail:
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """CAs, key stores and a client certificate, as a tests.certificates.TLSFiles."""
    from tests.certificates import write_tls_files

    return write_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def activemq_tls(tmp_path_factory, tls_files):
    """A running private ActiveMQ with a certificate from tls_files.ca_file."""
    broker = brokers.ActiveMQ(
        tmp_path_factory.mktemp("activemq-tls"),
        tls_keystore=tls_files.broker_keystore,
        tls_keystore_password=tls_files.keystore_password,
    )
    _start_or_skip(broker, "ActiveMQ")
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def activemq_wrong_host(tmp_path_factory, tls_files):
    """A running private ActiveMQ whose certificate names only wrong.example."""
    broker = brokers.ActiveMQ(
        tmp_path_factory.mktemp("activemq-wrong-host"),
        tls_keystore=tls_files.wrong_host_keystore,
        tls_keystore_password=tls_files.keystore_password,
    )
    _start_or_skip(broker, "ActiveMQ")
    yield broker
    broker.stop()


# --- End of the private ActiveMQ broker section ------------------------------


# --- Private RabbitMQ node ---------------------------------------------------
#
# The session fixture "rabbitmq" starts one private RabbitMQ node with the
# STOMP plugin, from the shipped etc/rabbitmq/rabbitmq.conf and
# enabled_plugins, on free loopback ports (see scripts/brokers.py). It never
# touches the system node that the Debian package may run. Mark tests that
# use it with @pytest.mark.broker, like the ActiveMQ tests.


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory):
    """A running private RabbitMQ node, shared by the whole test session.

    The value is a brokers.RabbitMQ with the same API as brokers.ActiveMQ
    (host, port, uri, login, passcode, namespace, log_path, start(), stop(),
    kill(), restart()), plus vhost, which STOMP clients must send as the
    CONNECT "host" header, node, and rabbitmqctl(*arguments). A test that
    stops or kills the node must start it again before it ends.

    When RabbitMQ is not installed, dependent tests are skipped, or fail when
    the environment variable CI is "true". A node that is installed but fails
    to start always fails the tests.
    """
    broker = brokers.RabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    # pytest.fail is called outside the except clauses, so that the report
    # shows the reason alone and no chained traceback.
    problem = None
    try:
        broker.start()
    except brokers.BrokerUnavailable as error:
        problem = f"RabbitMQ is unavailable: {error}"
        must_fail = os.environ.get("CI") == "true"
    except brokers.BrokerStartError as error:
        problem = str(error)
        must_fail = True
    if problem is not None:
        if must_fail:
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)

    yield broker

    broker.stop()


@pytest.fixture(scope="session", params=["activemq", "rabbitmq"])
def broker(request):
    """The "activemq" fixture, then the "rabbitmq" fixture.

    A test that uses it runs once per broker, with the test id suffix
    [activemq] or [rabbitmq]. broker.kind names the broker. Skip and failure
    rules are those of the fixture in use.
    """
    return request.getfixturevalue(request.param)


# --- End of the private RabbitMQ node section --------------------------------
