"""The inbox: the Redis stream between ingestion and delivery, and the drainers that read it.

Ingestion appends each request (cut into entries of at most `batch_size` postbacks) to one
Redis stream in one script call: one round trip, and no RQ job per request. RQ jobs
("drainers", `delivery.jobs.drain`) read the stream through a consumer group, so postbacks
of many requests travel together under load, while a lone postback is read the moment it
lands. An entry stays pending in the group until its postbacks are recorded; a drainer that
dies leaves it pending for another to claim. docs/decisions.md, "The inbox", weighs this
against the alternatives.

Drainers hold leases, a sorted set scored by expiry. Whoever adds work checks, in the same
script, whether a live drainer will see it, and if none will, registers a new drainer's lease
and tells the caller to start it as an RQ job. A caller that dies before starting it leaves a
lease that runs out; `sweep()`, run by every idle worker each second, then starts one.

Tries that must wait (retries after backoff, postbacks deferred by an open circuit) wait in a
sorted set keyed by postback id, so scheduling the same try twice is one try; `sweep()` moves
the due ones into the stream.

Every key is named here, with the scripts that change them together.
"""

import json
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.conf import settings
from redis import Redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import RedisError, ResponseError
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from postbackproject.postback import DRAIN, Try
from postbackproject.queue import get_connection, get_queue

logger = logging.getLogger(__name__)

INBOX = "postback:inbox"  # stream of entries: field "r" (a request's postbacks) or "t" (tries)
GROUP = "delivery"  # the consumer group every drainer reads in
LEASES = "postback:drainers"  # sorted set: drainer id -> lease expiry (ms since the epoch)
DUE = "postback:due"  # sorted set: postback id -> when its next try is due (ms)
DUE_TRIES = "postback:due:tries"  # hash: postback id -> the try (JSON), beside DUE
ACCEPTED = "postback:accepted"  # hash: minute (Unix seconds) -> postbacks accepted in it
RATE_PER_KEY = "postback:rate:key:%d"  # a sender key's rate limit: when its allowance is whole (ms)
RATE_PER_ADDRESS = "postback:rate:address:%s"  # the same for a client address without a key

# A drainer renews its lease every second; one that stops renewing is taken for dead after
# this long, and its pending entries go to the next drainer that looks.
LEASE_MS = 15_000
# Longest a drain job may run before RQ kills it. Drainers hand over after
# DELIVERY_DRAINER_MAX_SECONDS; this only catches one that is stuck.
DRAIN_JOB_TIMEOUT = 3600
# Tries moved from the due set into one stream entry.
TRIES_PER_ENTRY = 100

_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function live_drainers(leases, now)
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  return redis.call('ZCARD', leases)
end

-- The consumer group, created reading from the first entry (an error if it exists: ignored).
local function ensure_group(inbox, group)
  redis.pcall('XGROUP', 'CREATE', inbox, group, '0', 'MKSTREAM')
end

local function field(reply, name)
  for i = 1, #reply, 2 do
    if reply[i] == name then return reply[i + 1] end
  end
end

-- Whether an entry was added that no drainer has read yet.
local function has_unread(inbox, group)
  if redis.call('EXISTS', inbox) == 0 then return false end
  local last_added = field(redis.call('XINFO', 'STREAM', inbox), 'last-generated-id')
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', inbox)) do
    if field(g, 'name') == group then return field(g, 'last-delivered-id') ~= last_added end
  end
  return true
end

-- Consumers with pending entries whose drainer's lease has run out (it died, or left).
local function orphaned_consumers(inbox, group, leases, now, me)
  local found = {}
  if redis.call('EXISTS', inbox) == 0 then return found end
  local summary = redis.call('XPENDING', inbox, group)
  if tonumber(summary[1]) == 0 or not summary[4] then return found end
  for _, consumer in ipairs(summary[4]) do
    local name = consumer[1]
    local lease = redis.call('ZSCORE', leases, name)
    if name ~= me and (not lease or tonumber(lease) < now) then
      found[#found + 1] = {name, tonumber(consumer[2])}
    end
  end
  return found
end

local function has_pending(inbox, group, consumer)
  return #redis.call('XPENDING', inbox, group, '-', '+', 1, consumer) > 0
end
"""

# Append a request's entries; start a drainer when none is alive. The hot path of ingestion:
# few arguments, no cleanup (the sweep does that), the new drainer named after the entry, and
# the consumer group left for drainers to create (with id 0: they read from the first entry).
# Counts the postbacks accepted, per minute, for the dashboard. Rate limits are checked first,
# in the same call, and charged only when the request is taken (GCRA: each limit's key holds
# the time, in ms, at which its sender's allowance is whole again).
# KEYS: inbox, leases, accepted, one per rate limit. ARGV: most entries waiting, postbacks,
# number of rate limits, for each its interval and tolerance (ms), entries...
# Returns {limit's number, ms to wait} (rate limited, nothing added), -1 (backlog full, nothing
# added), 0, or the id of a drainer for the caller to start.
_APPEND = """
local inbox, leases = KEYS[1], KEYS[2]
local now = now_ms()
local limits = tonumber(ARGV[3])
local charged = {}
for n = 1, limits do
  local interval, tolerance = tonumber(ARGV[2 + 2 * n]), tonumber(ARGV[3 + 2 * n])
  local tat = math.max(tonumber(redis.call('GET', KEYS[3 + n]) or 0), now)
  if tat - now > tolerance then return {n, math.ceil(tat - now - tolerance)} end
  charged[n] = tat + interval
end
if redis.call('XLEN', inbox) >= tonumber(ARGV[1]) then return -1 end
for n = 1, limits do
  redis.call('SET', KEYS[3 + n], string.format('%.3f', charged[n]), 'PX', math.max(1, math.ceil(charged[n] - now)))
end
local first
for i = 4 + 2 * limits, #ARGV do
  local id = redis.call('XADD', inbox, '*', 'r', ARGV[i])
  first = first or id
end
redis.call('HINCRBY', KEYS[3], math.floor(now / 60000) * 60, ARGV[2])
if redis.call('ZCOUNT', leases, '(' .. now, '+inf') > 0 then return 0 end
local drainer = 'drain-' .. first
redis.call('ZADD', leases, now + __LEASE_MS__, drainer)
return drainer
"""

# Move due tries into the stream; start a drainer if work waits that no live drainer will see.
# KEYS: inbox, leases, due, due tries. ARGV: group, lease ms, new drainer id, tries per entry.
# Returns {tries moved, 1 if the caller starts the drainer else 0}.
_SWEEP = """
local inbox, leases, due, tries = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local per_entry = tonumber(ARGV[4])
ensure_group(inbox, ARGV[1])
local now = now_ms()
local moved = 0
while moved < 10 * per_entry do
  local ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, per_entry)
  if #ids == 0 then break end
  local texts = redis.call('HMGET', tries, unpack(ids))
  local kept = {}
  for _, text in ipairs(texts) do
    if text then kept[#kept + 1] = text end
  end
  if #kept > 0 then redis.call('XADD', inbox, '*', 't', '[' .. table.concat(kept, ',') .. ']') end
  redis.call('ZREM', due, unpack(ids))
  redis.call('HDEL', tries, unpack(ids))
  moved = moved + #ids
end
if live_drainers(leases, now) > 0 then return {moved, 0} end
if not has_unread(inbox, ARGV[1]) and #orphaned_consumers(inbox, ARGV[1], leases, now, '') == 0 then
  return {moved, 0}
end
redis.call('ZADD', leases, now + tonumber(ARGV[2]), ARGV[3])
return {moved, 1}
"""

# A drainer that found a full read asks for a colleague, up to one per worker of the queue.
# KEYS: leases, the queue's worker set. ARGV: lease ms, new drainer id. Returns 1 to start it.
_RECRUIT = """
local now = now_ms()
if live_drainers(KEYS[1], now) >= math.max(1, redis.call('SCARD', KEYS[2])) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
return 1
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

# Leave: when idle, only if nothing is unread or orphaned (else keep draining, return 0);
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


_SOURCES = {
    "append": _APPEND.replace("__LEASE_MS__", str(LEASE_MS)),
    "sweep": _SWEEP,
    "recruit": _RECRUIT,
    "reclaim": _RECLAIM,
    "leave": _LEAVE,
}


@cache
def _script(name: str) -> Script:
    return get_connection().register_script(_PRELUDE + _SOURCES[name])


def run_script(name: str, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA on the process's client (the script is loaded again if Redis lost it)."""
    return _script(name)(keys=keys, args=args, client=get_connection())


def new_drainer_id() -> str:
    return f"drain-{uuid.uuid4().hex}"


# --- entries -----------------------------------------------------------------------------


def request_entries(request_id: str, method: str, url: str, data_texts: list[str], per_entry: int) -> list[str]:
    """A request as stream entries: `[request id, first index, method, URL template, [objects]]`.

    Data objects go in as the JSON text ingestion made of them (numbers as written), not as
    strings inside JSON, which would escape every quote. Postback ids are `<request id>-<index>`,
    so the entry need not carry one per postback.
    """
    head = f"{json.dumps(method)},{json.dumps(url, ensure_ascii=False)}"
    return [
        f'["{request_id}",{start},{head},[{",".join(data_texts[start : start + per_entry])}]]'
        for start in range(0, len(data_texts), per_entry)
    ]


def postback_id(request_id: str, index: int) -> str:
    return f"{request_id}-{index}"


@dataclass(frozen=True)
class Entry:
    """One stream entry as read: its id, its kind ("r" request or "t" tries) and payload."""

    id: str
    kind: str
    payload: bytes


def entries_from_reply(items: list[Any]) -> list[Entry]:
    """Entries from XREADGROUP (id, {field: value}) or a script's XCLAIM ([id, [field, value]])."""
    entries = []
    for item in items:
        if not item:
            continue  # claimed but deleted meanwhile
        entry_id, fields = item[0], item[1]
        if isinstance(fields, dict):
            fields = [part for pair in fields.items() for part in pair]
        if fields:
            entries.append(Entry(text(entry_id), text(fields[0]), fields[1]))
    return entries


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def redis_now_ms() -> int:
    """Redis's clock, which every lease and due time is measured against."""
    seconds, microseconds = get_connection().time()
    return int(seconds) * 1000 + int(microseconds) // 1000


# --- producers ---------------------------------------------------------------------------


class BacklogFull(Exception):
    """The inbox holds INGEST_MAX_QUEUED_JOBS entries: nothing was added."""


@dataclass(frozen=True)
class RateLimit:
    """At most `per_second` requests a second, up to that many at once (at least one), counted
    under a Redis key shared by every web process."""

    key: str
    per_second: float
    subject: str  # what is limited, for the sender to read: "sender key" or "address"

    @classmethod
    def per_sender_key(cls, key_id: int, per_second: float) -> "RateLimit":
        return cls(RATE_PER_KEY % key_id, per_second, "sender key")

    @classmethod
    def per_address(cls, address: str, per_second: float) -> "RateLimit":
        return cls(RATE_PER_ADDRESS % address, per_second, "address")

    def script_args(self) -> tuple[float, float]:
        """GCRA's emission interval and tolerance, in ms."""
        interval = 1000 / self.per_second
        return interval, (max(1.0, self.per_second) - 1) * interval


class RateLimited(Exception):
    """A rate limit refused the request: nothing was added or charged."""

    def __init__(self, limit: RateLimit, wait_ms: int) -> None:
        super().__init__(f"{limit.key}: wait {wait_ms} ms")
        self.limit = limit
        self.retry_after = max(1, math.ceil(wait_ms / 1000))


class NotReplicated(Exception):
    """Fewer replicas than REDIS_WAIT_FOR_REPLICAS confirmed the request in time: it is in the
    master, and will be delivered unless the master dies before a replica has it."""


def append_request(entries: list[str], postbacks: int, limits: Sequence[RateLimit] = ()) -> None:
    """Add a request's entries in one round trip, charging its rate limits; start a drainer if
    none is alive.

    Raises RateLimited, BacklogFull or RedisError, and then nothing was added (unless the
    connection broke after Redis ran the script, which the caller cannot tell from a refusal).
    """
    started = _append(entries, postbacks, limits)
    if isinstance(started, list):
        number, wait_ms = started
        raise RateLimited(limits[number - 1], wait_ms)
    if started == -1:
        raise BacklogFull
    if started:
        drainer = started.decode()
        try:
            start_drainer(drainer)
        except RedisError:
            # The entries are in: answering 503 now would make the sender send them twice.
            logger.warning("could not start drainer %s; the next sweep will", drainer, exc_info=True)


def _append(entries: list[str], postbacks: int, limits: Sequence[RateLimit]) -> Any:
    """The append script, and with REDIS_WAIT_FOR_REPLICAS, WAIT in the same round trip."""
    keys = [INBOX, LEASES, ACCEPTED, *(limit.key for limit in limits)]
    args: list[str | int | float] = [settings.INGEST_MAX_QUEUED_JOBS, postbacks, len(limits)]
    args += [number for limit in limits for number in limit.script_args()]
    args += entries
    wanted = settings.REDIS_WAIT_FOR_REPLICAS
    if not wanted:
        return run_script("append", keys, args)
    with get_connection().pipeline(transaction=False) as pipe:
        _script("append")(keys=keys, args=args, client=pipe)
        pipe.wait(wanted, settings.REDIS_WAIT_TIMEOUT_MS)
        started, replicas = pipe.execute()
    if started != -1 and not isinstance(started, list) and replicas < wanted:
        raise NotReplicated(f"{replicas} of {wanted} replicas confirmed the request")
    return started


def start_drainer(drainer: str) -> None:
    """Put a drain job on the RQ queue under the lease already registered for it."""
    queue = get_queue()
    job = queue.create_job(
        DRAIN,
        args=(drainer,),
        job_id=drainer,
        description="drain the postback inbox",
        timeout=DRAIN_JOB_TIMEOUT,
        result_ttl=0,
        failure_ttl=24 * 3600,
    )
    queue.enqueue_job(job)


def sweep() -> int:
    """Move due tries into the stream and start a drainer if work is orphaned; returns tries moved."""
    drainer = new_drainer_id()
    moved, start = run_script("sweep", [INBOX, LEASES, DUE, DUE_TRIES], [GROUP, LEASE_MS, drainer, TRIES_PER_ENTRY])
    if start:
        start_drainer(drainer)
    return int(moved)


def schedule_tries(tries: list[tuple[Try, float]], pipe: Pipeline | Redis) -> None:
    """Make each try due at its time (Unix seconds); a postback has at most one try waiting."""
    if not tries:
        return
    pipe.zadd(DUE, {item.postback_id: round(due * 1000) for item, due in tries})
    pipe.hset(DUE_TRIES, mapping={item.postback_id: item.to_json() for item, _ in tries})


def waiting_counts() -> dict[str, int]:
    """Entries in the stream, entries read and not yet done, tries waiting for their time."""
    connection = get_connection()
    with connection.pipeline(transaction=False) as pipe:
        pipe.xlen(INBOX)
        pipe.zcard(DUE)
        pipe.exists(INBOX)
        length, due, exists = pipe.execute()
    try:
        pending = int(connection.xpending(INBOX, GROUP)["pending"]) if exists else 0
    except ResponseError:  # no drainer has created the group yet: nothing is pending
        pending = 0
    return {"entries": int(length), "pending": pending, "due": int(due)}


def recruit_key() -> str:
    return WORKERS_BY_QUEUE_KEY % settings.POSTBACK_QUEUE
