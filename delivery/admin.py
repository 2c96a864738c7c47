"""Admin: the delivery settings (one row), the read-only attempt log and the open circuits."""

import re
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import models
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.formats import date_format
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.timezone import localtime
from redis.exceptions import RedisError

from delivery.circuit import close_circuits, open_circuits
from delivery.forms import BulkReplayForm, DeliverySettingsForm, DestinationForm, SigningSecretForm
from delivery.models import (
    OVERRIDE_FIELDS,
    CircuitBreaker,
    DeliveryAttempt,
    DeliverySettings,
    Destination,
    DestinationSecret,
    PostbackRequest,
    QueueMonitor,
    SigningSecret,
)
from delivery.queue_pages import is_on_site, may_see_queue_pages
from delivery.recording import ATTEMPT_COLUMNS
from delivery.replay import failed_between, replay
from postbackproject.numbers import PlainNumberInput
from postbackproject.postback import METHODS

# A postback id is `<request id>-<index>`, letters, digits and dashes: a search term with a dot,
# a colon or a bracket is a host.
MAY_BE_POSTBACK_ID = re.compile(r"[\w-]+")


@admin.register(DeliverySettings)
class DeliverySettingsAdmin(admin.ModelAdmin[DeliverySettings]):
    form = DeliverySettingsForm
    formfield_overrides = {models.FloatField: {"widget": PlainNumberInput}}
    fieldsets = [
        ("Retries", {"fields": ["max_attempts", "backoff_base_seconds", "backoff_factor", "backoff_max_seconds"]}),
        ("URL values", {"fields": ["unmatched_default", "max_url_bytes"]}),
        (
            "Requests",
            {
                "fields": [
                    "connect_timeout_seconds",
                    "read_timeout_seconds",
                    "total_timeout_seconds",
                    "response_body_max_bytes",
                    "store_response_body",
                ]
            },
        ),
        (
            "Protecting receivers and each other",
            {"fields": ["max_in_flight_per_host", "circuit_failure_threshold", "circuit_open_seconds"]},
        ),
        ("Queueing", {"fields": ["batch_size"]}),
        ("Signing", {"fields": ["sign_postbacks"]}),
        ("Traces", {"fields": ["send_traceparent"]}),
    ]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, object] | None = None
    ) -> HttpResponseRedirect:
        """There is one row: the list goes straight to it (created with defaults if need be)."""
        settings_row = DeliverySettings.load()
        if settings_row._state.adding:
            settings_row.save()
        return HttpResponseRedirect(reverse("admin:delivery_deliverysettings_change", args=[settings_row.pk]))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: DeliverySettings | None = None) -> bool:
        return False


@admin.register(SigningSecret)
class SigningSecretAdmin(admin.ModelAdmin[SigningSecret]):
    """Secrets that sign postbacks. Staff see each secret on its page: receivers need it."""

    form = SigningSecretForm
    list_display = ["label", "active", "created_at"]
    list_filter = ["active"]
    readonly_fields = ["secret", "created_at"]
    # No bulk delete: it would bypass the form's rule on the last active secret.
    actions = None

    def get_fields(self, request: HttpRequest, obj: SigningSecret | None = None) -> tuple[str, ...]:
        """Adding asks for a label only: the secret is generated when it is saved."""
        return ("label", "active") if obj is None else ("label", "secret", "active", "created_at")

    def has_delete_permission(self, request: HttpRequest, obj: SigningSecret | None = None) -> bool:
        """Only retired secrets are deleted; an active one is deactivated first (the form's rules)."""
        return super().has_delete_permission(request, obj) and (obj is None or not obj.active)


class DestinationSecretFormSet(forms.BaseInlineFormSet):  # type: ignore[type-arg]
    """At most MAX_ACTIVE secrets of a destination are active: a rotation at a time."""

    def clean(self) -> None:
        super().clean()
        active = [
            form for form in self.forms if form.cleaned_data.get("active") and not form.cleaned_data.get("DELETE")
        ]
        if len(active) > DestinationSecret.MAX_ACTIVE:
            raise forms.ValidationError(
                f"At most {DestinationSecret.MAX_ACTIVE} secrets of a destination can be active at once."
            )


class DestinationSecretInline(admin.TabularInline[DestinationSecret, Destination]):
    """A destination's own signing secrets, shown to staff (receivers need them); generated,
    never typed in."""

    model = DestinationSecret
    formset = DestinationSecretFormSet
    fields = ["label", "secret", "active", "created_at"]
    readonly_fields = ["secret", "created_at"]
    extra = 0


@admin.register(Destination)
class DestinationAdmin(admin.ModelAdmin[Destination]):
    """Per-receiver rules; its extra headers' values are never shown (`DestinationForm`)."""

    form = DestinationForm
    formfield_overrides = {models.FloatField: {"widget": PlainNumberInput}}
    inlines = [DestinationSecretInline]
    list_display = ["name", "host", "url_prefix", "paused", "rate_per_second", "header_names"]
    list_filter = ["paused"]
    search_fields = ["name", "host"]
    fieldsets = [
        (None, {"fields": ["name", "host", "url_prefix", "paused"]}),
        ("Rate limit", {"fields": ["rate_per_second", "rate_burst"]}),
        ("Extra headers", {"fields": ["header_lines"]}),
        (
            "Own rules (blank: the global delivery settings)",
            {"fields": list(OVERRIDE_FIELDS)},
        ),
    ]

    @admin.display(description="extra headers")
    def header_names(self, obj: Destination) -> str:
        return ", ".join(name for name, _ in obj.header_pairs)


class CappedPaginator(Paginator):  # type: ignore[type-arg]
    """Counts at most CAP + 1 rows: a COUNT(*) over 5 million attempts took 1.7 s on SQLite,
    on every page of the list, and nobody pages through more than 200 pages of 50."""

    CAP = 10_000

    @cached_property
    def count(self) -> int:
        rows: QuerySet[DeliveryAttempt] = self.object_list  # type: ignore[assignment]
        return rows[: self.CAP + 1].count()


class StatusClassFilter(admin.SimpleListFilter):
    title = "response"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("2xx", "2xx"), ("3xx", "3xx"), ("4xx", "4xx"), ("5xx", "5xx"), ("none", "no response")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[DeliveryAttempt]) -> QuerySet[DeliveryAttempt]:
        value = self.value()
        if value == "none":
            return queryset.filter(response_code__isnull=True)
        if value in {"2xx", "3xx", "4xx", "5xx"}:
            low = int(value[0]) * 100
            return queryset.filter(response_code__gte=low, response_code__lt=low + 100)
        return queryset


class MethodFilter(admin.SimpleListFilter):
    title = "method"
    parameter_name = "method"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(method, method) for method in sorted(METHODS)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[DeliveryAttempt]) -> QuerySet[DeliveryAttempt]:
        if not self.value():
            return queryset
        return queryset.filter(
            postback_id__in=PostbackRequest.objects.filter(method=self.value()).values("postback_id")
        )


class AttemptChangeList(ChangeList):
    """The page's attempts with their postbacks' requests, read in one query for the page."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        rows: list[DeliveryAttempt] = list(self.result_list)
        sent = PostbackRequest.of(row.postback_id for row in rows)
        for row in rows:
            row.sent = sent.get(row.postback_id)


@admin.register(DeliveryAttempt)
class DeliveryAttemptAdmin(admin.ModelAdmin[DeliveryAttempt]):
    # Whole values, nothing cut: the `-N` ending is what tells a request's postbacks apart, and
    # a cut URL or error hides what differs. Long ones wrap in their cell (delivery/admin.css).
    list_display = ["started", "postback", "try_number", "code", "ms", "outcome", "short_why", "request"]
    list_display_links = ["started"]
    # Filters with fixed choices: a filter listing the values found (response codes, methods)
    # or a date bar reads every row of the table for them, 20 s with 5 million rows on SQLite.
    list_filter = ["outcome", StatusClassFilter, MethodFilter, "delivered_at"]
    # Exact matches only (get_search_results): both are indexed, a LIKE on the URL is not.
    search_fields = ["postback_id", "host"]
    search_help_text = "A postback id, or a destination host[:port] (exactly)."
    list_per_page = 50
    show_full_result_count = False  # COUNT(*) over millions of rows on every page is slow
    paginator = CappedPaginator
    actions = ["replay_postbacks"]

    # The detail page: the attempt's own columns, then what its postback sends.
    fields = [*ATTEMPT_COLUMNS, "sent_request", "sent_body", "sent_headers", "sent_by"]
    readonly_fields = ["sent_request", "sent_body", "sent_headers", "sent_by"]

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return AttemptChangeList

    @admin.action(description="Replay the selected postbacks that failed for good", permissions=["replay"])
    def replay_postbacks(self, request: HttpRequest, queryset: QuerySet[DeliveryAttempt]) -> None:
        ids = set(queryset.values_list("postback_id", flat=True))
        queued = replay(ids)
        level = messages.SUCCESS if queued else messages.WARNING
        self.message_user(
            request,
            f"{queued} of {len(ids)} postbacks queued again; a postback is replayed only "
            "when its last attempt failed for good.",
            level,
        )

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("delivery.replay_postback")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[DeliveryAttempt], search_term: str
    ) -> tuple[QuerySet[DeliveryAttempt], bool]:
        """The attempts of a postback or to a host: equality, so that an index answers
        (Django's own search lowercases or pattern-matches, which reads the whole table).

        A term that cannot be a postback id looks by host alone: "postback id or host" cannot
        use the host index's time order, and with 50 million attempts PostgreSQL then walked
        every failure in time order looking for one host's (1.5 s; by host alone, 24 ms)."""
        term = search_term.strip()
        if not term:
            return queryset, False
        by_host = Q(host=term.lower())
        if MAY_BE_POSTBACK_ID.fullmatch(term):
            return queryset.filter(Q(postback_id=term) | by_host), False
        return queryset.filter(by_host), False

    def get_urls(self) -> list[URLPattern]:
        replay_view = self.admin_site.admin_view(self.replay_view)
        return [path("replay/", replay_view, name="delivery_deliveryattempt_replay"), *super().get_urls()]

    def replay_view(self, request: HttpRequest) -> HttpResponse:
        """Replay in bulk: GET shows how many postbacks failed for good in a range (the
        dashboard links here with the range filled in), POST replays them. A POST naming one
        `postback_id` replays that one (the postback page's button) and goes back."""
        if not self.has_replay_permission(request):
            raise PermissionDenied
        if request.method == "POST" and "postback_id" in request.POST:
            return self._replay_one(request, request.POST["postback_id"])
        form = BulkReplayForm(request.POST if request.method == "POST" else request.GET or None)
        matched: set[str] | None = None
        if form.is_valid():
            data = form.cleaned_data
            matched = failed_between(data["since"], data["until"], data["host"].strip())
            if request.method == "POST":
                queued = replay(matched)
                self.message_user(
                    request,
                    f"{queued} of {len(matched)} postbacks queued again; the others have been delivered "
                    "or are being retried since.",
                    messages.SUCCESS if queued else messages.WARNING,
                )
                return HttpResponseRedirect(
                    reverse("admin:delivery_deliveryattempt_changelist") + "?outcome__exact=failed"
                )
        context = {
            **self.admin_site.each_context(request),
            "title": "Replay failed postbacks",
            "opts": self.model._meta,
            "form": form,
            "matched": None if matched is None else len(matched),
        }
        return TemplateResponse(request, "admin/delivery/replay.html", context)

    def _replay_one(self, request: HttpRequest, postback_id: str) -> HttpResponse:
        queued = replay([postback_id])
        if queued:
            self.message_user(request, f"Postback {postback_id} queued again.", messages.SUCCESS)
        else:
            self.message_user(
                request, f"Postback {postback_id} has not failed for good: not replayed.", messages.WARNING
            )
        back = request.POST.get("next", "")
        if not is_on_site(request, back):
            back = reverse("admin:delivery_deliveryattempt_changelist") + f"?q={postback_id}"
        return HttpResponseRedirect(back)

    @admin.display(description="started", ordering="delivered_at")
    def started(self, obj: DeliveryAttempt) -> str:
        return date_format(localtime(obj.delivered_at), "DATETIME_FORMAT")

    @admin.display(description="postback", ordering="postback_id")
    def postback(self, obj: DeliveryAttempt) -> str:
        """The whole id (they run to 34 characters); the link leads to its page."""
        url = reverse("dashboard:postback", args=[obj.postback_id])
        return format_html('<a href="{}" title="Every attempt, and replay">{}</a>', url, obj.postback_id)

    @admin.display(description="request")
    def request(self, obj: DeliveryAttempt) -> str:
        """The whole URL (up to 8 KiB) in a box of a few lines that scrolls."""
        if obj.sent is None:
            return "no longer kept"
        return format_html('<div class="long">{} {}</div>', obj.sent.method, obj.sent.url)

    @admin.display(description="request sent")
    def sent_request(self, obj: DeliveryAttempt) -> str:
        sent = self._sent(obj)
        return f"{sent.method} {sent.url}" if sent else "no longer kept (retention)"

    @admin.display(description="request body")
    def sent_body(self, obj: DeliveryAttempt) -> str:
        sent = self._sent(obj)
        return sent.request_body if sent else ""

    @admin.display(description="sender's headers")
    def sent_headers(self, obj: DeliveryAttempt) -> str:
        """The headers the sender gave (endpoint.headers), as sent: a table that scrolls
        sideways in its own box on a narrow screen."""
        sent = self._sent(obj)
        if sent is None or not sent.headers:
            return "none"
        rows = format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", sent.headers.items())
        return format_html('<div class="scroll-x"><table id="sender-headers">{}</table></div>', rows)

    @admin.display(description="sender")
    def sent_by(self, obj: DeliveryAttempt) -> str:
        sent = self._sent(obj)
        return sent.sender if sent else ""

    @staticmethod
    def _sent(obj: DeliveryAttempt) -> PostbackRequest | None:
        if obj.sent is None:
            obj.sent = PostbackRequest.of([obj.postback_id]).get(obj.postback_id)
        return obj.sent

    @admin.display(description="try", ordering="attempt")
    def try_number(self, obj: DeliveryAttempt) -> int:
        return obj.attempt

    @admin.display(description="code", ordering="response_code")
    def code(self, obj: DeliveryAttempt) -> int | None:
        return obj.response_code

    @admin.display(description="ms", ordering="response_time_ms")
    def ms(self, obj: DeliveryAttempt) -> float | None:
        return obj.response_time_ms

    @admin.display(description="error")
    def short_why(self, obj: DeliveryAttempt) -> str:
        return obj.why()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: DeliveryAttempt | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: DeliveryAttempt | None = None) -> bool:
        return False


@admin.register(QueueMonitor)
class QueueMonitorAdmin(admin.ModelAdmin[QueueMonitor]):
    """django-rq's pages (queues, workers, failed drain jobs), under a name that says so."""

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, object] | None = None) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        return HttpResponseRedirect(reverse("django_rq:home"))

    def has_view_permission(self, request: HttpRequest, obj: QueueMonitor | None = None) -> bool:
        return may_see_queue_pages(request)  # the pages' own rule: one rule for both

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: QueueMonitor | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: QueueMonitor | None = None) -> bool:
        return False


@admin.register(CircuitBreaker)
class CircuitBreakerAdmin(admin.ModelAdmin[CircuitBreaker]):
    """The hosts whose circuit is open, read from Redis; staff with "change" may close them."""

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, object] | None = None) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            return self._close(request)
        try:
            circuits = [
                {
                    "host": circuit.host,
                    "until": datetime.fromtimestamp(circuit.until, UTC),
                    "failures": circuit.failures,
                    "probe_due": circuit.probe_due,
                }
                for circuit in open_circuits()
            ]
        except RedisError as exc:
            circuits = []
            self.message_user(request, f"Redis is unavailable: {exc}", messages.ERROR)
        context = {
            **self.admin_site.each_context(request),
            "title": "Open circuits",
            "opts": self.model._meta,
            "circuits": circuits,
            "can_close": self.has_change_permission(request),
        }
        return TemplateResponse(request, "admin/delivery/circuits.html", context)

    def _close(self, request: HttpRequest) -> HttpResponse:
        if not self.has_change_permission(request):
            raise PermissionDenied
        hosts = request.POST.getlist("host")
        released = close_circuits(hosts)
        self.message_user(
            request,
            f"Closed {len(hosts)} circuit{'s' if len(hosts) != 1 else ''}; "
            f"{released} deferred postback{'s go' if released != 1 else ' goes'} out now.",
            messages.SUCCESS,
        )
        return HttpResponseRedirect(request.path)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: CircuitBreaker | None = None) -> bool:
        return False
