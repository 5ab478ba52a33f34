"""
Checks of the arguments of ``MasterService.dispatch`` and of the master's defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from taskmesh._messages import DispatchMode, Destinations, validate_slave_id, validate_tags


@dataclass(frozen=True)
class DispatchOptions:
    """
    The checked delivery options of one request.

    ``destination`` is where the task is sent: the tasks topic, a work queue
    or a slave's queue. ``timeout`` and ``ttl`` are in seconds, and ``ttl``
    is never longer than ``timeout``.
    """

    mode: DispatchMode
    selector: dict[str, str]
    target: str | None
    destination: str
    timeout: float
    ttl: float
    max_attempts: int


@dataclass(frozen=True)
class DispatchDefaults:
    """
    The master's defaults for options that a caller leaves out.

    ``ttl`` ``None`` makes the time-to-live equal to the timeout.
    """

    timeout: float
    ttl: float | None
    max_attempts: int


def check_dispatch_options(
    destinations: Destinations,
    defaults: DispatchDefaults,
    *,
    mode: DispatchMode | str,
    selector: Mapping[str, str] | None,
    target: str | None,
    timeout: float | None,
    ttl: float | None,
    max_attempts: int | None,
) -> DispatchOptions:
    """
    Check the delivery options of a request and fill in the defaults.

    Raises:
        ValueError: an option is invalid or does not fit the mode. The
            message names the option.
    """
    checked_mode = check_mode(mode)
    checked_timeout = defaults.timeout if timeout is None else check_seconds(timeout, "timeout")
    checked_selector = check_selector(selector)
    return DispatchOptions(
        mode=checked_mode,
        selector=checked_selector,
        target=target,
        destination=_choose_destination(destinations, checked_mode, checked_selector, target),
        timeout=checked_timeout,
        ttl=_choose_ttl(ttl, checked_timeout, defaults.ttl),
        max_attempts=(
            defaults.max_attempts
            if max_attempts is None
            else check_max_attempts(max_attempts, "max_attempts")
        ),
    )


def _choose_ttl(ttl: float | None, timeout: float, default_ttl: float | None) -> float:
    if ttl is None:
        return timeout if default_ttl is None else min(default_ttl, timeout)
    ttl = check_seconds(ttl, "ttl")
    if ttl > timeout:
        raise ValueError(
            f"ttl {ttl:g} s is longer than the timeout {timeout:g} s. Give a ttl up to the"
            " timeout, because the master stops waiting at the deadline"
        )
    return ttl


def _choose_destination(
    destinations: Destinations,
    mode: DispatchMode,
    selector: Mapping[str, str],
    target: str | None,
) -> str:
    if mode is DispatchMode.DIRECT:
        if target is None:
            raise ValueError("a direct task needs a target slave id")
        if not isinstance(target, str):
            raise ValueError(f"target must be a slave id, not {type(target).__name__}")
        if selector:
            raise ValueError("a direct task goes to one named slave, so it takes no selector tags")
        return destinations.direct(validate_slave_id(target))
    if target is not None:
        raise ValueError(f"target {target!r} is only for direct tasks, not {mode.value} tasks")
    if mode is DispatchMode.QUEUE:
        return destinations.work(selector)
    return destinations.tasks


def check_seconds(seconds: float, name: str) -> float:
    """
    Return ``seconds`` as a float if it is a positive, finite number.

    Raises:
        ValueError: naming ``name`` and the value.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, not {type(seconds).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {seconds!r}")
    return float(seconds)


def check_max_attempts(max_attempts: int, name: str) -> int:
    """
    Return ``max_attempts`` if it is a positive integer.

    Raises:
        ValueError: naming ``name`` and the value.
    """
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"{name} must be a positive integer, not {max_attempts!r}")
    return max_attempts


def check_mode(mode: DispatchMode | str) -> DispatchMode:
    """
    Convert a mode name such as ``"queue"`` to a :class:`DispatchMode`.

    Raises:
        ValueError: the name is not a dispatch mode.
    """
    try:
        return DispatchMode(mode)
    except ValueError:
        raise ValueError(
            f"invalid mode {mode!r}: expected one of {', '.join(m.value for m in DispatchMode)}"
        ) from None


def check_selector(selector: Mapping[str, str] | None) -> dict[str, str]:
    """
    Check selector tags and return a copy. ``None`` selects every slave.

    Raises:
        ValueError: the selector is not a mapping, or a tag is invalid.
    """
    if selector is None:
        return {}
    if not isinstance(selector, Mapping):
        raise ValueError(
            f"selector must be a mapping of tag names to values, not {type(selector).__name__}"
        )
    return validate_tags(selector)
