"""The deadline heap behind the transport's read timeouts, and a slot's read-deadline
arithmetic, without a receiver."""

import pycurl

from delivery.timers import Deadlines
from delivery.transport import Limits, Request, Transport, _Slot


def test_the_earliest_deadline_is_known_without_looking_at_the_rest():
    deadlines: Deadlines[str] = Deadlines()
    for due, item in [(5.0, "e"), (1.0, "a"), (3.0, "c")]:
        deadlines.add(due, item)

    assert deadlines.next_due() == 1.0
    assert len(deadlines) == 3


def test_only_the_deadlines_that_fell_come_out_earliest_first():
    deadlines: Deadlines[str] = Deadlines()
    for due, item in [(5.0, "e"), (1.0, "a"), (3.0, "c"), (3.0, "d")]:
        deadlines.add(due, item)

    assert deadlines.pop_due(3.0, lambda item: True) == ["a", "c", "d"]
    assert deadlines.next_due() == 5.0
    assert deadlines.pop_due(4.9, lambda item: True) == []


def test_entries_of_items_no_longer_live_are_dropped_when_they_fall():
    deadlines: Deadlines[str] = Deadlines()
    deadlines.add(1.0, "finished")
    deadlines.add(2.0, "waiting")

    assert deadlines.pop_due(10.0, lambda item: item != "finished") == ["waiting"]
    assert len(deadlines) == 0
    assert deadlines.next_due() is None


def test_equal_deadlines_never_compare_their_items():
    deadlines: Deadlines[object] = Deadlines()
    one, two = object(), object()  # not orderable
    deadlines.add(1.0, one)
    deadlines.add(1.0, two)

    assert deadlines.pop_due(1.0, lambda item: True) == [one, two]


class FakeHandle:
    """Stands in for a libcurl handle's timing and size figures."""

    def __init__(self) -> None:
        self.info = {
            pycurl.STARTTRANSFER_TIME: 0.0,
            pycurl.PRETRANSFER_TIME: 0.0,
            pycurl.HEADER_SIZE: 0,
            pycurl.SIZE_DOWNLOAD_T: 0,
        }

    def getinfo(self, what: int) -> float:
        return self.info[what]


LIMITS = Limits(connect_timeout=5, read_timeout=10, total_timeout=60, body_max_bytes=100)


def slot_started_at(started: float) -> tuple[_Slot, FakeHandle]:
    slot = _Slot((), "", pycurl.CurlShare(), Transport(())._shards[0])
    slot.load(Request("p", 1, "GET", "http://127.0.0.1/", None), LIMITS, token=None, host="127.0.0.1", step=0)
    slot.started = slot.looked_at = started
    handle = FakeHandle()
    slot.handle = handle  # type: ignore[assignment]
    return slot, handle


def test_a_request_still_connecting_is_looked_at_again_a_read_timeout_later():
    slot, _ = slot_started_at(100.0)

    assert slot.read_deadline(now=110.0) == 120.0


def test_the_read_clock_runs_from_the_request_being_sent():
    slot, handle = slot_started_at(100.0)
    handle.info[pycurl.PRETRANSFER_TIME] = 3.0  # sent at 103

    assert slot.read_deadline(now=110.0) == 113.0
    assert slot.read_deadline(now=113.0) is None  # nothing came: timed out


def test_a_body_byte_moves_the_deadline_to_a_read_timeout_after_it():
    slot, handle = slot_started_at(100.0)
    handle.info[pycurl.PRETRANSFER_TIME] = 0.001
    handle.info[pycurl.STARTTRANSFER_TIME] = 1.0  # headers at 101
    handle.info[pycurl.HEADER_SIZE] = 80
    slot.on_body(b"x")
    slot.last_body_at = 107.0

    assert slot.read_deadline(now=110.0) == 117.0


def test_headers_that_came_at_once_time_out_a_read_timeout_after_the_first_byte():
    slot, handle = slot_started_at(100.0)
    handle.info[pycurl.PRETRANSFER_TIME] = 0.001
    handle.info[pycurl.STARTTRANSFER_TIME] = 1.0  # the head at 101
    handle.info[pycurl.HEADER_SIZE] = 80

    assert slot.read_deadline(now=110.0) == 111.0
    assert slot.read_deadline(now=111.0) is None


def test_headers_that_trickle_count_as_moving_since_the_look_before():
    slot, handle = slot_started_at(100.0)
    handle.info[pycurl.PRETRANSFER_TIME] = 0.001
    handle.info[pycurl.STARTTRANSFER_TIME] = 1.0  # first header byte at 101
    handle.info[pycurl.HEADER_SIZE] = 10
    assert slot.read_deadline(now=110.0) == 111.0

    handle.info[pycurl.HEADER_SIZE] = 11  # one more byte, some time after the look at 110
    assert slot.read_deadline(now=111.0) == 120.0
    assert slot.read_deadline(now=119.0) == 120.0
    assert slot.read_deadline(now=120.0) is None  # nothing more since
