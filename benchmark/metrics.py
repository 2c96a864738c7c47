"""Generic statistics for the report: percentiles, per-second series, RSS over a run, and
a process's CPU time. Nothing here imports Django: processes the tool spawns import it too."""

import math
import statistics
from collections.abc import Iterable, Sequence

import psutil

Percentiles = dict[str, float | None]


def percentiles(values: Iterable[float]) -> Percentiles:
    """p50, p95, p99 (linear interpolation between closest ranks, as numpy's default), max."""
    data = sorted(values)
    if not data:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    if len(data) == 1:
        only = data[0]
        return {"p50": only, "p95": only, "p99": only, "max": only}
    cuts = statistics.quantiles(data, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "max": data[-1]}


def bucket(time: float, start: float, step: float = 1.0) -> int:
    return max(0, math.floor((time - start) / step))


def per_second_counts(
    times: Iterable[float], start: float, seconds: int, weights: Iterable[int] | None = None, *, step: float = 1.0
) -> list[int]:
    """How many events (or the sum of their weights) fell in each second (or step) after start."""
    counts = [0] * seconds
    for time, weight in zip(times, weights if weights is not None else _ones(), strict=False):
        index = bucket(time, start, step)
        if index < seconds:
            counts[index] += weight
    return counts


def _ones() -> Iterable[int]:
    while True:
        yield 1


def per_second_percentiles(
    points: Iterable[tuple[float, float]], start: float, seconds: int, *, step: float = 1.0
) -> list[Percentiles]:
    """For (time, value) points: the percentiles of the values of each second (or step)."""
    buckets: list[list[float]] = [[] for _ in range(seconds)]
    for time, value in points:
        index = bucket(time, start, step)
        if index < seconds:
            buckets[index].append(value)
    return [percentiles(values) for values in buckets]


def value_at(samples: Sequence[tuple[float, float]], time: float) -> float | None:
    """The sample nearest to time."""
    if not samples:
        return None
    return min(samples, key=lambda sample: abs(sample[0] - time))[1]


def rss_summary(samples: Sequence[tuple[float, float]], start: float, end: float) -> dict[str, float | bool | None]:
    """Peak RSS, RSS at a quarter of the load and at its end, and whether it stayed within 10 %.

    `start` and `end` bound the load (the wait for the backlog afterwards is another regime).
    The first quarter is left out of the comparison: imports, pools and caches fill up then.
    A process that started after the quarter (gunicorn replaces workers after max_requests)
    is not judged: its growth would be its own start-up.
    """
    if not samples:
        return {"peak": None, "at_25_percent": None, "at_end": None, "growth": None, "flat": None}
    quarter_time = start + (end - start) / 4
    quarter = value_at(samples, quarter_time) if samples[0][0] <= quarter_time else None
    during = [sample for sample in samples if sample[0] <= end] or samples[:1]
    last = during[-1][1]
    growth = (last - quarter) / quarter if quarter else None
    return {
        "peak": max(rss for _, rss in samples),
        "at_25_percent": quarter,
        "at_end": last,
        "growth": growth,
        "flat": None if growth is None else abs(growth) <= 0.10,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time the process has used so far, user and system."""
    times = process.cpu_times()
    return float(times.user + times.system)
