"""The inbox's shards: INBOX_SHARDS streams, each with its keys in one hash slot.

One stream is one Redis core's work (docs/scaling.md). Sharded, each request goes to one shard
(the next, in turn, from each process), each shard has drainers of its own, and a try that
must wait goes back into the shard it came from. A shard's keys share a hash tag, so that
every script touches one slot of a Redis Cluster; the tags are chosen so that the shards' slots
lie evenly over the 16,384 (with N shards on N masters of evenly split slots, one each).

Which shards exist is kept in Redis (`keys.SHARDS`: shard id -> when a process last used it):
every process stamps the shards it ingests into or delivers from, once a second, and workers
sweep and drain every shard stamped there. When INBOX_SHARDS changes, the shards no process
uses any more keep being drained; once RETIRE_AFTER_MS has passed since their last use and
they hold nothing (no entry, none pending, no try waiting, no count to fold), a worker drops
them. A live change loses nothing: a process still on the old count keeps its shards alive by
using them.
"""

import itertools
import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property

from django.conf import settings
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ConnectionError, RedisError, TimeoutError

from postbackproject import keys, scripts
from postbackproject.queue import after_cluster_error, get_connection, is_cluster, master_of

logger = logging.getLogger(__name__)

# A shard no process has used for this long, and that holds nothing, is dropped.
RETIRE_AFTER_MS = 60_000
# How long a process passes over a shard whose master failed it (`Turns.avoid`).
AVOID_SECONDS = 5.0
# How often a process stamps the shards it uses.
STAMP_EVERY_SECONDS = 1.0


@dataclass(frozen=True)
class Shard:
    """One stream of the inbox and the keys beside it (`keys.shard_keys`)."""

    id: str

    @cached_property
    def _keys(self) -> dict[str, str]:
        return keys.shard_keys(self.id)

    @property
    def inbox(self) -> str:
        return self._keys["inbox"]

    @property
    def leases(self) -> str:
        return self._keys["leases"]

    @property
    def due(self) -> str:
        return self._keys["due"]

    @property
    def due_tries(self) -> str:
        return self._keys["due_tries"]

    @property
    def rejected(self) -> str:
        return self._keys["rejected"]

    @property
    def accepted(self) -> str:
        return self._keys["accepted"]

    def folding(self, token: str) -> str:
        """A hash of this shard's accepted counts being folded into the database."""
        return f"{self._keys['folding']}:{token}"

    def new_drainer_id(self) -> str:
        return drainer_prefix(self) + random_hex()

    @property
    def slot(self) -> int:
        return key_slot(self.inbox.encode())


MAIN = Shard(keys.MAIN_SHARD)


def random_hex() -> str:
    return f"{random.getrandbits(128):032x}"


def drainer_prefix(shard: Shard) -> str:
    """Drainer ids name their shard (RQ job ids allow letters, digits, - and _ only): a drain
    job is given its id alone."""
    return "drain-" if shard == MAIN else f"drain_{shard.id}_"


def shard_of_drainer(drainer_id: str) -> Shard:
    if drainer_id.startswith("drain_"):
        return Shard(drainer_id.split("_")[1])
    return MAIN


@cache
def tag(index: int, count: int) -> str:
    """The hash tag of shard `index` of `count`: the first "<count>-<index>-<k>" whose slot lies
    in the index-th of `count` equal ranges of slots."""
    low = index * REDIS_CLUSTER_HASH_SLOTS // count
    high = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // count
    for k in itertools.count():
        candidate = f"{count}-{index}-{k}"
        if low <= key_slot(candidate.encode()) < high:
            return candidate
    raise AssertionError("unreachable")


def configured() -> list[Shard]:
    """The shards this process ingests into and drains: INBOX_SHARDS of them. On a single
    Redis the first is the main shard (the keys of an inbox before it was sharded)."""
    return list(_configured(settings.INBOX_SHARDS, bool(settings.REDIS_CLUSTER_NODES)))


@cache
def _configured(count: int, cluster: bool) -> tuple[Shard, ...]:
    """Built once per setting (every request asks): each shard's key names are made once."""
    return tuple(MAIN if index == 0 and not cluster else Shard(tag(index, count)) for index in range(count))


class Turns:
    """Which shard takes the next request: each in turn, from a random start (so that web
    processes started together do not all begin with the first), and the stamps of use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turn: Iterator[int] = itertools.count(random.randrange(1024))
        self._stamped_at = -STAMP_EVERY_SECONDS
        self._avoided: dict[Shard, float] = {}  # shard -> until when (monotonic)

    def next(self) -> Shard:
        """The next shard, passing over those avoided (unless every one is)."""
        shards = configured()
        if len(shards) == 1 and shards[0] == MAIN:
            return MAIN  # nothing to choose and, on a single Redis, nothing to stamp
        self.stamp_now_and_then(shards)
        if self._avoided:
            self._readmit_the_recovered()
        with self._lock:
            turn = next(self._turn)
            shards = [shard for shard in shards if shard not in self._avoided] or shards
        return shards[turn % len(shards)]

    def avoid(self, shard: Shard) -> None:
        """Pass a shard over for AVOID_SECONDS, and after that until its master answers with
        the replicas REDIS_WAIT_FOR_REPLICAS asks for: it could not be reached or did not
        confirm its replicas (a failover under way; a promoted replica with none of its own,
        where every request would wait REDIS_WAIT_TIMEOUT_MS to be refused)."""
        with self._lock:
            self._avoided[shard] = time.monotonic() + AVOID_SECONDS

    def _readmit_the_recovered(self) -> None:
        """Avoided shards whose time is up: back in turn if their master is fit, else avoided
        for AVOID_SECONDS more (one question to it, not a request sacrificed)."""
        now = time.monotonic()
        with self._lock:
            due = [shard for shard, until in self._avoided.items() if until <= now]
            for shard in due:  # asked by this thread alone
                self._avoided[shard] = now + AVOID_SECONDS
        for shard in due:
            if master_is_fit(shard):
                with self._lock:
                    self._avoided.pop(shard, None)

    def stamp_now_and_then(self, shards: list[Shard]) -> None:
        """Stamp the shards as used, at most once a STAMP_EVERY_SECONDS. A stamp that fails
        (the registry's master failing over) is left for the next: a shard is retired only
        after a minute without one, and the request goes on to its own shard."""
        now = time.monotonic()
        if now - self._stamped_at >= STAMP_EVERY_SECONDS:
            self._stamped_at = now
            try:
                stamp(shards)
            except RedisError as exc:
                logger.warning("could not stamp the inbox shards in use: %s", exc)


@contextmanager
def unless_a_master_is_down(what: str) -> Iterator[None]:
    """For work on every shard: on a cluster, what needs a master that cannot be reached
    (failing over) is skipped, said in the log, and the rest is done; on a single Redis the
    error is everyone's and goes to the caller."""
    try:
        yield
    except (ConnectionError, TimeoutError) as exc:
        if not is_cluster():
            raise
        logger.warning("%s skipped, a master cannot be reached: %s", what, exc)


def master_is_fit(shard: Shard) -> bool:
    """Whether the shard's master answers and has the replicas REDIS_WAIT_FOR_REPLICAS asks for
    in sync."""
    try:
        master = master_of(shard.inbox)
        if not settings.REDIS_WAIT_FOR_REPLICAS:
            return bool(master.ping())
        replication = master.info("replication")
    except RedisError as exc:
        after_cluster_error(exc)
        return False
    replicas = [value for name, value in replication.items() if name.startswith("slave") and isinstance(value, dict)]
    in_sync = sum(value.get("state") == "online" for value in replicas)
    return bool(in_sync >= settings.REDIS_WAIT_FOR_REPLICAS)


turns = Turns()

# Stamp shards as used now (Redis's clock). KEYS: the registry. ARGV: shard ids.
_STAMP = """
local now = now_ms()
for _, id in ipairs(ARGV) do redis.call('HSET', KEYS[1], id, now) end
return now
"""


def stamp(shards: list[Shard]) -> int:
    """Record that this process uses these shards; returns Redis's time (ms)."""
    return int(scripts.run(_STAMP, [keys.SHARDS], [shard.id for shard in shards]))


@dataclass(frozen=True)
class Known:
    """Every shard to drain: those configured here, and those any process has used."""

    shards: list[Shard]
    retired: list[Shard]  # unused for RETIRE_AFTER_MS: dropped once they hold nothing


def known() -> Known:
    """Stamps this process's shards and reads which others exist (two round trips); while the
    registry's master fails over, this process's own shards."""
    mine = configured()
    with unless_a_master_is_down("reading which inbox shards are in use"):
        now = stamp(mine)
        used: dict[bytes, bytes] = get_connection().hgetall(keys.SHARDS)  # type: ignore[assignment]
        others = {Shard(shard_id.decode()): int(at) for shard_id, at in used.items()}
        shards = list(mine) + [shard for shard in others if shard not in mine]
        retired = [shard for shard, at in others.items() if shard not in mine and at < now - RETIRE_AFTER_MS]
        return Known(shards, retired)
    return Known(mine, [])


def listed() -> list[Shard]:
    """Every shard there is, read only (one round trip): configured here, or used by any process."""
    mine = configured()
    used: list[bytes] = get_connection().hkeys(keys.SHARDS)  # type: ignore[assignment]
    return mine + [shard for shard in (Shard(shard_id.decode()) for shard_id in used) if shard not in mine]


# Drop a retired shard's keys if it holds nothing. KEYS: inbox, leases, due, due tries,
# accepted, rejected. ARGV: group. Returns 1 when dropped.
_DROP = """
local inbox, leases, due, tries, accepted = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if redis.call('ZCARD', due) > 0 or redis.call('HLEN', accepted) > 0 then return 0 end
if live_drainers(leases, now_ms()) > 0 then return 0 end
if redis.call('EXISTS', inbox) == 1 then
  if redis.call('XLEN', inbox) > 0 then return 0 end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', inbox)) do
    if tonumber(field(g, 'pending')) > 0 then return 0 end
  end
end
if redis.call('LLEN', KEYS[6]) > 0 then return 0 end
redis.call('DEL', inbox, leases, due, tries)
return 1
"""


def drop_if_empty(shard: Shard) -> bool:
    """Drop a retired shard that holds nothing (and forget it); False while it holds work.
    Entries set aside in its `rejected` list keep it, for a person to read."""
    keys_ = [shard.inbox, shard.leases, shard.due, shard.due_tries, shard.accepted, shard.rejected]
    if not scripts.run(_DROP, keys_, [keys.GROUP]):
        return False
    get_connection().hdel(keys.SHARDS, shard.id)
    return True
