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

The inbox is INBOX_SHARDS such streams, each with its own drainers, leases and due tries
(`postbackproject.shards`): a request goes to one shard, and every script here works on one
shard's keys, which share a hash slot (on a Redis Cluster, one master).

The keys are named in `postbackproject.keys`; the scripts that change them together are
here (drainers' leases: `delivery.lease`), each starting with the shared prelude
(`postbackproject.scripts`). Every time kept in Redis is on Redis's clock.
"""

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from redis import Redis
from redis.exceptions import ConnectionError, RedisError, ResponseError

from postbackproject import keys, scripts, shards
from postbackproject.postback import DRAIN, Try
from postbackproject.queue import after_cluster_error, get_connection, get_queue, is_cluster, master_of
from postbackproject.shards import Shard, drainer_prefix

logger = logging.getLogger(__name__)

# A drainer renews its lease every second; one that stops renewing is taken for dead after
# this long, and its pending entries go to the next drainer that looks.
LEASE_MS = 15_000
# Longest a drain job may run before RQ kills it. Drainers hand over after
# DELIVERY_DRAINER_MAX_SECONDS; this only catches one that is stuck.
DRAIN_JOB_TIMEOUT = 3600
# Tries moved from the due set into one stream entry.
TRIES_PER_ENTRY = 100

# Append a request's entries; start a drainer when none is alive. The hot path of ingestion:
# few arguments, no cleanup (the sweep does that), the new drainer named after the entry, and
# the consumer group left for drainers to create (with id 0: they read from the first entry).
# Counts the postbacks accepted, per minute, for the dashboard. Rate limits are checked first,
# in the same call, and charged only when the request is taken (GCRA: each limit's key holds
# the time, in ms, at which its sender's allowance is whole again).
# Entries carry the trace their postbacks continue, when there is one (field `tp`, a W3C
# traceparent), beside the request (field `r`).
# All of a shard's keys share one slot; on a Redis Cluster the rate limits (keys of their own
# slots) are charged by a script of their own before this one, and none are given here.
# KEYS: the shard's inbox, leases and accepted counts, one per rate limit. ARGV: most entries
# waiting, postbacks, the shard's drainer id prefix, number of rate limits, for each its
# interval and tolerance (ms), the traceparent or "", entries...
# Returns {limit's number, ms to wait} (rate limited, nothing added), -1 (backlog full, nothing
# added), 0, or the id of a drainer for the caller to start.
_APPEND = """
local inbox, leases = KEYS[1], KEYS[2]
local now = now_ms()
local limits = tonumber(ARGV[4])
local charged = {}
for n = 1, limits do
  local tat, wait = gcra_wait(KEYS[3 + n], now, tonumber(ARGV[4 + 2 * n]))
  if wait > 0 then return {n, math.ceil(wait)} end
  charged[n] = tat + tonumber(ARGV[3 + 2 * n])
end
if redis.call('XLEN', inbox) >= tonumber(ARGV[1]) then return -1 end
for n = 1, limits do gcra_charge(KEYS[3 + n], charged[n], now) end
local first, id
local tp = ARGV[5 + 2 * limits]
for i = 6 + 2 * limits, #ARGV do
  if tp == '' then
    id = redis.call('XADD', inbox, '*', 'r', ARGV[i])
  else
    id = redis.call('XADD', inbox, '*', 'r', ARGV[i], 'tp', tp)
  end
  first = first or id
end
redis.call('HINCRBY', KEYS[3], math.floor(now / 60000) * 60, ARGV[2])
if redis.call('ZCOUNT', leases, '(' .. now, '+inf') > 0 then return 0 end
local drainer = ARGV[3] .. first
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

# Schedule tries, each `delay` ms after now by Redis's clock (a postback has one try waiting at
# most: the member is its id), and acknowledge and delete entries, in one step: an entry is
# never acknowledged without the tries that follow from it.
# KEYS: inbox, due, due tries. ARGV: group, number of tries, per try its postback id, delay ms
# and JSON; then the ids of entries to acknowledge. Returns Redis's time (ms).
# It runs even when Redis is full (allow-oom): it deletes the entries it acknowledges, and
# refusing it would leave drainers unable to free anything, waiting on a Redis that stays full.
_SCHEDULE = """#!lua flags=allow-oom
local inbox, due, tries, group = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local now = now_ms()
local last = 2 + 3 * tonumber(ARGV[2])
for i = 3, last, 3 do
  redis.call('ZADD', due, now + tonumber(ARGV[i + 1]), ARGV[i])
  redis.call('HSET', tries, ARGV[i], ARGV[i + 2])
end
local ids = {}
for i = last + 1, #ARGV do ids[#ids + 1] = ARGV[i] end
in_slices(ids, function(...) redis.call('XACK', inbox, group, ...) end)
in_slices(ids, function(...) redis.call('XDEL', inbox, ...) end)
return now
"""

# Check and charge one rate limit (on a Redis Cluster, where its key has a slot of its own).
# KEYS: the limit's key. ARGV: its interval and tolerance (ms). Returns ms to wait (0: charged).
_CHARGE = """
local now = now_ms()
local tat, wait = gcra_wait(KEYS[1], now, tonumber(ARGV[2]))
if wait > 0 then return math.ceil(wait) end
gcra_charge(KEYS[1], tat + tonumber(ARGV[1]), now)
return 0
"""

_APPEND_SOURCE = _APPEND.replace("__LEASE_MS__", str(LEASE_MS))


# --- entries -----------------------------------------------------------------------------


def request_entries(
    request_id: str,
    method: str,
    url: str,
    data_texts: list[str],
    per_entry: int,
    sender: str = "",
    headers: Mapping[str, str] | None = None,
) -> list[str]:
    """A request as stream entries: `[request id, first index, method, URL template, [objects]]`,
    then its sender when there is one or headers follow ("" for none), then the sender's header
    templates (`endpoint.headers`, an object) when there are some.

    Data objects go in as the JSON text ingestion made of them (numbers as written), not as
    strings inside JSON, which would escape every quote. Postback ids are `<request id>-<index>`,
    so the entry need not carry one per postback.
    """
    head = f"{json.dumps(method)},{json.dumps(url, ensure_ascii=False)}"
    tail = f",{json.dumps(sender, ensure_ascii=False)}" if sender or headers else ""
    if headers:
        tail += f",{json.dumps(headers, ensure_ascii=False, separators=(',', ':'))}"
    return [
        f'["{request_id}",{start},{head},[{",".join(data_texts[start : start + per_entry])}]{tail}]'
        for start in range(0, len(data_texts), per_entry)
    ]


def postback_id(request_id: str, index: int) -> str:
    return f"{request_id}-{index}"


@dataclass(frozen=True)
class Entry:
    """One stream entry as read: its id, its kind ("r" request or "t" tries) and payload, and
    the trace its postbacks continue (a W3C traceparent; a request entry's field `tp`)."""

    id: str
    kind: str
    payload: bytes
    traceparent: str = ""


def entries_from_reply(items: list[Any]) -> list[Entry]:
    """Entries from XREADGROUP (id, {field: value}) or a script's XCLAIM ([id, [field, value]]):
    the first pair is the entry's kind and payload; a `tp` pair after it, its traceparent; any
    other pair is ignored."""
    entries = []
    for item in items:
        if not item:
            continue  # claimed but deleted meanwhile
        entry_id, fields = item[0], item[1]
        if isinstance(fields, dict):
            fields = [part for pair in fields.items() for part in pair]
        if fields:
            traceparent = next((text(fields[i + 1]) for i in range(2, len(fields) - 1, 2) if fields[i] in _TP), "")
            entries.append(Entry(text(entry_id), text(fields[0]), fields[1], traceparent))
    return entries


_TP = (b"tp", "tp")


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
        return cls(keys.rate_per_sender_key(key_id), per_second, "sender key")

    @classmethod
    def per_address(cls, address: str, per_second: float) -> "RateLimit":
        return cls(keys.rate_per_address(address), per_second, "address")

    def script_args(self) -> tuple[float, float]:
        return gcra_args(self.per_second, self.per_second)


def gcra_args(per_second: float, burst: float) -> tuple[float, float]:
    """A GCRA limit's emission interval and tolerance, in ms, for the scripts' `gcra_wait`:
    `per_second` requests a second, up to `burst` at once (at least one)."""
    interval = 1000 / per_second
    return interval, (max(1.0, burst) - 1) * interval


class RateLimited(Exception):
    """A rate limit refused the request: nothing was added or charged."""

    def __init__(self, limit: RateLimit, wait_ms: int) -> None:
        super().__init__(f"{limit.key}: wait {wait_ms} ms")
        self.limit = limit
        self.retry_after = max(1, math.ceil(wait_ms / 1000))


class NotReplicated(Exception):
    """Fewer replicas than REDIS_WAIT_FOR_REPLICAS confirmed the request in time: it is in the
    master, and will be delivered unless the master dies before a replica has it."""


def append_request(entries: list[str], postbacks: int, limits: Sequence[RateLimit] = (), traceparent: str = "") -> None:
    """Add a request's entries in one round trip, charging its rate limits, with the trace their
    postbacks continue (a W3C traceparent, or none); start a drainer if none is alive.

    Raises RateLimited, BacklogFull or RedisError, and then nothing was added (unless the
    connection broke after Redis ran the script, which the caller cannot tell from a refusal).
    A shard whose master cannot be reached, or did not confirm its replicas, is passed over by
    this process for a while (`shards.Turns.avoid`); a request refused a connection goes to the
    next shard at once.
    """
    shard = shards.turns.next()
    if is_cluster():
        _charge(limits)
        limits = ()
    try:
        started = _append(shard, entries, postbacks, limits, traceparent)
    except NotReplicated:
        shards.turns.avoid(shard)
        raise
    except ConnectionError:
        shards.turns.avoid(shard)
        other = shards.turns.next()
        if other == shard:
            raise
        started = _append(other, entries, postbacks, limits, traceparent)
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


def _charge(limits: Sequence[RateLimit]) -> None:
    """Charge rate limits one script each (a Redis Cluster keeps each key on its own slot).
    Unlike the single Redis's one script, a limit charged before a later one refuses, or before
    the backlog is found full, stays charged: the sender waits a little longer, no more."""
    for limit in limits:
        wait_ms = scripts.run(_CHARGE, [limit.key], limit.script_args())
        if wait_ms:
            raise RateLimited(limit, int(wait_ms))


def _append(shard: Shard, entries: list[str], postbacks: int, limits: Sequence[RateLimit], traceparent: str) -> Any:
    """The append script, and with REDIS_WAIT_FOR_REPLICAS, WAIT in the same round trip (on
    a cluster, on the connection to the shard's master that ran the script: WAIT counts the
    replicas that hold what that connection wrote)."""
    names = [shard.inbox, shard.leases, shard.accepted, *(limit.key for limit in limits)]
    args: list[str | int | float] = [settings.INGEST_MAX_QUEUED_JOBS, postbacks, drainer_prefix(shard), len(limits)]
    args += [number for limit in limits for number in limit.script_args()]
    args.append(traceparent)
    args += entries
    wanted = settings.REDIS_WAIT_FOR_REPLICAS
    if not wanted:
        return scripts.run(_APPEND_SOURCE, names, args)
    try:
        started, replicas = scripts.run_and(
            _APPEND_SOURCE,
            names,
            args,
            master_of(shard.inbox),
            lambda pipe: pipe.wait(wanted, settings.REDIS_WAIT_TIMEOUT_MS),
        )
    except RedisError as exc:
        after_cluster_error(exc)
        raise
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
    """Sweep every shard there is (`sweep_shard`), and drop retired shards that hold nothing;
    returns tries moved. On a Redis Cluster a shard whose master cannot be reached (failing
    over) is left for the next sweep; the others are swept (the caller, maybe a drainer of a
    shard that is fine, carries on)."""
    found = shards.known()
    moved = 0
    for shard in found.shards:
        with shards.unless_a_master_is_down(f"sweeping inbox shard {shard.id}"):
            moved += sweep_shard(shard)
    for shard in found.retired:
        with shards.unless_a_master_is_down(f"dropping inbox shard {shard.id}"):
            if shards.drop_if_empty(shard):
                logger.info("inbox shard %s dropped: no process uses it and it holds nothing", shard.id)
    return moved


def sweep_shard(shard: Shard) -> int:
    """Move a shard's due tries into its stream and start a drainer if work there is orphaned;
    returns tries moved."""
    drainer = shard.new_drainer_id()
    names = [shard.inbox, shard.leases, shard.due, shard.due_tries]
    moved, start = scripts.run(_SWEEP, names, [keys.GROUP, LEASE_MS, drainer, TRIES_PER_ENTRY])
    if start:
        start_drainer(drainer)
    return int(moved)


def schedule_tries(
    shard: Shard, tries: Sequence[tuple[Try, float]], acknowledge: Sequence[str] = (), client: Redis | None = None
) -> int:
    """Make each try due in the shard that many seconds from now by Redis's clock, whatever
    this machine's clock says (a postback has at most one try waiting in a shard: scheduled
    twice, the later stands), and acknowledge and delete the shard's entries named, in one
    script call. Returns Redis's time (ms)."""
    args: list[str | int] = [keys.GROUP, len(tries)]
    for item, delay in tries:
        args += [item.postback_id, max(0, round(delay * 1000)), item.to_json()]
    args += acknowledge
    return int(scripts.run(_SCHEDULE, [shard.inbox, shard.due, shard.due_tries], args, client=client))


def waiting_counts() -> dict[str, int]:
    """Entries in the streams, entries read and not yet done, tries waiting for their time,
    over every shard."""
    totals = {"entries": 0, "pending": 0, "due": 0}
    for counts in waiting_by_shard().values():
        for name, count in counts.items():
            totals[name] += count
    return totals


def waiting_by_shard() -> dict[str, dict[str, int]]:
    """`waiting_in` of every shard there is, by shard id."""
    return {shard.id: waiting_in(shard) for shard in shards.listed()}


def waiting_in(shard: Shard) -> dict[str, int]:
    """A shard's entries in its stream, entries read and not yet done, tries waiting."""
    connection = get_connection()
    with connection.pipeline(transaction=False) as pipe:
        pipe.xlen(shard.inbox)
        pipe.zcard(shard.due)
        pipe.exists(shard.inbox)
        length, due, exists = pipe.execute()
    try:
        pending = int(connection.xpending(shard.inbox, keys.GROUP)["pending"]) if exists else 0
    except ResponseError:  # no drainer has created the group yet: nothing is pending
        pending = 0
    return {"entries": int(length), "pending": pending, "due": int(due)}
