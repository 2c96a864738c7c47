"""The benchmark tool: its receiver's behaviours, its DNS server, the `wild` world, its load
generator, its arithmetic and report, and short scenarios through real processes (own Redis,
gunicorn, workers, receivers) whose figures must add up. Nothing here asserts how fast
anything is."""

import asyncio
import glob
import http.client
import io
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme
from django.conf import settings
from dnslib import QTYPE, RCODE, DNSRecord  # type: ignore[import-untyped]  # no stubs
from redis import Redis
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from benchmark import php
from benchmark.costs import CommandCount, CostReadings, RedisCounters, TableCounts, command_counts
from benchmark.database import AttemptRow
from benchmark.dns import DnsProtocol, DnsServer, answer
from benchmark.figures import RawRun, group_figures, summarize
from benchmark.loadgen import MAX_503_RETRIES, Generator, LoadPlan, LoadResult
from benchmark.metrics import per_second_counts, percentiles, rss_summary
from benchmark.monitor import Monitor
from benchmark.receiver import (
    ANSWERED,
    ATTEMPT,
    COMPLETED,
    CONNECTIONS,
    IN_FLIGHT,
    LATENCY_MS,
    POSTBACK_ID,
    RECEIVED,
    STATUS,
    Behaviour,
    Listener,
    Receiver,
    ReceiverProtocol,
    ReceiverState,
    parse_head,
)
from benchmark.report import print_report, progress_columns
from benchmark.scenarios import Options, build, waves
from benchmark.targets import judge
from benchmark.transport_costs import measure as measure_transport_costs
from benchmark.wild import WildOptions, WildWorld, host_latencies, plan_hosts
from tests.conftest import free_port

GET = b"GET /data?key=k HTTP/1.1\r\nHost: x\r\nX-Postback-Id: p1\r\nX-Postback-Attempt: 3\r\n\r\n"


# --- the receiver, in-process: a fake transport and the timers it asks for ------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True


class Timers:
    """Stands in for loop.call_later: keeps the callbacks so that a test fires them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[float, Any, tuple[Any, ...]]] = []
        loop = asyncio.new_event_loop()
        monkeypatch.setattr(
            loop, "call_later", lambda delay, callback, *args: self.calls.append((delay, callback, args))
        )
        monkeypatch.setattr(asyncio, "get_running_loop", lambda: loop)

    def keep(self, delay: float, callback: Any, args: tuple[Any, ...]) -> None:
        self.calls.append((delay, callback, args))

    def fire_next(self) -> float:
        delay, callback, args = self.calls.pop(0)
        callback(*args)
        return delay


def connect(
    behaviour: Behaviour, counts: list[int] | None = None
) -> tuple[ReceiverProtocol, FakeTransport, ReceiverState]:
    state = ReceiverState(behaviour, counts=counts)
    protocol = ReceiverProtocol(state)
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport, state


def test_it_answers_200_at_once_and_records_the_postback_headers():
    protocol, transport, state = connect(Behaviour())
    protocol.data_received(GET)
    assert transport.written.startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.written.endswith(b"\r\n\r\nok")
    [receipt] = state.receipts
    assert (receipt[POSTBACK_ID], receipt[ATTEMPT], receipt[STATUS], receipt[COMPLETED]) == ("p1", 3, 200, True)


def test_it_adds_latency_with_a_timer_not_a_sleep(monkeypatch):
    timers = Timers(monkeypatch)
    protocol, transport, state = connect(Behaviour(latency_ms=250))
    protocol.data_received(GET)
    assert transport.written == b""
    assert state.receipts[0][COMPLETED] is False
    assert timers.fire_next() == 0.25
    assert transport.written.startswith(b"HTTP/1.1 200 OK")
    assert state.receipts[0][COMPLETED] is True


def test_it_answers_the_error_status_at_the_error_rate():
    protocol, transport, state = connect(Behaviour(error_rate=1.0, error_status=503))
    protocol.data_received(GET + GET)
    assert transport.written.count(b"HTTP/1.1 503 Service Unavailable") == 2
    assert [receipt[STATUS] for receipt in state.receipts] == [503, 503]


def test_it_drips_one_byte_per_interval_and_sends_the_rest_when_the_stall_ends(monkeypatch):
    timers = Timers(monkeypatch)
    protocol, transport, state = connect(Behaviour(stall=True, stall_for=3600, drip_interval=2, drip_body_bytes=10))
    protocol.data_received(GET)
    assert transport.written.endswith(b"Content-Length: 10\r\nConnection: keep-alive\r\n\r\nx")
    assert timers.fire_next() == 2
    assert transport.written.endswith(b"\r\n\r\nxx")
    assert state.receipts[0][COMPLETED] is False

    state.started -= 3600  # the stall is over
    timers.fire_next()
    assert transport.written.endswith(b"\r\n\r\n" + b"x" * 10)
    assert state.receipts[0][COMPLETED] is True
    protocol.data_received(GET)  # and new requests get plain answers
    assert transport.written.endswith(b"\r\n\r\nok")


def test_it_waits_for_the_whole_body_and_says_100_continue_when_asked():
    protocol, transport, state = connect(Behaviour())
    head = b"POST /x HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\nX-Postback-Id: p2\r\n\r\n"
    protocol.data_received(head + b"ab")
    assert transport.written == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert state.receipts == []
    protocol.data_received(b"cd")
    assert transport.written.endswith(b"ok")
    assert state.receipts[0][POSTBACK_ID] == "p2"


def test_it_closes_the_connection_when_the_client_asks():
    protocol, transport, _ = connect(Behaviour())
    protocol.data_received(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert b"Connection: close" in transport.written
    assert transport.closed


def test_it_closes_every_connection_after_its_answer_when_told():
    protocol, transport, _ = connect(Behaviour(close_after_answer=True))
    protocol.data_received(GET)
    assert b"Connection: close" in transport.written
    assert transport.closed


def test_it_records_the_latency_it_added_and_when_the_answer_went_out(monkeypatch):
    timers = Timers(monkeypatch)
    counts = [0, 0, 0]
    protocol, _, state = connect(Behaviour(latency_ms=250), counts)
    protocol.data_received(GET)
    [receipt] = state.receipts
    assert (receipt[LATENCY_MS], receipt[ANSWERED], counts[IN_FLIGHT]) == (250, 0.0, 1)
    timers.fire_next()
    assert float(receipt[ANSWERED]) >= float(receipt[0])
    assert (counts[RECEIVED], counts[IN_FLIGHT], counts[CONNECTIONS]) == (1, 0, 1)


def test_a_silent_listener_reads_and_never_answers_and_its_request_stays_in_flight_until_the_client_leaves():
    counts = [0, 0, 0]
    protocol, transport, state = connect(Behaviour(silent=True), counts)
    protocol.data_received(GET + GET)
    assert transport.written == b""
    assert [(r[STATUS], r[COMPLETED]) for r in state.receipts] == [(0, False)]  # the second waits behind
    assert counts[IN_FLIGHT] == 1
    protocol.connection_lost(None)
    assert counts[IN_FLIGHT] == 0


def test_a_head_is_parsed_only_once_complete():
    assert parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n") is None
    head = parse_head(b"GET / HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello")
    assert head is not None
    assert (head.content_length, head.keep_alive, head.length) == (5, False, 37)


# --- the receiver and the load generator as processes ----------------------------------------


@pytest.fixture
def receiver_process():
    started: list[Receiver] = []

    def start(behaviour: Behaviour) -> Receiver:
        receiver = Receiver.single("test", behaviour, free_port())
        receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


def test_the_receiver_process_answers_keep_alive_requests_and_returns_its_records(receiver_process):
    receiver = receiver_process(Behaviour())
    connection = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=5)
    for attempt in (1, 2):
        connection.request("GET", "/data", headers={"X-Postback-Id": "abc", "X-Postback-Attempt": str(attempt)})
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"ok")
    connection.close()
    receipts = receiver.stop()
    assert [(r[POSTBACK_ID], r[ATTEMPT], r[STATUS], r[COMPLETED]) for r in receipts] == [
        ("abc", 1, 200, True),
        ("abc", 2, 200, True),
    ]


def test_the_load_generator_sends_the_requests_asked_for_and_keeps_every_answer(receiver_process):
    receiver = receiver_process(Behaviour())
    plan = LoadPlan(url=receiver.url("/x"), bodies=[b'{"a": 1}'], clients=3, requests=20, parse_ids=False)
    result = Generator(plan).run()
    assert len(result.records) == 20
    assert {status for _, _, status, _ in result.records} == {200}
    assert all(sent <= answered for sent, answered, _, _ in result.records)
    assert len(receiver.stop()) == 20


def test_the_load_generator_counts_503s_and_drops_what_stays_refused(receiver_process):
    receiver = receiver_process(Behaviour(error_rate=1.0, error_status=503))
    plan = LoadPlan(url=receiver.url("/x"), bodies=[b"{}"], requests=1, parse_ids=False, default_retry_after=0.01)
    result = Generator(plan).run()
    assert (result.backpressure, result.retried, result.dropped) == (MAX_503_RETRIES + 1, MAX_503_RETRIES, 1)


# --- arithmetic -----------------------------------------------------------------------------


def test_percentiles_interpolate_between_ranks():
    figures = percentiles(float(value) for value in range(1, 101))
    assert figures["p50"] == pytest.approx(50.5)
    assert figures["p99"] == pytest.approx(99.01)
    assert figures["max"] == 100
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "max": None}
    assert percentiles([7.0])["p99"] == 7.0


def test_per_second_counts_bucket_by_whole_seconds_after_the_start():
    assert per_second_counts([100.0, 100.9, 101.0, 103.5, 99.0], 100.0, 4) == [3, 1, 0, 1]
    assert per_second_counts([100.5, 101.5], 100.0, 2, [2, 100]) == [2, 100]
    assert per_second_counts([100.05, 100.15, 100.19], 100.0, 3, step=0.1) == [1, 2, 0]


def test_rss_is_flat_when_the_end_is_within_ten_percent_of_the_first_quarter():
    samples = [(float(t), 100.0 + t) for t in range(0, 121)]
    summary = rss_summary(samples, 0.0, 100.0)  # the load ran 100 s; sampling went on after it
    assert (summary["at_25_percent"], summary["at_end"], summary["peak"]) == (125.0, 200.0, 220.0)
    assert summary["flat"] is False
    assert rss_summary([(t, 100.0) for t in (0.0, 50.0, 100.0)], 0.0, 100.0)["flat"] is True
    assert rss_summary([(60.0, 100.0), (100.0, 300.0)], 0.0, 100.0)["flat"] is None  # started late


def raw_run(**overrides: Any) -> RawRun:
    """Two requests: a (postbacks a1, a2) answered at 10.1, b (b1) at 10.2."""
    load = LoadResult(
        records=[(10.0, 10.1, 202, ["a1", "a2"]), (10.1, 10.2, 202, ["b1"]), (10.2, 10.3, 503, [])],
        started=10.0,
        ended=12.0,
        backpressure=1,
        dropped=1,
    )
    receipts = [  # arrival, id, attempt, status, answered in full, latency added (ms), answered at
        [10.15, "a1", 1, 200, True, 100.0, 10.25],
        [10.20, "a2", 1, 503, True, 0.0, 10.20],
        [10.60, "a2", 2, 200, True, 300.0, 10.91],
        [10.70, "a2", 2, 200, True, 0.0, 10.70],  # sent again: a duplicate
        [10.30, "b1", 1, 200, False, 0.0, 0.0],  # the sender gave up on this one (dripped)
        [10.90, "other", 1, 200, True, 0.0, 10.90],  # not ours
    ]
    attempts = [
        AttemptRow("a1", 1, "success"),
        AttemptRow("a2", 1, "retry"),
        AttemptRow("a2", 2, "success"),
        AttemptRow("b1", 1, "retry"),
    ]
    values: dict[str, Any] = {
        "name": "load",
        "started": 10.0,
        "load_ended": 10.5,
        "ended": 13.0,
        "wait_timed_out": True,
        "loads": [load],
        "receipts": {"main": receipts},
        "attempts": attempts,
        "final_seen_at": {"a1": 10.5, "a2": 11.0},
        "redis_before": {"total_net_input_bytes": 1000, "total_net_output_bytes": 500},
        "redis_after": {"total_net_input_bytes": 1600, "total_net_output_bytes": 800},
        "rss": {"web": [(10.0, 100.0), (13.0, 105.0)]},
        "samples": [],
    }
    return RawRun(**{**values, **overrides})


def test_the_figures_add_up_from_what_was_recorded():
    figures = summarize(raw_run())
    ingest, delivery, redis = figures["ingest"], figures["delivery"], figures["redis"]
    assert (ingest["requests"], ingest["accepted_requests"], ingest["statuses"]) == (3, 2, {"202": 2, "503": 1})
    assert ingest["requests_per_second"] == pytest.approx(1.0)
    assert ingest["latency_ms"]["max"] == pytest.approx(100.0)
    assert (delivery["accepted"], delivery["delivered"], delivery["lost"]) == (3, 2, 1)
    assert delivery["duplicates"] == 1
    assert (delivery["attempts"], delivery["retries"], delivery["failed"]) == (4, 2, 0)
    assert delivery["delivered_per_second"] == pytest.approx(2 / 0.6)
    assert delivery["delivered_while_sending"] == 1  # a1 at 10.15; a2 only at 10.6
    # From the 202 to the first arrival of any kind: a1 0.05 s, a2 0.1 s, b1 0.1 s.
    assert delivery["end_to_end_ms"]["max"] == pytest.approx(100.0)
    assert redis["bytes_per_postback"] == pytest.approx(300.0)
    assert figures["series"]["step_seconds"] == 0.1  # a 3-second run is drawn in tenths
    assert sum(figures["series"]["accepted_per_second"]) * 0.1 == pytest.approx(3)  # rates, per tenth


def test_commandstats_are_read_per_command_subcommands_included():
    section = {  # INFO commandstats as redis-py parses it
        "cmdstat_xadd": {"calls": 3, "usec": 12, "usec_per_call": 4.0, "rejected_calls": 0, "failed_calls": 0},
        "cmdstat_client|setname": {"calls": 2, "usec": 1, "usec_per_call": 0.5},
        "errorstat_ERR": {"count": 1},
    }
    assert command_counts(section) == {"xadd": CommandCount(3, 12), "client|setname": CommandCount(2, 1)}


def test_each_part_s_cost_is_its_counters_growth_per_postback():
    readings = CostReadings(
        redis_before=RedisCounters(1.0, {"evalsha": CommandCount(10, 100), "xack": CommandCount(1, 1)}),
        redis_after=RedisCounters(1.3, {"evalsha": CommandCount(20, 400), "xack": CommandCount(1, 1)}),
        tables_before=TableCounts({"attempt": 5, "request": 5}, {"attempt": 8192, "request": 8192}, {7: 1.0, 8: 2.0}),
        # backend 8 disconnected (lost), 9 connected meanwhile (from zero)
        tables_after=TableCounts(
            {"attempt": 15, "request": 10}, {"attempt": 15192, "request": 10692}, {7: 1.5, 9: 0.5}
        ),
    )
    cpu = {"web": 0.2, "worker1": 0.1, "redis": 0.3}
    figures = summarize(raw_run(costs=readings, cpu=cpu, service_processes=["web", "worker1", "redis"]))
    costs = figures["costs"]  # 3 postbacks in 2 accepted requests (raw_run)
    assert costs["web_cpu_us_per_request"] == pytest.approx(100_000)
    assert costs["worker_cpu_us_per_postback"] == pytest.approx(100_000 / 3)
    assert costs["redis_cpu_us_per_postback"] == pytest.approx(100_000)  # INFO cpu's 0.3 s, not psutil's
    assert list(costs["redis_commands"]) == ["evalsha"]  # xack did not run during the scenario
    assert costs["redis_commands"]["evalsha"]["usec_per_call"] == pytest.approx(30.0)
    assert costs["redis_commands"]["evalsha"]["calls_per_postback"] == pytest.approx(10 / 3)
    database = costs["database"]
    assert (database["attempt_rows_per_postback"], database["attempt_bytes_per_row"]) == (pytest.approx(10 / 3), 700)
    assert (database["request_bytes_per_row"], database["bytes_per_postback"]) == (500, pytest.approx(9500 / 3))
    assert database["backend_cpu_us_per_attempt_row"] == pytest.approx(100_000)  # 1 s over 10 rows
    without_sizes = CostReadings(
        readings.redis_before,
        readings.redis_after,
        TableCounts({"attempt": 0, "request": 0}, None),
        TableCounts({"attempt": 3, "request": 3}, None),
    )
    assert summarize(raw_run(costs=without_sizes))["costs"]["database"]["bytes_per_postback"] is None  # SQLite


def test_the_kill_figure_is_the_time_from_the_kill_to_the_last_final_outcome():
    figures = summarize(raw_run(kill_at=10.2, final_seen_at={"a1": 10.5, "a2": 11.0, "b1": 12.7}))
    assert figures["kill"]["all_final_after_seconds"] == pytest.approx(2.5)
    assert summarize(raw_run(kill_at=10.2))["kill"]["all_final_after_seconds"] is None


def test_targets_are_judged_from_ratios_to_the_baselines():
    figures = summarize(raw_run(name="fanout"))
    figures.update(baselines={"plain_client_requests_per_second": 1.0}, load=[{"objects_per_request": 100}])
    [ratio_verdict, redis_verdict] = judge([figures])
    assert ratio_verdict.met is True  # 3.3 postbacks/s against 1 request/s
    assert redis_verdict.met is False  # 300 B against 1.5 x 29 B + 50


# --- one short scenario through real processes -----------------------------------------------


@pytest.fixture
def benchmark_database_url():
    """None (the tool's own SQLite) on SQLite; a scratch database when the suite runs on PostgreSQL."""
    database = settings.DATABASES["default"]
    if database["ENGINE"] != "django.db.backends.postgresql":
        yield None
        return
    name = f"benchmark_{uuid.uuid4().hex[:12]}"
    server = {key.lower(): database[key] for key in ("HOST", "PORT", "USER", "PASSWORD") if database.get(key)}
    with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    user = database["USER"] + (f":{database['PASSWORD']}" if database.get("PASSWORD") else "")
    yield f"postgres://{user}@{database['HOST'] or '127.0.0.1'}:{database['PORT'] or 5432}/{name}"
    with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.mark.timeout(180)
def test_a_short_scenario_runs_through_real_processes_and_its_figures_add_up(tmp_path, benchmark_database_url):
    report, plot = tmp_path / "report.json", tmp_path / "report.png"
    command = [sys.executable, "manage.py", "benchmark", "load", "--requests", "30", "--clients", "2",
               "--skip-ceiling", "--baseline-seconds", "1", "--max-wait", "60",
               "--json", str(report), "--plot", str(plot)]  # fmt: skip
    if benchmark_database_url:
        command += ["--database-url", benchmark_database_url]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "postbackproject.settings", "SECRET_KEY": "test-only"}
    env.pop("DATABASE_URL", None)
    done = subprocess.run(command, cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr

    [figures] = json.loads(report.read_text())["scenarios"]
    delivery = figures["delivery"]
    assert figures["ingest"]["accepted_requests"] == 30
    assert delivery["accepted"] == 60
    assert delivery["delivered"] == delivery["succeeded"] == 60
    assert (delivery["lost"], delivery["duplicates"], delivery["failed"]) == (0, 0, 0)
    assert figures["wait_timed_out"] is False
    assert figures["baselines"]["healthz_requests_per_second"] > 0
    assert {"web", "worker1", "worker2", "redis"} <= set(figures["processes"])
    costs = figures["costs"]
    assert (costs["database"]["attempt_rows_per_postback"], costs["database"]["request_rows_per_postback"]) == (1, 1)
    assert costs["web_cpu_us_per_request"] > 0 and costs["worker_cpu_us_per_postback"] > 0
    assert costs["redis_cpu_us_per_postback"] > 0 and "evalsha" in costs["redis_commands"]  # the ingest script
    assert costs["redis_memory"]["postbacks"] == 4000  # sent with the workers stopped, then let go
    assert costs["redis_memory"]["bytes_per_postback"] > 0
    assert (costs["database"]["bytes_per_postback"] is not None) == (benchmark_database_url is not None)
    assert Path(plot).read_bytes().startswith(b"\x89PNG")


def test_a_service_process_that_exited_during_the_run_is_flagged():
    assert summarize(raw_run())["processes_exited"] == {}
    assert summarize(raw_run(exited={"worker1": 11.5}))["processes_exited"] == {"worker1": 1.5}


# --- HTTPS, many listeners, silence: the receiver as processes -------------------------------


@pytest.fixture
def certificate_authority(tmp_path):
    """A CA of the test's own, and a certificate for 127.0.0.1 and `h1.wild.test` under it."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf = tmp_path / "leaf.pem"
    ca.issue_cert("127.0.0.1", "h1.wild.test").private_key_and_cert_chain_pem.write_to_path(str(leaf))
    return tmp_path / "ca.pem", str(leaf)


def test_the_receiver_serves_https_and_plain_listeners_on_ports_it_binds_itself(certificate_authority):
    ca, leaf = certificate_authority
    listeners = [Listener("127.0.0.1", 0, Behaviour(), leaf), Listener("127.0.0.1", 0, Behaviour())]
    receiver = Receiver("many", listeners, processes=2)
    receiver.start()
    try:
        secure, plain = receiver.listeners
        assert secure.port and plain.port and secure.port != plain.port
        context = ssl.create_default_context(cafile=str(ca))
        https = http.client.HTTPSConnection("127.0.0.1", secure.port, timeout=5, context=context)
        https.request("GET", "/data", headers={"X-Postback-Id": "tls"})
        assert https.getresponse().read() == b"ok"
        https.close()
        connection = http.client.HTTPConnection("127.0.0.1", plain.port, timeout=5)
        connection.request("GET", "/data", headers={"X-Postback-Id": "plain"})
        assert connection.getresponse().read() == b"ok"
        connection.close()
    finally:
        receipts = receiver.stop()
    assert sorted(r[POSTBACK_ID] for r in receipts) == ["plain", "tls"]


def test_a_silent_host_accepts_the_connection_and_never_answers_the_tls_handshake():
    receiver = Receiver("silent", [Listener("127.0.0.1", 0, Behaviour(silent=True))], processes=1)
    receiver.start()
    try:
        raw = socket.create_connection(("127.0.0.1", receiver.port), timeout=0.5)  # accepted
        context = ssl.create_default_context()
        with pytest.raises(TimeoutError):
            context.wrap_socket(raw, server_hostname="h1.wild.test")  # the ServerHello never comes
        raw.close()
    finally:
        receiver.stop()


def test_the_load_generator_follows_its_schedule_and_sends_each_body_to_its_own_target():
    receiver = Receiver("targets", [Listener("127.0.0.1", 0, Behaviour()) for _ in range(3)], processes=1)
    receiver.start()
    try:
        targets = tuple(receiver.url("/x", index) for index in range(3))
        plan = LoadPlan(url="unused", targets=targets, bodies=[b""], schedule=(0.0, 0.0, 0.05), parse_ids=False)
        result = Generator(plan).run()
        connections = receiver.connections()
    finally:
        receiver.stop()
    assert [status for _, _, status, _ in result.records] == [200, 200, 200]
    assert connections == 3  # one request to each listener


def test_waves_start_a_group_of_hosts_every_period():
    offsets = waves(180, 15, 10.0)
    assert len(offsets) == 180
    assert offsets.count(0.0) == 15
    assert offsets[-1] == 110.0
    assert sorted(offsets) == list(offsets)


def test_stallmany_runs_its_waves_beside_a_steady_healthy_stream_for_as_long():
    [scenario] = build("stallmany", Options())
    stalled, healthy = scenario.phases
    assert scenario.together
    assert (stalled.receiver, stalled.objects, len(stalled.schedule or ())) == ("stalled", 12, 180)
    assert (healthy.receiver, healthy.objects, healthy.rate, healthy.duration) == ("healthy", 1, 2.0, 120.0)
    assert dict(scenario.groups) == {"stalled_hosts": 0, "healthy_receiver": 1}


def test_wild_converts_postbacks_a_second_into_requests_and_sends_one_request_to_each_dead_host():
    [scenario] = build("wild", Options(rate=4000))
    live, dead = scenario.phases
    assert live.rate == 400  # 10 objects a request
    assert (dead.receiver, dead.requests) == ("dead", 5)
    in_all = [each.name for each in build("all", Options())]
    assert "wild" not in in_all and "stallmany" not in in_all


# --- DNS ------------------------------------------------------------------------------------


def test_the_dns_server_answers_known_names_with_their_address_and_nothing_else():
    names = {"h0001.wild.test": "127.9.0.1"}

    def ask(name: str, kind: str = "A") -> tuple[Any, bool]:
        replied = answer(DNSRecord.question(name, kind).pack(), names)
        assert replied is not None
        return DNSRecord.parse(replied[0]), replied[1]

    found, hit = ask("H0001.wild.test.")
    assert hit and [str(rr.rdata) for rr in found.rr] == ["127.9.0.1"]
    no_v6, hit = ask("h0001.wild.test", "AAAA")
    assert not hit and no_v6.header.rcode == RCODE.NOERROR and not no_v6.rr
    unknown, _ = ask("nope.wild.test")
    assert unknown.header.rcode == RCODE.NXDOMAIN
    assert answer(b"not a query", names) is None


class FakeDatagrams:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append(data)

    def is_closing(self) -> bool:
        return False


def test_the_dns_server_sends_each_answer_after_its_delay(monkeypatch):
    timers = Timers(monkeypatch)
    protocol = DnsProtocol({"h1.wild.test": "127.9.0.2"}, delay_ms=50)
    datagrams = FakeDatagrams()
    protocol.connection_made(datagrams)  # type: ignore[arg-type]
    protocol.datagram_received(DNSRecord.question("h1.wild.test").pack(), ("127.0.0.1", 5353))
    assert datagrams.sent == []
    assert timers.fire_next() == 0.05
    assert DNSRecord.parse(datagrams.sent[0]).q.qtype == QTYPE.A


def test_the_dns_server_process_answers_on_udp_and_counts_what_it_found():
    port = free_port()  # a port of our own: 53 is for the scenario, which runs as root
    server = DnsServer("127.0.0.1", {"h1.wild.test": "127.9.0.3"}, delay_ms=1, port=port)
    server.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(DNSRecord.question("h1.wild.test").pack(), ("127.0.0.1", port))
            reply = DNSRecord.parse(client.recvfrom(512)[0])
        assert str(reply.rr[0].rdata) == "127.9.0.3"
        assert server.queries() == (1, 1)
    finally:
        server.stop()


# --- the wild world ---------------------------------------------------------------------------


def test_host_latencies_follow_the_log_normal_asked_for_within_its_cap():
    import random

    drawn = host_latencies(20_000, WildOptions(latency_median_ms=200, latency_p99_ms=2000), random.Random(7))
    cuts = statistics.quantiles(drawn, n=100)
    assert cuts[49] == pytest.approx(200, rel=0.05)
    assert cuts[98] == pytest.approx(2000, rel=0.1)
    assert max(drawn) <= 4000


def test_the_world_is_drawn_from_its_seed_with_shares_of_https_and_names_and_a_few_dead_hosts():
    options = WildOptions(hosts=100, tls_share=0.2, dns_share=0.3, refusing_hosts=3, silent_hosts=2, seed=5)
    plans = plan_hosts(options, subnet=77)
    assert plans == plan_hosts(options, subnet=77)
    live = [plan for plan in plans if plan.kind == "live"]
    assert (len(live), sum(p.scheme == "https" for p in live), sum(p.named for p in live)) == (100, 20, 30)
    assert [(p.kind, p.scheme) for p in plans[100:]] == [
        ("silent", "https"),
        ("silent", "http"),
        ("refusing", "https"),
        ("refusing", "http"),
        ("refusing", "https"),
    ]
    assert all(plan.address.startswith("127.77.") for plan in plans)
    assert len({plan.address for plan in plans}) == 53  # two ports to an address
    assert live[42].name == "h0042.wild.test"


def test_the_worlds_hosts_answer_over_https_refuse_or_stay_silent_and_names_resolve_in_the_workers_namespace(
    tmp_path,
):
    options = WildOptions(hosts=6, tls_share=0.5, dns_share=0.5, refusing_hosts=1, silent_hosts=1, dns_delay_ms=5)
    world = WildWorld(options, tmp_path / "world", processes=1)
    world.start()
    try:
        by_kind = {kind: [h for h in world.hosts if h.plan.kind == kind] for kind in ("live", "refusing", "silent")}
        [refusing], [silent] = by_kind["refusing"], by_kind["silent"]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((refusing.plan.address, refusing.port), timeout=2)
        secure = next(h for h in by_kind["live"] if h.plan.scheme == "https")
        context = ssl.create_default_context(cafile=str(world.ca_bundle))
        https = http.client.HTTPSConnection(secure.plan.address, secure.port, timeout=10, context=context)
        https.request("GET", "/x", headers={"X-Postback-Id": "p"})
        assert https.getresponse().status in (200, 503)
        https.close()
        assert silent.plan.scheme == "https"
        extras = world.service_extras()
        assert extras.environment == {"DELIVERY_CA_BUNDLE": str(world.ca_bundle)}
        if world.names_off_because:
            pytest.skip(f"names could not be set up here: {world.names_off_because}")
        named = next(h for h in by_kind["live"] if h.by_name)
        assert named.base.startswith(f"{named.plan.scheme}://{named.plan.name}:")
        lookup = f"import socket; print(socket.gethostbyname('{named.plan.name}'))"
        resolved = subprocess.run(
            [*extras.worker_prefix, sys.executable, "-c", lookup],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        assert resolved.stdout.strip() == named.plan.address
        assert world.resolv_conf is not None
        assert Path("/etc/resolv.conf").read_text() != world.resolv_conf.read_text()  # ours stays in the namespace
    finally:
        world.stop()


# --- figures, targets and the report -------------------------------------------------------------


def test_end_to_end_to_the_answer_stands_beside_the_latency_the_receivers_added():
    delivery = summarize(raw_run())["delivery"]
    # a1: answered 10.25, its 202 at 10.1 -> 150 ms, 100 ms of it the receiver's; a2: 10.91 - 10.1.
    assert delivery["end_to_end_answered_ms"]["max"] == pytest.approx(810.0)
    assert delivery["end_to_end_answered_ms"]["p50"] == pytest.approx(480.0)
    assert delivery["receiver_latency_ms"]["max"] == pytest.approx(300.0)
    assert delivery["receiver_lag_ms"]["max"] == pytest.approx(10.0)


def test_cpu_per_postback_counts_the_services_processes_only():
    run = raw_run(
        cpu={"web": 0.1, "web/77": 0.2, "worker1": 0.3, "redis": 0.1, "receiver-main/0": 5.0},
        service_processes=["redis", "web", "web/77", "worker1"],
    )
    cpu = summarize(run)["cpu"]
    assert cpu["service_seconds"] == pytest.approx(0.7)
    assert cpu["by_role"] == pytest.approx({"redis": 0.1, "web": 0.3, "workers": 0.3})
    assert cpu["us_per_postback"] == pytest.approx(0.7e6 / 2)  # a1 and a2 were delivered
    assert cpu["others_seconds"] == {"receiver-main/0": 5.0}


def test_the_backlog_line_is_drawn_from_the_recorded_times_of_acceptance_and_final_outcome():
    series = summarize(raw_run(final_at={"a1": 10.25, "a2": 10.91}))["series"]
    # Accepted at 10.1 (a1, a2) and 10.2 (b1); final at 10.25 and 10.91; b1 never (tenths).
    assert series["backlog"][1:3] == [3, 2]
    assert series["backlog"][8] == 2
    assert set(series["backlog"][9:]) == {1}


def test_a_groups_figures_are_those_of_its_phase_postbacks_alone():
    second = LoadResult(records=[(10.0, 10.4, 202, ["c1"])], started=10.0, ended=10.4)
    run = raw_run(loads=[raw_run().loads[0], second], final_seen_at={"c1": 11.0})
    group = group_figures(run, 1)
    assert (group["accepted"], group["delivered"], group["without_final_outcome"]) == (1, 0, 0)


def wild_figures(**delivery: Any) -> dict[str, Any]:
    figures = summarize(raw_run(name="wild"))
    figures["load"] = [{"rate": 400.0, "objects_per_request": 10}]
    figures["delivery"].update(delivery)
    return figures


def test_wild_is_judged_on_delivery_while_sending_latency_beside_the_receivers_and_nothing_lost():
    good = wild_figures(
        delivered_while_sending_ratio=0.96,
        end_to_end_answered_ms={"p99": 2900.0},
        receiver_latency_ms={"p99": 2000.0},
        lost=0,
    )
    verdicts = judge([good])
    assert [v.met for v in verdicts] == [True, True, True]
    assert "4,000/s offered" in verdicts[0].target
    late = wild_figures(
        delivered_while_sending_ratio=0.9,
        end_to_end_answered_ms={"p99": 3100.0},
        receiver_latency_ms={"p99": 2000.0},
        lost=1,
    )
    assert [v.met for v in judge([late])] == [False, False, False]


def test_stallmany_is_judged_on_the_healthy_receivers_p99_and_every_stalled_postback_final():
    figures = summarize(raw_run(name="stallmany"))
    healthy = {"accepted": 240, "end_to_end_ms": {"p99": 800.0, "max": 4000.0}, "without_final_outcome": 0}
    figures.update(healthy_receiver=healthy, stalled_hosts={"accepted": 2160, "without_final_outcome": 0})
    assert [v.met for v in judge([figures])] == [True, True]
    figures["healthy_receiver"] = {**healthy, "end_to_end_ms": {"p99": 1000.0, "max": 4000.0}}
    figures["stalled_hosts"] = {"accepted": 2160, "without_final_outcome": 3}
    assert [v.met for v in judge([figures])] == [False, False]


def report_runs() -> list[dict[str, Any]]:
    """Every scenario's figures, with long names, big numbers and the flags the report shows."""
    runs = []
    for name in ("load", "load-open", "loop", "flood", "fanout", "slow", "flaky", "stall", "kill", "stallmany"):
        figures = summarize(raw_run(name=name))
        figures.update(title=f"{name}: a title long enough to need more than one line at eighty columns " * 2)
        figures.update(baselines={"healthz_requests_per_second": 12345.6}, load=[{"rate": 100.0}], receivers={})
        figures["delivery"].update(accepted=1_234_567, attempts=12_345_678, delivered_per_second=123_456.7)
        runs.append(figures)
    runs[0]["processes_exited"] = {"worker2": 3.0}
    return runs


def test_the_report_is_readable_at_80_columns_with_no_cell_cut():
    console = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    verdicts = [
        *judge([wild_figures(end_to_end_answered_ms={"p99": 2900.0}, receiver_latency_ms={"p99": 2000.0})]),
        *judge([dict(summarize(raw_run(name="kill")), kill=None)]),
    ]
    print_report(console, report_runs(), verdicts, {})
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in ("load-open", "stallmany", "1,234,567", "12,345,678", "123,457", "exited"):
        assert name in text


def test_the_progress_line_keeps_its_bar_at_80_columns():
    console = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    progress = Progress(*progress_columns(80), console=console)
    progress.add_task(
        "stallmany waiting", total=100, completed=40, accepted=1_234_567, delivered=1_200_000, backlog=34_567
    )
    table: Table = progress.make_tasks_table(progress.tasks)
    console.print(table)
    line = console.export_text().rstrip("\n")
    assert "━" in line and "…" not in line
    assert "1,234,567" in line and "34,567" in line
    assert len(line) <= 80


# --- the monitor ---------------------------------------------------------------------------------


class FakeAttemptLog:
    """The attempt log as the monitor polls it: rows appear as the test writes them."""

    def __init__(self) -> None:
        self.pending: list[AttemptRow] = []

    def poll(self) -> list[AttemptRow]:
        fresh, self.pending = self.pending, []
        return fresh


def test_a_backlog_sample_counts_the_final_outcomes_written_up_to_that_instant(clean_redis):
    counters = [[0, 0, 0]]
    log = FakeAttemptLog()
    monitor = Monitor(clean_redis, log, counters, {})  # type: ignore[arg-type]
    monitor.tick()  # the first sample, and the timers start
    counters[0][1] = 2  # two accepted...
    log.pending = [AttemptRow("a", 1, "success"), AttemptRow("b", 1, "success")]  # ...and both written final
    monitor.sample_queues()
    assert monitor.samples[-1]["backlog"] == 0


# --- a short `wild` through real processes ---------------------------------------------------------


@pytest.fixture(scope="module")
def wild_run(tmp_path_factory) -> dict[str, Any]:
    """20 hosts (4 over HTTPS, 6 by name), 2 that refuse connections, 3 s at 100 postbacks/s."""
    report = tmp_path_factory.mktemp("wild") / "report.json"
    command = [sys.executable, "manage.py", "benchmark", "wild", "--hosts", "20", "--rate", "100",
               "--duration", "3", "--silent-hosts", "0", "--refusing-hosts", "2", "--dns-delay-ms", "20",
               "--skip-ceiling", "--max-wait", "60", "--json", str(report)]  # fmt: skip
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "postbackproject.settings", "SECRET_KEY": "test-only"}
    env.pop("DATABASE_URL", None)
    done = subprocess.run(command, cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    [figures] = json.loads(report.read_text())["scenarios"]
    return dict(figures)


@pytest.mark.timeout(180)
def test_a_short_wild_run_delivers_to_every_live_host_over_http_and_https_and_fails_the_dead_ones(wild_run):
    delivery, world, dead = wild_run["delivery"], wild_run["receivers"], wild_run["dead_hosts"]
    assert wild_run["wait_timed_out"] is False
    assert (world["hosts"], world["over_tls"], world["refusing"]) == (20, 4, 2)
    assert delivery["accepted"] == 300 + 2 * 4  # 10 objects a request; 4 for each dead host
    assert (dead["accepted"], dead["failed"], dead["without_final_outcome"]) == (8, 8, 0)
    assert delivery["delivered"] == delivery["succeeded"] == 300  # every live host, HTTPS ones too
    assert (delivery["lost"], delivery["duplicates"]) == (0, 0)
    assert delivery["deferred"] > 0  # the dead hosts' circuits opened
    assert delivery["receiver_latency_ms"]["p50"] > 0
    assert delivery["end_to_end_answered_ms"]["p50"] >= delivery["receiver_latency_ms"]["p50"]
    assert any(sample.get("receivers_in_flight") for sample in wild_run["series"]["samples"])
    assert wild_run["cpu"]["us_per_postback"] > 0


@pytest.mark.timeout(180)
def test_a_short_wild_run_reaches_a_share_of_its_hosts_by_name_through_its_own_dns_server(wild_run):
    world = wild_run["receivers"]
    if not world["names"]:
        pytest.skip(f"no names in this run: {world['names_off_because']}")
    assert world["by_name"] == 6
    assert world["dns_queries"]["found"] >= 1


def test_transport_costs_are_measured_for_both_schemes_and_both_kinds_of_connection():
    costs = measure_transport_costs(in_flight=20, requests=40)

    assert set(costs.memory_mib_per_1000) == {"http", "https"}
    assert set(costs.cpu_us_per_request) == {"http new", "http reused", "https new", "https reused"}
    assert all(micros > 0 for micros in costs.cpu_us_per_request.values())


# --- the PHP baseline (benchmark/php.py) -----------------------------------------------------


def test_the_php_baseline_at_equal_counts_holds_php_fpm_to_as_many_children_as_gunicorn(tmp_path):
    config = php.fpm_config(tmp_path, "equal", 2, php.Redis("127.0.0.1", 6390, "secret"))

    assert "pm = static\n" in config
    assert "pm.max_children = 2\n" in config
    assert "env[REDIS_PASSWORD] = secret\n" in config
    assert php.children_of("equal", 2) == 2


def test_the_php_baseline_at_defaults_runs_debians_pool(tmp_path):
    config = php.fpm_config(tmp_path, "defaults", 2, php.Redis("127.0.0.1", 6390, ""))

    assert "pm = dynamic\n" in config
    assert "pm.max_children = 5\n" in config
    assert "REDIS_PASSWORD" not in config  # php-fpm refuses an empty value
    assert php.children_of("defaults", 2) == 5


def test_the_php_baseline_serves_both_ingest_urls_through_php_fpms_socket(tmp_path):
    config = php.nginx_config(tmp_path, 8123, as_root=False)

    assert "listen 127.0.0.1:8123;" in config
    assert r"location ~ ^/(ingest\.php|i)$" in config
    assert f"fastcgi_pass unix:{tmp_path / 'php-fpm.sock'};" in config
    assert "user root" not in config


def test_the_php_baseline_is_measured_beside_load_only_when_asked():
    assert "php" not in build("load", Options())[0].baselines
    assert build("load", Options(php_pools=("equal",)))[0].baselines == ("healthz", "php")
    assert php.pools_named("both") == ("equal", "defaults")
    assert php.pools_named(None) == ()


@pytest.mark.skipif(
    shutil.which("nginx") is None or not glob.glob("/usr/sbin/php-fpm*"),
    reason="nginx and php-fpm are installed by deploy/benchmark.sh --php-baseline",
)
def test_the_php_page_pushes_one_entry_per_data_object_and_answers_202(tmp_path, redis_server):
    body = json.dumps({"endpoint": {"method": "GET", "url": "http://r/{k}"}, "data": [{"k": 1}, {"k": 2}]}).encode()
    with php.php_site(tmp_path, "equal", 1, settings.REDIS_URL) as url:
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
        connection.request("POST", "/ingest.php", body)
        response = connection.getresponse()
        answer = json.loads(response.read())

    assert response.status == 202
    assert answer["accepted"] == 2
    entries = [json.loads(entry) for entry in Redis.from_url(settings.REDIS_URL).lrange(php.INBOX_KEY, 0, -1)]
    assert [entry[1:] for entry in entries] == [
        [0, "GET", "http://r/{k}", {"k": 1}],
        [1, "GET", "http://r/{k}", {"k": 2}],
    ]
