"""
Check that etc/activemq/activemq-tls.xml is etc/activemq/activemq.xml plus
the STOMP over TLS listener, and nothing else.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

ACTIVEMQ = Path(__file__).resolve().parents[2] / "etc" / "activemq"
BEANS = "{http://www.springframework.org/schema/beans}"
CORE = "{http://activemq.apache.org/schema/core}"


def outline(element: ElementTree.Element) -> tuple[object, ...]:
    """
    Return the tag, attributes, text and children of ``element``, without comments.
    """
    return (
        element.tag,
        sorted(element.attrib.items()),
        (element.text or "").strip(),
        [outline(child) for child in element],
    )


def without_tls(root: ElementTree.Element) -> ElementTree.Element:
    """
    Remove the parts that activemq-tls.xml adds to activemq.xml.
    """
    broker = root.find(f"{CORE}broker")
    assert broker is not None
    ssl_context = broker.find(f"{CORE}sslContext")
    assert ssl_context is not None, "activemq-tls.xml has no <sslContext>"
    broker.remove(ssl_context)

    connectors = broker.find(f"{CORE}transportConnectors")
    assert connectors is not None
    tls_connectors = [c for c in connectors if c.get("name") == "stomp+ssl"]
    assert len(tls_connectors) == 1, "activemq-tls.xml needs one stomp+ssl connector"
    connectors.remove(tls_connectors[0])

    placeholder = root.find(f"{BEANS}bean")
    assert placeholder is not None
    assert placeholder.get("class", "").endswith("PropertyPlaceholderConfigurer")
    properties = {p.get("name"): p.get("value") for p in placeholder.findall(f"{BEANS}property")}
    assert properties == {
        "locations": "file:${activemq.conf}/taskmesh-tls.properties",
        "ignoreResourceNotFound": "true",
    }
    for child in list(placeholder):
        placeholder.remove(child)
    placeholder.text = None
    return root


def test_tls_file_is_plain_file_plus_tls() -> None:
    plain = ElementTree.parse(ACTIVEMQ / "activemq.xml").getroot()
    tls = ElementTree.parse(ACTIVEMQ / "activemq-tls.xml").getroot()

    assert outline(without_tls(tls)) == outline(plain)


def test_tls_connector_uses_port_property() -> None:
    tls = ElementTree.parse(ACTIVEMQ / "activemq-tls.xml").getroot()

    uris = [c.get("uri") for c in tls.iter(f"{CORE}transportConnector")]

    assert "stomp+ssl://127.0.0.1:${taskmesh.stomp.ssl.port:61614}" in uris


def test_plain_file_has_no_key_store() -> None:
    plain = ElementTree.parse(ACTIVEMQ / "activemq.xml").getroot()

    assert list(plain.iter(f"{CORE}sslContext")) == []
