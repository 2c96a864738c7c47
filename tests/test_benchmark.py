"""The benchmark tool: its receiver's behaviours, its load generator, its arithmetic, and one
short scenario through real processes (own Redis, gunicorn, workers, receiver) whose figures
must add up. Nothing here asserts how fast anything is."""

import asyncio
import http.client
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings

from benchmark.database import AttemptRow
from benchmark.figures import RawRun, summarize
from benchmark.loadgen import MAX_503_RETRIES, Generator, LoadPlan, LoadResult
from benchmark.metrics import per_second_counts, percentiles, rss_summary
from benchmark.receiver import (
    ATTEMPT,
    COMPLETED,
    POSTBACK_ID,
    STATUS,
    Behaviour,
    Receiver,
    ReceiverProtocol,
    ReceiverState,
    parse_head,
)
from benchmark.targets import judge
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


def connect(behaviour: Behaviour) -> tuple[ReceiverProtocol, FakeTransport, ReceiverState]:
    state = ReceiverState(behaviour)
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
        receiver = Receiver("test", behaviour, free_port())
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
    receipts = [
        [10.15, "a1", 1, 200, True],
        [10.20, "a2", 1, 503, True],
        [10.60, "a2", 2, 200, True],
        [10.70, "a2", 2, 200, True],  # sent again: a duplicate
        [10.30, "b1", 1, 200, False],  # the sender gave up on this one (dripped)
        [10.90, "other", 1, 200, True],  # not ours
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
    assert Path(plot).read_bytes().startswith(b"\x89PNG")


def test_a_service_process_that_exited_during_the_run_is_flagged():
    assert summarize(raw_run())["processes_exited"] == {}
    assert summarize(raw_run(exited={"worker1": 11.5}))["processes_exited"] == {"worker1": 1.5}
