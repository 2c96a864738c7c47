"""What a response means for a postback, and how long to wait before trying again."""

import random

from delivery.models import DeliverySettings, Outcome
from delivery.transport import Response

# Statuses that say "not now" rather than "never": the receiver may recover.
RETRYABLE_STATUSES = frozenset({408, 429})


def is_success(status: int) -> bool:
    return 200 <= status < 300


def is_retryable(response: Response) -> bool:
    if response.status is None:
        return response.transient
    return response.status in RETRYABLE_STATUSES or 500 <= response.status < 600


def outcome_of(response: Response, try_in_series: int, config: DeliverySettings) -> Outcome:
    """2xx succeeds; retryable failures retry until the attempts run out; the rest fail now."""
    if response.status is not None and is_success(response.status):
        return Outcome.SUCCESS
    if is_retryable(response) and try_in_series < config.max_attempts:
        return Outcome.RETRY
    return Outcome.FAILED


def backoff_seconds(try_in_series: int, config: DeliverySettings) -> float:
    """Wait after try N: base * factor^(N-1), capped, with "equal jitter" (half fixed, half
    random) so that postbacks failed together do not all come back at the same instant."""
    ceiling = min(
        config.backoff_max_seconds, config.backoff_base_seconds * config.backoff_factor ** (try_in_series - 1)
    )
    # Clamped: with the tiniest bases the sum of the two halves rounds past the ceiling.
    return min(ceiling, ceiling / 2 + random.uniform(0, ceiling / 2))


def retry_delay_seconds(try_in_series: int, retry_after: float | None, config: DeliverySettings) -> float:
    """Backoff, or longer when the receiver asked for it with Retry-After (within the cap)."""
    delay = backoff_seconds(try_in_series, config)
    if retry_after is not None:
        delay = max(delay, min(retry_after, config.backoff_max_seconds))
    return delay


def host_answered(response: Response) -> bool | None:
    """What a try says about its host, for the circuit breaker: True when the host answered
    usefully, False when it failed or went silent (counts toward opening its circuit), None
    when the try says nothing about the host (the address was refused before sending)."""
    if response.status is not None:
        return not is_retryable(response)
    return False if response.transient else None
