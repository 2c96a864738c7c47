"""A drainer's lease: the sorted set of live drainers, and the scripts that change it.

A drain job runs under a lease (drainer id -> expiry on Redis's clock, in its inbox shard's
`leases` set) that it renews every second. A drainer whose lease ran out is taken for dead: its
pending entries go to the next drainer that looks. `Lease` is the one place that knows these scripts' KEYS and
ARGV: callers say what they want (take, renew, recruit, reclaim, leave), never build lists.
"""

from dataclasses import dataclass
from typing import Any

from redis import Redis

from delivery.clock import RedisClock
from postbackproject import inbox, keys, scripts
from postbackproject.queue import get_queue_connection
from postbackproject.shards import shard_of_drainer

# After a drain job fails, its entries wait this long before another drainer takes them.
FAILURE_PAUSE_MS = 5000
# Most entries taken over from a dead drainer at once.
RECLAIM_MOST = 100

# Register a drainer's lease, unless enough drainers are alive already in its shard (one per
# worker of the queue); a drain job standing by its own lease (registered for it) may always
# keep it. KEYS: the shard's leases. ARGV: lease ms, drainer id, 1 to keep its own lease, the
# queue's workers (RQ's set, on RQ's Redis: not a key of this script).
# Returns {1 if the lease is held (renewed or new) else 0, Redis's time ms}.
_RECRUIT = """
local leases, now = KEYS[1], now_ms()
local own = ARGV[3] == '1' and redis.call('ZSCORE', leases, ARGV[2])
if not own and live_drainers(leases, now) >= math.max(1, tonumber(ARGV[4])) then return {0, now} end
redis.call('ZADD', leases, 'GT', now + tonumber(ARGV[1]), ARGV[2])
return {1, now}
"""

# Set a lease's expiry to now + ms: only ever later ('GT'), or whatever it was ('SET').
# KEYS: leases. ARGV: ms, drainer id, 'GT' or 'SET'. Returns Redis's time (ms).
# It runs even when Redis is full (allow-oom: a few bytes), so that a drainer waiting for room
# keeps its entries rather than have them taken over and sent again.
_EXTEND = """#!lua flags=allow-oom
local now = now_ms()
if ARGV[3] == 'GT' then
  redis.call('ZADD', KEYS[1], 'GT', now + tonumber(ARGV[1]), ARGV[2])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
end
return now
"""

# Take over the pending entries of one consumer whose drainer is gone.
# KEYS: inbox, leases. ARGV: group, this drainer, most entries.
# Returns {the entries claimed, {entry id, times read by drainers}...}.
_RECLAIM = """
local inbox, leases, group, me = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
for _, orphan in ipairs(orphaned_consumers(inbox, group, leases, now_ms(), me)) do
  local ids, deliveries = {}, {}
  for _, p in ipairs(redis.call('XPENDING', inbox, group, '-', '+', tonumber(ARGV[3]), orphan[1])) do
    ids[#ids + 1] = p[1]
    deliveries[#deliveries + 1] = {p[1], p[4] + 1}
  end
  local claimed = redis.call('XCLAIM', inbox, group, me, 0, unpack(ids))
  if #ids >= orphan[2] then redis.call('XGROUP', 'DELCONSUMER', inbox, group, orphan[1]) end
  return {claimed, deliveries}
end
return {{}, {}}
"""

# Leave: when idle, only if nothing is unread or orphaned (else keep draining, return -1);
# when handing over (time box, shutdown), start a successor if work remains and nobody is
# alive to do it. KEYS: inbox, leases. ARGV: group, this drainer, successor id or '', lease ms.
# Returns 1 when the caller must start the successor, 0 when it need not, -1 (stay).
_LEAVE = """
local inbox, leases, group, me, successor = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()
local unread = has_unread(inbox, group)
if successor == '' and (unread or #orphaned_consumers(inbox, group, leases, now, me) > 0) then return -1 end
redis.call('ZREM', leases, me)
local mine = has_pending(inbox, group, me)
if not mine then redis.call('XGROUP', 'DELCONSUMER', inbox, group, me) end
if successor == '' or not (unread or mine) or live_drainers(leases, now) > 0 then return 0 end
redis.call('ZADD', leases, now + tonumber(ARGV[4]), successor)
return 1
"""


@dataclass(frozen=True)
class Reclaimed:
    """An entry taken over from a drainer that is gone, and how many drainers have read it."""

    entry: inbox.Entry
    deliveries: int


class Lease:
    """One drainer's lease, in the shard its id names. Each reply that carries Redis's time
    updates `redis_clock`."""

    def __init__(self, connection: Redis, drainer_id: str, queue: str, redis_clock: RedisClock) -> None:
        self.connection = connection
        self.id = drainer_id
        self.shard = shard_of_drainer(drainer_id)
        self.queue_workers = keys.queue_workers(queue)
        self.redis_clock = redis_clock

    def take(self) -> bool:
        """Start under the lease registered for this job; a job queued so long that its lease
        ran out still runs, unless enough drainers are alive already."""
        return self._recruit(self.id, own=True)

    def renew(self) -> None:
        self._extend(inbox.LEASE_MS, only_later=True)

    def release_after_failure(self) -> None:
        """The job is failing: its entries go to another drainer after a short pause, not after
        the whole lease, and not at once either (a failure that repeats must not spin)."""
        self._extend(FAILURE_PAUSE_MS, only_later=False)

    def recruit(self) -> bool:
        """Start a colleague (an RQ job under a lease of its own), up to one per worker."""
        colleague = self.shard.new_drainer_id()
        if not self._recruit(colleague, own=False):
            return False
        inbox.start_drainer(colleague)
        return True

    def reclaim(self) -> list[Reclaimed]:
        """Claim the pending entries of one drainer that left or died (RECLAIM_MOST at most)."""
        names = [self.shard.inbox, self.shard.leases]
        claimed, deliveries = self._run(_RECLAIM, names, [keys.GROUP, self.id, RECLAIM_MOST])
        counts = {inbox.text(entry_id): int(count) for entry_id, count in deliveries}
        return [Reclaimed(entry, counts.get(entry.id, 0)) for entry in inbox.entries_from_reply(claimed)]

    def leave(self, handing_over: bool = False) -> bool:
        """Retire (idle) or hand over, starting a successor if one is needed; False when there
        is still work to read (idle only) and the lease is kept."""
        successor = self.shard.new_drainer_id() if handing_over else ""
        names = [self.shard.inbox, self.shard.leases]
        verdict = self._run(_LEAVE, names, [keys.GROUP, self.id, successor, inbox.LEASE_MS])
        if verdict == 1:
            inbox.start_drainer(successor)
        return bool(verdict != -1)

    def _recruit(self, drainer_id: str, own: bool) -> bool:
        asked_at = self.redis_clock.asking()
        workers = get_queue_connection().scard(self.queue_workers)
        held, now = self._run(_RECRUIT, [self.shard.leases], [inbox.LEASE_MS, drainer_id, int(own), workers])
        self.redis_clock.heard(int(now), asked_at)
        return bool(held)

    def _extend(self, ms: int, only_later: bool) -> None:
        asked_at = self.redis_clock.asking()
        now = self._run(_EXTEND, [self.shard.leases], [ms, self.id, "GT" if only_later else "SET"])
        self.redis_clock.heard(int(now), asked_at)

    def _run(self, source: str, names: list[str], args: list[str | int]) -> Any:
        return scripts.run(source, names, args, client=self.connection)
