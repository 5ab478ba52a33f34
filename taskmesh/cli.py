"""
The ``taskmesh`` command: submit tasks to a master and inspect it over its HTTP API.

The command is a plain synchronous HTTP client (``urllib``) and needs no
reactor. It talks to the API that ``make_http_site`` serves.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TextIO

from taskmesh import __version__
from taskmesh._api_token import TokenFileError, check_token, read_token_file
from taskmesh._messages import DispatchMode, validate_slave_id, validate_tags, validate_task_name

DEFAULT_API = "http://127.0.0.1:8750"
API_ENVIRONMENT_VARIABLE = "TASKMESH_API"
TOKEN_FILE_ENVIRONMENT_VARIABLE = "TASKMESH_API_TOKEN_FILE"
TOKEN_ENVIRONMENT_VARIABLE = "TASKMESH_API_TOKEN"

# Seconds between polls of a submitted request.
POLL_INTERVAL = 0.2
# Seconds to wait for one HTTP response from the master.
HTTP_TIMEOUT = 10.0

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

_EPILOG = f"""\
exit status:
  0  the command worked; for submit, the task succeeded on every slave
  1  the task failed, timed out, expired or was cancelled; show or cancel
     found no such request; cancel found the request already ended; or the
     master is not connected to the broker
  2  invalid arguments, the master rejected the request as invalid, or the
     master requires an API token that was missing or wrong
  3  the master's API is unreachable or did not respond with JSON
  130  interrupted (Ctrl-C); a submitted request continues on the master

The API address comes from --api, else ${API_ENVIRONMENT_VARIABLE}, else {DEFAULT_API}.
A master with [master] http_token_file needs its token in every request. The
token comes from the file named by --token-file, else from the file named by
${TOKEN_FILE_ENVIRONMENT_VARIABLE}, else from ${TOKEN_ENVIRONMENT_VARIABLE}, and never from
the command line.
"""


class UsageError(Exception):
    """
    An invalid argument; the command exits with EXIT_USAGE.
    """


class ApiUnreachable(Exception):
    """
    The API could not be reached or did not respond with JSON.
    """


class ApiError(Exception):
    """
    The API responded with an HTTP error status and a JSON error message.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ApiClient:
    """
    A synchronous client for the master's JSON API.
    """

    def __init__(
        self, base_url: str, timeout: float = HTTP_TIMEOUT, *, token: str | None = None
    ) -> None:
        """
        Args:
            base_url: the API's URL, such as ``http://127.0.0.1:8750``.
            timeout: seconds to wait for each response.
            token: the bearer token to send, or ``None`` to send none.
        """
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._token = token

    def get(self, path: str) -> Any:
        """
        Return the decoded JSON body of ``GET path``.

        Raises:
            ApiUnreachable: the API cannot be reached or did not respond with JSON.
            ApiError: the API responded with a status of 400 or higher.
        """
        return self._request("GET", path, None)

    def post(self, path: str, payload: Any) -> Any:
        """
        Send ``payload`` as JSON with ``POST path`` and return the decoded response.

        Raises:
            ApiUnreachable: the API cannot be reached or did not respond with JSON.
            ApiError: the API responded with a status of 400 or higher.
        """
        return self._request("POST", path, json.dumps(payload).encode("utf-8"))

    def _request(self, method: str, path: str, body: bytes | None) -> Any:
        url = self.base_url + path
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("Accept", "application/json")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if self._token is not None:
            # An unredirected header is not sent again if a redirect leads
            # to another server.
            request.add_unredirected_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                return self._decode(url, response.read())
        except urllib.error.HTTPError as e:
            try:
                payload = self._decode(url, e.read())
            except ApiUnreachable:
                raise ApiUnreachable(
                    f"the server at {url} responded {e.code} {e.reason} without a JSON body;"
                    " check that it is a taskmesh master"
                ) from None
            finally:
                e.close()
            message = payload.get("error") if isinstance(payload, dict) else None
            raise ApiError(e.code, str(message or e.reason)) from None
        except urllib.error.URLError as e:
            raise ApiUnreachable(
                f"cannot reach the taskmesh master API at {url}: {e.reason}"
            ) from None
        except TimeoutError:
            raise ApiUnreachable(
                f"the taskmesh master API at {url} did not respond within {self._timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            # For example a connection reset or a response that is not HTTP.
            raise ApiUnreachable(f"cannot reach the taskmesh master API at {url}: {e!r}") from None

    @staticmethod
    def _decode(url: str, body: bytes) -> Any:
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiUnreachable(
                f"the server at {url} did not respond with JSON; check that it is a taskmesh master"
            ) from None


@dataclass
class _ReplyPrinter:
    """
    Print what changed in each slave's progress, result or error between
    successive snapshots of one request.
    """

    output: TextIO
    width: int = 0
    progress: dict[str, tuple[float, str]] = field(default_factory=dict)
    replied: set[str] = field(default_factory=set)
    attempts: set[tuple[str, int]] = field(default_factory=set)

    def update(self, record: dict[str, Any]) -> None:
        attempts = [a for a in record.get("attempts", []) if isinstance(a, dict)]
        slave_ids = [
            *record.get("expected", []),
            *(str(attempt.get("slave_id", "")) for attempt in attempts),
            *record.get("progress", {}),
            *record.get("results", {}),
            *record.get("errors", {}),
        ]
        self.width = max([self.width, *(len(slave_id) for slave_id in slave_ids)])

        for attempt in attempts:
            key = (str(attempt.get("slave_id", "")), int(attempt.get("attempt", 0)))
            if key in self.attempts:
                continue
            self.attempts.add(key)
            redelivered = " (redelivered)" if attempt.get("redelivered") else ""
            self._print_line(key[0], "started", f"attempt {key[1]}{redelivered}")

        for slave_id, report in sorted(record.get("progress", {}).items()):
            current = (float(report.get("percent", 0.0)), str(report.get("message", "")))
            if slave_id in self.replied or self.progress.get(slave_id) == current:
                continue
            self.progress[slave_id] = current
            self._print_line(slave_id, f"{current[0]:3.0f}%", current[1])

        for slave_id, result in sorted(record.get("results", {}).items()):
            if slave_id not in self.replied:
                self.replied.add(slave_id)
                self._print_line(slave_id, "result", json.dumps(result, sort_keys=True))

        for slave_id, error in sorted(record.get("errors", {}).items()):
            if slave_id not in self.replied:
                self.replied.add(slave_id)
                self._print_line(
                    slave_id, "error ", f"{error.get('error_type')}: {error.get('message')}"
                )

    def _print_line(self, slave_id: str, column: str, text: str) -> None:
        print(f"{slave_id:<{self.width}}  {column}  {text}".rstrip(), file=self.output, flush=True)


def _submit(client: ApiClient, options: argparse.Namespace, output: TextIO) -> int:
    try:
        validate_task_name(options.task)
    except ValueError as e:
        raise UsageError(str(e)) from None
    args = _parse_args_json(options.args_json)

    payload: dict[str, Any] = {"task": options.task, "args": args}
    payload.update(_delivery_fields(options))
    accepted = client.post("/tasks", payload)
    if not isinstance(accepted, dict) or not isinstance(accepted.get("request_id"), str):
        raise ApiUnreachable(
            f"the server at {client.base_url}/tasks responded without a request_id;"
            " check that it is a taskmesh master"
        )
    request_id = accepted["request_id"]
    print(_describe_submission(request_id, options, accepted), file=output, flush=True)
    _warn_if_no_slave_matches(client, options)

    printer = _ReplyPrinter(output)
    try:
        while True:
            try:
                record = client.get(f"/tasks/{request_id}")
            except ApiError as e:
                if e.status == 404:
                    raise ApiError(
                        404,
                        f"request {request_id} is no longer known to the master at"
                        f" {client.base_url}; the master may have restarted",
                    ) from None
                raise
            printer.update(record)
            if record.get("state") != "pending":
                break
            time.sleep(options.poll_interval)
    except KeyboardInterrupt:
        print(
            f"stopped waiting; request {request_id} continues on the master."
            f" Check it with: taskmesh show {request_id}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED

    state = record.get("state")
    print(f"{state}: {record.get('reason', '')}", file=output)
    missing = record.get("missing") or []
    if missing:
        print(f"missing: {', '.join(missing)}", file=output)
    return EXIT_SUCCEEDED if state == "succeeded" else EXIT_FAILED


def _warn_if_no_slave_matches(client: ApiClient, options: argparse.Namespace) -> None:
    """
    Warn on standard error when no live slave can run the task.

    The master still waits, because a matching slave may start later, so
    this is a warning and not an error.
    """
    requested_slave = options.slave
    requested_tags = _parse_tags(options.tags or [])
    if requested_slave is None and not requested_tags:
        return
    try:
        live = client.get("/slaves").get("slaves", [])
    except (ApiError, ApiUnreachable, AttributeError):
        return
    matching = [
        slave
        for slave in live
        if (requested_slave is None or slave.get("slave_id") == requested_slave)
        and all((slave.get("tags") or {}).get(name) == value for name, value in requested_tags.items())
    ]
    if matching:
        return
    requested = f"slave {requested_slave}" if requested_slave else "slave with tag " + ", ".join(
        f"{name}={value}" for name, value in requested_tags.items()
    )
    names = ", ".join(str(slave.get("slave_id")) for slave in live) or "none"
    print(
        f"taskmesh: warning: no live {requested} (live slaves: {names}); the task waits until"
        " its time-to-live ends unless such a slave starts",
        file=sys.stderr,
        flush=True,
    )


def _delivery_fields(options: argparse.Namespace) -> dict[str, Any]:
    """
    Return the ``POST /tasks`` fields for the delivery options on the command
    line. The master chooses the options that are left out.

    Raises:
        UsageError: the options do not fit together.
    """
    fields: dict[str, Any] = {}
    mode = options.mode
    if options.slave is not None:
        if mode is None:
            mode = DispatchMode.DIRECT.value
        elif mode != DispatchMode.DIRECT.value:
            raise UsageError(f"--slave is only for --mode direct, not --mode {mode}")
    if mode == DispatchMode.DIRECT.value and options.slave is None:
        raise UsageError("--mode direct needs --slave ID, the slave to run the task")
    tags = _parse_tags(options.tags or [])
    if tags and mode == DispatchMode.DIRECT.value:
        raise UsageError("--tag cannot be combined with --mode direct, which names its slave")
    if len(tags) > 1 and mode == DispatchMode.QUEUE.value:
        raise UsageError(
            "--mode queue selects slaves by at most one --tag, because each tag has its own"
            " work queue"
        )
    if options.timeout is not None and options.ttl is not None and options.ttl > options.timeout:
        raise UsageError(
            f"--ttl {options.ttl:g} is longer than --timeout {options.timeout:g}. Give a ttl"
            " up to the timeout, because the master stops waiting at the deadline"
        )

    if mode is not None:
        fields["mode"] = mode
    if options.slave is not None:
        fields["slave"] = options.slave
    if tags:
        fields["tags"] = tags
    if options.timeout is not None:
        fields["timeout"] = options.timeout
    if options.ttl is not None:
        fields["ttl"] = options.ttl
    if options.max_attempts is not None:
        fields["max_attempts"] = options.max_attempts
    return fields


def _parse_tags(items: Sequence[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals:
            raise UsageError(f"invalid --tag {item!r}: expected NAME=VALUE, for example role=db")
        if name in tags:
            raise UsageError(f"--tag {name} is given twice")
        tags[name] = value
    try:
        return validate_tags(tags)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _describe_submission(
    request_id: str, options: argparse.Namespace, accepted: dict[str, Any]
) -> str:
    mode = accepted.get("mode", DispatchMode.BROADCAST.value)
    tags = _parse_tags(options.tags or [])
    if mode == DispatchMode.QUEUE.value:
        if tags:
            [(name, value)] = tags.items()
            return (
                f"request {request_id}: task {options.task} queued for one slave with the"
                f" tag {name}={value}"
            )
        return f"request {request_id}: task {options.task} queued for one slave"
    if mode == DispatchMode.DIRECT.value:
        return f"request {request_id}: task {options.task} queued for slave {options.slave}"

    expected = list(accepted.get("expected", []))
    if expected:
        return (
            f"request {request_id}: task {options.task} sent to {len(expected)}"
            f" live slave{'s' if len(expected) != 1 else ''}: {', '.join(expected)}"
        )
    if tags:
        return (
            f"request {request_id}: task {options.task} sent, but no live slave has the tags"
            f" {', '.join(f'{name}={value}' for name, value in tags.items())};"
            " waiting for replies until the deadline"
        )
    return (
        f"request {request_id}: task {options.task} sent, but no slave is live;"
        " waiting for replies until the deadline"
    )


def _parse_args_json(text: str) -> dict[str, Any]:
    if text == "-":
        text = sys.stdin.read()
    try:
        args = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise UsageError(f"invalid ARGS_JSON {text!r}: {e}") from None
    if not isinstance(args, dict):
        raise UsageError(
            f"ARGS_JSON must be a JSON object such as '{{\"seconds\": 5}}', not {text!r}"
        )
    return args


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _show(client: ApiClient, options: argparse.Namespace, output: TextIO) -> int:
    try:
        uuid.UUID(options.request_id)
    except ValueError:
        raise UsageError(f"invalid request id {options.request_id!r}: expected a UUID") from None
    try:
        record = client.get(f"/tasks/{options.request_id}")
    except ApiError as e:
        if e.status == 404:
            print(f"taskmesh: {e.message}", file=sys.stderr)
            return EXIT_FAILED
        raise

    mode = str(record.get("mode", DispatchMode.BROADCAST.value))
    rows = [
        ("request", str(record.get("request_id", options.request_id))),
        ("task", str(record.get("task", "-"))),
        ("args", json.dumps(record.get("args", {}), sort_keys=True)),
        ("mode", mode),
    ]
    if record.get("slave"):
        rows.append(("slave", str(record["slave"])))
    tags = record.get("tags") or {}
    if tags:
        rows.append(("tags", ", ".join(f"{name}={value}" for name, value in sorted(tags.items()))))
    rows += [
        ("state", str(record.get("state", "-"))),
        ("reason", record.get("reason") or "-"),
        ("created", _format_time(record.get("created_at"))),
        ("start by", _format_time(record.get("start_by"))),
        ("deadline", _format_time(record.get("deadline"))),
        ("finished", _format_time(record.get("finished_at"))),
        ("expected", ", ".join(record.get("expected", [])) or "-"),
        ("missing", ", ".join(record.get("missing", [])) or "-"),
        ("attempts", _describe_attempts(record, mode)),
    ]
    _print_table(rows, output)

    printer = _ReplyPrinter(output)
    if (
        record.get("attempts")
        or record.get("progress")
        or record.get("results")
        or record.get("errors")
    ):
        print("", file=output)
        printer.update(record)
    return EXIT_SUCCEEDED


def _describe_attempts(record: dict[str, Any], mode: str) -> str:
    count = len(record.get("attempts", []))
    max_attempts = record.get("max_attempts")
    if mode == DispatchMode.BROADCAST.value or not isinstance(max_attempts, int):
        return f"{count} started"
    return f"{count} started, at most {max_attempts} without a result"


def _cancel(client: ApiClient, options: argparse.Namespace, output: TextIO) -> int:
    try:
        uuid.UUID(options.request_id)
    except ValueError:
        raise UsageError(f"invalid request id {options.request_id!r}: expected a UUID") from None
    payload = {} if options.reason is None else {"reason": options.reason}
    try:
        record = client.post(f"/tasks/{options.request_id}/cancel", payload)
    except ApiError as e:
        if e.status in (404, 409):
            print(f"taskmesh: {e.message}", file=sys.stderr)
            return EXIT_FAILED
        raise
    print(f"{record.get('state', '-')}: {record.get('reason', '')}", file=output)
    return EXIT_SUCCEEDED


def _slaves(client: ApiClient, options: argparse.Namespace, output: TextIO) -> int:
    body = client.get("/slaves")
    slaves = body.get("slaves", [])
    if not slaves:
        print("no live slaves", file=output)
        return EXIT_SUCCEEDED
    now = body.get("time")
    rows = [("SLAVE", "HOST", "PID", "TASKS", "LAST SEEN")]
    for slave in slaves:
        last_seen = slave.get("last_seen")
        if isinstance(now, (int, float)) and isinstance(last_seen, (int, float)):
            seen = f"{max(0.0, now - last_seen):.0f} s ago"
        else:
            seen = "-"
        rows.append(
            (
                str(slave.get("slave_id", "")),
                str(slave.get("hostname") or "-"),
                str(slave.get("pid") or "-"),
                ", ".join(slave.get("tasks", [])) or "-",
                seen,
            )
        )
    _print_table(rows, output)
    return EXIT_SUCCEEDED


def _status(client: ApiClient, options: argparse.Namespace, output: TextIO) -> int:
    status = client.get("/status")
    connected = bool(status.get("broker_connected"))
    if connected:
        broker = "connected"
    else:
        broker = f"not connected: {status.get('broker_last_error') or 'no session established yet'}"
    rows = [
        ("api", client.base_url),
        ("version", str(status.get("version", "-"))),
        ("namespace", str(status.get("namespace", "-"))),
        ("broker", broker),
        ("live slaves", str(status.get("live_slaves", "-"))),
        ("pending", str(status.get("pending_requests", "-"))),
    ]
    _print_table(rows, output)
    stats = status.get("stats", {})
    if stats:
        print("", file=output)
        _print_table([(name, str(value)) for name, value in sorted(stats.items())], output)
    return EXIT_SUCCEEDED if connected else EXIT_FAILED


def _print_table(rows: Sequence[Sequence[str]], output: TextIO) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        print("  ".join(cells).rstrip(), file=output)


def _format_time(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    milliseconds = int(value % 1 * 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value)) + f".{milliseconds:03d}"


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"timeout must be a positive number of seconds, not {text!r}"
        )
    return value


def _positive_ttl(text: str) -> float:
    try:
        return _positive_seconds(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"ttl must be a positive number of seconds, not {text!r}"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _slave_id(text: str) -> str:
    try:
        return validate_slave_id(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _api_url(text: str) -> str:
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UsageError(
            f"invalid API URL {text!r}: expected http://HOST:PORT, for example {DEFAULT_API}"
        )
    return text.rstrip("/")


@dataclass(frozen=True)
class _ApiToken:
    """
    The API token to send, and where it came from for messages.
    """

    value: str = field(repr=False)
    source: str


def _api_token(token_file: str | None, environ: Mapping[str, str]) -> _ApiToken | None:
    """
    Read the API token from ``--token-file``, else from the file named by
    ``$TASKMESH_API_TOKEN_FILE``, else from ``$TASKMESH_API_TOKEN``.

    Raises:
        UsageError: the file cannot be read, or the token is empty or has
            characters other than visible ASCII.
    """
    sources = [
        ("--token-file", token_file),
        (f"${TOKEN_FILE_ENVIRONMENT_VARIABLE}", environ.get(TOKEN_FILE_ENVIRONMENT_VARIABLE)),
    ]
    for name, path in sources:
        if not path:
            continue
        # Unlike the master, the command accepts a file that a group may
        # read, so that operators can share one copy of the token.
        try:
            from_file = read_token_file(path, owner_only=False)
        except TokenFileError as e:
            raise UsageError(f"{name}: {e}") from None
        return _ApiToken(from_file, f"{name} {path}")

    from_environment = environ.get(TOKEN_ENVIRONMENT_VARIABLE)
    if not from_environment:
        return None
    name = f"${TOKEN_ENVIRONMENT_VARIABLE}"
    try:
        # A token pasted into the variable may end with a line break.
        return _ApiToken(check_token(from_environment.strip()), name)
    except ValueError as e:
        raise UsageError(f"{name} {e}") from None


def _describe_unauthorized(token: _ApiToken | None) -> str:
    if token is None:
        return (
            "The master requires an API token. Pass the file that contains it with"
            f" --token-file PATH or ${TOKEN_FILE_ENVIRONMENT_VARIABLE}, or the token itself in"
            f" ${TOKEN_ENVIRONMENT_VARIABLE}. The master reads its token from the file named by"
            " [master] http_token_file."
        )
    return (
        f"The master rejected the API token from {token.source}. Check that it is the token"
        " in the file named by the master's [master] http_token_file."
    )


def build_parser() -> argparse.ArgumentParser:
    """
    Build the parser for the ``taskmesh`` command and its subcommands.
    """
    parser = argparse.ArgumentParser(
        prog="taskmesh",
        description="Submit tasks to a taskmesh master and inspect it through its HTTP API.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"taskmesh {__version__}")
    api_help = (
        f"URL of the master's HTTP API (default: ${API_ENVIRONMENT_VARIABLE} or {DEFAULT_API})"
    )
    parser.add_argument("--api", help=api_help)
    token_file_help = (
        "file that contains the API token of a master with [master] http_token_file"
        f" (default: ${TOKEN_FILE_ENVIRONMENT_VARIABLE}, else the token in"
        f" ${TOKEN_ENVIRONMENT_VARIABLE}, else no token)"
    )
    parser.add_argument("--token-file", metavar="PATH", help=token_file_help)
    # Subcommands accept --api and --token-file too; SUPPRESS keeps them from
    # overwriting a value given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api", default=argparse.SUPPRESS, help=api_help)
    common.add_argument(
        "--token-file", metavar="PATH", default=argparse.SUPPRESS, help=token_file_help
    )

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    submit = commands.add_parser(
        "submit",
        parents=[common],
        help="run a task on slaves and wait for the outcome",
        description="Run a task on every live slave (broadcast), on one slave from a work"
        " queue (--mode queue) or on one named slave (--slave ID), print starts, progress"
        " and results as they arrive, and exit 0 only if the request succeeded.",
    )
    submit.add_argument("task", metavar="TASK", help="task name, for example sleep")
    submit.add_argument(
        "args_json",
        metavar="ARGS_JSON",
        nargs="?",
        default="{}",
        help="task arguments as a JSON object, for example '{\"seconds\": 5}'"
        " (default: {}; '-' reads them from standard input)",
    )
    submit.add_argument(
        "--mode",
        choices=[mode.value for mode in DispatchMode],
        help="broadcast: every live slave runs the task; queue: one slave from the work"
        " queue runs it; direct: the slave named by --slave runs it (default: broadcast,"
        " or direct with --slave)",
    )
    submit.add_argument(
        "--slave",
        type=_slave_id,
        metavar="ID",
        help="id of the slave that runs a direct task",
    )
    submit.add_argument(
        "--tag",
        dest="tags",
        action="append",
        metavar="NAME=VALUE",
        help="run the task only on slaves with this tag; repeat for more tags"
        " (at most one with --mode queue)",
    )
    submit.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="seconds the master waits for replies (default: the master's default timeout)",
    )
    submit.add_argument(
        "--ttl",
        type=_positive_ttl,
        metavar="SECONDS",
        help="seconds within which a slave must start the task; at most the timeout"
        " (default: the master's default_ttl, else the timeout)",
    )
    submit.add_argument(
        "--max-attempts",
        type=_positive_int,
        metavar="N",
        help="starts of a queue or direct task without a result that the master allows;"
        " one more start fails the request as a poison message"
        " (default: the master's max_attempts)",
    )
    submit.set_defaults(run=_submit)

    slaves = commands.add_parser("slaves", parents=[common], help="list the live slaves")
    slaves.set_defaults(run=_slaves)

    status = commands.add_parser(
        "status",
        parents=[common],
        help="show the master's version, broker connection and counters;"
        " exits 1 if the master is not connected to the broker",
    )
    status.set_defaults(run=_status)

    show = commands.add_parser(
        "show", parents=[common], help="show one request with its starts, replies and state"
    )
    show.add_argument("request_id", metavar="REQUEST_ID", help="request id printed by submit")
    show.set_defaults(run=_show)

    cancel = commands.add_parser(
        "cancel",
        parents=[common],
        help="cancel a pending request and tell the slaves to drop it;"
        " exits 1 if the request is unknown or has already ended",
    )
    cancel.add_argument("request_id", metavar="REQUEST_ID", help="request id printed by submit")
    cancel.add_argument(
        "--reason",
        metavar="TEXT",
        help="why the request is cancelled, kept with the request"
        " (default: cancelled through the HTTP API)",
    )
    cancel.set_defaults(run=_cancel)
    return parser


def main(argv: Sequence[str] | None = None, *, poll_interval: float = POLL_INTERVAL) -> int:
    """
    Run the ``taskmesh`` command and return its exit status.

    ``poll_interval`` is the number of seconds between polls of a submitted
    request.
    """
    parser = build_parser()
    try:
        options = parser.parse_args(argv)
    except SystemExit as e:
        # argparse exits for --help and --version, and with status 2 (EXIT_USAGE)
        # for invalid arguments.
        return e.code if isinstance(e.code, int) else EXIT_USAGE

    options.poll_interval = poll_interval
    run: Callable[[ApiClient, argparse.Namespace, TextIO], int] = options.run
    token: _ApiToken | None = None
    try:
        api = _api_url(options.api or os.environ.get(API_ENVIRONMENT_VARIABLE) or DEFAULT_API)
        token = _api_token(options.token_file, os.environ)
        client = ApiClient(api, token=None if token is None else token.value)
        return run(client, options, sys.stdout)
    except UsageError as e:
        print(f"taskmesh: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ApiUnreachable as e:
        print(
            f"taskmesh: error: {e}\nCheck that the master is running and that --api"
            f" or ${API_ENVIRONMENT_VARIABLE} points to its HTTP API.",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except ApiError as e:
        print(f"taskmesh: error: the master responded {e.status}: {e.message}", file=sys.stderr)
        if e.status == 401:
            print(_describe_unauthorized(token), file=sys.stderr)
        return EXIT_USAGE if 400 <= e.status < 500 and e.status != 404 else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (for example "| head"): stop
        # quietly, and keep Python from reporting the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
