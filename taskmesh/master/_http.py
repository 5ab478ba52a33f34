"""
The master's JSON API over HTTP, built on ``twisted.web.resource``.

Endpoints:

- ``POST /tasks`` with ``{"task": "sleep", "args": {...}, "timeout": 30}``
  dispatches a task and responds 202 with its ``request_id``.
- ``GET /tasks/<request_id>`` returns one request, ``GET /tasks`` recent ones.
- ``GET /slaves`` returns the live slaves.
- ``GET /status`` returns the version, the broker connection and counters.

Every response, errors included, is ``application/json``; errors have the form
``{"error": "..."}``.
"""

# twisted.web's Request, Resource and Site are unannotated (Twisted 26.10), so
# every call into them would otherwise be reported.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import math
from io import BytesIO
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from taskmesh import __version__
from taskmesh._messages import new_request_id, validate_task_name

from ._service import MasterService, RequestRecord, SlaveInfo, TaskState

# Maximum size of a request body in bytes; larger bodies get 413.
MAX_BODY_SIZE = 1024 * 1024

_POST_FIELDS = ("task", "args", "timeout")


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
            " /slaves and /status"
        )
        return _respond(request, 404, {"error": message})


class _RootResource(_JsonResource):
    def __init__(self, master: MasterService) -> None:
        super().__init__()
        self.putChild(b"tasks", _TasksResource(master))
        self.putChild(b"slaves", _SlavesResource(master))
        self.putChild(b"status", _StatusResource(master))

    def render_GET(self, request: Request) -> bytes:
        return _respond(
            request,
            200,
            {
                "endpoints": [
                    "POST /tasks",
                    "GET /tasks",
                    "GET /tasks/<request_id>",
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
            task, args, timeout = _parse_task_request(body)
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
            self._master.dispatch(task, args, timeout=timeout, request_id=request_id)
        except ValueError as e:
            return _respond(request, 400, {"error": str(e)})

        record = self._master.get_request(request_id)
        request.setHeader(b"location", f"/tasks/{request_id}".encode("ascii"))
        return _respond(
            request,
            202,
            {
                "request_id": request_id,
                "expected": list(record.expected) if record is not None else [],
                "deadline": record.deadline if record is not None else None,
            },
        )

    def _too_large(self, request: Request) -> bytes:
        return _respond(
            request,
            413,
            {"error": f"request body is larger than the maximum of {MAX_BODY_SIZE} bytes"},
        )


def _parse_task_request(body: bytes) -> tuple[str, dict[str, Any], float | None]:
    """
    Parse a ``POST /tasks`` body into task name, arguments and timeout.

    Raises:
        _BadRequest: the body is not valid JSON or a field is missing or invalid.
    """
    try:
        payload = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise _BadRequest(f"request body is not valid UTF-8: {e}") from None
    except ValueError as e:
        raise _BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise _BadRequest(
            'request body must be a JSON object such as {"task": "sleep", "args": {}},'
            f" not {_json_type(payload)}"
        )

    unknown = sorted(set(payload) - set(_POST_FIELDS))
    if unknown:
        raise _BadRequest(
            f"unknown field {unknown[0]!r}: expected only 'task', 'args' and 'timeout'"
        )

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

    timeout = payload.get("timeout")
    if timeout is not None:
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise _BadRequest(
                f"field 'timeout' must be a positive number of seconds, not {json.dumps(timeout)}"
            )
        timeout = float(timeout)
    return task, args, timeout


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

    def render_GET(self, request: Request) -> bytes:
        record = self._master.get_request(self._request_id)
        if record is None:
            message = (
                f"request {self._request_id} not found; the master keeps pending"
                " requests and the most recent finished ones"
            )
            return _respond(request, 404, {"error": message})
        return _respond(request, 200, _describe_record(record))


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
    def __init__(self, master: MasterService) -> None:
        super().__init__()
        self._master = master

    def render_GET(self, request: Request) -> bytes:
        connection = self._master.connection
        pending = [r for r in self._master.recent_requests() if r.state is TaskState.PENDING]
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
                "pending_requests": len(pending),
                "stats": self._master.stats,
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
        "state": record.state.value,
        "expected": list(record.expected),
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
        "state": record.state.value,
        "expected": list(record.expected),
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
        "created_at": record.created_at,
        "deadline": record.deadline,
        "finished_at": record.finished_at,
    }


def make_http_site(master: MasterService) -> Site:
    """
    Build the HTTP API site for ``master``; the caller listens on an endpoint.

    The site uses the master's clock for its connection timeouts.
    """
    site = Site(_RootResource(master), requestFactory=_ApiRequest, reactor=master.clock)
    site.displayTracebacks = False
    return site
