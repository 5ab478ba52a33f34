"""
Rate limiting for repeated warnings of both daemons.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

# Each kind of unmatched or invalid message is logged individually this many
# times per window of LOG_WINDOW seconds. The rest are counted and summarised
# once per window.
LOGGED_PER_WINDOW = 5
LOG_WINDOW = 60.0


class LogRateLimiter:
    """
    Decide which repeated events get a log line of their own.

    Per kind of event, the first ``limit`` events of each ``window`` seconds
    are logged and the rest counted. :meth:`flush` logs one summary line per
    kind for each window that had suppressed events.
    """

    def __init__(
        self,
        log: Logger,
        clock: IReactorTime,
        limit: int = LOGGED_PER_WINDOW,
        window: float = LOG_WINDOW,
    ) -> None:
        self.log = log
        self._clock = clock
        self._limit = limit
        self._window = window
        # kind -> [window start, events logged, events suppressed]
        self._windows: dict[str, list[float]] = {}

    def should_log(self, kind: str) -> bool:
        now = self._clock.seconds()
        counts = self._windows.get(kind)
        if counts is None or now - counts[0] >= self._window:
            self._summarise(kind)
            counts = self._windows[kind] = [now, 0, 0]
        if counts[1] < self._limit:
            counts[1] += 1
            return True
        counts[2] += 1
        return False

    def flush(self) -> None:
        now = self._clock.seconds()
        for kind, counts in list(self._windows.items()):
            if now - counts[0] >= self._window:
                self._summarise(kind)
                del self._windows[kind]

    def _summarise(self, kind: str) -> None:
        counts = self._windows.get(kind)
        if counts is not None and counts[2]:
            self.log.warn(
                "{count} more {kind} in the last {seconds:.0f} s were counted but not logged",
                count=int(counts[2]),
                kind=kind,
                seconds=self._clock.seconds() - counts[0],
            )
