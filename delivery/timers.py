"""Deadlines kept in a heap: the next one is found in O(1), each added or fired in O(log n).

The transport has one deadline per request in flight (its read timeout). Walking every request
on every turn of the loop to find the few that are late would make each turn cost as much as
the requests in flight; a heap makes it cost as much as the deadlines that are due.

Deadlines are never removed early: a request that finishes leaves its entry behind, and the
owner says, when the entry comes due, whether it still counts (`is_live`). Each item has at
most a handful of entries over its life, so the heap stays within a small multiple of the
items alive.
"""

import heapq
import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Deadlines(Generic[T]):
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()  # breaks ties without comparing items

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, due: float, item: T) -> None:
        heapq.heappush(self._heap, (due, next(self._order), item))

    def next_due(self) -> float | None:
        """When the earliest deadline falls (it may belong to an item no longer live)."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, is_live: Callable[[T], bool]) -> list[T]:
        """The live items whose deadline has come, earliest first; dead entries are dropped."""
        due: list[T] = []
        while self._heap and self._heap[0][0] <= now:
            item = heapq.heappop(self._heap)[2]
            if is_live(item):
                due.append(item)
        return due

    def clear(self) -> None:
        self._heap.clear()
