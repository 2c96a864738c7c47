"""Delivery records and the runtime settings that admins tune."""

import copy
import logging
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import ClassVar

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import DatabaseError, models

from delivery.destinations import RateLimit, Routes
from delivery.hosts import host_of
from delivery.signing import new_secret

logger = logging.getLogger(__name__)


class ResponseBodyPolicy(models.TextChoices):
    """Which attempt rows keep the receiver's response body (its log line always does)."""

    ALL = "all", "all attempts"
    FAILURES = "failures", "failures only (every attempt but a success)"
    NONE = "none", "none"


class DeliverySettings(models.Model):
    """The one row of runtime delivery settings, edited in admin or `manage.py deliverysettings`.

    Workers and ingestion read it through `current()`, which caches it for a few seconds
    (DELIVERY_SETTINGS_CACHE_SECONDS), so a change applies without a restart.
    """

    SINGLETON_ID = 1

    max_attempts = models.PositiveSmallIntegerField(
        default=5,
        validators=[MinValueValidator(1), MaxValueValidator(50)],
        help_text="Tries per postback, counting the first. 1 means never retry.",
    )
    backoff_base_seconds = models.FloatField(
        default=10,
        validators=[MinValueValidator(0), MaxValueValidator(86400)],
        help_text="Wait before the first retry. Later waits grow by the factor; "
        "each is jittered between half and all of its value.",
    )
    backoff_factor = models.FloatField(
        default=4,
        validators=[MinValueValidator(1), MaxValueValidator(100)],
        help_text="Each retry waits this many times longer than the one before.",
    )
    backoff_max_seconds = models.FloatField(
        default=3600,
        validators=[MinValueValidator(0), MaxValueValidator(7 * 86400)],
        help_text="Longest wait between tries, also the cap on a receiver's Retry-After.",
    )
    unmatched_default = models.CharField(
        max_length=1000,
        blank=True,
        default="",
        help_text="Value for a {placeholder} that the data object does not have or sets to null. "
        "Percent-encoded like any other value.",
    )
    max_url_bytes = models.PositiveIntegerField(
        default=16 * 1024,
        validators=[MinValueValidator(256), MaxValueValidator(1024 * 1024)],
        help_text="Longest URL a postback may be sent to, in bytes, once its values are filled in. "
        "Ingestion refuses a data object whose URL would be longer; delivery checks again and "
        "records a failed attempt without sending.",
    )
    connect_timeout_seconds = models.FloatField(
        default=5,
        validators=[MinValueValidator(0.1), MaxValueValidator(60)],
        help_text="How long to wait for the receiver to accept a connection.",
    )
    read_timeout_seconds = models.FloatField(
        default=10,
        validators=[MinValueValidator(0.1), MaxValueValidator(300)],
        help_text="How long to wait for the receiver between bytes of its response.",
    )
    total_timeout_seconds = models.FloatField(
        default=15,
        validators=[MinValueValidator(0.1), MaxValueValidator(600)],
        help_text="Longest one request may take, from connecting to the last byte of the response, "
        "however slowly the receiver sends it. A request cut off here is retried.",
    )
    response_body_max_bytes = models.PositiveIntegerField(
        default=4096,
        validators=[MaxValueValidator(1024 * 1024)],
        help_text="How much of each response body is kept in the attempt log. 0 keeps none.",
    )
    store_response_body = models.CharField(
        max_length=8,
        choices=ResponseBodyPolicy.choices,
        default=ResponseBodyPolicy.FAILURES,
        help_text="Which attempt rows keep the response body (cut to response_body_max_bytes): a "
        "success's body is seldom read and costs the most space. Each attempt's log line carries "
        "its body whatever this says.",
    )
    batch_size = models.PositiveIntegerField(
        default=100,
        validators=[MinValueValidator(1), MaxValueValidator(10000)],
        help_text="Most postbacks per inbox entry; a larger request is split into several entries, "
        "which different workers can deliver at once.",
    )
    max_in_flight_per_host = models.PositiveIntegerField(
        default=0,
        validators=[MaxValueValidator(100000)],
        help_text="Most requests one worker keeps in flight to one destination host; 0: no cap of "
        "its own (DELIVERY_CONCURRENCY, 1024 by default, bounds it). Hosts earn their in-flight "
        "requests with answers, and hosts that have not answered share a quarter of each "
        "worker's connections, so a slow or stalling host cannot take them all without a cap.",
    )
    circuit_failure_threshold = models.PositiveIntegerField(
        default=10,
        validators=[MinValueValidator(1), MaxValueValidator(10000)],
        help_text="Failures or timeouts in a row after which a host's circuit opens: its postbacks "
        "wait, without using up their attempts, until one probe request gets through.",
    )
    circuit_open_seconds = models.FloatField(
        default=30,
        validators=[MinValueValidator(1), MaxValueValidator(86400)],
        help_text="How long an open circuit waits before its probe. Each failed probe doubles the "
        "wait, up to 16 times this.",
    )
    sign_postbacks = models.BooleanField(
        default=False,
        help_text="Sign every request with the active signing secrets (Standard Webhooks headers "
        "webhook-id, webhook-timestamp, webhook-signature). Needs an active signing secret.",
    )
    send_traceparent = models.BooleanField(
        default=False,
        help_text="Send each request with a W3C traceparent header naming its attempt's span, so "
        "that a receiver's traces join ours. Takes effect while traces are on "
        "(OTEL_EXPORTER_OTLP_ENDPOINT set).",
    )
    updated_at = models.DateTimeField(auto_now=True)

    # The active signing secrets when sign_postbacks is on, loaded with the settings by
    # `current()`, so that workers sign without a query per request. Not a column.
    signing_secrets: tuple[str, ...] = ()
    # The destinations, loaded with the settings by `current()` (not columns): every
    # destination's rules, each a copy of these settings with its overrides (`routes`); and on
    # such a copy, the destination it is for.
    routes: "Routes[DeliverySettings]" = Routes()
    destination: "Destination | None" = None

    _cache: ClassVar[tuple[float, "DeliverySettings"] | None] = None

    class Meta:
        verbose_name = "delivery settings"
        verbose_name_plural = "delivery settings"

    def __str__(self) -> str:
        return "Delivery settings"

    def save(self, *args: object, **kwargs: object) -> None:
        self.pk = self.SINGLETON_ID
        super().save(*args, **kwargs)  # type: ignore[arg-type]
        DeliverySettings._cache = None

    @classmethod
    def load(cls) -> "DeliverySettings":
        """The settings row as stored now (defaults if it was never saved)."""
        found = cls.objects.filter(pk=cls.SINGLETON_ID).first()
        return found if found is not None else cls(pk=cls.SINGLETON_ID)

    @classmethod
    def current(cls) -> "DeliverySettings":
        """The settings, at most DELIVERY_SETTINGS_CACHE_SECONDS old; while the database is
        unreachable, the last ones read (delivery goes on), or the defaults if none was."""
        cached = cls._cache
        now = time.monotonic()
        if cached is None or now - cached[0] >= settings.DELIVERY_SETTINGS_CACHE_SECONDS:
            try:
                cached = (now, cls.load().with_signing_secrets().with_destinations())
            except DatabaseError:
                logger.warning("delivery settings unreadable; using the last ones read", exc_info=True)
                cached = (now, cached[1] if cached is not None else cls(pk=cls.SINGLETON_ID))
            cls._cache = cached
        return cached[1]

    def with_signing_secrets(self) -> "DeliverySettings":
        """These settings with the active signing secrets attached, when signing is on."""
        if self.sign_postbacks:
            self.signing_secrets = SigningSecret.active_secrets()
            if not self.signing_secrets:
                # The admin and the command refuse this state; only a direct database edit
                # reaches it. Postbacks then go out unsigned: say so on every refresh.
                logger.error("sign_postbacks is on but no signing secret is active: postbacks go out unsigned")
        return self

    def with_destinations(self) -> "DeliverySettings":
        """These settings with every destination's rules attached (two queries)."""
        destinations = list(Destination.objects.all())
        secrets: dict[int, list[str]] = {}
        active = DestinationSecret.objects.filter(active=True).order_by("created_at", "id")
        for destination_id, secret in active.values_list("destination", "secret"):
            secrets.setdefault(destination_id, []).append(secret)
        self.routes = Routes(
            [(row.host, row.url_prefix, row.rules(self, tuple(secrets.get(row.pk, ())))) for row in destinations]
        )
        return self

    def rules_for(self, host: str, url: str) -> "DeliverySettings":
        """The settings a postback to this URL goes by: its destination's, else these."""
        return self.routes.match(host, url) or self


class ReloadsSettings(models.Model):
    """A row the cached settings carry (`DeliverySettings.current()`): saving or deleting one
    drops this process's cache, so that it works with the change at once."""

    class Meta:
        abstract = True

    def save(self, *args: object, **kwargs: object) -> None:
        super().save(*args, **kwargs)  # type: ignore[arg-type]
        DeliverySettings._cache = None

    def delete(self, *args: object, **kwargs: object) -> tuple[int, dict[str, int]]:
        deleted = super().delete(*args, **kwargs)  # type: ignore[arg-type]
        DeliverySettings._cache = None
        return deleted


class SigningSecret(ReloadsSettings):
    """A secret that signs postbacks (`delivery.signing`), shared with receivers.

    Generated here, never typed in. At most MAX_ACTIVE are active, so that a rotation can run:
    add the new one, give it to receivers, deactivate the old one. The database holds it in
    clear, as it must to sign: whoever reads the database can sign postbacks.
    """

    MAX_ACTIVE = 2

    label = models.CharField(max_length=100, help_text='Whom or what this secret is for, e.g. "2026 rotation".')
    secret = models.CharField(max_length=100, default=new_secret, editable=False)
    active = models.BooleanField(default=True, help_text="Active secrets sign every postback while signing is on.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.label

    @classmethod
    def active_secrets(cls) -> tuple[str, ...]:
        """The secrets that sign now, oldest first (their order in the signature header)."""
        rows = cls.objects.filter(active=True).order_by("created_at", "id")
        return tuple(rows.values_list("secret", flat=True))


def normalised_host(text: str) -> str:
    """A destination's host as URLs name it (`hosts.host_of`): `host[:port]`, lower case, a
    scheme's default port dropped when a URL is given."""
    text = text.strip()
    return host_of(text) if "://" in text else host_of("none://" + text)


# A destination's own rules: each, set, replaces the delivery setting of the same name.
OVERRIDE_FIELDS = (
    "max_attempts",
    "backoff_base_seconds",
    "backoff_max_seconds",
    "connect_timeout_seconds",
    "total_timeout_seconds",
    "max_in_flight_per_host",
)


class Destination(ReloadsSettings):
    """Rules for the postbacks to one receiver: a host, optionally a URL prefix within it
    (`delivery.destinations`). Each rule left blank is the global setting's.

    Extra headers are stored in clear (they are sent), but admin never shows a saved value,
    and they are never logged or recorded with attempts.
    """

    name = models.CharField(max_length=100, help_text='Whom this is for, e.g. "Ad network A".')
    host = models.CharField(
        max_length=255,
        help_text="host[:port] as the host table shows it (a URL's default port left out), e.g. "
        "api.example.com or 10.0.0.5:8080. A URL may be pasted: its host is kept.",
    )
    url_prefix = models.CharField(
        max_length=1000,
        blank=True,
        default="",
        help_text='Optional: only URLs on this host whose path starts with this, e.g. "/v2/". '
        "The longest matching prefix wins over a shorter one and over the host alone.",
    )
    paused = models.BooleanField(
        default=False,
        help_text="Postbacks wait, spending no attempt, and go out in order of arrival once unpaused.",
    )
    rate_per_second = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.01), MaxValueValidator(100000)],
        help_text="Most requests a second to this destination, from all workers together. "
        "Postbacks over it wait (no attempt spent). Blank: no limit.",
    )
    rate_burst = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(100000)],
        help_text="Most requests at once within the rate. Blank: the rate's requests in a second (at least 1).",
    )
    headers = models.JSONField(
        default=list,
        blank=True,
        help_text="Extra headers sent to this destination: [name, value] pairs. Over a sender's "
        "header of the same name; under the product's own.",
    )
    max_attempts = models.PositiveSmallIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(50)]
    )
    backoff_base_seconds = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0), MaxValueValidator(86400)]
    )
    backoff_max_seconds = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0), MaxValueValidator(7 * 86400)]
    )
    connect_timeout_seconds = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0.1), MaxValueValidator(60)]
    )
    total_timeout_seconds = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0.1), MaxValueValidator(600)]
    )
    max_in_flight_per_host = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MaxValueValidator(100000)],
        help_text="Most requests one worker keeps in flight to this host (0: no cap of its own).",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["host", "url_prefix"]
        constraints = [models.UniqueConstraint(fields=["host", "url_prefix"], name="destination_host_prefix")]

    def __str__(self) -> str:
        return f"{self.name} ({self.host}{self.url_prefix})"

    def save(self, *args: object, **kwargs: object) -> None:
        self.host = normalised_host(self.host)
        super().save(*args, **kwargs)

    @property
    def header_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((str(name), str(value)) for name, value in self.headers or ())

    @property
    def rate_limit(self) -> RateLimit | None:
        if not self.rate_per_second:
            return None
        burst = self.rate_burst or max(1, int(self.rate_per_second))
        return RateLimit(self.pk, self.rate_per_second, burst)

    def overrides(self) -> dict[str, float | int]:
        """The rules this destination sets itself: settings field -> value."""
        return {field: getattr(self, field) for field in OVERRIDE_FIELDS if getattr(self, field) is not None}

    def rules(self, config: DeliverySettings, secrets: tuple[str, ...]) -> DeliverySettings:
        """The settings its postbacks go by: a copy of the global ones with its overrides, its
        own signing secrets when it has any (else the global ones)."""
        rules = copy.copy(config)
        for field, value in self.overrides().items():
            setattr(rules, field, value)
        if secrets:
            rules.signing_secrets = secrets
        rules.routes = Routes()
        rules.destination = self
        return rules


class DestinationSecret(ReloadsSettings):
    """A destination's own signing secret: its postbacks are signed with its active ones (at
    most two, for a rotation), whatever sign_postbacks says; the global secrets sign the rest."""

    MAX_ACTIVE = SigningSecret.MAX_ACTIVE

    destination = models.ForeignKey(Destination, on_delete=models.CASCADE, related_name="secrets")
    label = models.CharField(max_length=100, help_text='e.g. "2026 rotation".')
    secret = models.CharField(max_length=100, default=new_secret, editable=False)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.label


class Outcome(models.TextChoices):
    SUCCESS = "success", "success"
    RETRY = "retry", "will retry"
    FAILED = "failed", "failed"
    # Not sent: the host's circuit is open. The try keeps its number and is made later.
    DEFERRED = "deferred", "deferred"


FINAL_OUTCOMES = (Outcome.SUCCESS, Outcome.FAILED)


# How far back from a try's start its earlier record is looked for: a try recorded again (after
# a crash, or deferred again) and the request of its postback. On PostgreSQL that look reads the
# one or two day partitions it needs, not all of them.
RECORDED_WITHIN = timedelta(days=2)


class PostbackRequest(models.Model):
    """What a postback sends on every try, stored once beside its attempts (which name it by
    postback id): the URL and body are most of an attempt's bytes, and a retry sends them
    again unchanged.

    Written with the postback's first recorded try. A try recorded more than RECORDED_WITHIN
    (two days) after the postback's request row (a replay weeks later) writes the request
    again, so the attempts of any day find their request within that window; retention keeps
    requests that much longer than attempts (`delivery.retention`). On PostgreSQL the table is
    partitioned by day of `first_at`, like the attempt log (`delivery.partitions`).
    """

    postback_id = models.CharField(max_length=64)
    method = models.CharField(max_length=7)
    url = models.TextField(help_text="The URL as sent, placeholders replaced.")
    host = models.CharField(max_length=255, blank=True, help_text="The URL's host[:port], as circuits count it.")
    request_body = models.TextField(blank=True, help_text="The JSON body sent (POST, PUT, PATCH).")
    sender = models.CharField(
        max_length=100,
        blank=True,
        help_text='Who sent the request: "key 12" for sender key 12, else the client\'s address.',
    )
    headers = models.JSONField(
        default=dict,
        db_default={},
        blank=True,
        help_text="The sender's headers (endpoint.headers) as sent, placeholders replaced: names to values.",
    )
    first_at = models.DateTimeField(help_text="When the first try recorded with this row started.")

    class Meta:
        indexes = [
            # Every lookup: the postback page, admin's attempt list and detail, replay, the
            # check that writes a request once.
            models.Index(fields=["postback_id", "first_at"], name="request_postback"),
            # Retention on SQLite (PostgreSQL drops whole days).
            models.Index(fields=["first_at"], name="request_first_at"),
        ]

    def __str__(self) -> str:
        return f"{self.postback_id}: {self.method} {self.url}"

    @classmethod
    def of(cls, postback_ids: Iterable[str]) -> dict[str, "PostbackRequest"]:
        """The request of each of these postbacks that has one (the newest, where a replay
        wrote it again): one query."""
        found: dict[str, PostbackRequest] = {}
        for row in cls.objects.filter(postback_id__in=set(postback_ids)).order_by("first_at", "id"):
            found[row.postback_id] = row
        return found


class DeliveryAttempt(models.Model):
    """One try at delivering one postback: when, and what came back. What was sent is the
    postback's PostbackRequest, stored once for all its tries."""

    postback_id = models.CharField(max_length=64)
    attempt = models.PositiveSmallIntegerField(help_text="1 for the first try.")
    host = models.CharField(
        max_length=255,
        blank=True,
        help_text="The URL's host[:port], as circuits count it; kept on each attempt too, because "
        "every per-host page and admin's search filter attempts by it.",
    )
    delivered_at = models.DateTimeField(help_text="When the request started.")
    response_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response_time_ms = models.FloatField(null=True, blank=True)
    response_body = models.TextField(blank=True)
    error = models.TextField(blank=True)
    outcome = models.CharField(max_length=8, choices=Outcome.choices)

    # What the postback sends, where a page attached it (one query for a page of attempts).
    # Not a column.
    sent: PostbackRequest | None = None

    class Meta:
        ordering = ["-delivered_at", "-id"]
        permissions = [("replay_postback", "Can replay failed postbacks")]
        # Each index serves a page (docs/decisions.md, "Indexes kept to what the pages read";
        # `manage.py queryplans` shows which query uses which). On PostgreSQL the table is
        # partitioned by day (`delivery.partitions`) and each partition has these indexes.
        indexes = [
            # Every lookup by postback id: the postback page, admin's search, replay, a worker's
            # look at the log before sending, and the check that keeps a try recorded once
            # (`delivery.recording.insert_new_attempts`: a partitioned table cannot hold a
            # unique constraint without its partition key).
            models.Index(fields=["postback_id", "attempt", "outcome"], name="attempt_postback_try"),
            # Admin's list, newest first, and its date filter; prunehistory's oldest rows.
            models.Index(fields=["delivered_at"], name="attempt_delivered_at"),
            # The newest failures of a range (dashboard's "why", admin's outcome filter, bulk replay).
            models.Index(fields=["outcome", "delivered_at"], name="attempt_outcome_time"),
            # The same for one host, and admin's search by host.
            models.Index(fields=["host", "outcome", "delivered_at"], name="attempt_host_outcome_time"),
        ]

    def __str__(self) -> str:
        return f"{self.postback_id} try {self.attempt}: {self.outcome}"

    def why(self, body_chars: int = 60) -> str:
        """Why this try did not succeed, in one short line ("" when it did): the error, or the
        status with the start of the receiver's answer (HTTP replies carry no error text)."""
        if self.outcome == Outcome.SUCCESS:
            return ""
        if self.error.strip():
            return self.error.strip().splitlines()[0]
        body = " ".join(self.response_body.split())
        reply = f"HTTP {self.response_code}" if self.response_code is not None else "no response"
        return f"{reply}: {body[:body_chars]}" if body else reply


# Upper bounds (ms) of the latency histogram kept per rollup; a last bucket takes the rest.
LATENCY_BOUNDS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
LATENCY_BUCKETS = (*(f"le_{bound}ms" for bound in LATENCY_BOUNDS_MS), f"over_{LATENCY_BOUNDS_MS[-1]}ms")


def _bucket(bound: str) -> models.PositiveIntegerField[int, int]:
    return models.PositiveIntegerField(default=0, help_text=f"Attempts answered in {bound}.")


class RollupCounts(models.Model):
    """What every rollup row adds up: attempts, their latency, and its histogram."""

    attempts = models.PositiveIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0)
    latency_ms_max = models.FloatField(
        default=0,
        help_text="The longest response time (ms) of these attempts: a percentile read from the "
        "histogram is interpolated up to it, never beyond.",
    )
    le_5ms = _bucket("5 ms or less")
    le_10ms = _bucket("5 to 10 ms")
    le_25ms = _bucket("10 to 25 ms")
    le_50ms = _bucket("25 to 50 ms")
    le_100ms = _bucket("50 to 100 ms")
    le_250ms = _bucket("100 to 250 ms")
    le_500ms = _bucket("250 to 500 ms")
    le_1000ms = _bucket("0.5 to 1 s")
    le_2500ms = _bucket("1 to 2.5 s")
    le_5000ms = _bucket("2.5 to 5 s")
    le_10000ms = _bucket("5 to 10 s")
    le_30000ms = _bucket("10 to 30 s")
    over_30000ms = _bucket("over 30 s")

    class Meta:
        abstract = True


class DeliveryRollup(RollupCounts):
    """Attempts per minute, destination host, outcome and status class: what charts read.

    Written in the same transaction as the attempt rows, counting only rows really inserted,
    so a try recorded twice after a crash counts once. Kept longer than the attempts.
    """

    minute = models.DateTimeField(help_text="Start of the minute (UTC) the attempts started in.")
    host = models.CharField(max_length=255)
    outcome = models.CharField(max_length=8, choices=Outcome.choices)
    code_class = models.CharField(max_length=4, help_text='"2xx" to "5xx", or "none" without a response.')

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["minute", "host", "outcome", "code_class"], name="one_rollup_per_group"),
        ]
        # The constraint's index also serves every range of minutes over all hosts (the host
        # table's edges, prunehistory).
        indexes = [
            # One host's charts over a short range.
            models.Index(fields=["host", "minute"], name="rollup_host_minute"),
        ]

    def __str__(self) -> str:
        return f"{self.minute:%Y-%m-%d %H:%M} {self.host} {self.outcome} {self.code_class}: {self.attempts}"


# DeliverySeries.host of the rows that count every host together.
ALL_HOSTS = "*"


class Span(models.IntegerChoices):
    MINUTE = 60, "minute"
    HOUR = 3600, "hour"


class DeliverySeries(RollupCounts):
    """Coarser rollups beside DeliveryRollup, so that no chart reads more than a few thousand
    rows: per minute for all hosts together (host "*"), and per hour for each host and for
    all hosts. Written with DeliveryRollup, in the same transaction, from the same rows.
    """

    span = models.PositiveIntegerField(choices=Span.choices, help_text="Length of the period, in seconds.")
    start = models.DateTimeField(help_text="Start of the period (UTC).")
    host = models.CharField(max_length=255, help_text='A host[:port], or "*" for all hosts together.')
    outcome = models.CharField(max_length=8, choices=Outcome.choices)
    code_class = models.CharField(max_length=4, help_text='"2xx" to "5xx", or "none" without a response.')

    class Meta:
        verbose_name_plural = "delivery series"
        constraints = [
            # Also the index of every chart's query: one span, one host (or "*"), a time range.
            models.UniqueConstraint(fields=["span", "host", "start", "outcome", "code_class"], name="one_series_row"),
        ]
        # The host table: one span, a time range, every host.
        indexes = [models.Index(fields=["span", "start"], name="series_span_start")]

    def __str__(self) -> str:
        return f"{self.start:%Y-%m-%d %H:%M}+{self.span}s {self.host} {self.outcome} {self.code_class}: {self.attempts}"


class AcceptedRollup(models.Model):
    """Postbacks accepted per minute. Ingestion counts in Redis, beside the inbox write; the
    counts are folded in here a minute at a time (`delivery.rollups.fold_accepted`)."""

    minute = models.DateTimeField(unique=True)
    postbacks = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.minute:%Y-%m-%d %H:%M}: {self.postbacks} accepted"


class RollupFold(models.Model):
    """A fold of accepted counts that reached the database: a fold retried after a crash
    finds its mark and is not counted twice."""

    token = models.CharField(max_length=64, unique=True)
    folded_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.token


class CircuitBreaker(models.Model):
    """Not a table: admin's door to the circuits, which live in Redis (`delivery.circuit`).

    The model gives admin a page, a place in its index and permissions: "view" to list the
    open circuits, "change" to close one by hand.
    """

    class Meta:
        managed = False
        verbose_name = "open circuit"
        verbose_name_plural = "open circuits"
        default_permissions = ("view", "change")

    def __str__(self) -> str:
        return "open circuit"


class QueueMonitor(models.Model):
    """Not a table: admin's entry for django-rq's pages (queues, workers, failed jobs)."""

    class Meta:
        managed = False
        verbose_name = "queues and workers"
        verbose_name_plural = "queues and workers"
        default_permissions = ("view",)

    def __str__(self) -> str:
        return "queues and workers"
