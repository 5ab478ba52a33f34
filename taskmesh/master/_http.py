"""
The master's JSON API over HTTP, built on ``twisted.web.resource``.

Endpoints:

- ``POST /tasks`` with ``{"task": "sleep", "args": {...}, "timeout": 30}``
  dispatches a task and responds 202 with its ``request_id``. Optional fields:
  ``mode`` (``broadcast``, ``queue`` or ``direct``), ``slave`` (the target of
  a direct task), ``tags`` (an object of tags that slaves must have), ``ttl``
  (seconds) and ``max_attempts``.
- ``GET /tasks/<request_id>`` returns one request, ``GET /tasks`` recent ones.
- ``POST /tasks/<request_id>/cancel``, optionally with ``{"reason": "..."}``,
  cancels a pending request: 200 with the request, 404 for an unknown id, 409
  for a request that has already ended.
- ``GET /slaves`` returns the live slaves.
- ``GET /status`` returns the version, the broker connection and counters.

Every response, errors included, is ``application/json``; errors have the form
``{"error": "..."}``.

When the site has a token, every request must send ``Authorization: Bearer
TOKEN``. Others get 401 with ``WWW-Authenticate: Bearer``, whatever their
path, and ``GET /status`` counts them in ``stats`` as ``http_unauthorized``.
"""

# twisted.web's Request, Resource and Site are unannotated (Twisted 26.10), so
# every call into them would otherwise be reported.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import hmac
import json
import math
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from taskmesh import __version__
from taskmesh._api_token import check_token
from taskmesh._messages import (
    DispatchMode,
    new_request_id,
    validate_slave_id,
    validate_tags,
    validate_task_name,
)

from taskmesh._log_limiter import LogRateLimiter
from ._service import (
    MasterService,
    RequestAlreadyEnded,
    RequestNotFound,
    RequestRecord,
    SlaveInfo,
    StoreError,
)

# Maximum size of a request body in bytes; larger bodies get 413.
MAX_BODY_SIZE = 1024 * 1024

_POST_FIELDS = ("task", "args", "timeout", "mode", "slave", "tags", "ttl", "max_attempts")
_CANCEL_FIELDS = ("reason",)
_MAX_REASON_LENGTH = 1000


class _ApiRequest(Request):
    """
    A request that stores at most MAX_BODY_SIZE bytes of its body.

    A larger body is discarded as it arrives, and ``body_too_large`` is set so
    that the resource responds 413. Rendering errors get a JSON 500 response.
    """

    log = Logger()
    body_too_large = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY_SIZE:
            self.body_too_large = True
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        if self.content is not None and self.content.tell() + len(data) > MAX_BODY_SIZE:
            self.body_too_large = True
            self.content = BytesIO()
            return
        super().handleContentChunk(data)

    def processingFailed(self, reason: Failure) -> Failure:
        self.log.failure(
            "unexpected error handling {method} {uri}",
            reason,
            method=self.method.decode("ascii", "replace"),
            uri=self.uri.decode("ascii", "replace"),
        )
        body = _encode({"error": "internal server error; the master's log has the details"})
        self.setResponseCode(500)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return reason


class _BadRequest(Exception):
    """
    A client error to report as 400 with this message.
    """


def _encode(body: Any) -> bytes:
    return json.dumps(body, allow_nan=False, sort_keys=True).encode("ascii") + b"\n"


def _respond(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return _encode(body)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _JsonResource(Resource):
    """
    A resource whose errors for unknown children and methods are JSON.
    """

    def render(self, request: Request) -> bytes | int:
        try:
            result: bytes | int = super().render(request)
        except UnsupportedMethod as e:
            allowed_methods: list[bytes] = list(e.allowedMethods)
            allowed = [method.decode("ascii") for method in allowed_methods]
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
            method = request.method.decode("ascii", "replace")
            message = f"method {method} is not allowed here; use {' or '.join(allowed)}"
            return _respond(request, 405, {"error": message})
        return result

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            # A trailing slash addresses the same resource.
            return self
        return _NotFound()


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        path = request.path.decode("ascii", "replace")
        message = (
            f"no such resource: {path}; the API has /tasks, /tasks/<request_id>,"
            " /tasks/<request_id>/cancel, /slaves and /status"
        )
        return _respond(request, 404, {"error": message})


class _TokenCheck:
    """
    The bearer token check of every request, with a count of the rejected
    ones.

    Rejected requests are logged through a :class:`LogRateLimiter`, which
    logs the summary of a window's suppressed lines at the next rejection
    after that window. The token itself is never logged.
    """

    log = Logger()

    def __init__(self, token: str | None, clock: IReactorTime) -> None:
        self._token = None if token is None else token.encode("ascii")
        self.rejected = 0
        self._log_limiter = LogRateLimiter(self.log, clock)

    def accepts(self, request: Request) -> bool:
        """
        Check the request's ``Authorization`` header, and count and log a
        rejection.
        """
        if self._token is None:
            return True
        problem = _token_problem(request.getHeader(b"authorization"), self._token)
        if problem is None:
            return True

        self.rejected += 1
        if self._log_limiter.should_log("rejected HTTP API requests"):
            client = request.getClientAddress()
            self.log.warn(
                "rejected HTTP API request {method} {path} from {client}: {problem}",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                client=getattr(client, "host", None) or str(client),
                problem=problem,
            )
        return False


def _token_problem(header: bytes | None, token: bytes) -> str | None:
    """
    Return why an ``Authorization`` header does not carry ``token``, or
    ``None`` when it does.
    """
    if header is None:
        return "no Authorization header"
    parts = header.split(None, 1)
    # The scheme name is case-insensitive (RFC 9110, section 11.1).
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return "the Authorization header is not 'Bearer TOKEN'"
    if not hmac.compare_digest(parts[1].strip(), token):
        return "wrong token"
    return None


class _Unauthorized(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setHeader(b"www-authenticate", b"Bearer")
        message = (
            "missing or invalid API token: send Authorization: Bearer <token from"
            " [master] http_token_file>"
        )
        return _respond(request, 401, {"error": message})


class _ApiSite(Site):
    """
    A site that responds 401 to every request that fails the token check.

    The check runs when the site looks up the resource of a request, so it
    covers every path and method. Twisted responds to ``OPTIONS *`` before
    that lookup, with an empty 200 that contains no data.
    """

    def __init__(self, root: Resource, token_check: _TokenCheck, clock: IReactorTime) -> None:
        super().__init__(root, requestFactory=_ApiRequest, reactor=clock)
        self._token_check = token_check

    def getResourceFor(self, request: Request) -> IResource:
        if not self._token_check.accepts(request):
            return _Unauthorized()
        resource: IResource = super().getResourceFor(request)
        return resource


class _RootResource(_JsonResource):
    def __init__(self, master: MasterService, token_check: _TokenCheck) -> None:
        super().__init__()
        self.putChild(b"tasks", _TasksResource(master))
        self.putChild(b"slaves", _SlavesResource(master))
        self.putChild(b"status", _StatusResource(master, token_check))

    def render_GET(self, request: Request) -> bytes:
        return _respond(
            request,
            200,
            {
                "endpoints": [
                    "POST /tasks",
                    "GET /tasks",
                    "GET /tasks/<request_id>",
                    "POST /tasks/<request_id>/cancel",
                    "GET /slaves",
                    "GET /status",
                ]
            },
        )


class _TasksResource(_JsonResource):
    def __init__(self, master: MasterService) -> None:
        super().__init__()
        self._master = master

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return self
        return _TaskResource(self._master, path.decode("ascii", "replace"))

    def render_GET(self, request: Request) -> bytes:
        records = self._master.recent_requests()
        return _respond(request, 200, {"requests": [_summarise_record(r) for r in records]})

    def render_POST(self, request: Request) -> bytes:
        if getattr(request, "body_too_large", False):
            return self._too_large(request)
        body = b""
        if request.content is not None:
            request.content.seek(0)
            body = request.content.read(MAX_BODY_SIZE + 1)
        if len(body) > MAX_BODY_SIZE:
            return self._too_large(request)

        try:
            submitted = _parse_task_request(body)
        except _BadRequest as e:
            return _respond(request, 400, {"error": str(e)})

        connection = self._master.connection
        if not self._master.running:
            return _respond(request, 503, {"error": "the master service is not running"})
        if not connection.is_connected:
            cause = connection.last_error or "no session established yet"
            return _respond(
                request,
                503,
                {"error": f"the master is not connected to the broker: {cause}"},
            )

        request_id = new_request_id()
        try:
            self._master.dispatch(
                submitted.task,
                submitted.args,
                mode=submitted.mode,
                selector=submitted.tags,
                target=submitted.slave,
                timeout=submitted.timeout,
                ttl=submitted.ttl,
                max_attempts=submitted.max_attempts,
                request_id=request_id,
            )
        except ValueError as e:
            return _respond(request, 400, {"error": str(e)})
        except StoreError as e:
            return _respond(request, 503, {"error": f"the master cannot store the request: {e}"})

        record = self._master.get_request(request_id)
        request.setHeader(b"location", f"/tasks/{request_id}".encode("ascii"))
        return _respond(
            request,
            202,
            {
                "request_id": request_id,
                "mode": submitted.mode.value,
                "expected": list(record.expected) if record is not None else [],
                "deadline": record.deadline if record is not None else None,
                "start_by": record.start_by if record is not None else None,
            },
        )

    def _too_large(self, request: Request) -> bytes:
        return _respond(
            request,
            413,
            {"error": f"request body is larger than the maximum of {MAX_BODY_SIZE} bytes"},
        )


@dataclass(frozen=True)
class _TaskRequest:
    """
    The checked fields of a ``POST /tasks`` body.
    """

    task: str
    args: dict[str, Any]
    mode: DispatchMode = DispatchMode.BROADCAST
    slave: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    ttl: float | None = None
    max_attempts: int | None = None


def _parse_task_request(body: bytes) -> _TaskRequest:
    """
    Parse and check a ``POST /tasks`` body.

    Raises:
        _BadRequest: the body is not valid JSON or a field is missing or invalid.
    """
    payload = _load_json_object(
        body, 'request body must be a JSON object such as {"task": "sleep", "args": {}}'
    )

    unknown = sorted(set(payload) - set(_POST_FIELDS))
    if unknown:
        expected = ", ".join(f"'{name}'" for name in _POST_FIELDS)
        raise _BadRequest(f"unknown field {unknown[0]!r}: expected only {expected}")

    if "task" not in payload:
        raise _BadRequest("missing field 'task': expected a task name such as \"sleep\"")
    task = payload["task"]
    if not isinstance(task, str):
        raise _BadRequest(f"field 'task' must be a string, not {_json_type(task)}")
    try:
        validate_task_name(task)
    except ValueError as e:
        raise _BadRequest(f"field 'task': {e}") from None

    args = payload.get("args", {})
    if not isinstance(args, dict):
        raise _BadRequest(f"field 'args' must be a JSON object, not {_json_type(args)}")

    mode = _parse_mode(payload.get("mode", DispatchMode.BROADCAST.value))
    slave = _parse_slave(payload.get("slave"), mode)
    tags = _parse_tags(payload.get("tags"), mode)
    return _TaskRequest(
        task=task,
        args=args,
        mode=mode,
        slave=slave,
        tags=tags,
        timeout=_parse_seconds(payload, "timeout"),
        ttl=_parse_seconds(payload, "ttl"),
        max_attempts=_parse_max_attempts(payload.get("max_attempts")),
    )


def _load_json_object(body: bytes, expected: str) -> dict[str, Any]:
    try:
        payload = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise _BadRequest(f"request body is not valid UTF-8: {e}") from None
    except ValueError as e:
        raise _BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise _BadRequest(f"{expected}, not {_json_type(payload)}")
    return payload


def _parse_mode(value: Any) -> DispatchMode:
    modes = ", ".join(f'"{mode.value}"' for mode in DispatchMode)
    if not isinstance(value, str):
        raise _BadRequest(f"field 'mode' must be one of {modes}, not {_json_type(value)}")
    try:
        return DispatchMode(value)
    except ValueError:
        raise _BadRequest(f"field 'mode' must be one of {modes}, not {json.dumps(value)}") from None


def _parse_slave(value: Any, mode: DispatchMode) -> str | None:
    if value is None:
        if mode is DispatchMode.DIRECT:
            raise _BadRequest(
                "missing field 'slave': mode \"direct\" needs the id of the slave to run the task"
            )
        return None
    if mode is not DispatchMode.DIRECT:
        raise _BadRequest(
            f"field 'slave' is only for mode \"direct\", not \"{mode.value}\". Use 'tags'"
            " to choose slaves in the other modes"
        )
    if not isinstance(value, str):
        raise _BadRequest(f"field 'slave' must be a string, not {_json_type(value)}")
    try:
        return validate_slave_id(value)
    except ValueError as e:
        raise _BadRequest(f"field 'slave': {e}") from None


def _parse_tags(value: Any, mode: DispatchMode) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _BadRequest(
            'field \'tags\' must be a JSON object such as {"role": "db"},'
            f" not {_json_type(value)}"
        )
    if not all(isinstance(tag, str) for tag in value.values()):
        raise _BadRequest("field 'tags' must map tag names to strings")
    try:
        tags = validate_tags(value)
    except ValueError as e:
        raise _BadRequest(f"field 'tags': {e}") from None
    if tags and mode is DispatchMode.DIRECT:
        raise _BadRequest(
            "field 'tags' is not allowed with mode \"direct\", which names its slave in 'slave'"
        )
    if len(tags) > 1 and mode is DispatchMode.QUEUE:
        raise _BadRequest(
            f"field 'tags' has {len(tags)} tags, but mode \"queue\" selects slaves by at most"
            " one tag, because each tag has its own work queue"
        )
    return tags


def _parse_seconds(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _BadRequest(
            f"field '{name}' must be a positive number of seconds, not {json.dumps(value)}"
        )
    return float(value)


def _parse_max_attempts(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadRequest(
            f"field 'max_attempts' must be a positive integer, not {json.dumps(value)}"
        )
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class _TaskResource(_JsonResource):
    def __init__(self, master: MasterService, request_id: str) -> None:
        super().__init__()
        self._master = master
        self._request_id = request_id

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return self
        if path == b"cancel":
            return _CancelResource(self._master, self._request_id)
        return _NotFound()

    def render_GET(self, request: Request) -> bytes:
        record = self._master.get_request(self._request_id)
        if record is None:
            message = (
                f"request {self._request_id} not found; the master keeps pending"
                " requests and the most recent finished ones"
            )
            return _respond(request, 404, {"error": message})
        return _respond(request, 200, _describe_record(record))


class _CancelResource(_JsonResource):
    def __init__(self, master: MasterService, request_id: str) -> None:
        super().__init__()
        self._master = master
        self._request_id = request_id

    def render_POST(self, request: Request) -> bytes:
        body = b""
        if request.content is not None:
            request.content.seek(0)
            body = request.content.read(MAX_BODY_SIZE + 1)
        if getattr(request, "body_too_large", False) or len(body) > MAX_BODY_SIZE:
            return _respond(
                request,
                413,
                {"error": f"request body is larger than the maximum of {MAX_BODY_SIZE} bytes"},
            )
        try:
            reason = _parse_cancel_request(body)
        except _BadRequest as e:
            return _respond(request, 400, {"error": str(e)})
        if not self._master.running:
            return _respond(request, 503, {"error": "the master service is not running"})

        try:
            record = self._master.cancel(self._request_id, reason)
        except RequestNotFound:
            message = (
                f"request {self._request_id} not found; the master keeps pending"
                " requests and the most recent finished ones"
            )
            return _respond(request, 404, {"error": message})
        except RequestAlreadyEnded as e:
            body_409 = _describe_record(e.record)
            body_409["error"] = str(e)
            return _respond(request, 409, body_409)
        return _respond(request, 200, _describe_record(record))


def _parse_cancel_request(body: bytes) -> str:
    """
    Return the cancel reason from an optional ``{"reason": "..."}`` body.

    Raises:
        _BadRequest: the body is not a JSON object or the reason is invalid.
    """
    default = "cancelled through the HTTP API"
    if not body.strip():
        return default
    payload = _load_json_object(
        body, 'request body must be empty or a JSON object such as {"reason": "wrong input"}'
    )
    unknown = sorted(set(payload) - set(_CANCEL_FIELDS))
    if unknown:
        raise _BadRequest(f"unknown field {unknown[0]!r}: expected only 'reason'")
    reason = payload.get("reason")
    if reason is None:
        return default
    if not isinstance(reason, str):
        raise _BadRequest(f"field 'reason' must be a string, not {_json_type(reason)}")
    if len(reason) > _MAX_REASON_LENGTH:
        raise _BadRequest(
            f"field 'reason' has {len(reason)} characters, more than the maximum of"
            f" {_MAX_REASON_LENGTH}"
        )
    return reason or default


class _SlavesResource(_JsonResource):
    def __init__(self, master: MasterService) -> None:
        super().__init__()
        self._master = master

    def render_GET(self, request: Request) -> bytes:
        return _respond(
            request,
            200,
            {
                "time": self._master.clock.seconds(),
                "slaves": [_describe_slave(slave) for slave in self._master.live_slaves()],
            },
        )


class _StatusResource(_JsonResource):
    def __init__(self, master: MasterService, token_check: _TokenCheck) -> None:
        super().__init__()
        self._master = master
        self._token_check = token_check

    def render_GET(self, request: Request) -> bytes:
        connection = self._master.connection
        return _respond(
            request,
            200,
            {
                "version": __version__,
                "namespace": self._master.destinations.namespace,
                "running": bool(self._master.running),
                "broker_connected": connection.is_connected,
                "broker_last_error": connection.last_error,
                "live_slaves": len(self._master.live_slaves()),
                "pending_requests": self._master.pending_count,
                "stats": {**self._master.stats, "http_unauthorized": self._token_check.rejected},
            },
        )


def _describe_slave(slave: SlaveInfo) -> dict[str, Any]:
    return {
        "slave_id": slave.slave_id,
        "hostname": slave.hostname,
        "pid": slave.pid,
        "tasks": list(slave.tasks),
        "tags": dict(slave.tags),
        "interval": slave.interval,
        "first_seen": slave.first_seen,
        "last_seen": slave.last_seen,
    }


def _summarise_record(record: RequestRecord) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "task": record.task,
        "mode": record.mode.value,
        "state": record.state.value,
        "expected": list(record.expected),
        "attempt_count": len(record.attempts),
        "result_count": len(record.results),
        "error_count": len(record.errors),
        "missing": list(record.missing),
        "reason": record.reason,
        "created_at": record.created_at,
        "finished_at": record.finished_at,
    }


def _describe_record(record: RequestRecord) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "task": record.task,
        "args": record.args,
        "mode": record.mode.value,
        "tags": dict(record.selector),
        "slave": record.target,
        "max_attempts": record.max_attempts,
        "state": record.state.value,
        "expected": list(record.expected),
        "attempts": [
            {
                "slave_id": attempt.slave_id,
                "attempt": attempt.attempt,
                "redelivered": attempt.redelivered,
                "accepted_at": attempt.accepted_at,
            }
            for attempt in record.attempts
        ],
        "progress": {
            slave_id: {
                "percent": progress.percent,
                "message": progress.message,
                "updated_at": progress.updated_at,
            }
            for slave_id, progress in record.progress.items()
        },
        "results": dict(record.results),
        "errors": {
            slave_id: {"error_type": error_type, "message": message}
            for slave_id, (error_type, message) in record.errors.items()
        },
        "missing": list(record.missing),
        "reason": record.reason,
        "timeout": record.timeout,
        "ttl": record.ttl,
        "created_at": record.created_at,
        "start_by": record.start_by,
        "deadline": record.deadline,
        "finished_at": record.finished_at,
    }


def make_http_site(master: MasterService, *, token: str | None = None) -> Site:
    """
    Build the HTTP API site for ``master``; the caller listens on an endpoint.

    With a ``token``, every request must send ``Authorization: Bearer
    TOKEN``, and the others get 401. The site uses the master's clock for its
    connection timeouts.

    Raises:
        ValueError: the token is empty or has characters other than visible
            ASCII.
    """
    if token is not None:
        try:
            check_token(token)
        except ValueError as e:
            raise ValueError(f"the API token {e}") from None
    token_check = _TokenCheck(token, master.clock)
    site = _ApiSite(_RootResource(master, token_check), token_check, master.clock)
    site.displayTracebacks = False
    return site
