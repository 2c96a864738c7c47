"""Lua scripts on Redis: one prelude shared by every script, and how a script is run.

Every script starts with PRELUDE, so that helpers (Redis's clock above all) are written once.
A script may start with a shebang line of flags (`#!lua flags=allow-oom`, Redis 7): it stays first.
Scripts are loaded by hash (EVALSHA) and loaded again when Redis has lost them (a restart, a
failover), on whichever client or pipeline runs them.
"""

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from postbackproject.queue import get_connection

PRELUDE = """
-- Redis's clock, in ms since the epoch: the one clock every time kept in Redis is on.
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

-- GCRA rate limits: a limit's key holds the time (ms) at which its allowance is whole again.
-- Returns that time (now, if past) and how long a request must wait to fit (0: it fits).
local function gcra_wait(key, now, tolerance)
  local tat = math.max(tonumber(redis.call('GET', key) or 0), now)
  return tat, math.max(0, tat - now - tolerance)
end

-- Charge a request: the allowance is whole again at `tat` (kept until then).
local function gcra_charge(key, tat, now)
  redis.call('SET', key, string.format('%.3f', tat), 'PX', math.max(1, math.ceil(tat - now)))
end

-- Calls `call` with the items as arguments, a slice at a time (Lua's unpack has a stack limit).
local function in_slices(items, call)
  for start = 1, #items, 1000 do
    call(unpack(items, start, math.min(start + 999, #items)))
  end
end
"""


@cache
def _loaded(source: str) -> Script:
    """The script as Redis runs it: PRELUDE first, after the source's shebang line if it has one
    (`#!lua flags=...` must be the script's first line)."""
    shebang, body = source.split("\n", 1) if source.startswith("#!") else ("", source)
    return get_connection().register_script(f"{shebang}\n{PRELUDE}{body}" if shebang else PRELUDE + body)


def run(source: str, keys: Sequence[str], args: Sequence[Any], client: Redis | Pipeline | None = None) -> Any:
    """EVALSHA the script (PRELUDE + source), on the process's client unless given one."""
    client = client if client is not None else get_connection()
    script = _loaded(source)
    if not isinstance(client, RedisCluster):
        return script(keys=keys, args=args, client=client)
    try:
        return client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        # Loaded on the master of the keys' slot alone: redis-py's Script would load it on every
        # master, and fail while any one of them is down (failing over).
        client.execute_command("SCRIPT LOAD", script.script, target_nodes=client.get_node_from_key(keys[0]))
        return client.evalsha(script.sha, len(keys), *keys, *args)


def run_and(
    source: str, keys: Sequence[str], args: Sequence[Any], client: Redis, then: Callable[[Pipeline], Any]
) -> list[Any]:
    """EVALSHA the script and the commands `then` adds, in one round trip: the replies.

    `run` on a pipeline would cost a round trip more: redis-py's pipeline asks SCRIPT EXISTS
    before every execute that holds a script. Here the script is loaded only when Redis says it
    lacks it (a restart, a failover), and the pipeline is sent again."""
    script = _loaded(source)
    for attempt in range(2):
        with client.pipeline(transaction=False) as pipe:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            then(pipe)
            try:
                return pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
                client.script_load(script.script)
    raise AssertionError("unreachable")
