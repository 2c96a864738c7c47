"""The service's database as the benchmark sees it: delivery settings in, attempt rows out.

A started service has a database of its own (a copy of a migrated SQLite file, or the URL
given), which this process reaches through an extra connection alias registered at run time.
"""

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import environ
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import Max

from delivery.models import DeliveryAttempt, DeliverySettings

FINAL_OUTCOMES = frozenset({"success", "failed"})  # "retry" and "deferred" are not final
# Rows are polled by id; a row whose transaction commits after a higher id was read would be
# missed, so each poll reads this many ids back again (and drops what it has seen).
POLL_OVERLAP_IDS = 5000

_aliases = itertools.count(1)


def open_database(url: str | None) -> str:
    """A connection alias for the service's database (None: this process's default)."""
    if url is None:
        return DEFAULT_DB_ALIAS
    config: dict[str, Any] = dict(environ.Env.db_url_config(url))
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # As postbackproject/settings.py: WAL, so reading here never blocks a worker's write.
        config["OPTIONS"] = {"init_command": "PRAGMA journal_mode=WAL;", "timeout": 20}
    alias = f"benchmark{next(_aliases)}"
    connections.settings[alias] = connections.configure_settings({DEFAULT_DB_ALIAS: config})[DEFAULT_DB_ALIAS]
    return alias


def close_database(alias: str) -> None:
    connections[alias].close()


def apply_settings(alias: str, overrides: Mapping[str, object]) -> dict[str, object]:
    """Write the defaults plus overrides as the settings row; returns the fields applied.

    Only fields the model has are set, so the tool works on either side of a change that adds
    or removes settings.
    """
    row = DeliverySettings(pk=DeliverySettings.SINGLETON_ID)
    applied = {}
    for name, value in overrides.items():
        if hasattr(row, name):
            setattr(row, name, value)
            applied[name] = value
    row.save(using=alias)
    return applied


def current_settings(alias: str) -> DeliverySettings | None:
    return DeliverySettings.objects.using(alias).filter(pk=DeliverySettings.SINGLETON_ID).first()


def restore_settings(alias: str, previous: DeliverySettings | None) -> None:
    if previous is None:
        DeliverySettings.objects.using(alias).filter(pk=DeliverySettings.SINGLETON_ID).delete()
    else:
        previous.save(using=alias)


@dataclass(frozen=True)
class AttemptRow:
    postback_id: str
    attempt: int
    outcome: str


class AttemptLog:
    """Every DeliveryAttempt row written after it was opened, read a little at a time."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.start_id: int = self.rows().aggregate(top=Max("id"))["top"] or 0
        self.last_id = self.start_id
        self.seen: set[AttemptRow] = set()

    def rows(self) -> Any:
        return DeliveryAttempt.objects.using(self.alias)

    def final_times(self) -> dict[str, float]:
        """When each postback's final try ended (Unix time), from the rows themselves: the start
        of the try plus its response time. A postback delivered after a failure counts as
        delivered. One query, at the end of a run (dates cost to convert, rows by the 100,000)."""
        query = (
            self.rows()
            .filter(id__gt=self.start_id, outcome__in=FINAL_OUTCOMES)
            .values_list("postback_id", "outcome", "delivered_at", "response_time_ms")
        )
        times: dict[str, float] = {}
        outcomes: dict[str, str] = {}
        for postback_id, outcome, delivered_at, response_ms in query.iterator(chunk_size=5000):
            ended = delivered_at.timestamp() + (response_ms or 0.0) / 1000
            if postback_id not in times or (outcome == "success" and outcomes[postback_id] != "success"):
                times[postback_id], outcomes[postback_id] = ended, outcome
        return times

    def poll(self) -> list[AttemptRow]:
        """Rows not returned before."""
        since = max(self.start_id, self.last_id - POLL_OVERLAP_IDS)
        fresh = []
        query = self.rows().filter(id__gt=since).order_by("id").values_list("id", "postback_id", "attempt", "outcome")
        for row_id, postback_id, attempt, outcome in query.iterator(chunk_size=5000):
            self.last_id = max(self.last_id, row_id)
            row = AttemptRow(postback_id, attempt, outcome)
            if row not in self.seen:
                self.seen.add(row)
                fresh.append(row)
        return fresh
