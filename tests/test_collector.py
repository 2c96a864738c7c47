"""A worker collects garbage on a timer, not on Python's allocation counter."""

import gc
import time
import weakref

import pytest

from delivery import collector


class Node:
    def __init__(self) -> None:
        self.other: object = None


@pytest.fixture
def worker_collector(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    collector.take_over_from_the_allocation_counter()
    yield now
    gc.unfreeze()
    gc.enable()


def a_cycle() -> weakref.ref[Node]:
    one, two = Node(), Node()
    one.other, two.other = two, one
    return weakref.ref(one)


def test_taking_over_turns_the_automatic_collector_off_and_sets_aside_what_exists(worker_collector):
    assert not gc.isenabled()
    assert gc.get_freeze_count() > 0


def test_a_cycle_waits_for_the_next_young_collection_a_second_later(worker_collector):
    cycle = a_cycle()
    collector.collect_when_due()
    assert cycle() is not None  # not due yet: nothing collected

    worker_collector[0] += collector.YOUNG_EVERY_SECONDS
    collector.collect_when_due()

    assert cycle() is None


def test_everything_is_collected_at_least_once_a_minute(worker_collector, monkeypatch):
    collected: list[int] = []

    def collect(generation: int = 2) -> int:
        collected.append(generation)
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    worker_collector[0] += collector.FULL_EVERY_SECONDS

    collector.collect_when_due()

    assert collected == [2]


def test_outside_a_worker_python_keeps_its_own_collector():
    assert gc.isenabled()
    collector.collect_when_due()
    assert gc.isenabled()
