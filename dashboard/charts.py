"""What each JSON endpoint serves: a chart's labels and series (the table beside it is drawn
from the same numbers), built from the sums in `dashboard.aggregates`."""

from datetime import UTC, datetime, timedelta
from typing import Any

from django.utils import timezone
from django.utils.formats import date_format

from dashboard import aggregates
from dashboard.aggregates import Sums
from dashboard.ranges import DAY, Window
from delivery.circuit import OpenCircuit
from delivery.models import Outcome

CODE_CLASSES = (("2xx", "2xx"), ("3xx", "3xx"), ("4xx", "4xx"), ("5xx", "5xx"), ("none", "no response"))
PERCENTILES = (("p50", "p50", 0.50), ("p95", "p95", 0.95), ("p99", "p99", 0.99))
# Hosts listed in the host table, busiest first (hosts with an open circuit come on top of these).
HOST_ROWS = 100


def chart(window: Window, series: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    zone = timezone.get_current_timezone()
    starts = [edge.astimezone(zone) for edge in window.edges[:-1]]
    return {
        "window": window.describe(),
        "labels": [label(start, window) for start in starts],
        "starts": [start.isoformat() for start in starts],
        "series": series,
        **extra,
    }


def label(start: datetime, window: Window) -> str:
    """A bucket's start as the reader's clock shows it, written as every page writes times
    (postbackproject/formats): its time within a day, its date for day buckets, else both."""
    if window.bucket == DAY:
        return date_format(start, "DATE_FORMAT")
    if window.end - window.start <= timedelta(days=1):
        return date_format(start, "TIME_FORMAT")
    return date_format(start, "DATETIME_FORMAT")


def line(key: str, name: str, data: list[Any]) -> dict[str, Any]:
    return {"key": key, "label": name, "data": data}


def volume(window: Window, host: str | None, unfolded: dict[int, int]) -> dict[str, Any]:
    """Postbacks accepted (all hosts only: ingestion does not know hosts by then), and
    attempts delivered, retried, failed and deferred, per bucket."""
    buckets = aggregates.per_bucket(window, host)
    series = []
    if host is None:
        series.append(line("accepted", "accepted", aggregates.accepted_per_bucket(window, unfolded)))
    for outcome, name in (
        (Outcome.SUCCESS, "delivered"),
        (Outcome.RETRY, "retried"),
        (Outcome.FAILED, "failed"),
        (Outcome.DEFERRED, "deferred"),
    ):
        series.append(line(str(outcome), name, [bucket.outcomes[outcome] for bucket in buckets]))
    return chart(window, series, totals={item["key"]: sum(item["data"]) for item in series})


def success(window: Window, host: str | None) -> dict[str, Any]:
    """Percent of sent attempts that got a 2xx, and percent of finished postbacks delivered."""
    buckets = aggregates.per_bucket(window, host)
    whole = aggregates.total(buckets)
    series = [
        line("attempts", "attempts succeeded", [bucket.success_rate() for bucket in buckets]),
        line("postbacks", "postbacks delivered", [delivered_rate(bucket) for bucket in buckets]),
    ]
    return chart(window, series, totals={"attempts": whole.success_rate(), "postbacks": delivered_rate(whole)})


def delivered_rate(sums: Sums) -> float | None:
    finished = sums.outcomes[Outcome.SUCCESS] + sums.outcomes[Outcome.FAILED]
    return round(100 * sums.outcomes[Outcome.SUCCESS] / finished, 2) if finished else None


def latency(window: Window, host: str | None) -> dict[str, Any]:
    """Response time percentiles (ms) per bucket, from the rollups' histograms and maxima."""
    buckets = aggregates.per_bucket(window, host)
    whole = aggregates.total(buckets)
    series = [line(key, name, [bucket.percentile(q) for bucket in buckets]) for key, name, q in PERCENTILES]
    totals: dict[str, float | None] = {key: whole.percentile(q) for key, _, q in PERCENTILES}
    totals["mean"] = whole.mean_latency()
    return chart(window, series, totals=totals)


def codes(window: Window, host: str | None) -> dict[str, Any]:
    """Sent attempts per response status class ("none": no response: refused, timed out)."""
    buckets = aggregates.per_bucket(window, host)
    series = [line(key, name, [bucket.classes[key] for bucket in buckets]) for key, name in CODE_CLASSES]
    return chart(window, series, totals={item["key"]: sum(item["data"]) for item in series})


def hosts(
    window: Window, circuits: dict[str, OpenCircuit], destinations: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """The destination hosts of the window, busiest first, with their circuit's state and
    their destinations (hosts with an open circuit or a destination listed too)."""
    sums = aggregates.per_host(window)
    busiest = sorted(sums, key=lambda host: (-sum(sums[host].outcomes.values()), host))[:HOST_ROWS]
    ruled = sorted(set(circuits) | set(destinations))
    shown = [host for host in ruled if host not in busiest] + busiest
    return {
        "window": window.describe(),
        "hosts": [
            host_row(host, sums.get(host, Sums()), circuits.get(host), destinations.get(host, [])) for host in shown
        ],
        "total_hosts": len(set(sums) | set(ruled)),
    }


def host_row(host: str, sums: Sums, circuit: OpenCircuit | None, destinations: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "destinations": destinations,
        "host": host,
        "attempts": sums.sent,
        "delivered": sums.outcomes[Outcome.SUCCESS],
        "retried": sums.outcomes[Outcome.RETRY],
        "failed": sums.outcomes[Outcome.FAILED],
        "deferred": sums.outcomes[Outcome.DEFERRED],
        "success_rate": sums.success_rate(),
        "mean_ms": sums.mean_latency(),
        "p95_ms": sums.percentile(0.95),
        "circuit": circuit_state(circuit),
    }


def circuit_state(circuit: OpenCircuit | None) -> dict[str, Any]:
    """ "closed", "open" until a time, or "probe_due" since that time."""
    if circuit is None:
        return {"state": "closed"}
    until = datetime.fromtimestamp(circuit.until, UTC).astimezone(timezone.get_current_timezone())
    return {"state": circuit.state, "until": until.isoformat(), "failures": circuit.failures}
