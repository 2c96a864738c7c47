"""Circuit breakers per destination host, shared by every worker through Redis.

After `circuit_failure_threshold` failures or timeouts in a row, a host's circuit opens: its
postbacks are not sent but deferred (put back without using up an attempt) until the circuit
has been open `circuit_open_seconds`. Then one worker sends one postback as a probe; an
answer closes the circuit, a failure opens it again for twice as long (up to 16 times).

Every worker keeps a local copy of which hosts are open or failing, refreshed each second and
after each report, so a healthy host costs no Redis round trip at all.
"""

import json
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

from delivery.hosts import host_of
from postbackproject import inbox
from postbackproject.postback import Try
from postbackproject.queue import get_connection

OPEN = "postback:circuits:open"  # sorted set: host -> open until (ms since the epoch)
FAILURES = "postback:circuits:failures"  # hash: host -> failures in a row
TRIPS = "postback:circuits:trips"  # hash: host -> times opened in a row (doubles the wait)
PROBE_PREFIX = "postback:circuits:probe:"  # string per host: the worker probing it
# Longest an open circuit waits, as a multiple of circuit_open_seconds.
MAX_WAIT_FACTOR = 16

# KEYS: open, failures, trips. ARGV: threshold, base wait ms, probe key prefix, then per host:
# host, answered (1/0), failures since its last answer, probed (1/0).
# Returns {open hosts and their times (ms), flat}, {hosts with failures counted and the counts, flat}.
_REPORT = """
local open, failures, trips = KEYS[1], KEYS[2], KEYS[3]
local threshold, base = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 4, #ARGV, 4 do
  local host, answered, trailing, probed = ARGV[i], ARGV[i + 1] == '1', tonumber(ARGV[i + 2]), ARGV[i + 3] == '1'
  if answered then
    redis.call('ZREM', open, host)
    redis.call('HDEL', trips, host)
    redis.call('DEL', ARGV[3] .. host)
    if trailing > 0 then redis.call('HSET', failures, host, trailing) else redis.call('HDEL', failures, host) end
  elseif trailing > 0 or probed then
    local count = redis.call('HINCRBY', failures, host, trailing)
    local is_open = redis.call('ZSCORE', open, host)
    if probed or (not is_open and count >= threshold) then
      local trip = redis.call('HINCRBY', trips, host, 1)
      local wait = base * math.min(2 ^ (trip - 1), __MAX_FACTOR__)
      redis.call('ZADD', open, now + wait, host)
      redis.call('DEL', ARGV[3] .. host)
    end
  end
end
return {redis.call('ZRANGE', open, 0, -1, 'WITHSCORES'), redis.call('HGETALL', failures)}
""".replace("__MAX_FACTOR__", str(MAX_WAIT_FACTOR))


@dataclass
class HostReport:
    """What one host did in a batch of finished requests, in the order they finished."""

    answered: bool = False
    failures_since_answer: int = 0
    probed: bool = False

    def add(self, answered: bool) -> None:
        if answered:
            self.answered = True
            self.failures_since_answer = 0
        else:
            self.failures_since_answer += 1


@dataclass(frozen=True)
class Admission:
    """Whether a host's postbacks may go now: send, send one as the probe, or defer."""

    send: bool
    probe: bool = False
    defer_until: float = 0.0  # Unix time, when not sending
    reason: str = ""


SEND = Admission(send=True)


class Circuits:
    """This worker's view of the shared circuits, and its reports to them."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._open: dict[str, float] = {}  # host -> open until (Unix seconds)
        self._failures: dict[str, int] = {}  # host -> failures in a row, as last reported
        self._probing: set[str] = set()
        self._refreshed_at = 0.0
        self._script = get_connection().register_script(_REPORT)

    def admission(self, host: str, probe_seconds: float, open_seconds: float) -> Admission:
        """May this host's postbacks be sent now? Acquires the probe when its time has come."""
        until = self._open.get(host)
        if until is None:
            return SEND
        now = time.time()
        if now < until:
            return Admission(send=False, defer_until=self._spread(until, open_seconds), reason=self._why(host, until))
        if host in self._probing:
            return Admission(send=False, defer_until=0.0, reason="")  # hold until the probe answers
        if get_connection().set(PROBE_PREFIX + host, self.owner, nx=True, px=round(probe_seconds * 1000) + 5000):
            self._probing.add(host)
            return Admission(send=True, probe=True)
        later = now + probe_seconds
        return Admission(send=False, defer_until=self._spread(later, open_seconds), reason=self._why(host, until))

    def failures_in_row(self, host: str) -> int:
        """Failures in a row counted for the host by every worker, as of the last report."""
        return self._failures.get(host, 0)

    def needs_report(self, host: str, report: HostReport) -> bool:
        """Healthy hosts are not reported: only failures, and answers that close or reset."""
        return report.failures_since_answer > 0 or report.probed or host in self._failures or host in self._open

    def report(self, reports: dict[str, HostReport], threshold: int, open_seconds: float) -> None:
        """Send what hosts did; refresh the local view from the answer. Also refreshes on a timer."""
        due = {host: report for host, report in reports.items() if self.needs_report(host, report)}
        if not due and time.monotonic() - self._refreshed_at < 1.0:
            return
        args: list[str | int] = [threshold, round(open_seconds * 1000), PROBE_PREFIX]
        for host, report in due.items():
            args += [host, int(report.answered), report.failures_since_answer, int(report.probed)]
            if report.probed:
                self._probing.discard(host)
        opened, failing = self._script(keys=[OPEN, FAILURES, TRIPS], args=args, client=get_connection())
        self._open = {opened[i].decode(): float(opened[i + 1]) / 1000 for i in range(0, len(opened), 2)}
        self._failures = {failing[i].decode(): int(failing[i + 1]) for i in range(0, len(failing), 2)}
        self._refreshed_at = time.monotonic()

    def _why(self, host: str, until: float) -> str:
        when = time.strftime("%H:%M:%S", time.gmtime(until))
        return f"circuit open for {host} after failures in a row; next try after {when} UTC"

    @staticmethod
    def _spread(until: float, open_seconds: float) -> float:
        """Deferred postbacks come back spread over a little while, not all at once."""
        return until + random.uniform(0, min(10.0, open_seconds / 4))


def open_circuits() -> list[tuple[str, float, int]]:
    """Hosts whose circuit is open: (host, open until as Unix time, failures in a row)."""
    connection = get_connection()
    with connection.pipeline(transaction=False) as pipe:
        pipe.zrange(OPEN, 0, -1, withscores=True)
        pipe.hgetall(FAILURES)
        opened, failures = pipe.execute()
    counts = {host.decode(): int(count) for host, count in failures.items()}
    return [(host.decode(), score / 1000, counts.get(host.decode(), 0)) for host, score in opened]


def close_circuits(hosts: Iterable[str]) -> int:
    """Close circuits by hand (staff, in admin); their deferred postbacks are due at once.

    Returns how many deferred postbacks were released. Finding them reads every waiting try
    (the due set is keyed by postback, not host): fine for an occasional admin action.
    """
    closing = set(hosts)
    if not closing:
        return 0
    connection = get_connection()
    with connection.pipeline() as pipe:
        pipe.zrem(OPEN, *closing)
        pipe.hdel(FAILURES, *closing)
        pipe.hdel(TRIPS, *closing)
        pipe.delete(*(PROBE_PREFIX + host for host in closing))
        pipe.execute()
    released = [
        postback_id
        for postback_id, text in connection.hscan_iter(inbox.DUE_TRIES, count=1000)
        if host_of(Try.from_fields(json.loads(text)).url) in closing
    ]
    for start in range(0, len(released), 1000):
        connection.zadd(inbox.DUE, dict.fromkeys(released[start : start + 1000], 0), xx=True)
    if released:
        inbox.sweep()
    return len(released)
