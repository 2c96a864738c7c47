"""The performance targets, judged from the figures of the scenarios that ran (where each comes
from: docs/benchmark.md, "Targets")."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmark.metrics import ratio
from benchmark.payloads import mean_object_json_bytes

Figures = dict[str, Any]


@dataclass(frozen=True)
class Verdict:
    scenario: str
    target: str
    measured: str
    met: bool | None  # None: not measurable in this run

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "target": self.target, "measured": self.measured, "met": self.met}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def loop_target(figures: Figures) -> Verdict:
    share = figures["delivery"]["delivered_while_sending_ratio"]
    # The service's processes; the receivers keep every receipt in memory and grow by design.
    service = {name: p for name, p in figures["processes"].items() if not name.startswith("receiver")}
    flat = [p["flat"] for p in service.values() if p["flat"] is not None]
    growing = [name for name, p in service.items() if p["flat"] is False]
    met = None if share is None else share >= 0.95 and all(flat)
    measured = f"{_fmt(share)} x accepted; RSS " + (f"grew: {', '.join(growing)}" if growing else "flat")
    return Verdict("loop", "delivered in the window >= 0.95 x accepted; RSS flat within 10 %", measured, met)


def flood_target(figures: Figures) -> Verdict:
    noop = figures["baselines"].get("rq_noop_jobs_per_second")
    value = ratio(figures["delivery"]["delivered_per_second"], noop)
    return Verdict(
        "flood",
        "delivered/s >= 3 x RQ no-op jobs/s",
        f"{_fmt(value)} x ({_fmt(noop, 0)} jobs/s)",
        None if value is None else value >= 3,
    )


def ingest_target(figures: Figures) -> Verdict:
    healthz = figures["baselines"].get("healthz_requests_per_second")
    value = ratio(figures["ingest"]["requests_per_second"], healthz)
    return Verdict(
        figures["scenario"],
        "ingest of the sample >= 0.7 x /healthz requests/s",
        f"{_fmt(value)} x ({_fmt(healthz, 0)} req/s)",
        None if value is None else value >= 0.7,
    )


def fanout_target(figures: Figures) -> Verdict:
    plain = figures["baselines"].get("plain_client_requests_per_second")
    value = ratio(figures["delivery"]["delivered_per_second"], plain)
    return Verdict(
        "fanout",
        "delivered/s >= 2.0 x the plain client loop",
        f"{_fmt(value)} x ({_fmt(plain, 0)} req/s)",
        None if value is None else value >= 2.0,
    )


def slow_target(figures: Figures) -> Verdict:
    latency = figures["receivers"]["main"]["latency_ms"]
    ideal = figures["workers"] * figures["concurrency"] * 1000.0 / latency
    value = ratio(figures["delivery"]["delivered_per_second"], ideal)
    return Verdict(
        "slow",
        f"delivered/s >= 0.8 x workers x DELIVERY_CONCURRENCY x (1000 / {latency:g} ms)",
        f"{_fmt(value)} x ({_fmt(ideal, 0)}/s)",
        None if value is None else value >= 0.8,
    )


def end_to_end_target(figures: Figures) -> Verdict:
    p99 = figures["delivery"]["end_to_end_ms"]["p99"]
    rate = figures["load"][0]["rate"]
    return Verdict(
        figures["scenario"],
        f"end-to-end p99 <= 50 ms at {rate:g} requests/s",
        f"{_fmt(p99, 1)} ms",
        None if p99 is None else p99 <= 50,
    )


def redis_loop_target(figures: Figures) -> Verdict:
    value = figures["redis"]["bytes_per_postback"]
    return Verdict(
        "loop",
        "Redis bytes in + out per postback <= 600",
        f"{_fmt(value, 0)} B",
        None if value is None else value <= 600,
    )


def redis_fanout_target(figures: Figures) -> Verdict:
    value = figures["redis"]["bytes_per_postback"]
    limit = 1.5 * mean_object_json_bytes(figures["load"][0]["objects_per_request"]) + 50
    return Verdict(
        "fanout",
        f"Redis bytes in + out per postback <= 1.5 x object JSON + 50 = {limit:.0f}",
        f"{_fmt(value, 0)} B",
        None if value is None else value <= limit,
    )


def stall_target(figures: Figures) -> Verdict:
    healthy = figures["healthy_receiver"]
    delay, lost = healthy["end_to_end_ms"]["max"], healthy["without_final_outcome"]
    met = None if delay is None else delay <= 5000 and lost == 0
    return Verdict(
        "stall",
        "healthy receiver delayed <= 5 s (max end-to-end)",
        f"max {_fmt(delay, 0)} ms, p99 {_fmt(healthy['end_to_end_ms']['p99'], 0)} ms, {lost} unfinished",
        met,
    )


def kill_target(figures: Figures) -> Verdict:
    kill = figures.get("kill")
    after = kill["all_final_after_seconds"] if kill else None
    measured = (
        "no busy worker was killed"
        if not kill
        else (f"{_fmt(after, 1)} s" if after is not None else f"{kill['without_final_outcome']} unfinished at the end")
    )
    return Verdict(
        "kill",
        "every postback final <= 60 s after SIGKILL",
        measured,
        None if not kill else after is not None and after <= 60,
    )


def _offered(figures: Figures) -> str:
    """The `wild` load as offered, in postbacks/s."""
    live = figures["load"][0]
    return f"{(live['rate'] or 0) * live['objects_per_request']:,.0f}/s offered"


def wild_delivered_target(figures: Figures) -> Verdict:
    share = figures["delivery"]["delivered_while_sending_ratio"]
    return Verdict(
        "wild",
        f"delivered while sending >= 0.95 x accepted, at {_offered(figures)}",
        f"{_fmt(share)} x accepted",
        None if share is None else share >= 0.95,
    )


def wild_latency_target(figures: Figures) -> Verdict:
    """End-to-end to the answer, against the latency the receivers themselves added."""
    ours = figures["delivery"]["end_to_end_answered_ms"]["p99"]
    theirs = figures["delivery"]["receiver_latency_ms"]["p99"]
    met = None if ours is None or theirs is None else ours <= theirs + 1000
    return Verdict(
        "wild",
        "end-to-end p99 (202 to answer) <= receivers' own p99 + 1 s",
        f"{_fmt(ours, 0)} ms; receivers {_fmt(theirs, 0)} ms",
        met,
    )


def lost_target(figures: Figures) -> Verdict:
    lost = figures["delivery"]["lost"]
    return Verdict(figures["scenario"], "lost = 0 (every postback final)", f"{lost} lost", lost == 0)


def stallmany_healthy_target(figures: Figures) -> Verdict:
    e2e = figures["healthy_receiver"]["end_to_end_ms"]
    return Verdict(
        "stallmany",
        "healthy receiver's end-to-end p99 < 1 s",
        f"p99 {_fmt(e2e['p99'], 0)} ms, max {_fmt(e2e['max'], 0)} ms",
        None if e2e["p99"] is None else e2e["p99"] < 1000,
    )


def stallmany_final_target(figures: Figures) -> Verdict:
    stalled, healthy = figures["stalled_hosts"], figures["healthy_receiver"]
    unfinished = stalled["without_final_outcome"] + healthy["without_final_outcome"]
    return Verdict(
        "stallmany",
        "every postback final, the stalled hosts' too",
        f"{stalled['accepted'] - stalled['without_final_outcome']:,} of {stalled['accepted']:,} stalled, "
        f"{healthy['accepted'] - healthy['without_final_outcome']:,} of {healthy['accepted']:,} healthy",
        unfinished == 0 and stalled["accepted"] > 0,
    )


def php_target(pool: str, pairing: str) -> Callable[[Figures], Verdict]:
    def judged(figures: Figures) -> Verdict:
        php = figures["baselines"].get(f"php_{pool}_requests_per_second")
        children = figures["baselines"].get(f"php_{pool}_children")
        value = ratio(figures["ingest"]["requests_per_second"], php)
        return Verdict(
            figures["scenario"],
            f"ingest requests/s >= 1.0 x the PHP page's, {pairing}",
            f"{_fmt(value)} x ({_fmt(php, 0)} req/s, {children} PHP-FPM children)",
            None if value is None else value >= 1.0,
        )

    return judged


def _with_php(pool: str) -> Callable[[Figures], bool]:
    return lambda figures: _closed_sample_load(figures) and f"php_{pool}_requests_per_second" in figures["baselines"]


def _closed_sample_load(figures: Figures) -> bool:
    return bool(figures["scenario"] == "load")


def _open_sample_load(figures: Figures) -> bool:
    return bool(figures["scenario"] == "load-open")


CHECKS: list[tuple[Callable[[Figures], bool], Callable[[Figures], Verdict]]] = [
    (lambda f: f["scenario"] == "loop", loop_target),
    (lambda f: f["scenario"] == "flood", flood_target),
    (_closed_sample_load, ingest_target),
    (_with_php("equal"), php_target("equal", "as many PHP-FPM children as gunicorn workers")),
    (_with_php("defaults"), php_target("defaults", "PHP-FPM's Debian pool")),
    (lambda f: f["scenario"] == "fanout", fanout_target),
    (lambda f: f["scenario"] == "slow", slow_target),
    (_open_sample_load, end_to_end_target),
    (lambda f: f["scenario"] == "loop", redis_loop_target),
    (lambda f: f["scenario"] == "fanout", redis_fanout_target),
    (lambda f: f["scenario"] == "stall", stall_target),
    (lambda f: f["scenario"] == "kill", kill_target),
    (lambda f: f["scenario"] == "wild", wild_delivered_target),
    (lambda f: f["scenario"] == "wild", wild_latency_target),
    (lambda f: f["scenario"] == "wild", lost_target),
    (lambda f: f["scenario"] == "stallmany", stallmany_healthy_target),
    (lambda f: f["scenario"] == "stallmany", stallmany_final_target),
]


def judge(runs: list[Figures]) -> list[Verdict]:
    return [verdict(figures) for applies, verdict in CHECKS for figures in runs if applies(figures)]
