"""A scenario's figures, computed from what was recorded: the load generator's requests, the
receivers' receipts, the attempt rows, Redis's counters and the samples taken each second.

Pure functions of the raw data, so the report's arithmetic is tested without processes.
"""

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from benchmark.costs import CostReadings, cost_figures
from benchmark.database import FINAL_OUTCOMES, AttemptRow
from benchmark.loadgen import LoadResult
from benchmark.metrics import per_second_counts, per_second_percentiles, percentiles, ratio, rss_summary
from benchmark.receiver import ANSWERED, ARRIVAL, COMPLETED, LATENCY_MS, POSTBACK_ID, STATUS, Receipt


@dataclass
class RawRun:
    """Everything one scenario recorded."""

    name: str
    started: float  # the first send (Unix time)
    load_ended: float  # the last answer to the load generator
    ended: float  # every postback final, or the wait gave up
    wait_timed_out: bool
    loads: list[LoadResult]
    receipts: dict[str, list[Receipt]]  # receiver name -> receipts
    attempts: list[AttemptRow]
    final_seen_at: dict[str, float]  # postback id -> when the poll first saw its final outcome
    redis_before: dict[str, int]
    redis_after: dict[str, int]
    rss: dict[str, list[tuple[float, float]]]  # process -> (time, bytes)
    samples: list[dict[str, float]]  # one a second: time, accepted, delivered, backlog, queues
    final_at: dict[str, float] = field(default_factory=dict)  # postback id -> its final try's end (the rows)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds over the run
    service_processes: list[str] = field(default_factory=list)  # the processes of `cpu` that are the service
    kill_at: float | None = None
    exited: dict[str, float] = field(default_factory=dict)  # process -> when it was found gone
    costs: CostReadings | None = None  # counters for each part's cost per postback (benchmark/costs.py)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Accepted:
    """Postbacks accepted: id -> the time its request's 202 arrived."""

    at: dict[str, float]

    @classmethod
    def from_loads(cls, loads: Iterable[LoadResult]) -> "Accepted":
        return cls({pid: answered for load in loads for _, answered, _, ids in load.records for pid in ids})


def ingest_figures(loads: list[LoadResult]) -> dict[str, Any]:
    records = [record for load in loads for record in load.records]
    started = min((load.started for load in loads), default=0.0)
    ended = max((load.ended for load in loads), default=0.0)
    accepted = [record for record in records if record[2] == 202]
    seconds = ended - started
    return {
        "requests": len(records),
        "accepted_requests": len(accepted),
        "statuses": {str(status): count for status, count in sorted(Counter(r[2] for r in records).items())},
        "requests_per_second": len(accepted) / seconds if seconds > 0 else None,
        "latency_ms": _ms(percentiles(done - sent for sent, done, _, _ in accepted)),
        "backpressure_503": sum(load.backpressure for load in loads),
        "retried_after_503": sum(load.retried for load in loads),
        "dropped_after_503": sum(load.dropped for load in loads),
        "transport_errors": sum(load.errors for load in loads),
        "late_starts": sum(load.late for load in loads),
        "load_generator_cpu_us_per_request": 1e6 * sum(load.cpu_seconds for load in loads) / len(records)
        if records
        else None,
        "seconds": seconds,
    }


def first_receipts(receipts: Iterable[Receipt], ids: dict[str, float]) -> tuple[dict[str, float], dict[str, Receipt]]:
    """Per accepted postback: the first arrival of any kind, and the first request answered 2xx
    in full (the one that delivered it)."""
    first_any: dict[str, float] = {}
    first_ok: dict[str, Receipt] = {}
    for receipt in receipts:
        pid = str(receipt[POSTBACK_ID])
        if pid not in ids:
            continue
        arrival = float(receipt[ARRIVAL])
        first_any[pid] = min(arrival, first_any.get(pid, math.inf))
        if 200 <= int(receipt[STATUS]) < 300 and receipt[COMPLETED]:
            earlier = first_ok.get(pid)
            if earlier is None or arrival < float(earlier[ARRIVAL]):
                first_ok[pid] = receipt
    return first_any, first_ok


def duplicates(receipts: Iterable[Receipt], ids: dict[str, float]) -> int:
    """2xx answers, sent in full, for a postback beyond its first."""
    ok = Counter(
        str(r[POSTBACK_ID])
        for r in receipts
        if str(r[POSTBACK_ID]) in ids and 200 <= int(r[STATUS]) < 300 and r[COMPLETED]
    )
    return sum(count - 1 for count in ok.values() if count > 1)


def outcome_figures(attempts: list[AttemptRow], ids: dict[str, float]) -> dict[str, Any]:
    ours = [row for row in attempts if row.postback_id in ids]
    outcomes = Counter(row.outcome for row in ours)
    final: dict[str, str] = {}
    for row in ours:
        if row.outcome in FINAL_OUTCOMES and (row.postback_id not in final or row.outcome == "success"):
            final[row.postback_id] = row.outcome
    finals = Counter(final.values())
    return {
        "attempts": sum(count for outcome, count in outcomes.items() if outcome != "deferred"),
        "attempt_outcomes": dict(sorted(outcomes.items())),
        "retries": outcomes.get("retry", 0),
        "deferred": outcomes.get("deferred", 0),
        "succeeded": finals.get("success", 0),
        "failed": finals.get("failed", 0),
        "lost": sum(1 for pid in ids if pid not in final),
    }


def delivery_figures(run: RawRun, accepted: Accepted) -> dict[str, Any]:
    receipts = [receipt for batch in run.receipts.values() for receipt in batch]
    first_any, first_ok = first_receipts(receipts, accepted.at)
    arrivals = [float(receipt[ARRIVAL]) for receipt in first_ok.values()]
    window = (max(arrivals) - run.started) if arrivals else 0.0
    in_window = sum(1 for arrival in arrivals if arrival <= run.load_ended)
    return {
        "accepted": len(accepted.at),
        "delivered": len(first_ok),
        "delivered_per_second": len(first_ok) / window if window > 0 else None,
        "delivery_window_seconds": window,
        "delivered_while_sending": in_window,
        "delivered_while_sending_ratio": ratio(in_window, len(accepted.at)),
        "end_to_end_ms": _ms(percentiles(first_any[pid] - accepted.at[pid] for pid in first_any)),
        **answer_figures(first_ok, accepted),
        "duplicates": duplicates(receipts, accepted.at),
        **outcome_figures(run.attempts, accepted.at),
    }


def answer_figures(first_ok: dict[str, Receipt], accepted: Accepted) -> dict[str, Any]:
    """Beside the receivers' own latency: how long after its 202 each postback's delivering
    request was answered (end-to-end including the receiver's time), the latency the receiver
    added to that request (what it applied, from its own records), and how late the receiver
    answered beyond that (its event loop's lag: near zero unless the receiver is overloaded)."""
    delivering = list(first_ok.items())
    return {
        "end_to_end_answered_ms": _ms(
            percentiles(float(receipt[ANSWERED]) - accepted.at[pid] for pid, receipt in delivering)
        ),
        "receiver_latency_ms": _ms(percentiles(float(receipt[LATENCY_MS]) / 1000 for _, receipt in delivering)),
        "receiver_lag_ms": _ms(
            percentiles(
                float(receipt[ANSWERED]) - float(receipt[ARRIVAL]) - float(receipt[LATENCY_MS]) / 1000
                for _, receipt in delivering
            )
        ),
    }


def redis_figures(before: dict[str, int], after: dict[str, int], accepted: int) -> dict[str, Any]:
    bytes_in = after.get("total_net_input_bytes", 0) - before.get("total_net_input_bytes", 0)
    bytes_out = after.get("total_net_output_bytes", 0) - before.get("total_net_output_bytes", 0)
    return {
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "bytes_in_per_postback": ratio(bytes_in, accepted),
        "bytes_out_per_postback": ratio(bytes_out, accepted),
        "bytes_per_postback": ratio(bytes_in + bytes_out, accepted),
        "commands": after.get("total_commands_processed", 0) - before.get("total_commands_processed", 0),
    }


def series(run: RawRun, accepted: Accepted) -> dict[str, Any]:
    """Series for the plot and the JSON, from the first send to the end: one point a second,
    or a tenth of a second for runs under 10 s (a fanout run can be over in one second)."""
    step = 1.0 if run.ended - run.started >= 10 else 0.1
    count = max(1, math.ceil((run.ended - run.started) / step))
    receipts = [receipt for batch in run.receipts.values() for receipt in batch]
    first_any, first_ok = first_receipts(receipts, accepted.at)
    records = [record for load in run.loads for record in load.records if record[2] == 202]
    accepted_counts = per_second_counts(
        (r[1] for r in records), run.started, count, (len(r[3]) for r in records), step=step
    )
    delivered_counts = per_second_counts(
        (float(receipt[ARRIVAL]) for receipt in first_ok.values()), run.started, count, step=step
    )
    finals = [run.final_at[pid] for pid in accepted.at if pid in run.final_at]
    final_counts = per_second_counts(finals, run.started, count, step=step)
    ingest = per_second_percentiles(((r[1], r[1] - r[0]) for r in records), run.started, count, step=step)
    end_to_end = per_second_percentiles(
        ((accepted.at[pid], first_any[pid] - accepted.at[pid]) for pid in first_any), run.started, count, step=step
    )
    answered = per_second_percentiles(
        ((accepted.at[pid], float(receipt[ANSWERED]) - accepted.at[pid]) for pid, receipt in first_ok.items()),
        run.started,
        count,
        step=step,
    )
    return {
        "started": run.started,
        "step_seconds": step,
        "second": [round(index * step, 3) for index in range(count)],  # start of each step
        "accepted_per_second": [n / step for n in accepted_counts],
        "delivered_per_second": [n / step for n in delivered_counts],
        # Accepted minus final at the end of each step, from the recorded times of both.
        "backlog": list(itertools.accumulate(a - f for a, f in zip(accepted_counts, final_counts, strict=True))),
        "ingest_latency_ms": [_ms(p) for p in ingest],
        "end_to_end_ms": [_ms(p) for p in end_to_end],
        "end_to_end_answered_ms": [_ms(p) for p in answered],
        "samples": run.samples,
    }


def process_figures(run: RawRun) -> dict[str, Any]:
    return {name: rss_summary(samples, run.started, run.load_ended) for name, samples in sorted(run.rss.items())}


def cpu_figures(run: RawRun, delivered: int) -> dict[str, Any]:
    """CPU seconds of the service's processes (web and its workers, RQ workers, Redis) from the
    first sample before the load to the last after the wait, and per postback delivered; the
    other processes watched (receivers, DNS server) beside, as seconds."""
    service = {name: run.cpu[name] for name in run.service_processes if name in run.cpu}
    by_role: defaultdict[str, float] = defaultdict(float)
    for name, seconds in service.items():
        by_role["web" if name.startswith("web") else "workers" if name.startswith("worker") else name] += seconds
    total = sum(service.values())
    return {
        "service_seconds": total,
        "by_role": dict(sorted(by_role.items())),
        "us_per_postback": ratio(1e6 * total, delivered),
        "others_seconds": {name: seconds for name, seconds in sorted(run.cpu.items()) if name not in service},
    }


def summarize(run: RawRun) -> dict[str, Any]:
    accepted = Accepted.from_loads(run.loads)
    delivery = delivery_figures(run, accepted)
    figures: dict[str, Any] = {
        "scenario": run.name,
        "seconds": run.ended - run.started,
        "wait_timed_out": run.wait_timed_out,
        "ingest": ingest_figures(run.loads),
        "delivery": delivery,
        "redis": redis_figures(run.redis_before, run.redis_after, len(accepted.at)),
        "processes": process_figures(run),
        "cpu": cpu_figures(run, delivery["delivered"]),
        # Service processes that exited during the run without the tool stopping them (something
        # else on the machine killed them, or they crashed): the scenario's figures are not valid.
        "processes_exited": {name: at - run.started for name, at in sorted(run.exited.items())},
        **run.extra,
    }
    if run.costs is not None:
        ingest = figures["ingest"]
        figures["costs"] = cost_figures(
            run.costs, figures["cpu"]["by_role"], ingest["accepted_requests"], len(accepted.at)
        )
    if run.kill_at is not None:
        figures["kill"] = kill_figures(run, accepted)
    figures["series"] = series(run, accepted)
    return figures


def kill_figures(run: RawRun, accepted: Accepted) -> dict[str, Any]:
    """Seconds from the SIGKILL until every accepted postback had a final outcome."""
    assert run.kill_at is not None
    pending = [pid for pid in accepted.at if pid not in run.final_seen_at]
    last = max((run.final_seen_at[pid] for pid in accepted.at if pid in run.final_seen_at), default=run.kill_at)
    return {
        "killed_at_second": run.kill_at - run.started,
        "all_final_after_seconds": None if pending else max(0.0, last - run.kill_at),
        "without_final_outcome": len(pending),
    }


def _ms(values: dict[str, float | None]) -> dict[str, float | None]:
    return {key: None if value is None else round(value * 1000, 2) for key, value in values.items()}


def group_figures(run: RawRun, index: int) -> dict[str, Any]:
    """The figures of the postbacks one load phase sent (e.g. the healthy receiver's)."""
    accepted = Accepted.from_loads([run.loads[index]])
    receipts = [receipt for batch in run.receipts.values() for receipt in batch]
    first_any, first_ok = first_receipts(receipts, accepted.at)
    outcomes = outcome_figures(run.attempts, accepted.at)
    return {
        "accepted": len(accepted.at),
        "delivered": len(first_ok),
        "end_to_end_ms": _ms(percentiles(first_any[pid] - accepted.at[pid] for pid in first_any)),
        "succeeded": outcomes["succeeded"],
        "failed": outcomes["failed"],
        "without_final_outcome": sum(1 for pid in accepted.at if pid not in run.final_seen_at),
    }
