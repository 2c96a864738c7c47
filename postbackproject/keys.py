"""Every Redis key the product uses, named here and nowhere else.

Scripts take these as KEYS (never build them inside Lua), so that each script touches only
the keys it declares. Times kept in Redis (lease expiries, due times, open-until times, rate
limits) are milliseconds since the epoch by Redis's own clock (`TIME`), whichever machine
wrote them: docs/decisions.md, "Redis's clock".
"""

from rq.worker_registration import WORKERS_BY_QUEUE_KEY

# --- the inbox -----------------------------------------------------------------------------
# The inbox is INBOX_SHARDS shards (`postbackproject.shards`), each a set of the keys below,
# all in one hash slot: a script may touch only one slot of a Redis Cluster. A shard's keys
# carry its id as their hash tag ("postback:inbox:{3-1-7}"); the first shard of a single Redis
# keeps the names it had before the inbox was sharded, so that upgrading strands nothing.
MAIN_SHARD = "main"
# The consumer group every drainer reads a shard's stream in (a name inside it, not a key).
GROUP = "delivery"
# Hash: shard id -> when a process last used it to ingest or deliver (ms): the shards workers
# sweep and drain, and how a shard no process uses any more is found and dropped once empty.
SHARDS = "postback:shards"


def shard_keys(shard: str) -> dict[str, str]:
    """A shard's keys by role:
    - inbox: stream of entries: field "r" (a request's postbacks) or "t" (tries that came due);
    - leases: sorted set: drainer id -> lease expiry (ms);
    - due: sorted set: postback id -> when its next try is due (ms), the try itself in due_tries;
    - due_tries: hash: postback id -> the try (JSON);
    - rejected: list of entries that could not be read (not written by ingestion), for a person;
    - accepted: hash: minute (Unix seconds, by Redis's clock) -> postbacks accepted in it;
    - folding: the prefix of hashes of accepted counts being folded into the database."""
    if shard == MAIN_SHARD:
        return dict(_MAIN_SHARD_KEYS)
    return {role: f"{name}:{{{shard}}}" for role, name in _MAIN_SHARD_KEYS.items()}


_MAIN_SHARD_KEYS = {
    "inbox": "postback:inbox",
    "leases": "postback:drainers",
    "due": "postback:due",
    "due_tries": "postback:due:tries",
    "rejected": "postback:inbox:rejected",
    "accepted": "postback:accepted",
    "folding": "postback:accepted:folding",
}
# The main shard's keys, as tests and tools on a single Redis name them.
INBOX = _MAIN_SHARD_KEYS["inbox"]
LEASES = _MAIN_SHARD_KEYS["leases"]
DUE = _MAIN_SHARD_KEYS["due"]
DUE_TRIES = _MAIN_SHARD_KEYS["due_tries"]
REJECTED = _MAIN_SHARD_KEYS["rejected"]
ACCEPTED = _MAIN_SHARD_KEYS["accepted"]
# Prefix shared by every shard's folding hashes (a fold left by a crash is found by it).
ACCEPTED_FOLDING_PREFIX = _MAIN_SHARD_KEYS["folding"]

# --- ingestion -----------------------------------------------------------------------------


def rate_per_sender_key(key_id: int) -> str:
    """A sender key's rate limit: when its allowance is whole again (ms)."""
    return f"postback:rate:key:{key_id}"


def rate_per_address(address: str) -> str:
    """The same for a client address that sent no key."""
    return f"postback:rate:address:{address}"


# --- destinations --------------------------------------------------------------------------


# A destination's two keys share a hash tag: its rate limit's script sets both.
def destination_rate(destination_id: int) -> str:
    """A destination's rate limit: when its allowance is whole again (ms)."""
    return f"postback:rate:{{destination:{destination_id}}}"


def destination_throttled(destination_id: int) -> str:
    """Set for a moment after a destination's rate limit held a postback back (the dashboard's
    "throttled")."""
    return f"postback:throttled:{{destination:{destination_id}}}"


# --- circuits ------------------------------------------------------------------------------
# One hash tag for every circuit key: a report changes many hosts' circuits in one script.
# Sorted set: host -> open until (ms).
CIRCUITS_OPEN = "postback:{circuits}:open"
# Hash: host -> failures in a row.
CIRCUITS_FAILURES = "postback:{circuits}:failures"
# Hash: host -> times opened in a row (each doubles the wait).
CIRCUITS_TRIPS = "postback:{circuits}:trips"
# Sorted set: host -> when its circuit last changed or was reported on (ms): what workers read
# to bring their copies up to date, and how stale state is found.
CIRCUITS_CHANGES = "postback:{circuits}:changes"


def circuit_probe(host: str) -> str:
    """A string per host while one worker probes it: that worker's name (expires by itself)."""
    return f"postback:{{circuits}}:probe:{host}"


# --- operations ----------------------------------------------------------------------------
# Set by `manage.py profilejob`: the next drain job takes it (GETDEL) and is profiled.
PROFILE_NEXT_JOB = "postback:profile-next-job"


def queue_workers(queue: str) -> str:
    """RQ's set of the workers listening on a queue (RQ's key, named for our scripts)."""
    return WORKERS_BY_QUEUE_KEY % queue
