"""Realistic delivery history for trying and measuring the dashboard (`manage.py seedhistory`).

Hosts get Zipf-like shares of the traffic and profiles of their own (healthy, flaky, failing
with 4xx, or down for a few hours now and then, with circuit deferrals); volume follows a
daily curve; every postback gets its series of tries, retried with backoff as the engine
does. Rows are written in bulk (COPY on PostgreSQL, executemany on SQLite), each chunk in one
transaction with its rollups, so the rollups always add up to the attempts.
"""

import math
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Model

from delivery import partitions, rollups
from delivery.models import DeliveryAttempt, Outcome, PostbackRequest

MAX_ATTEMPTS = 5
CHUNK = 50_000
# A row as generated: the columns of its attempt and of its postback's request.
_COLUMNS = [
    "postback_id",
    "attempt",
    "method",
    "url",
    "host",
    "request_body",
    "delivered_at",
    "response_code",
    "response_time_ms",
    "response_body",
    "error",
    "outcome",
]
_ATTEMPT_COLUMNS = [name for name in _COLUMNS if name not in ("method", "url", "request_body")]
_REQUEST_COLUMNS = ["postback_id", "method", "url", "host", "request_body", "delivered_at"]
# Seeded postbacks come from a handful of sender keys.
_SENDERS = [f"key {n}" for n in range(1, 6)]
_ATTEMPT_INDEXES = [_COLUMNS.index(name) for name in _ATTEMPT_COLUMNS]
_REQUEST_INDEXES = [_COLUMNS.index(name) for name in _REQUEST_COLUMNS]
Row = tuple[str, int, str, str, str, str, datetime, int | None, float | None, str, str, str]


@dataclass(frozen=True)
class Profile:
    """How one host answers: the chance of each kind of failure per try, and its speed."""

    host: str
    share: float
    median_ms: float
    server_errors: float = 0.01
    timeouts: float = 0.002
    refused: float = 0.001
    client_errors: float = 0.0
    # (start, end) Unix times when the host refuses every connection.
    outages: tuple[tuple[float, float], ...] = ()

    def down(self, when: float) -> bool:
        return any(start <= when < end for start, end in self.outages)


def profiles(count: int, start: float, end: float, rng: random.Random) -> list[Profile]:
    """Hosts busiest first; about one in ten flaky, one in ten sending back 4xx, one in
    eight down for 1-4 hours twice in the period."""
    weights = [1 / (rank + 1) ** 1.1 for rank in range(count)]
    total = sum(weights)
    hosts = []
    for rank, weight in enumerate(weights):
        kind = rank % 10
        outages: tuple[tuple[float, float], ...] = ()
        if rank % 8 == 3:
            outages = tuple(_outage(start, end, rng) for _ in range(2))
        hosts.append(
            Profile(
                host=f"receiver-{rank + 1:03d}.example.com",
                share=weight / total,
                median_ms=rng.choice((12, 25, 40, 80, 150, 300)),
                server_errors=0.12 if kind == 4 else 0.01,
                timeouts=0.03 if kind == 4 else 0.002,
                client_errors=0.25 if kind == 7 else 0.0,
                outages=outages,
            )
        )
    return hosts


def _outage(start: float, end: float, rng: random.Random) -> tuple[float, float]:
    begin = rng.uniform(start, max(start, end - 4 * 3600))
    return begin, begin + rng.uniform(3600, 4 * 3600)


class Generator:
    """Attempt rows of postbacks spread over [start, end), in time order of their first try."""

    def __init__(self, hosts: list[Profile], start: datetime, end: datetime, rng: random.Random) -> None:
        self.hosts, self.rng = hosts, rng
        self.start, self.end = start.timestamp(), end.timestamp()
        self.cumulative: list[float] = []
        running = 0.0
        for host in hosts:
            running += host.share
            self.cumulative.append(running)
        self.prefix = uuid.uuid4().hex[:12]
        self.count = 0

    def postbacks(self, wanted: int) -> Iterator[tuple[float, list[Row]]]:
        """About `wanted` postbacks: (accepted at, its attempt rows), minute by minute, with
        more at midday than at night."""
        minutes = int((self.end - self.start) // 60)
        curve = [1 + 0.6 * math.sin(2 * math.pi * ((self.start / 60 + m) % 1440 - 360) / 1440) for m in range(minutes)]
        scale = wanted / sum(curve)
        for minute, weight in enumerate(curve):
            expected = weight * scale
            count = int(expected) + (self.rng.random() < expected - int(expected))
            base = self.start + minute * 60
            for at in sorted(base + self.rng.random() * 60 for _ in range(count)):
                yield at, self.series(at)

    def series(self, at: float) -> list[Row]:
        host = self.hosts[min(self._pick(), len(self.hosts) - 1)]
        self.count += 1
        postback_id = f"{self.prefix}{self.count:x}-0"
        method = "POST" if self.rng.random() < 0.2 else "GET"
        url = f"https://{host.host}/postback?click={self.count}&event=install&payout=1.50"
        body = '{"event":"install","payout":1.50}' if method == "POST" else ""
        rows: list[Row] = []
        when = at + self.rng.uniform(0.001, 0.05)
        for number in range(1, MAX_ATTEMPTS + 1):
            if host.down(when) and self.rng.random() < 0.7:  # its circuit is open: deferred first
                rows.append(self._row(postback_id, number, method, url, host, body, when, None, None, "deferred"))
                when += self.rng.uniform(30, 40)
            code, ms, outcome, error = self._try(host, when, number)
            rows.append(self._row(postback_id, number, method, url, host, body, when, code, ms, outcome, error))
            if outcome != Outcome.RETRY:
                break
            when += min(3600.0, 10 * 4 ** (number - 1)) * self.rng.uniform(0.5, 1.0) + ms / 1000
        return [row for row in rows if row[6].timestamp() < self.end]

    def _pick(self) -> int:
        point = self.rng.random()
        low, high = 0, len(self.cumulative) - 1
        while low < high:  # bisect: a few steps for hundreds of hosts
            middle = (low + high) // 2
            if self.cumulative[middle] < point:
                low = middle + 1
            else:
                high = middle
        return low

    def _try(self, host: Profile, when: float, number: int) -> tuple[int | None, float, str, str]:
        last = number == MAX_ATTEMPTS
        transient = Outcome.FAILED if last else Outcome.RETRY
        if host.down(when):
            return (
                None,
                round(self.rng.uniform(0.3, 2.0), 2),
                transient,
                "connection error: [Errno 111] Connection refused",
            )
        draw = self.rng.random()
        if draw < host.client_errors:
            return self.rng.choice((400, 404, 410)), self._latency(host), Outcome.FAILED, ""
        draw -= host.client_errors
        if draw < host.server_errors:
            return self.rng.choice((500, 502, 503)), self._latency(host), transient, ""
        draw -= host.server_errors
        if draw < host.timeouts:
            return (
                None,
                round(self.rng.uniform(15000, 15050), 2),
                transient,
                "total timeout: no complete reply within 15 s",
            )
        draw -= host.timeouts
        if draw < host.refused:
            return (
                None,
                round(self.rng.uniform(0.3, 2.0), 2),
                transient,
                "connection error: [Errno 111] Connection refused",
            )
        return self.rng.choice((200, 200, 200, 204)), self._latency(host), Outcome.SUCCESS, ""

    def _latency(self, host: Profile) -> float:
        return round(min(14000.0, host.median_ms * math.exp(self.rng.gauss(0, 0.6))), 2)

    @staticmethod
    def _row(
        postback_id: str,
        number: int,
        method: str,
        url: str,
        host: Profile,
        body: str,
        when: float,
        code: int | None,
        ms: float | None,
        outcome: str,
        error: str = "",
    ) -> Row:
        reply = {None: "", 200: "ok", 204: "", 400: "bad request", 404: "not found", 410: "gone"}.get(
            code, "upstream unavailable"
        )
        if outcome == Outcome.DEFERRED:
            error = f"not sent: circuit open for {host.host} after failures in a row (deferred)"
        at = datetime.fromtimestamp(when, UTC)
        return (postback_id, number, method, url, host.host, body, at, code, ms, reply, error, str(outcome))


def seed(
    attempts: int,
    days: float,
    hosts: int,
    end: datetime,
    seed_value: int | None = None,
    progress: Callable[[int], None] = lambda written: None,
) -> int:
    """Write `attempts` attempt rows (and their rollups and accepted counts) ending at `end`;
    returns how many were written."""
    rng = random.Random(seed_value)
    start = end - timedelta(days=days)
    generator = Generator(profiles(hosts, start.timestamp(), end.timestamp(), rng), start, end, rng)
    partitions.make_room_for([*(start + timedelta(days=day) for day in range(math.ceil(days))), end])
    written = 0
    pending: list[Row] = []
    accepted: Counter[int] = Counter()
    while written < attempts:
        # About 1.08 tries per postback; a second pass tops up whatever the first fell short by.
        for at, rows in generator.postbacks(max(1, int((attempts - written) / 1.08))):
            room = attempts - written - len(pending)
            if room <= 0:
                break
            if not rows:
                continue  # its first try would fall after the end
            pending += rows[:room]
            accepted[int(at // 60 * 60)] += 1
            if len(pending) >= CHUNK:
                written += write_chunk(pending, accepted)
                pending, accepted = [], Counter()
                progress(written)
        written += write_chunk(pending, accepted)
        pending, accepted = [], Counter()
        progress(written)
    analyze()
    return written


def write_chunk(rows: list[Row], accepted: Counter[int]) -> int:
    """One transaction: the rows, their rollups, and the postbacks they stand for."""
    if not rows:
        return 0
    tallies: dict[rollups.MinuteKey, rollups.Tally] = {}
    minutes: dict[int, datetime] = {}
    for row in rows:
        stamp = int(row[6].timestamp()) // 60 * 60
        minute = minutes.get(stamp) or minutes.setdefault(stamp, datetime.fromtimestamp(stamp, UTC))
        key = (minute, row[4], row[11], rollups.code_class(row[7]))
        tally = tallies.get(key) or tallies.setdefault(key, rollups.Tally())
        tally.add(row[8])
    with transaction.atomic():
        _insert(rows)
        rollups.add_tallies(tallies)
        rollups.add_accepted({datetime.fromtimestamp(minute, UTC): count for minute, count in accepted.items()})
    return len(rows)


def _insert(rows: list[Row]) -> None:
    """The attempt rows, and a request row for each postback (from its first row: a
    postback's rows are all in one chunk)."""
    firsts: dict[str, Row] = {}
    for row in rows:
        firsts.setdefault(row[0], row)
    attempts = [tuple(row[index] for index in _ATTEMPT_INDEXES) for row in rows]
    requests = [
        (*(row[index] for index in _REQUEST_INDEXES), _SENDERS[len(row[4]) % len(_SENDERS)]) for row in firsts.values()
    ]
    _copy(DeliveryAttempt, _ATTEMPT_COLUMNS, attempts)
    _copy(PostbackRequest, [*_REQUEST_COLUMNS[:-1], "first_at", "sender"], requests)


def _copy(model: type[Model], names: list[str], rows: list[tuple[Any, ...]]) -> None:
    """COPY on PostgreSQL, executemany elsewhere."""
    table = connection.ops.quote_name(model._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(name) for name in names)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            return
        adapt = connection.ops.adapt_datetimefield_value
        cursor.executemany(
            f"INSERT INTO {table} ({columns}) VALUES ({', '.join(['%s'] * len(names))})",
            [tuple(adapt(value) if isinstance(value, datetime) else value for value in row) for row in rows],
        )


def analyze() -> None:
    """Fresh planner statistics: the indexes are only chosen well once the planner knows."""
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
