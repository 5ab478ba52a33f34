"""
End to end over TLS: a real twistd master and slave connect to the private
ActiveMQ with TLS through ssl:// and verify its certificate with the test CA.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from .harness import Deployment

pytestmark = pytest.mark.broker


@pytest.fixture
def deployment(tmp_path: Path, activemq_tls: Any, tls_files: Any) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path, activemq_tls)
    # A relative tls_ca_file is relative to the configuration file's directory.
    shutil.copy(tls_files.ca_file, tmp_path / "broker-ca.pem")
    yield deployment
    deployment.stop_all()


def test_broadcast_echo_over_tls(deployment: Deployment, activemq_tls: Any) -> None:
    tls = {"uri": activemq_tls.ssl_uri, "tls_ca_file": "broker-ca.pem"}
    master = deployment.master(**tls).start()
    slave = deployment.slave("t1", **tls).start()
    connected = r"connected to " + re.escape(activemq_tls.ssl_uri) + r" with STOMP 1\.2"
    for daemon in (master, slave):
        daemon.wait_for_log(connected)
    deployment.wait_for_api()
    deployment.wait_for_slaves("t1")

    result = deployment.cli("submit", "echo", '{"over": "tls"}', "--timeout", "30")

    assert result.returncode == 0, result.stdout + result.stderr
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    request_id = re.findall(uuid, result.stdout)[0]
    record = deployment.get(f"/tasks/{request_id}")
    assert record["state"] == "succeeded"
    assert record["results"] == {"t1": {"over": "tls"}}
    for daemon in (master, slave):
        assert "NOT verified" not in daemon.log()


def test_unrelated_ca_logged_with_cause(
    deployment: Deployment, activemq_tls: Any, tls_files: Any
) -> None:
    shutil.copy(tls_files.other_ca_file, deployment.directory / "broker-ca.pem")
    master = deployment.master(uri=activemq_tls.ssl_uri, tls_ca_file="broker-ca.pem").start()

    master.wait_for_log(
        r"could not establish a STOMP session with "
        + re.escape(activemq_tls.ssl_uri)
        + r": TLS handshake failed: certificate verify failed: .* no CA of this chain is among"
        r" the CAs in .*broker-ca\.pem"
    )
    deployment.wait_for_api()
    status = deployment.get("/status")
    assert "certificate verify failed" in json.dumps(status), status
