"""`manage.py benchmark SCENARIO`: the internal benchmarking tool (docs/benchmark.md)."""

import os
import platform
import shutil
import sys
import tempfile
import time
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from rich.console import Console
from rich.progress import Progress

from benchmark.baselines import receiver_ceiling
from benchmark.php import POOLS, pools_named
from benchmark.report import print_report, progress_columns, write_json, write_plot
from benchmark.runner import RunSettings, ScenarioRun
from benchmark.scenarios import SCENARIOS, Options, build
from benchmark.service import (
    LocalService,
    Service,
    ServiceExtras,
    ServiceOptions,
    raise_open_files_limit,
    remote_service,
)
from benchmark.targets import judge
from benchmark.wild import WildOptions


class RemoteProvider:
    """A service somebody else runs: every scenario gets the same one, and nothing is stopped."""

    starts_service = False

    def __init__(self, service: Service) -> None:
        self.service = service

    def start(self, name: str, extras: ServiceExtras | None = None) -> Service:
        return self.service

    def stop(self, service: Service) -> None:
        pass


class Command(BaseCommand):
    help = "Benchmark ingestion and delivery on loopback and report figures against the targets."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
        service = parser.add_argument_group("service under test")
        service.add_argument(
            "--url", help="drive a running service (e.g. http://127.0.0.1:8000) instead of starting one"
        )
        service.add_argument("--redis-url", help="with --url: its Redis (default: REDIS_URL of this process)")
        service.add_argument(
            "--database-url",
            help="the service's database (default: a temporary SQLite one, or this process's DATABASE_URL with --url)",
        )
        service.add_argument("--web-workers", type=int, default=2, help="gunicorn processes (WEB_CONCURRENCY)")
        service.add_argument("--workers", type=int, default=2, help="RQ worker processes")
        service.add_argument("--concurrency", type=int, help="DELIVERY_CONCURRENCY (default: the service's own)")
        service.add_argument(
            "--settings-cache",
            type=float,
            default=5.0,
            help="with --url: the service's DELIVERY_SETTINGS_CACHE_SECONDS",
        )
        load = parser.add_argument_group("load (default: each scenario's own)")
        load.add_argument("--rate", type=float, help="open loop: requests a second (wild: postbacks a second)")
        load.add_argument("--clients", type=int, help="closed loop: requests in flight")
        load.add_argument("--duration", type=float, help="seconds of load")
        load.add_argument("--requests", type=int, help="requests to send (instead of a duration)")
        load.add_argument("--objects", type=int, help="data objects a request (fanout, slow, wild)")
        load.add_argument("--ingest-path", default="/ingest.php", choices=["/ingest.php", "/i"])
        load.add_argument(
            "--php-baseline",
            choices=[*POOLS, "both"],
            help="load: also measure the brief's stack (nginx + PHP-FPM + phpredis, benchmark/php.py) with "
            "as many PHP-FPM children as --web-workers (equal), with Debian's pool (defaults), or both",
        )
        receiver = parser.add_argument_group("receiver")
        receiver.add_argument("--latency-ms", type=float, help="slow, kill: the receiver's added latency")
        receiver.add_argument("--error-rate", type=float, help="flaky, wild: share of requests answered 503")
        receiver.add_argument("--stall-for", type=float, help="stall: seconds before the stalled receiver recovers")
        receiver.add_argument(
            "--receiver-processes",
            type=int,
            help="processes sharing a receiver's port (default 1), or the wild hosts between them (default 2)",
        )
        receiver.add_argument("--skip-ceiling", action="store_true", help="do not measure the receivers' ceilings")
        receiver.add_argument(
            "--baseline-seconds",
            type=float,
            default=10.0,
            help="longest the /healthz baseline runs (the plain client loop: half)",
        )
        wild = parser.add_argument_group("wild (docs/benchmark.md, 'wild')")
        defaults = WildOptions()
        wild.add_argument("--hosts", type=int, default=defaults.hosts, help="live hosts (address:port)")
        wild.add_argument("--latency-median-ms", type=float, default=defaults.latency_median_ms)
        wild.add_argument("--latency-p99-ms", type=float, default=defaults.latency_p99_ms)
        wild.add_argument("--tls-share", type=float, default=defaults.tls_share, help="share of hosts over HTTPS")
        wild.add_argument("--dns-share", type=float, default=defaults.dns_share, help="share of hosts by name")
        wild.add_argument("--dns-delay-ms", type=float, default=defaults.dns_delay_ms, help="the DNS server's delay")
        wild.add_argument("--refusing-hosts", type=int, default=defaults.refusing_hosts)
        wild.add_argument(
            "--silent-hosts", type=int, default=defaults.silent_hosts, help="accept, never answer (first one HTTPS)"
        )
        wild.add_argument("--seed", type=int, default=defaults.seed, help="draws of latencies, HTTPS and names")
        stallmany = parser.add_argument_group("stallmany")
        stallmany.add_argument("--stall-hosts", type=int, default=180, help="hosts that never answer, one request each")
        stallmany.add_argument("--wave-hosts", type=int, default=15, help="stalled hosts a wave")
        stallmany.add_argument("--wave-seconds", type=float, default=10.0, help="seconds between waves")
        stallmany.add_argument("--stall-objects", type=int, default=12, help="data objects a stalled request")
        output = parser.add_argument_group("output")
        output.add_argument(
            "--max-wait",
            type=float,
            help="seconds to wait after the load for every postback's final outcome (120; stallmany 300)",
        )
        output.add_argument("--json", type=Path, help="write every figure and series to this file")
        output.add_argument("--plot", type=Path, help="write a PNG of throughput, backlog and latency")
        output.add_argument("--logs", type=Path, help="keep the logs of the processes started, one folder a scenario")

    def handle(self, *args: Any, **options: Any) -> None:
        # Piped output (a log, CI) gets room for wider tables instead of 80 columns.
        console = Console(width=None if sys.stdout.isatty() else 170)
        raise_open_files_limit()
        concurrency = options["concurrency"] or settings.DELIVERY_CONCURRENCY
        scenarios = build(options["scenario"], self.scenario_options(options, concurrency))
        header: dict[str, Any] = {
            "command": options["scenario"],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "workers": options["workers"],
            "web_workers": options["web_workers"],
            "concurrency": concurrency,
        }
        if not options["skip_ceiling"]:
            console.print("measuring the receiver's ceiling…")
            header.update(receiver_ceiling(processes=options["receiver_processes"] or 1))
        run_settings = RunSettings(
            max_wait=options["max_wait"],
            workers=options["workers"],
            concurrency=concurrency,
            receiver_processes=options["receiver_processes"],
            ingest_path=options["ingest_path"],
            baseline_seconds=options["baseline_seconds"],
            skip_ceiling=options["skip_ceiling"],
            web_workers=options["web_workers"],
            php_pools=pools_named(options["php_baseline"]),
        )
        workdir = Path(tempfile.mkdtemp(prefix="postback-benchmark-"))
        run_settings.workdir = workdir / "receivers"
        try:
            provider = self.provider(options, workdir, console)
            runs = self.run_all(scenarios, provider, run_settings, console)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        verdicts = judge(runs)
        print_report(console, runs, verdicts, header)
        if options["json"]:
            write_json(options["json"], runs, verdicts, header)
            console.print(f"figures written to {options['json']}")
        if options["plot"]:
            write_plot(options["plot"], runs)
            console.print(f"plot written to {options['plot']}")

    @staticmethod
    def scenario_options(options: dict[str, Any], concurrency: int) -> Options:
        return Options(
            rate=options["rate"],
            clients=options["clients"],
            duration=options["duration"],
            requests=options["requests"],
            objects=options["objects"],
            latency_ms=options["latency_ms"],
            error_rate=options["error_rate"],
            stall_for=options["stall_for"],
            workers=options["workers"],
            concurrency=concurrency,
            wild=WildOptions(
                hosts=options["hosts"],
                latency_median_ms=options["latency_median_ms"],
                latency_p99_ms=options["latency_p99_ms"],
                tls_share=options["tls_share"],
                dns_share=options["dns_share"],
                dns_delay_ms=options["dns_delay_ms"],
                error_rate=options["error_rate"] if options["error_rate"] is not None else WildOptions.error_rate,
                refusing_hosts=options["refusing_hosts"],
                silent_hosts=options["silent_hosts"],
                seed=options["seed"],
            ),
            stall_hosts=options["stall_hosts"],
            wave_hosts=options["wave_hosts"],
            wave_seconds=options["wave_seconds"],
            stall_objects=options["stall_objects"],
            php_pools=pools_named(options["php_baseline"]),
        )

    @staticmethod
    def provider(options: dict[str, Any], workdir: Path, console: Console) -> "LocalService | RemoteProvider":
        if options["url"]:
            console.print(f"driving the running service at {options['url']}: no process figures, no kill")
            service = remote_service(
                options["url"], options["redis_url"], options["database_url"], options["settings_cache"]
            )
            return RemoteProvider(service)
        service_options = ServiceOptions(
            web_workers=options["web_workers"],
            workers=options["workers"],
            concurrency=options["concurrency"],
            database_url=options["database_url"],
            keep_logs=options["logs"],
        )
        local = LocalService(service_options, workdir)
        console.print("migrating the benchmark's database…")
        try:
            local.prepare()
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc
        return local

    @staticmethod
    def run_all(
        scenarios: list[Any], provider: Any, run_settings: RunSettings, console: Console
    ) -> list[dict[str, Any]]:
        runs = []
        with Progress(*progress_columns(console.width), console=console) as progress:
            for scenario in scenarios:
                runs.append(ScenarioRun(scenario, provider, run_settings, progress).run())
        return runs
