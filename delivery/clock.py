"""Clocks for delivery: this process's monotonic clock, and its estimate of Redis's clock.

Every time kept in Redis (due times, leases, open circuits) is on Redis's clock, so that
workers on machines whose clocks disagree still agree on when a try is due (docs/decisions.md,
"Redis's clock"). A worker never needs its own wall clock for that: it measures intervals
on its monotonic clock, and reads Redis's time from the replies of scripts it runs anyway
(each returns `TIME`), carrying that reading forward on the monotonic clock.

Tests drive delivery with a fake `Clock` (see tests/fakes.py): time passes when the code
waits, not in the world.
"""

import time

from redis import Redis


class Clock:
    """This process's monotonic clock, and how the drainer waits on it."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def read_block_ms(self, wanted_ms: int) -> int:
        """How long a blocking read from Redis may wait for new entries: this clock lets Redis
        do the waiting (a fake one passes the time itself and lets the read return at once)."""
        return wanted_ms


class RedisClock:
    """An estimate of Redis's clock, in Unix seconds: its last reading plus the monotonic
    time since. A reading taken between asking and hearing back is placed halfway, so the
    estimate is off by half a round trip at most (well under a millisecond on a LAN)."""

    def __init__(self, connection: Redis, clock: Clock) -> None:
        self.connection = connection
        self.clock = clock
        self._offset: float | None = None  # Redis's time minus the monotonic clock, in seconds

    def asking(self) -> float:
        """Note before sending a command whose reply carries Redis's time; pass to `heard`."""
        return self.clock.monotonic()

    def heard(self, redis_ms: int, asked_at: float) -> None:
        """Take a reading of Redis's time (ms) from a reply to a command sent at `asked_at`."""
        self._offset = redis_ms / 1000 - (asked_at + self.clock.monotonic()) / 2

    def now(self) -> float:
        """Redis's time now, in Unix seconds (asks Redis once if nothing was observed yet)."""
        if self._offset is None:
            asked_at = self.asking()
            seconds, microseconds = self.connection.time()
            self.heard(int(seconds) * 1000 + int(microseconds) // 1000, asked_at)
        assert self._offset is not None
        return self.clock.monotonic() + self._offset

    def in_seconds(self, when: float) -> float:
        """How long from now until a time on Redis's clock (negative once it has passed)."""
        return when - self.now()
