"""Redis at its memory limit: with `noeviction` it refuses writes (OutOfMemoryError, "OOM command
not allowed") until memory is freed. Delivery rides it out: the writes that free memory or keep
a drainer's entries its own run anyway (their scripts are `allow-oom`), the rest wait for a
later turn, and no worker or job fails for it."""

import logging
from collections.abc import Callable

from redis.exceptions import OutOfMemoryError

logger = logging.getLogger(__name__)


def unless_redis_is_full(call: Callable[[], object], what: str) -> bool:
    """Run `call`; when Redis refuses it for being full, say so and go on without it (the
    caller tries again on a later turn). Whether it ran."""
    try:
        call()
    except OutOfMemoryError:
        logger.warning("Redis is full (maxmemory, noeviction): %s waits for room", what)
        return False
    return True
