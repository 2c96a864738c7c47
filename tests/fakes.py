"""A fake clock and a fake transport, for driving the drainer's loop without HTTP or waiting.

Time passes only when the code under test waits: a read that would block, a poll for
replies, a sleep. Replies come from a script per URL path, each after its own delay on that
clock. Redis and the database stay real.
"""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from django.utils import timezone

from delivery.clock import Clock
from delivery.transport import Limits, Request, Response, Transport


class FakeClock(Clock):
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def read_block_ms(self, wanted_ms: int) -> int:
        self.now += wanted_ms / 1000
        return 0


@dataclass(frozen=True)
class Answer:
    status: int | None = 200
    after: float = 0.01  # seconds on the fake clock
    retry_after: float | None = None


class FakeTransport(Transport):
    """The Transport interface; answers come from `answer(request)` after their delay."""

    def __init__(self, clock: FakeClock, answer: Callable[[Request], Answer] = lambda request: Answer()) -> None:
        self.clock = clock
        self.answer = answer
        self.sent: list[Request] = []
        self.abandoned = 0
        self._out: deque[tuple[float, object, Request, Answer]] = deque()

    @property
    def in_flight(self) -> int:
        return len(self._out)

    def start(self, request: Request, limits: Limits, token: object) -> None:
        answer = self.answer(request)
        self.sent.append(request)
        self._out.append((self.clock.now + answer.after, token, request, answer))

    def poll(self, timeout: float) -> list[tuple[object, Response]]:
        """Replies due by now; if none, the clock moves to the next one (within `timeout`)."""
        if self._out and not self._due():
            self.clock.now = min(self.clock.now + timeout, min(ready for ready, *_ in self._out))
        elif not self._out:
            self.clock.now += timeout
        landed = self._due()
        for item in landed:
            self._out.remove(item)
        return [(token, self._reply(answer)) for _, token, _, answer in landed]

    def abandon(self) -> None:
        self.abandoned += len(self._out)
        self._out.clear()

    def close(self) -> None:
        self._out.clear()

    def _due(self) -> list[tuple[float, object, Request, Answer]]:
        return [item for item in self._out if item[0] <= self.clock.now]

    @staticmethod
    def _reply(answer: Answer) -> Response:
        if answer.status is None:
            return Response(timezone.now(), None, answer.after * 1000, error="timed out", transient=True)
        return Response(timezone.now(), answer.status, answer.after * 1000, "ok", "", answer.retry_after)
