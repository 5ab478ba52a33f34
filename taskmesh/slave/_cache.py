"""
A bounded least-recently-used mapping for the slave's per-request memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Iterator, TypeVar

_Key = TypeVar("_Key")
_Value = TypeVar("_Value")


class BoundedCache(Generic[_Key, _Value]):
    """
    A mapping that evicts its least recently used entries beyond
    ``max_entries`` entries or ``max_size`` total size.

    ``size_of`` gives each value's size in the unit of ``max_size`` (for
    example bytes). A value larger than ``max_size`` on its own is not
    stored. Reading an entry with :meth:`get` makes it the most recently
    used.
    """

    def __init__(
        self,
        max_entries: int,
        *,
        max_size: int | None = None,
        size_of: Callable[[_Value], int] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries!r}")
        if (max_size is None) != (size_of is None):
            raise ValueError("max_size and size_of must be given together")
        self.max_entries = max_entries
        self.max_size = max_size
        self._size_of = size_of
        self._entries: OrderedDict[_Key, tuple[_Value, int]] = OrderedDict()
        self._size = 0
        self.evicted = 0

    def get(self, key: _Key) -> _Value | None:
        """
        Return the value stored for ``key`` and mark it as recently used, or ``None``.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: _Key, value: _Value) -> bool:
        """
        Store ``value`` for ``key`` as the most recently used entry, evicting
        the oldest entries beyond the limits.

        Returns whether the value was stored: a value larger than
        ``max_size`` is not, and removes any older value for ``key``.
        """
        self.discard(key)
        size = self._size_of(value) if self._size_of is not None else 0
        if self.max_size is not None and size > self.max_size:
            return False
        self._entries[key] = (value, size)
        self._size += size
        while len(self._entries) > self.max_entries or (
            self.max_size is not None and self._size > self.max_size
        ):
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self._size -= evicted_size
            self.evicted += 1
        return True

    def discard(self, key: _Key) -> None:
        """
        Remove ``key`` if it is stored.
        """
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._size -= entry[1]

    @property
    def size(self) -> int:
        """
        Total size of the stored values, 0 without ``size_of``.
        """
        return self._size

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[_Key]:
        return iter(self._entries)
