"""Every Redis key the product uses, named here and nowhere else.

Scripts take these as KEYS (never build them inside Lua), so that each script touches only
the keys it declares. Times kept in Redis (lease expiries, due times, open-until times, rate
limits) are milliseconds since the epoch by Redis's own clock (`TIME`), whichever machine
wrote them: docs/decisions.md, "Redis's clock".
"""

from rq.worker_registration import WORKERS_BY_QUEUE_KEY

# --- the inbox -----------------------------------------------------------------------------
# Stream of entries: field "r" (a request's postbacks) or "t" (tries that came due).
INBOX = "postback:inbox"
# The consumer group every drainer reads the inbox in (a name inside INBOX, not a key).
GROUP = "delivery"
# List of inbox entries that could not be read (not written by ingestion), kept for a person.
REJECTED = "postback:inbox:rejected"
# Sorted set: drainer id -> lease expiry (ms).
LEASES = "postback:drainers"
# Sorted set: postback id -> when its next try is due (ms); the try itself waits in DUE_TRIES.
DUE = "postback:due"
# Hash: postback id -> the try (JSON), beside DUE.
DUE_TRIES = "postback:due:tries"

# --- ingestion -----------------------------------------------------------------------------
# Hash: minute (Unix seconds, by Redis's clock) -> postbacks accepted in it.
ACCEPTED = "postback:accepted"
# Hashes of accepted counts being folded into the database, one per fold (suffix: its token).
ACCEPTED_FOLDING_PREFIX = "postback:accepted:folding:"


def rate_per_sender_key(key_id: int) -> str:
    """A sender key's rate limit: when its allowance is whole again (ms)."""
    return f"postback:rate:key:{key_id}"


def rate_per_address(address: str) -> str:
    """The same for a client address that sent no key."""
    return f"postback:rate:address:{address}"


# --- destinations --------------------------------------------------------------------------


def destination_rate(destination_id: int) -> str:
    """A destination's rate limit: when its allowance is whole again (ms)."""
    return f"postback:rate:destination:{destination_id}"


def destination_throttled(destination_id: int) -> str:
    """Set for a moment after a destination's rate limit held a postback back (the dashboard's
    "throttled")."""
    return f"postback:throttled:destination:{destination_id}"


# --- circuits ------------------------------------------------------------------------------
# Sorted set: host -> open until (ms).
CIRCUITS_OPEN = "postback:circuits:open"
# Hash: host -> failures in a row.
CIRCUITS_FAILURES = "postback:circuits:failures"
# Hash: host -> times opened in a row (each doubles the wait).
CIRCUITS_TRIPS = "postback:circuits:trips"
# Sorted set: host -> when its circuit last changed or was reported on (ms): what workers read
# to bring their copies up to date, and how stale state is found.
CIRCUITS_CHANGES = "postback:circuits:changes"


def circuit_probe(host: str) -> str:
    """A string per host while one worker probes it: that worker's name (expires by itself)."""
    return f"postback:circuits:probe:{host}"


# --- operations ----------------------------------------------------------------------------
# Set by `manage.py profilejob`: the next drain job takes it (GETDEL) and is profiled.
PROFILE_NEXT_JOB = "postback:profile-next-job"


def queue_workers(queue: str) -> str:
    """RQ's set of the workers listening on a queue (RQ's key, named for our scripts)."""
    return WORKERS_BY_QUEUE_KEY % queue
