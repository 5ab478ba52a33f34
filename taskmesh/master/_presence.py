"""
The live slaves of a namespace, as their announcements describe them.
"""

from __future__ import annotations

from typing import Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskmesh._messages import Announcement, SlaveState, matches_selector

from ._records import SlaveInfo

# A slave that sends no announcement for this many of its announced intervals
# is dropped from the live slaves.
MISSED_INTERVALS = 3


class SlaveRegistry:
    """
    The live slaves, updated from announcements and expired by silence.

    The registry counts ``announcements`` and ``slaves_expired`` in
    ``stats``, the master's counter dictionary.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, stats: dict[str, int]) -> None:
        self._clock = clock
        self._stats = stats
        self._slaves: dict[str, SlaveInfo] = {}

    def on_announcement(self, announcement: Announcement) -> None:
        """
        Add, refresh or remove a slave from its announcement.
        """
        self._stats["announcements"] += 1
        slave_id = announcement.slave_id
        known = self._slaves.get(slave_id)
        if announcement.state is SlaveState.DOWN:
            if self._slaves.pop(slave_id, None) is not None:
                self.log.info("slave {slave_id} went down", slave_id=slave_id)
            return

        now = self._clock.seconds()
        self._slaves[slave_id] = SlaveInfo(
            slave_id=slave_id,
            hostname=announcement.hostname,
            pid=announcement.pid,
            tasks=announcement.tasks,
            tags=dict(announcement.tags),
            interval=announcement.interval,
            first_seen=known.first_seen if known is not None else now,
            last_seen=now,
        )
        if known is None or announcement.state is SlaveState.UP:
            self.log.info(
                "slave {slave_id} is {state} on {hostname} (pid {pid}) with tasks {tasks}",
                slave_id=slave_id,
                state=announcement.state.value,
                hostname=announcement.hostname or "an unknown host",
                pid=announcement.pid,
                tasks=", ".join(announcement.tasks) or "(none)",
            )

    def expire(self) -> None:
        """
        Drop the slaves that missed MISSED_INTERVALS announcements.
        """
        now = self._clock.seconds()
        for slave in list(self._slaves.values()):
            silence = now - slave.last_seen
            if silence > MISSED_INTERVALS * slave.interval:
                del self._slaves[slave.slave_id]
                self._stats["slaves_expired"] += 1
                self.log.warn(
                    "dropped slave {slave_id}: no announcement for {seconds:.0f} s,"
                    " {missed} times its interval of {interval} s",
                    slave_id=slave.slave_id,
                    seconds=silence,
                    missed=MISSED_INTERVALS,
                    interval=slave.interval,
                )

    def live(self) -> list[SlaveInfo]:
        """
        Return the live slaves sorted by slave id.
        """
        return [self._slaves[slave_id] for slave_id in sorted(self._slaves)]

    def matching(self, selector: Mapping[str, str]) -> frozenset[str]:
        """
        Return the ids of the live slaves whose tags match ``selector``.
        """
        return frozenset(
            slave.slave_id
            for slave in self._slaves.values()
            if matches_selector(slave.tags, selector)
        )
