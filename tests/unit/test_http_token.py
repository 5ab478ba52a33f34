"""
Tests for the HTTP API token: ``[master] http_token_file`` in the master's
configuration, the check in the HTTP site, and the ``taskmesh`` command's
``--token-file``, ``TASKMESH_API_TOKEN_FILE`` and ``TASKMESH_API_TOKEN``.
"""

# Twisted's MemoryReactorClock, MultiService and Logger are unannotated
# (Twisted 26.10), so every call into them would otherwise be reported.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import pytest_twisted  # type: ignore[import-untyped]  # pytest-twisted 1.14 has no types
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.web.server import Site

from taskmesh._api_token import describe_public_listening
from taskmesh._config import ConfigError, MasterSettings, load_master_settings
from taskmesh.cli import main
from taskmesh.master import MasterService, make_http_site
from taskmesh.master import tap as master_tap
from taskmesh.testing import FakeBroker, FakeConnection
from tests.certificates import CertificateAuthority
from tests.unit.test_http import Response, call
from tests.unit.test_tap import FakeConnectionService

# 44 characters, the length of `head -c 32 /dev/urandom | base64`.
TOKEN = "q7Xh2bV9kLm4Pz8RtY1wE6sD3fG5jN0cA2uI9oK7vB4="
NAMESPACE = "tokentest"
UNAUTHORIZED_MESSAGE = (
    "missing or invalid API token: send Authorization: Bearer <token from"
    " [master] http_token_file>"
)


def write_token(directory: Path, token: str = TOKEN, *, mode: int = 0o600) -> Path:
    path = directory / "api-token"
    path.write_text(token + "\n", encoding="ascii")
    path.chmod(mode)
    return path


def write_config(directory: Path, text: str) -> str:
    path = directory / "master.ini"
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(path: str | None, **overrides: str | None) -> MasterSettings:
    return load_master_settings(path, overrides, {})


# -- Configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp:8750:interface=127.0.0.1",
        "tcp:8750:interface=127.0.0.2",
        "tcp:8750:127.0.0.1",
        "tcp:8750:interface=localhost",
        "tcp6:8750:interface=\\:\\:1",
        "tcp6:8750:interface=\\:\\:ffff\\:127.0.0.1",
        "unix:/run/taskmesh/api.sock",
    ],
)
def test_loopback_token_optional(tmp_path: Path, endpoint: str) -> None:
    settings = load(write_config(tmp_path, f"[master]\nhttp = {endpoint}\n"))

    assert settings.http_endpoint == endpoint
    assert settings.http_token_file is None
    assert settings.http_token is None


def test_default_endpoint_needs_no_token() -> None:
    settings = load(None)

    assert settings.http_token is None


def test_loopback_token_read_when_set(tmp_path: Path) -> None:
    write_token(tmp_path)
    path = write_config(tmp_path, "[master]\nhttp_token_file = api-token\n")

    settings = load(path)

    assert settings.http_token_file == str(tmp_path / "api-token")
    assert settings.http_token == TOKEN


def test_unix_socket_token_read_when_set(tmp_path: Path) -> None:
    token_file = write_token(tmp_path)
    path = write_config(
        tmp_path, f"[master]\nhttp = unix:/run/taskmesh/api.sock\nhttp_token_file = {token_file}\n"
    )

    assert load(path).http_token == TOKEN


def test_settings_repr_hides_token(tmp_path: Path) -> None:
    write_token(tmp_path)
    settings = load(write_config(tmp_path, "[master]\nhttp_token_file = api-token\n"))

    assert TOKEN not in repr(settings)
    assert "api-token" in repr(settings)


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp:8750",
        "tcp:8750:interface=0.0.0.0",
        "tcp:port=8750",
        "tcp6:8750",
        "tcp6:8750:interface=\\:\\:",
    ],
)
def test_all_addresses_needs_token(tmp_path: Path, endpoint: str) -> None:
    path = write_config(tmp_path, f"[master]\nhttp = {endpoint}\n")

    with pytest.raises(ConfigError) as error:
        load(path)

    message = str(error.value)
    assert message.startswith(
        f"{path}: [master] http: {endpoint} listens on all addresses, so [master]"
        " http_token_file is required."
    )
    assert "head -c 32 /dev/urandom | base64 > " in message
    assert f"chmod 600 {tmp_path / 'api-token'}" in message
    assert f"set http_token_file = {tmp_path / 'api-token'}" in message


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("tcp:8750:interface=192.0.2.7", "listens on 192.0.2.7, which is not a loopback address"),
        (
            "tcp6:8750:interface=2001\\:db8\\:\\:7",
            "listens on 2001:db8::7, which is not a loopback address",
        ),
        (
            "tcp:8750:interface=master.example",
            "listens on master.example, which is not a loopback address",
        ),
    ],
)
def test_other_address_needs_token(tmp_path: Path, endpoint: str, expected: str) -> None:
    path = write_config(tmp_path, f"[master]\nhttp = {endpoint}\n")

    with pytest.raises(ConfigError, match="http_token_file is required") as error:
        load(path)

    assert f"[master] http: {endpoint} {expected}, so" in str(error.value)


def test_http_option_outside_loopback_needs_token() -> None:
    with pytest.raises(ConfigError) as error:
        load(None, **{"master.http": "tcp:8750"})

    message = str(error.value)
    assert message.startswith("command line: [master] http: tcp:8750 listens on all addresses")
    assert "/etc/taskmesh/api-token" in message


def test_tap_rejects_public_http_without_token() -> None:
    options = master_tap.Options(environ={}, require_signing=False)

    with pytest.raises(usage.UsageError, match="http_token_file is required"):
        options.parseOptions(["--http", "tcp:0"])


def test_other_address_with_token_accepted(tmp_path: Path) -> None:
    write_token(tmp_path)
    path = write_config(
        tmp_path, "[master]\nhttp = tcp:8750:interface=0.0.0.0\nhttp_token_file = api-token\n"
    )

    settings = load(path)

    assert settings.http_endpoint == "tcp:8750:interface=0.0.0.0"
    assert settings.http_token == TOKEN


def test_ssl_endpoint_checks_interface(tmp_path: Path) -> None:
    certificate = CertificateAuthority.create("api CA").issue("localhost", dns_names=("localhost",))
    certificate.write_pem(tmp_path / "api.pem", tmp_path / "api.key")
    keys = f"privateKey={tmp_path / 'api.key'}:certKey={tmp_path / 'api.pem'}"

    local = load(None, **{"master.http": f"ssl:8750:{keys}:interface=127.0.0.1"})
    with pytest.raises(ConfigError, match="listens on all addresses"):
        load(None, **{"master.http": f"ssl:8750:{keys}"})

    assert local.http_token is None


def test_unknown_listening_counts_as_public() -> None:
    assert describe_public_listening("no-such-endpoint-type:1") == (
        "listens on addresses that taskmesh cannot determine"
    )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_token_file_shared_mode_rejected(tmp_path: Path, mode: int) -> None:
    token_file = write_token(tmp_path, mode=mode)
    path = write_config(tmp_path, "[master]\nhttp_token_file = api-token\n")

    with pytest.raises(ConfigError) as error:
        load(path)

    message = str(error.value)
    assert message.startswith(f"{path}: [master] http_token_file: {token_file} has mode")
    assert f"mode {mode:04o}," in message
    assert message.endswith(f"run chmod 600 {token_file}")
    assert TOKEN not in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_token_file_owner_only_mode_accepted(tmp_path: Path, mode: int) -> None:
    write_token(tmp_path, mode=mode)
    path = write_config(tmp_path, "[master]\nhttp_token_file = api-token\n")

    assert load(path).http_token == TOKEN


def test_short_token_rejected(tmp_path: Path) -> None:
    token_file = write_token(tmp_path, "x" * 31)
    path = write_config(tmp_path, "[master]\nhttp_token_file = api-token\n")

    with pytest.raises(ConfigError) as error:
        load(path)

    message = str(error.value)
    assert f"{token_file} has a token of 31 characters, fewer than the minimum of 32" in message
    assert f"head -c 32 /dev/urandom | base64 > {token_file}" in message
    assert "x" * 31 not in message


def test_token_of_32_characters_accepted(tmp_path: Path) -> None:
    write_token(tmp_path, "y" * 32)
    path = write_config(tmp_path, "[master]\nhttp_token_file = api-token\n")

    assert load(path).http_token == "y" * 32


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "is empty: expected one token"),
        ("  \n", "is empty: expected one token"),
        (f"{TOKEN} {TOKEN}", "contains spaces, line breaks or characters"),
        (f"{TOKEN}\n{TOKEN}", "contains spaces, line breaks or characters"),
    ],
)
def test_invalid_token_content_rejected(tmp_path: Path, content: str, expected: str) -> None:
    token_file = tmp_path / "api-token"
    token_file.write_text(content, encoding="ascii")
    token_file.chmod(0o600)
    path = write_config(tmp_path, "[master]\nhttp_token_file = api-token\n")

    with pytest.raises(ConfigError, match=expected) as error:
        load(path)

    assert str(token_file) in str(error.value)


def test_non_ascii_token_rejected(tmp_path: Path) -> None:
    token_file = tmp_path / "api-token"
    token_file.write_bytes(b"\xc3\xa9" * 20)
    token_file.chmod(0o600)
    path = write_config(tmp_path, "[master]\nhttp_token_file = api-token\n")

    with pytest.raises(ConfigError, match="contains bytes that are not ASCII"):
        load(path)


def test_missing_token_file_rejected(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[master]\nhttp_token_file = api-token\n")

    with pytest.raises(ConfigError) as error:
        load(path)

    message = str(error.value)
    token_file = tmp_path / "api-token"
    assert message.startswith(f"{path}: [master] http_token_file: {token_file} not found")
    assert "head -c 32 /dev/urandom | base64" in message


def test_service_site_enforces_token(tmp_path: Path) -> None:
    write_token(tmp_path)
    path = write_config(
        tmp_path,
        "[master]\nhttp = tcp:0:interface=127.0.0.1\nhttp_token_file = api-token\n"
        "database = :memory:\n",
    )
    reactor = MemoryReactorClock()
    connection = FakeConnectionService(FakeBroker().connect(), [])

    root = master_tap.build_master_service(load(path), connection, clock=reactor, reactor=reactor)

    site = root.getServiceNamed("http").factory
    rejected = call(site, "GET", "/status")
    accepted = call(site, "GET", "/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert rejected.status == 401
    assert accepted.status == 200


# -- HTTP ------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_700_000_000)
    return clock


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    broker = FakeBroker()
    yield broker
    assert broker.handler_failures == []


@pytest.fixture
def master(clock: Clock, broker: FakeBroker) -> Iterator[MasterService]:
    service = MasterService(broker.connect(), NAMESPACE, clock=clock, default_timeout=30.0)
    service.startService()
    yield service
    service.stopService()
    assert clock.getDelayedCalls() == []


@pytest.fixture
def site(master: MasterService) -> Site:
    return make_http_site(master, token=TOKEN)


def authorized(site: Site, method: str, path: str, body: bytes | None = None) -> Response:
    return call(site, method, path, body, headers={"Authorization": f"Bearer {TOKEN}"})


def assert_unauthorized(response: Response) -> None:
    assert response.status == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": UNAUTHORIZED_MESSAGE}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/status"),
        ("GET", "/slaves"),
        ("GET", "/tasks"),
        ("GET", "/tasks/3f2a7c1e-8d4b-4f6a-9c2e-1b5d7e9f0a42"),
        ("POST", "/tasks/3f2a7c1e-8d4b-4f6a-9c2e-1b5d7e9f0a42/cancel"),
        ("GET", "/no/such/path"),
        ("DELETE", "/tasks"),
    ],
)
def test_request_without_token_is_401(site: Site, method: str, path: str) -> None:
    assert_unauthorized(call(site, method, path))


def test_post_without_token_dispatches_nothing(
    site: Site, master: MasterService, broker: FakeBroker
) -> None:
    response = call(site, "POST", "/tasks", b'{"task": "sleep", "args": {}}')

    assert_unauthorized(response)
    assert master.recent_requests() == []
    assert master.stats["dispatched"] == 0


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN.lower()}",
        "Bearer",
        f"Basic {TOKEN}",
        TOKEN,
    ],
)
def test_request_with_wrong_token_is_401(site: Site, header: str) -> None:
    assert_unauthorized(call(site, "GET", "/status", headers={"Authorization": header}))


def test_request_with_token_is_200(site: Site) -> None:
    response = authorized(site, "GET", "/status")

    assert response.status == 200
    assert response.json()["namespace"] == NAMESPACE


def test_bearer_scheme_case_insensitive(site: Site) -> None:
    response = call(site, "GET", "/slaves", headers={"Authorization": f"bearer {TOKEN}"})

    assert response.status == 200


def test_post_with_token_dispatches(site: Site, master: MasterService) -> None:
    response = authorized(site, "POST", "/tasks", b'{"task": "sleep", "args": {}}')

    assert response.status == 202
    assert master.stats["dispatched"] == 1


def test_no_token_configured_accepts_all(master: MasterService) -> None:
    site = make_http_site(master)

    plain = call(site, "GET", "/status")
    with_header = call(site, "GET", "/status", headers={"Authorization": "Bearer anything"})

    assert plain.status == 200
    assert with_header.status == 200
    assert plain.json()["stats"]["http_unauthorized"] == 0


def test_rejections_counted_in_stats(site: Site) -> None:
    call(site, "GET", "/status")
    call(site, "GET", "/tasks", headers={"Authorization": "Bearer wrong"})

    stats = authorized(site, "GET", "/status").json()["stats"]

    assert stats["http_unauthorized"] == 2


def test_rejections_logged_rate_limited(site: Site, clock: Clock) -> None:
    with capturedLogs() as events:
        for _ in range(8):
            call(site, "GET", "/status", headers={"Authorization": "Bearer wrong-token"})
        clock.advance(61)
        call(site, "GET", "/slaves")

    rejected = [e for e in events if e.get("log_format", "").startswith("rejected HTTP API")]
    summaries = [e for e in events if "were counted but not logged" in e.get("log_format", "")]
    assert len(rejected) == 6
    assert rejected[0]["problem"] == "wrong token"
    assert rejected[0]["path"] == "/status"
    # StringTransport's default peer address.
    assert rejected[0]["client"] == "192.168.1.1"
    assert rejected[-1]["problem"] == "no Authorization header"
    assert [summary["count"] for summary in summaries] == [3]


def test_token_never_logged(site: Site) -> None:
    with capturedLogs() as events:
        call(site, "GET", "/status", headers={"Authorization": f"Bearer {TOKEN}x"})
        authorized(site, "GET", "/status")

    for event in events:
        assert TOKEN not in repr(event)


@pytest.mark.parametrize("token", ["", "two words", "line\nbreak", "caf\u00e9"])
def test_site_rejects_invalid_token(master: MasterService, token: str) -> None:
    with pytest.raises(ValueError, match="the API token"):
        make_http_site(master, token=token)


# -- taskmesh command ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep proxies configured on the machine away from 127.0.0.1, and start
    # without an API address or token from the environment.
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("TASKMESH_API", "TASKMESH_API_TOKEN", "TASKMESH_API_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


async def run_command(argv: list[str], *, token: str | None = TOKEN) -> int:
    """
    Run ``main`` in a thread against a master site on 127.0.0.1 that
    requires ``token``, and return its exit status.
    """
    from twisted.internet import reactor

    broker = FakeBroker()
    connection: FakeConnection = broker.connect()
    master = MasterService(connection, NAMESPACE, clock=reactor)
    master.startService()
    site = make_http_site(master, token=token)
    # Site is unannotated in Twisted 26.10, so mypy cannot see that it is a ServerFactory.
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    api = f"http://127.0.0.1:{address.port}"
    try:
        code: int = await deferToThread(main, ["--api", api, *argv])
    finally:
        await maybeDeferred(port.stopListening)
        await master.stopService()
    assert broker.handler_failures == []
    return code


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]  # pytest-twisted is untyped
async def test_cli_token_file_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token_file = write_token(tmp_path)

    code = await run_command(["--token-file", str(token_file), "slaves"])

    assert code == 0
    assert capsys.readouterr().out == "no live slaves\n"


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]  # pytest-twisted is untyped
async def test_cli_token_file_after_command(tmp_path: Path) -> None:
    token_file = write_token(tmp_path)

    assert await run_command(["slaves", "--token-file", str(token_file)]) == 0


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]  # pytest-twisted is untyped
async def test_cli_token_file_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKMESH_API_TOKEN_FILE", str(write_token(tmp_path)))

    assert await run_command(["slaves"]) == 0


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]  # pytest-twisted is untyped
async def test_cli_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKMESH_API_TOKEN", TOKEN + "\n")

    assert await run_command(["slaves"]) == 0


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]  # pytest-twisted is untyped
async def test_cli_token_file_group_readable(tmp_path: Path) -> None:
    token_file = write_token(tmp_path, mode=0o640)

    assert await run_command(["--token-file", str(token_file), "slaves"]) == 0


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]  # pytest-twisted is untyped
async def test_cli_token_file_option_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong_file = tmp_path / "wrong-token"
    wrong_file.write_text("w" * 44, encoding="ascii")
    monkeypatch.setenv("TASKMESH_API_TOKEN_FILE", str(wrong_file))
    monkeypatch.setenv("TASKMESH_API_TOKEN", "w" * 44)

    from_option = await run_command(["--token-file", str(write_token(tmp_path)), "slaves"])
    from_file_variable = await run_command(["slaves"])

    assert from_option == 0
    assert from_file_variable == 2
    assert f"rejected the API token from $TASKMESH_API_TOKEN_FILE {wrong_file}" in (
        capsys.readouterr().err
    )


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]  # pytest-twisted is untyped
async def test_cli_missing_token_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = await run_command(["status"])

    error = capsys.readouterr().err
    assert code == 2
    assert f"the master responded 401: {UNAUTHORIZED_MESSAGE}" in error
    assert "The master requires an API token." in error
    assert "--token-file PATH or $TASKMESH_API_TOKEN_FILE" in error
    assert "$TASKMESH_API_TOKEN." in error


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]  # pytest-twisted is untyped
async def test_cli_wrong_token_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TASKMESH_API_TOKEN", "wrong-token")

    code = await run_command(["submit", "sleep"])

    error = capsys.readouterr().err
    assert code == 2
    assert "The master rejected the API token from $TASKMESH_API_TOKEN." in error
    assert "[master] http_token_file" in error
    assert "wrong-token" not in error


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]  # pytest-twisted is untyped
async def test_cli_token_sent_to_open_master(tmp_path: Path) -> None:
    token_file = write_token(tmp_path)

    assert await run_command(["--token-file", str(token_file), "slaves"], token=None) == 0


def test_cli_unreadable_token_file_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"

    code = main(["--token-file", str(missing), "slaves"])

    assert code == 2
    assert capsys.readouterr().err == f"taskmesh: error: --token-file: {missing} not found\n"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("two words", "$TASKMESH_API_TOKEN contains spaces, line breaks or characters"),
        ("   ", "$TASKMESH_API_TOKEN is empty"),
    ],
)
def test_cli_invalid_token_variable_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: str,
    expected: str,
) -> None:
    monkeypatch.setenv("TASKMESH_API_TOKEN", value)

    code = main(["slaves"])

    assert code == 2
    assert expected in capsys.readouterr().err


def test_cli_empty_token_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "api-token"
    token_file.write_text("\n", encoding="ascii")

    code = main(["--token-file", str(token_file), "slaves"])

    assert code == 2
    assert f"--token-file: {token_file} is empty" in capsys.readouterr().err


def test_cli_help_names_token_sources(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0

    output = capsys.readouterr().out
    assert "--token-file PATH" in output
    assert "$TASKMESH_API_TOKEN_FILE" in output
    assert "$TASKMESH_API_TOKEN," in output
