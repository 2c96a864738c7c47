"""The report: the figures and the targets on the terminal (readable at 80 columns), every
figure as JSON, and a PNG of throughput, backlog and latency over each scenario's run."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: draw to files only (before pyplot is imported)

import matplotlib.pyplot as plt
from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from benchmark.costs import TOP_COMMANDS
from benchmark.targets import Verdict

Figures = dict[str, Any]
Cell = Callable[[Figures], str]


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _status(run: Figures) -> str:
    if run["processes_exited"]:
        return "[red]exited[/]"
    return "[yellow]timed out[/]" if run["wait_timed_out"] else "ok"


def _peak_rss(run: Figures) -> str:
    peak = max((p["peak"] or 0 for p in run["processes"].values()), default=0)
    return _num(peak / 2**20, 1) if peak else "-"


def _added_latency(run: Figures) -> bool:
    return bool(run["delivery"]["receiver_latency_ms"]["p99"])


def _cost(run: Figures, *path: str) -> float | None:
    """A figure of the run's costs block (benchmark/costs.py); None where it was not measured."""
    value: Any = run.get("costs")
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, int | float) else None


# The summary's rows: a short label and how to read the value from one scenario's figures.
ROWS: list[tuple[str, Cell]] = [
    ("ingest req/s", lambda r: _num(r["ingest"]["requests_per_second"])),
    ("ingest p50 ms", lambda r: _num(r["ingest"]["latency_ms"]["p50"], 1)),
    ("ingest p99 ms", lambda r: _num(r["ingest"]["latency_ms"]["p99"], 1)),
    ("accepted", lambda r: _num(r["delivery"]["accepted"])),
    ("delivered/s", lambda r: _num(r["delivery"]["delivered_per_second"])),
    ("while sending", lambda r: _num(r["delivery"]["delivered_while_sending_ratio"], 2)),
    ("e2e p50 ms", lambda r: _num(r["delivery"]["end_to_end_ms"]["p50"], 1)),
    ("e2e p99 ms", lambda r: _num(r["delivery"]["end_to_end_ms"]["p99"], 1)),
    ("answered p99 ms", lambda r: _num(r["delivery"]["end_to_end_answered_ms"]["p99"]) if _added_latency(r) else ""),
    ("receivers p99 ms", lambda r: _num(r["delivery"]["receiver_latency_ms"]["p99"]) if _added_latency(r) else ""),
    ("attempts", lambda r: _num(r["delivery"]["attempts"])),
    ("retries", lambda r: _num(r["delivery"]["retries"])),
    ("failed", lambda r: _num(r["delivery"]["failed"])),
    ("lost", lambda r: _num(r["delivery"]["lost"])),
    ("duplicates", lambda r: _num(r["delivery"]["duplicates"])),
    ("Redis B/pb in", lambda r: _num(r["redis"]["bytes_in_per_postback"])),
    ("Redis B/pb out", lambda r: _num(r["redis"]["bytes_out_per_postback"])),
    ("peak RSS MiB", _peak_rss),
    ("CPU µs/pb", lambda r: _num(r["cpu"]["us_per_postback"])),
    ("web CPU µs/req", lambda r: _num(_cost(r, "web_cpu_us_per_request"))),
    ("worker CPU µs/pb", lambda r: _num(_cost(r, "worker_cpu_us_per_postback"))),
    ("Redis CPU µs/pb", lambda r: _num(_cost(r, "redis_cpu_us_per_postback"), 1)),
    ("DB CPU µs/pb", lambda r: _num(_cost(r, "database", "backend_cpu_us_per_postback"))),
    ("DB B/pb", lambda r: _num(_cost(r, "database", "bytes_per_postback"))),
    ("Redis B/pb waiting", lambda r: _num(_cost(r, "redis_memory", "bytes_per_postback"))),
    ("status", _status),
]
LABEL_WIDTH = max(len(label) for label, _ in ROWS)
# Receivers answering this late beyond the latency they meant to add were short of CPU.
RECEIVER_LAG_WARNING_MS = 100.0


def _cells(runs: list[Figures]) -> dict[str, list[str]]:
    """Every row's values, the rows without a value for any scenario left out."""
    cells = {label: [cell(run) for run in runs] for label, cell in ROWS}
    return {label: values for label, values in cells.items() if any(values)}


def _plain_width(text: str) -> int:
    """Columns the text takes once its markup is drawn."""
    return Text.from_markup(text).cell_len


def summary_tables(runs: list[Figures], width: int) -> list[Table]:
    """The figures as rows and the scenarios as columns, as many scenarios a table as fit in
    `width` columns: nothing is ever cut, however narrow the terminal."""
    tables: list[Table] = []
    chunk: list[Figures] = []
    used = LABEL_WIDTH + 4  # the label column, its padding and the borders
    for run in runs:
        needed = _column_width(run) + 3
        if chunk and used + needed > width:
            tables.append(_summary_table(chunk))
            chunk, used = [], LABEL_WIDTH + 4
        chunk.append(run)
        used += needed
    if chunk:
        tables.append(_summary_table(chunk))
    return tables


def _column_width(run: Figures) -> int:
    return max(len(run["scenario"]), *(_plain_width(cell(run)) for _, cell in ROWS))


def _summary_table(runs: list[Figures]) -> Table:
    table = Table(title="Benchmark summary", title_justify="left")
    table.add_column("figure", no_wrap=True, min_width=LABEL_WIDTH)
    for run in runs:
        table.add_column(run["scenario"], justify="right", no_wrap=True, min_width=_column_width(run))
    for label, values in _cells(runs).items():
        table.add_row(label, *values)
    return table


def targets_table(verdicts: list[Verdict]) -> Table:
    table = Table(title="Targets", title_justify="left")
    table.add_column("target", ratio=3)
    table.add_column("measured", ratio=2)
    table.add_column("met", no_wrap=True, min_width=7)
    for verdict in verdicts:
        met = {True: "[green]met[/]", False: "[red]not met[/]", None: "n/a"}[verdict.met]
        table.add_row(f"[bold]{verdict.scenario}[/]: {verdict.target}", verdict.measured, met)
    return table


def details(run: Figures) -> list[str]:
    """The figures that do not fit the table, one short line each."""
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
    for key in ("healthy_receiver", "stalled_receiver", "stalled_hosts", "dead_hosts"):
        if key in run:
            group, e2e = run[key], run[key]["end_to_end_ms"]
            lines.append(
                f"  {key.replace('_', ' ')}: {group['accepted']:,} accepted, {group['succeeded']:,} delivered, "
                f"{group['failed']:,} failed, {group['without_final_outcome']:,} without a final outcome; "
                f"e2e p50 {_num(e2e['p50'])} p99 {_num(e2e['p99'])} max {_num(e2e['max'])} ms"
            )
    if run["scenario"] == "wild":
        lines += wild_details(run)
    if "kill" in run:
        lines.append(f"  kill: {run['kill']}")
    cpu = run["cpu"]
    if cpu["by_role"]:
        roles = ", ".join(f"{role} {seconds:.1f}" for role, seconds in cpu["by_role"].items())
        lines.append(f"  CPU seconds: {roles} (service {cpu['service_seconds']:.1f})")
    if "costs" in run:
        lines += cost_details(run["costs"])
    grown = [f"{name} {p['growth']:+.0%}" for name, p in run["processes"].items() if p["growth"] is not None]
    if grown:
        lines.append("  RSS end vs 25 %: " + ", ".join(grown))
    load_cpu = _num(ingest["load_generator_cpu_us_per_request"], 1)
    lines.append(f"  load generator CPU: {load_cpu} µs a request (idle polling included)")
    return lines


def cost_details(costs: Figures) -> list[str]:
    """Where Redis spends its time, and the rows written, per postback (docs/scaling.md)."""
    commands = list(costs["redis_commands"].items())[:TOP_COMMANDS]
    spent = ", ".join(
        f"{name} {c['usec_per_postback']:.2f} ({c['calls_per_postback']:.3f} calls, {c['usec_per_call']:.1f} µs each)"
        for name, c in commands
    )
    database = costs["database"]
    lines = [
        f"  Redis µs/pb by command: {spent or '-'}",
        f"  database per postback: {_num(database['attempt_rows_per_postback'], 3)} attempt rows "
        f"({_num(database['attempt_bytes_per_row'])} B each), {_num(database['request_rows_per_postback'], 3)} "
        f"request rows ({_num(database['request_bytes_per_row'])} B each)",
    ]
    memory = costs["redis_memory"]
    if memory:
        lines.append(
            f"  Redis memory, workers stopped: {_num(memory['bytes'])} B for {_num(memory['postbacks'])} postbacks "
            f"in {_num(memory['requests'])} requests"
        )
    return lines


def wild_details(run: Figures) -> list[str]:
    world, delivery = run["receivers"], run["delivery"]
    names = (
        f"{world['by_name']:,} by name (DNS {_num(world['dns_delay_ms'])} ms, "
        f"{(world['dns_queries'] or {}).get('answered', 0):,} queries)"
        if world["names"]
        else f"no names: {world['names_off_because']}"
    )
    tls_off = world.get("tls_off_because")
    tls = f"no HTTPS: {tls_off}" if tls_off else f"{world['over_tls']:,} over HTTPS"
    lines = [
        f"  hosts: {world['hosts']:,} live, {tls}, {names}; dead: {world['refusing']} refusing, "
        f"{len(world['silent'])} silent",
    ]
    answered, theirs = delivery["end_to_end_answered_ms"], delivery["receiver_latency_ms"]
    lines.append(
        f"  202 to answer p50 {_num(answered['p50'])} p99 {_num(answered['p99'])} ms; receivers' own "
        f"p50 {_num(theirs['p50'])} p99 {_num(theirs['p99'])} ms; their lag p99 "
        f"{_num(delivery['receiver_lag_ms']['p99'], 1)} ms"
    )
    in_flight = [sample.get("receivers_in_flight", 0) for sample in run["series"]["samples"]]
    requests, connections = world.get("requests") or 0, world.get("connections") or 0
    lines.append(
        f"  at the receivers: peak {_num(max(in_flight, default=None))} requests in flight; "
        f"{connections:,} connections for {requests:,} requests ({world['receiver_processes']} processes, "
        f"CPU {_cpu_share(run)})"
    )
    lag = delivery["receiver_lag_ms"]["p99"]
    if lag is not None and lag > RECEIVER_LAG_WARNING_MS:
        lines.append(
            f"  [yellow]the receivers answered {lag:,.0f} ms late (p99) beyond their latency: they were short "
            "of CPU, and the service's figures understate it[/]"
        )
    baselines = run["baselines"]
    if "wild_receivers_requests_per_second" in baselines:
        lines.append(
            f"  receivers' ceiling: {_num(baselines['wild_receivers_requests_per_second'])} requests/s kept alive "
            f"({_num(baselines['wild_receivers_cpu_us_per_request'])} µs CPU each), "
            f"{_num(baselines['wild_receivers_new_connections_requests_per_second'])}/s with a new connection each "
            f"({_num(baselines['wild_receivers_new_connections_cpu_us_per_request'])} µs)"
        )
    return lines


def _cpu_share(run: Figures) -> str:
    """The receivers' CPU seconds per second of the run: near 1 per process means saturated."""
    used = sum(seconds for name, seconds in run["cpu"]["others_seconds"].items() if name.startswith("receiver"))
    return f"{used / run['seconds']:.2f} of a core" if run["seconds"] else "-"


def print_report(console: Console, runs: list[Figures], verdicts: list[Verdict], header: dict[str, Any]) -> None:
    for table in summary_tables(runs, console.width):
        console.print(table)
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


def progress_columns(width: int) -> tuple[ProgressColumn, ...]:
    """The progress line: what the scenario does, a bar, the counts, the time; short enough for
    80 columns (the counts shorten below 120)."""
    wide = width >= 120
    counts = (
        "accepted {task.fields[accepted]:,}  delivered {task.fields[delivered]:,}  backlog {task.fields[backlog]:,}"
        if wide
        else "acc {task.fields[accepted]:,} dlv {task.fields[delivered]:,} bl {task.fields[backlog]:,}"
    )
    return (
        TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=16)),
        BarColumn(bar_width=None if wide else 12),
        TextColumn(counts, table_column=Column(no_wrap=True)),
        TimeElapsedColumn(),
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
    series = run["series"]
    ends = [second + series["step_seconds"] for second in series["second"]]  # each value is at its step's end
    axis.plot(ends, series["backlog"], label="backlog (accepted - final)")
    samples = series["samples"]
    if samples:
        start = series["started"]
        times = [sample["time"] - start for sample in samples]
        axis.plot(times, [s["backlog"] for s in samples], label="not yet final in the log", linestyle=":")
        for key in ("rq_queue", "rq_scheduled", "inbox", "due", "receivers_in_flight"):
            if any(s.get(key) for s in samples):
                label = "in flight at receivers" if key == "receivers_in_flight" else key
                axis.plot(times, [s.get(key, 0) for s in samples], label=label, linestyle="--")
    axis.set_title(f"{run['scenario']}: backlog (postbacks; queues in their own units)")
    axis.set_xlabel("seconds")
    axis.legend(loc="best", fontsize="small")


def draw_latency(axis: Any, run: Figures) -> None:
    series = run["series"]
    lines = [("ingest_latency_ms", "ingest", "p50"), ("ingest_latency_ms", "ingest", "p99")]
    lines += [("end_to_end_ms", "end-to-end", "p50"), ("end_to_end_ms", "end-to-end", "p99")]
    if _added_latency(run):  # the receivers took their time: the 202-to-answer line beside
        lines.append(("end_to_end_answered_ms", "202 to answer", "p99"))
    for name, label, quantile in lines:
        values = [point[quantile] for point in series[name]]
        # Markers: a run shorter than two seconds has one point a line, which draws no line.
        axis.plot(series["second"], values, label=f"{label} {quantile}", marker=".")
    if _added_latency(run):
        theirs = run["delivery"]["receiver_latency_ms"]["p99"]
        axis.axhline(theirs, color="grey", linestyle=":", label="receivers' own p99")
    axis.set_yscale("log")
    axis.set_title(f"{run['scenario']}: latency (ms, by second of the 202)")
    axis.set_xlabel("seconds")
    axis.legend(loc="best", fontsize="small")
