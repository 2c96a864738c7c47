"""The report: a summary table and the targets on the terminal, every figure as JSON, and a
PNG of throughput, backlog and latency over each scenario's run."""

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: draw to files only (before pyplot is imported)

import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from benchmark.targets import Verdict

Figures = dict[str, Any]


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def summary_table(runs: list[Figures]) -> Table:
    table = Table(title="Benchmark summary", show_lines=False)
    columns = [
        "scenario", "ingest req/s", "ingest p50/p95/p99 ms", "accepted", "delivered/s",
        "e2e p50/p95/p99 ms", "attempts", "retries", "failed", "lost", "dup", "Redis B/pb in/out", "peak RSS MiB",
    ]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for run in runs:
        ingest, delivery, redis = run["ingest"], run["delivery"], run["redis"]
        peak = max((p["peak"] or 0 for p in run["processes"].values()), default=0)
        table.add_row(
            run["scenario"]
            + (" (wait timed out)" if run["wait_timed_out"] else "")
            + (" [red](process exited)[/]" if run["processes_exited"] else ""),
            _num(ingest["requests_per_second"]),
            "/".join(_num(ingest["latency_ms"][k], 1) for k in ("p50", "p95", "p99")),
            _num(delivery["accepted"]),
            _num(delivery["delivered_per_second"]),
            "/".join(_num(delivery["end_to_end_ms"][k], 1) for k in ("p50", "p95", "p99")),
            _num(delivery["attempts"]),
            _num(delivery["retries"]),
            _num(delivery["failed"]),
            _num(delivery["lost"]),
            _num(delivery["duplicates"]),
            f"{_num(redis['bytes_in_per_postback'])}/{_num(redis['bytes_out_per_postback'])}",
            _num(peak / 2**20, 1) if peak else "-",
        )
    return table


def targets_table(verdicts: list[Verdict]) -> Table:
    table = Table(title="Targets (issue 5)")
    for column in ("scenario", "target", "measured", "met"):
        table.add_column(column)
    for verdict in verdicts:
        met = {True: "[green]met[/]", False: "[red]not met[/]", None: "n/a"}[verdict.met]
        table.add_row(verdict.scenario, verdict.target, verdict.measured, met)
    return table


def details(run: Figures) -> list[str]:
    """The figures that do not fit the table, one line each."""
    lines = [f"[bold]{run['scenario']}[/]: {run['title']}"]
    if run["processes_exited"]:
        gone = ", ".join(f"{name} {at:.1f} s in" for name, at in run["processes_exited"].items())
        lines.append(f"  [red]exited during the run, not stopped by the tool: {gone}; these figures are not valid[/]")
    if run["baselines"]:
        lines.append("  baselines: " + ", ".join(f"{k} {v:,.0f}" for k, v in run["baselines"].items()))
    ingest = run["ingest"]
    if ingest["backpressure_503"]:
        lines.append(
            f"  503s: {ingest['backpressure_503']} (retried {ingest['retried_after_503']}, "
            f"dropped {ingest['dropped_after_503']})"
        )
    for key in ("healthy_receiver", "stalled_receiver"):
        if key in run:
            e2e = run[key]["end_to_end_ms"]
            lines.append(
                f"  {key}: e2e p50 {_num(e2e['p50'])} p99 {_num(e2e['p99'])} max {_num(e2e['max'])} ms, "
                f"{run[key]['without_final_outcome']} without a final outcome"
            )
    if "kill" in run:
        lines.append(f"  kill: {run['kill']}")
    grown = [f"{name} {p['growth']:+.0%}" for name, p in run["processes"].items() if p["growth"] is not None]
    if grown:
        lines.append("  RSS end vs 25 %: " + ", ".join(grown))
    cpu = _num(ingest["load_generator_cpu_us_per_request"], 1)
    lines.append(f"  load generator CPU: {cpu} µs a request (idle polling included: high at low rates)")
    return lines


def print_report(console: Console, runs: list[Figures], verdicts: list[Verdict], header: dict[str, Any]) -> None:
    console.print(summary_table(runs))
    for run in runs:
        for line in details(run):
            console.print(line)
    if verdicts:
        console.print(targets_table(verdicts))
    if "receiver_ceiling_requests_per_second" in header:
        console.print(
            f"receiver ceiling: {_num(header['receiver_ceiling_requests_per_second'])} requests/s "
            f"({header['receiver_processes']} process(es), {header['ceiling_clients']} keep-alive clients); "
            f"load generator: {_num(header['load_generator_cpu_us_per_request'], 1)} µs of CPU a request"
        )


def write_json(path: Path, runs: list[Figures], verdicts: list[Verdict], header: dict[str, Any]) -> None:
    document = {**header, "scenarios": runs, "targets": [verdict.as_dict() for verdict in verdicts]}
    path.write_text(json.dumps(document, indent=1, default=str))


def write_plot(path: Path, runs: list[Figures]) -> None:
    """One row per scenario: throughput, backlog, latency, each against seconds into the run."""
    figure, axes = plt.subplots(len(runs), 3, figsize=(16, 3.2 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        draw_throughput(row[0], run)
        draw_backlog(row[1], run)
        draw_latency(row[2], run)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def draw_throughput(axis: Any, run: Figures) -> None:
    series = run["series"]
    axis.plot(series["second"], series["accepted_per_second"], label="accepted/s", marker=".")
    axis.plot(series["second"], series["delivered_per_second"], label="delivered/s", marker=".")
    axis.set_title(f"{run['scenario']}: postbacks per second")
    axis.set_xlabel("seconds")
    axis.legend(loc="best", fontsize="small")


def draw_backlog(axis: Any, run: Figures) -> None:
    samples = run["series"]["samples"]
    if samples:
        start = run["series"]["started"]
        times = [sample["time"] - start for sample in samples]
        axis.plot(times, [s["backlog"] for s in samples], label="backlog (accepted - final)")
        for key in ("rq_queue", "rq_scheduled", "inbox", "due"):
            if any(s.get(key) for s in samples):
                axis.plot(times, [s.get(key, 0) for s in samples], label=key, linestyle="--")
    axis.set_title(f"{run['scenario']}: backlog (postbacks; queues in their own units)")
    axis.set_xlabel("seconds")
    axis.legend(loc="best", fontsize="small")


def draw_latency(axis: Any, run: Figures) -> None:
    series = run["series"]
    for name, label in (("ingest_latency_ms", "ingest"), ("end_to_end_ms", "end-to-end")):
        for quantile in ("p50", "p99"):
            values = [point[quantile] for point in series[name]]
            # Markers: a run shorter than two seconds has one point a line, which draws no line.
            axis.plot(series["second"], values, label=f"{label} {quantile}", marker=".")
    axis.set_yscale("log")
    axis.set_title(f"{run['scenario']}: latency (ms, by second of the 202)")
    axis.set_xlabel("seconds")
    axis.legend(loc="best", fontsize="small")
