"""Destinations as the dashboard shows them: each one's rules (what it sets itself; the rest
are the global settings) and its state, paused or throttled, linked to its admin page.

Never its headers' values: their names only.
"""

from typing import Any

from django.urls import reverse
from redis.exceptions import RedisError

from delivery.destinations import throttled_destinations
from delivery.models import Destination

# A destination's own rules in words: its field, and how its value reads.
RULE_WORDS = (
    ("max_attempts", "{} attempts"),
    ("backoff_base_seconds", "first backoff {:g} s"),
    ("backoff_max_seconds", "longest backoff {:g} s"),
    ("connect_timeout_seconds", "connect timeout {:g} s"),
    ("total_timeout_seconds", "total timeout {:g} s"),
    ("max_in_flight_per_host", "in-flight cap {} (0: none)"),
)


def rules_of(destination: Destination) -> list[str]:
    """What a destination sets itself, in words."""
    rules: list[str] = []
    if limit := destination.rate_limit:
        rules.append(f"at most {limit.per_second:g}/s, burst {limit.burst}")
    for field, words in RULE_WORDS:
        if (value := getattr(destination, field)) is not None:
            rules.append(words.format(value))
    if names := [name for name, _ in destination.header_pairs]:
        rules.append("headers " + ", ".join(names))
    if any(secret.active for secret in destination.secrets.all()):
        rules.append("own signing secrets")
    return rules


def by_host() -> dict[str, list[dict[str, Any]]]:
    """Every destination, by host: name, prefix, state, rules, admin link."""
    destinations = list(Destination.objects.prefetch_related("secrets"))
    try:
        throttled = throttled_destinations([destination.pk for destination in destinations])
    except RedisError:
        throttled = set()  # the live panel says Redis is down
    found: dict[str, list[dict[str, Any]]] = {}
    for destination in destinations:
        found.setdefault(destination.host, []).append(
            {
                "name": destination.name,
                "url_prefix": destination.url_prefix,
                "paused": destination.paused,
                "throttled": destination.pk in throttled,
                "rules": rules_of(destination),
                "admin_url": reverse("admin:delivery_destination_change", args=[destination.pk]),
            }
        )
    return found
