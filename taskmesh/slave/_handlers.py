"""
Task handlers: the registry, progress reporting, operator handler loading and
the built-in ``echo`` and ``sleep`` tasks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, TypeVar

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.python import threadable

from taskmesh._messages import validate_task_name

HANDLER_ENTRY_POINT_GROUP = "taskmesh.handlers"
BUILTIN_TASKS = ("echo", "sleep")
MAX_SLEEP_SECONDS = 3600

HandlerFunction = Callable[[dict[str, Any], "ProgressReporter"], Any]
_Function = TypeVar("_Function", bound=Callable[..., Any])


class InvalidArguments(ValueError):
    """
    Raised by a handler whose task arguments are invalid.

    The slave replies with error_type ``InvalidArguments`` and the exception's
    message, which should name the argument, the expected value and the value
    received.
    """


class HandlerLoadError(ValueError):
    """
    An operator handler could not be imported or registered.
    """


class ProgressReporter:
    """
    Sender of progress reports for one running task.

    :meth:`report` may be called from the handler's thread pool thread and
    from the reactor thread.
    """

    def __init__(self, send: Callable[[float, str], None], reactor: IReactorFromThreads) -> None:
        self._send = send
        self._reactor = reactor

    def report(self, percent: float, message: str = "") -> None:
        """
        Report that the task is ``percent`` (0 to 100) complete.

        The slave may merge reports that come faster than it sends them, and
        ignores reports made after the task finished.

        Raises:
            ValueError: ``percent`` is not a number between 0 and 100.
            TypeError: ``message`` is not a string.
        """
        if (
            isinstance(percent, bool)
            or not isinstance(percent, (int, float))
            or not math.isfinite(percent)
            or not 0 <= percent <= 100
        ):
            raise ValueError(
                f"progress percent must be a number between 0 and 100, got {percent!r}"
            )
        if not isinstance(message, str):
            raise TypeError(f"progress message must be a str, not {type(message).__name__}")
        if threadable.isInIOThread():  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
            self._send(float(percent), message)
        else:
            self._reactor.callFromThread(self._send, float(percent), message)


@dataclass(frozen=True)
class Handler:
    """
    A registered task handler.

    A blocking handler runs in the slave's thread pool. A non-blocking one
    runs on the reactor thread and may return a Deferred or a coroutine.
    """

    name: str
    function: HandlerFunction
    blocking: bool


class HandlerRegistry:
    """
    The task handlers of one slave, by task name.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, function: HandlerFunction, *, blocking: bool = True) -> None:
        """
        Register ``function`` as the handler of the task ``name``.

        The slave calls it as ``function(args, progress)`` and sends its
        return value, which must be JSON-serializable, as the task's result.

        Raises:
            ValueError: ``name`` is not a valid task name or is already
                registered, or ``function`` is a coroutine function
                registered with ``blocking=True``.
            TypeError: ``function`` is not callable.
        """
        validate_task_name(name)
        if not callable(function):
            raise TypeError(f"handler for task {name!r} is not callable: {function!r}")
        if blocking and inspect.iscoroutinefunction(function):
            raise ValueError(
                f"handler for task {name!r} is a coroutine function:"
                " register it with blocking=False"
            )
        if name in self._handlers:
            existing = self._handlers[name].function
            raise ValueError(f"task {name!r} already has a handler: {existing!r}")
        self._handlers[name] = Handler(name, function, blocking)

    def get(self, name: str) -> Handler | None:
        """
        Return the handler of the task ``name``, or ``None`` if there is none.
        """
        return self._handlers.get(name)

    def names(self) -> tuple[str, ...]:
        """
        Return the registered task names, sorted.
        """
        return tuple(sorted(self._handlers))

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __len__(self) -> int:
        return len(self._handlers)


def non_blocking(function: _Function) -> _Function:
    """
    Mark an operator handler that returns a Deferred, so that the slave calls
    it on the reactor thread instead of in its thread pool.

    Coroutine functions need no mark: they are always non-blocking.
    """
    # load_operator_handlers reads this marker.
    function.taskmesh_blocking = False  # type: ignore[attr-defined]  # functions accept attributes
    return function


@dataclass(frozen=True)
class HandlerSpec:
    """
    An operator handler loaded from the configuration or an entry point.

    ``source`` names where it came from, for error messages.
    """

    name: str
    function: HandlerFunction
    blocking: bool
    source: str


def load_operator_handlers(
    configured: Mapping[str, str],
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> list[HandlerSpec]:
    """
    Import the handlers named in the ``[handlers]`` configuration and in the
    ``taskmesh.handlers`` entry-point group.

    ``configured`` maps task names to ``package.module:function``. An entry
    point's name is its task name. A coroutine function, or one marked with
    :func:`non_blocking`, is non-blocking. Every other handler is blocking.
    ``entry_points`` defaults to the installed ones.

    Raises:
        HandlerLoadError: a module or function cannot be imported, a task
            name is invalid, or two handlers (including the built-in ones)
            have the same task name.
    """
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=HANDLER_ENTRY_POINT_GROUP)

    specs: dict[str, HandlerSpec] = {}
    for entry_point in entry_points:
        source = f"entry point {entry_point.name!r} ({entry_point.value})"
        function = _load_entry_point(entry_point, source)
        _add_spec(specs, entry_point.name, function, source)
    for name, target in configured.items():
        source = f"[handlers] {name} = {target}"
        function = _import_function(target, source)
        _add_spec(specs, name, function, source)
    return list(specs.values())


def _add_spec(specs: dict[str, HandlerSpec], name: str, function: Any, source: str) -> None:
    try:
        validate_task_name(name)
    except ValueError as e:
        raise HandlerLoadError(f"cannot register handler from {source}: {e}") from None
    if name in BUILTIN_TASKS:
        raise HandlerLoadError(
            f"cannot register handler from {source}: {name!r} is a built-in task."
            " Choose another task name"
        )
    if name in specs:
        raise HandlerLoadError(
            f"cannot register handler from {source}: task {name!r} already has"
            f" a handler from {specs[name].source}"
        )
    if not callable(function):
        raise HandlerLoadError(
            f"cannot register handler from {source}: {function!r} is not callable"
        )
    blocking = getattr(function, "taskmesh_blocking", True) and not inspect.iscoroutinefunction(
        function
    )
    specs[name] = HandlerSpec(name, function, bool(blocking), source)


def _load_entry_point(entry_point: importlib.metadata.EntryPoint, source: str) -> Any:
    try:
        return entry_point.load()
    except Exception as e:
        raise HandlerLoadError(
            f"cannot load handler from {source}: {type(e).__name__}: {e}"
        ) from e


def _import_function(target: str, source: str) -> Any:
    module_name, _, attribute_path = target.partition(":")
    if not module_name or not attribute_path:
        raise HandlerLoadError(
            f"cannot load handler from {source}: expected 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise HandlerLoadError(
            f"cannot load handler from {source}: importing module {module_name!r}"
            f" failed with {type(e).__name__}: {e}"
        ) from e

    value: Any = module
    for attribute in attribute_path.split("."):
        try:
            value = getattr(value, attribute)
        except AttributeError:
            raise HandlerLoadError(
                f"cannot load handler from {source}: module {module_name!r}"
                f" has no attribute {attribute_path!r}"
            ) from None
    return value


def register_builtin_handlers(registry: HandlerRegistry, clock: IReactorTime) -> None:
    """
    Register the built-in ``echo`` and ``sleep`` tasks.

    ``sleep`` waits on ``clock``, so a test can drive it with ``task.Clock``.
    """
    registry.register("echo", echo, blocking=False)

    async def sleep(args: dict[str, Any], progress: ProgressReporter) -> dict[str, Any]:
        return await sleep_on_clock(clock, args, progress)

    registry.register("sleep", sleep, blocking=False)


def echo(args: dict[str, Any], progress: ProgressReporter) -> dict[str, Any]:
    """
    Return the task arguments unchanged.
    """
    return args


async def sleep_on_clock(
    clock: IReactorTime, args: Mapping[str, Any], progress: ProgressReporter
) -> dict[str, Any]:
    """
    Wait ``args["seconds"]`` seconds on ``clock`` and return ``{"slept": seconds}``.

    Progress is reported after every whole second and at the end.

    Raises:
        InvalidArguments: ``seconds`` is missing or not a number between 0
            and 3600, or an unknown argument was given.
    """
    unknown = sorted(set(args) - {"seconds"})
    if unknown:
        raise InvalidArguments(
            f"unknown argument(s) {', '.join(repr(a) for a in unknown)}: sleep takes only 'seconds'"
        )
    if "seconds" not in args:
        raise InvalidArguments("missing argument 'seconds': expected a number between 0 and 3600")
    seconds = args["seconds"]
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or not 0 <= seconds <= MAX_SLEEP_SECONDS
    ):
        raise InvalidArguments(
            f"seconds must be a number between 0 and {MAX_SLEEP_SECONDS}, got {seconds!r}"
        )

    started = clock.seconds()
    whole_seconds = math.floor(seconds)
    for elapsed in range(1, whole_seconds + 1):
        await deferLater(clock, max(0.0, started + elapsed - clock.seconds()))
        progress.report(100.0 * elapsed / seconds, f"slept {elapsed} of {seconds} s")
    if seconds != whole_seconds or seconds == 0:
        await deferLater(clock, max(0.0, started + seconds - clock.seconds()))
        progress.report(100.0, f"slept {seconds} of {seconds} s")
    return {"slept": seconds}
