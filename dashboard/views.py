"""Dashboards for analysts, behind a login and read-only: each page is a shell, and each
chart or table on it is served as JSON by an endpoint of its own under /dashboard/api/."""

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_safe
from redis.exceptions import RedisError

from dashboard import attempts, charts, destinations, live
from dashboard.ranges import RangeError, Window, window_from
from delivery.replay import failed_postbacks

ChartView = Callable[[HttpRequest, Window, str | None], dict[str, Any]]
# The overview's charts: endpoint name, title, what it shows.
CHARTS = [
    ("volume", "Volume", "Postbacks accepted, and attempts by outcome."),
    ("success", "Success rate", "Sent attempts answered 2xx, and finished postbacks delivered (%)."),
    ("latency", "Latency", "Response time percentiles (ms), from histogram buckets; never above the slowest response."),
    ("codes", "Response codes", "Sent attempts by status class; no response: refused or timed out."),
]
# The longest postback id and host an attempt can have (DeliveryAttempt's columns): anything
# longer, or holding a control character (PostgreSQL refuses NUL), is no postback's or host's.
MAX_ID_CHARS = 64
MAX_HOST_CHARS = 255


@login_required
@require_safe
def index(request: HttpRequest) -> HttpResponse:
    context = {"charts": CHARTS, "time_zone": timezone.get_current_timezone_name()}
    return render(request, "dashboard/index.html", context)


@login_required
@require_safe
def postback_lookup(request: HttpRequest) -> HttpResponse:
    postback_id = request.GET.get("id", "").strip() or "-"
    if problem := id_problem(postback_id):
        return HttpResponseBadRequest(problem, content_type="text/plain; charset=utf-8")
    return redirect("dashboard:postback", postback_id=postback_id)


@login_required
@require_safe
def postback(request: HttpRequest, postback_id: str) -> HttpResponse:
    """One postback: what was sent, and every attempt with what came back."""
    if problem := id_problem(postback_id):
        return HttpResponseBadRequest(problem, content_type="text/plain; charset=utf-8")
    tries = attempts.history(postback_id)
    if not tries:
        raise Http404("no attempt of this postback is recorded (yet, or any more)")
    context = {
        "postback_id": postback_id,
        "tries": tries,
        "last": tries[-1],
        # What it sends (stored once for all its tries); None if pruned before its attempts.
        "sent": attempts.request_of(postback_id),
        # The error column only when a try has one: a delivered postback shows what came back.
        "any_error": any(row.error for row in tries),
        "time_zone": timezone.get_current_timezone_name(),
        "replayable": bool(failed_postbacks([postback_id])),
        "can_replay": request.user.is_staff and request.user.has_perm("delivery.replay_postback"),
        "admin_attempts": reverse("admin:delivery_deliveryattempt_changelist") + f"?q={postback_id}",
    }
    return render(request, "dashboard/postback.html", context)


def api(view: ChartView) -> Callable[[HttpRequest], JsonResponse]:
    """A JSON endpoint: login, GET only, the window from `range` (`start`, `end`), an optional
    `host`; a range it cannot show is a 400 that says why."""

    @wraps(view)
    @login_required
    @require_safe
    def endpoint(request: HttpRequest) -> JsonResponse:
        try:
            window = window_from(request.GET, timezone.now())
        except RangeError as exc:
            return JsonResponse({"error": str(exc)}, status=400)
        host = request.GET.get("host") or None
        if host is not None and (problem := text_problem("host", host, MAX_HOST_CHARS)):
            return JsonResponse({"error": problem}, status=400)
        return JsonResponse(view(request, window, host))

    return endpoint


def text_problem(name: str, text: str, longest: int) -> str | None:
    """Why no recorded attempt can hold this text (None if one can), for the reader."""
    if len(text) > longest:
        return f"{name}: at most {longest} characters"
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        return f"{name}: no control characters"
    return None


def id_problem(postback_id: str) -> str | None:
    if "/" in postback_id:
        return f"{postback_id[:MAX_ID_CHARS]!r} is not a postback id: ids hold no '/'"
    problem = text_problem("postback id", postback_id, MAX_ID_CHARS)
    return f"not a postback id ({problem})" if problem else None


@api
def volume(request: HttpRequest, window: Window, host: str | None) -> dict[str, Any]:
    return charts.volume(window, host, _unfolded_accepted())


@api
def success(request: HttpRequest, window: Window, host: str | None) -> dict[str, Any]:
    return charts.success(window, host)


@api
def latency(request: HttpRequest, window: Window, host: str | None) -> dict[str, Any]:
    return charts.latency(window, host)


@api
def codes(request: HttpRequest, window: Window, host: str | None) -> dict[str, Any]:
    return charts.codes(window, host)


@api
def hosts(request: HttpRequest, window: Window, host: str | None) -> dict[str, Any]:
    try:
        circuits = live.circuits()
    except RedisError:
        circuits = {}  # the table still shows volumes; the live panel says Redis is down
    ruled = destinations.by_host()
    found = charts.hosts(window, circuits, ruled)
    if host is not None:  # the host view: its destinations' rules and state, and its circuit
        found["host_view"] = {"destinations": ruled.get(host, []), "circuit": charts.circuit_state(circuits.get(host))}
    return found


@api
def failures(request: HttpRequest, window: Window, host: str | None) -> dict[str, Any]:
    found = attempts.failures(window, host)
    query = {"since": window.start.isoformat(), "until": window.end.isoformat(), "host": host or ""}
    return {**found, "replay_url": reverse("admin:delivery_deliveryattempt_replay") + "?" + urlencode(query)}


@login_required
@require_safe
def live_figures(request: HttpRequest) -> JsonResponse:
    try:
        return JsonResponse(live.figures())
    except RedisError as exc:
        return JsonResponse({"error": f"Redis is unavailable: {exc}"}, status=503)


def _unfolded_accepted() -> dict[int, int]:
    try:
        return live.unfolded_accepted()
    except RedisError:
        return {}  # the folded minutes still show; the live panel says Redis is down
