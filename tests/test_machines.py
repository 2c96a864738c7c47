"""Hosts that fail as wholes: separate machines made of network namespaces, one of them cut off
and killed under steady load, then brought back.

The machines (tests/namespaces.py), on one switch in 10.77.0.0/24:
- data (.2): Redis, and the suite's PostgreSQL database reached through a forwarder (the
  machine's server listens on loopback of the root namespace only);
- app1 (.11) and app2 (.12): each gunicorn and two workers, as production starts them;
- load (.3): the receiver and the senders, in the suite's own process (`inside`).
The receiver tells the application hosts apart by the address their requests come from.

`python -m tests.measure_machines` builds the same machines and measures what the veth links
add to Redis and database round trips, and the postbacks/s delivered across them
(docs/performance.md).
"""

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import requests
from django.db import connection
from redis import Redis
from redis.exceptions import RedisError

from benchmark.receiver import Behaviour, Listener
from benchmark.receiver import Receiver as BenchmarkReceiver
from delivery.models import DeliveryAttempt, Outcome
from tests.conftest import Processes, Received, Receiver, http_answers, success_ids, wait_until
from tests.namespaces import Network, inside, why_namespaces_cannot_be_made

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="hosts share one database over the network: PostgreSQL only"
    ),
]

# The suite's test database as the hosts reach it: user, host, port, name.
Database = tuple[str, str, int, str]

REDIS_PORT = 6380
DATABASE_PORT = 5432
WEB_PORT = 8000
APPS = {"app1": 11, "app2": 12}
WORKERS_PER_HOST = 2
# Requests in flight per worker; a worker killed mid-batch sent at most this many, and has
# as many replies back not yet recorded (tests/test_crashes.py: twice this per worker).
CONCURRENCY = 4
# The promise: delivery carries on on the surviving host within this long of a cut.
CARRY_ON_SECONDS = 30
# Production's default DATABASE_IDLE_IN_TRANSACTION_SECONDS, which the hosts run with.
IDLE_TRANSACTION_SECONDS = 10
# Deadlines for what depends on this busy machine (processes starting, a backlog draining),
# not speed checks.
START_SECONDS = 90
RECOVERY_SECONDS = 90

# The brief's sample, sent to the receiver on the load host.
SAMPLE_DATA = [{"key": "Azureus", "value": "Dendrobates"}, {"key": "Phyllobates", "value": "Terribilis"}]


@dataclass
class Machines:
    network: Network
    processes: Processes
    folder: Path
    database: Database
    receiver: Receiver | None = None  # on the load host
    # Every application host's processes run on the data host instead, reaching Redis and the
    # database over loopback (the measurement's baseline).
    colocated: bool = False
    running: dict[str, list[subprocess.Popen[bytes]]] = field(default_factory=dict)

    @property
    def received(self) -> list[Received]:
        assert self.receiver is not None
        return list(self.receiver.requests)

    @property
    def load(self) -> str:
        return self.network.namespace("load")

    def address(self, host: str) -> str:
        return self.network.hosts[host]

    def web_address(self, host: str) -> str:
        if self.colocated:
            return f"{self.address('data')}:{WEB_PORT + list(APPS).index(host)}"
        return f"{self.address(host)}:{WEB_PORT}"

    def web_url(self, host: str) -> str:
        return f"http://{self.web_address(host)}"

    def app_env(self, host: str, **overrides: str) -> dict[str, str]:
        data = "127.0.0.1" if self.colocated else self.address("data")
        user, _, _, name = self.database
        metrics = self.folder / f"metrics-{host}"
        metrics.mkdir(exist_ok=True)
        return {
            "DATABASE_URL": f"postgres://{user}@{data}:{DATABASE_PORT}/{name}",
            "REDIS_URL": f"redis://{data}:{REDIS_PORT}/0",
            "DELIVERY_ALLOW_NETWORKS": "10.77.0.0/24",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            "ALLOWED_HOSTS": self.web_address(host).partition(":")[0],
            "WEB_CONCURRENCY": "2",
            "GUNICORN_ACCESS_LOG": "",
            "DELIVERY_CONCURRENCY": str(CONCURRENCY),
            "DATABASE_IDLE_IN_TRANSACTION_SECONDS": str(IDLE_TRANSACTION_SECONDS),  # not the suite's 0
            **overrides,
        }

    def start_app(self, host: str, **overrides: str) -> None:
        """gunicorn and the workers on the host, as production starts them."""
        on = self.network.run("data" if self.colocated else host, [])
        env = self.app_env(host, **overrides)
        self.processes.web(self.web_address(host), on, **env)
        self.running[host] = self.processes.started[-1:]
        self.running[host] += [self.processes.worker(on, **env) for _ in range(WORKERS_PER_HOST)]

    def wait_for_web(self, host: str) -> None:
        with inside(self.load):
            wait_until(
                lambda: http_answers(f"{self.web_url(host)}/healthz"), timeout=START_SECONDS, what=f"{host}'s web"
            )

    def fail(self, host: str) -> None:
        """The host gone at once: its cable pulled, then everything on it killed (what it sent
        out before dying never gets an answer)."""
        self.network.unplug(host)
        for process in self.running.pop(host):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def last_to_deliver(self) -> str:
        """The application host that sent the receiver's latest request."""
        latest = self.received[-1].client_address
        return next(host for host in APPS if self.address(host) == latest)

    def delivered_from(self, host: str, since: float) -> int:
        address = self.address(host)
        return sum(1 for r in self.received if r.client_address == address and r.received_at > since)


@pytest.fixture
def machines(processes: Processes, tmp_path: Path) -> Iterator[Machines]:
    reason = why_namespaces_cannot_be_made()
    if reason:
        pytest.skip(reason)
    network = Network()
    receiver: Receiver | None = None
    try:
        network.start()
        data = network.add_host("data", 2)
        load = network.add_host("load", 3)
        for host, number in APPS.items():
            network.add_host(host, number)
        params = connection.settings_dict
        database = (params["USER"], params["HOST"] or "127.0.0.1", int(params["PORT"] or 5432), params["NAME"])
        start_data_host(network, processes, tmp_path, database)
        with inside(network.namespace("load")):
            receiver = Receiver(host=load)
        built = Machines(network, processes, tmp_path, database, receiver)
        wait_until(lambda: redis_answers(network, data), timeout=START_SECONDS, what="Redis on the data host")
        yield built
    finally:
        processes.stop_all()  # before the namespaces go: nothing left running in them
        if receiver is not None:
            receiver.close()
        network.stop()


def start_data_host(network: Network, processes: Processes, folder: Path, database: Database) -> None:
    data = network.hosts["data"]
    redis = subprocess.Popen(
        network.run("data", ["redis-server", "--port", str(REDIS_PORT), "--bind", data, "127.0.0.1",
                             "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(folder)]),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    processes.started.append(redis)
    _, host, port, _ = database
    processes.run(["-m", "tests.proxy", network.namespace("data"), data, str(DATABASE_PORT), host, str(port)])


def redis_answers(network: Network, address: str) -> bool:
    with inside(network.namespace("data")), Redis(host=address, port=REDIS_PORT, socket_timeout=1) as client:
        try:
            return bool(client.ping())
        except RedisError:
            return False


class Sender(threading.Thread):
    """A sender on the load host posting the sample to one web host, steadily, until stopped;
    keeps the ids of every postback answered 202 (acknowledged), and when."""

    def __init__(
        self, machines: Machines, host: str, url: str, data: Sequence[Mapping[str, object]], every: float, most: int = 0
    ) -> None:
        super().__init__(daemon=True)
        self.url = f"{machines.web_url(host)}/ingest.php"
        self.namespace = machines.load
        self.document = {"endpoint": {"method": "GET", "url": url}, "data": data}
        self.every = every
        self.most = most  # requests acknowledged before it stops by itself (0: no end)
        self.accepted: list[tuple[float, str]] = []
        self.acknowledged = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with inside(self.namespace), requests.Session() as session:
            while not self.stop.wait(self.every):  # the pace of the load, not a wait for anything
                try:
                    response = session.post(self.url, json=self.document, timeout=(1, 5))
                except requests.RequestException:
                    continue  # not acknowledged: the sender would send it again
                if response.status_code == 202:
                    now = time.time()
                    self.accepted += [(now, pid) for pid in response.json()["postbacks"]]
                    self.acknowledged += 1
                    if self.acknowledged == self.most:
                        return

    def ids(self, before: float = float("inf")) -> set[str]:
        return {pid for at, pid in list(self.accepted) if at < before}

    def accepted_since(self, since: float) -> int:
        return sum(1 for at, _ in list(self.accepted) if at > since)


@pytest.mark.timeout(400)
def test_a_host_cut_off_and_killed_under_load_loses_nothing_and_comes_back(machines):
    for host in APPS:
        machines.start_app(host)
    for host in APPS:
        machines.wait_for_web(host)
    assert machines.receiver is not None
    sample = machines.receiver.url("/data?key={key}&value={value}&foo={bar}")
    senders = {host: Sender(machines, host, sample, SAMPLE_DATA, every=0.1) for host in APPS}
    for sender in senders.values():
        sender.start()
    try:
        started = time.time()
        wait_until(
            lambda: all(machines.delivered_from(host, started) >= 10 for host in APPS),
            timeout=START_SECONDS,
            what="both application hosts delivering",
        )

        # The host that is sending now: it dies with requests in flight.
        victim = machines.last_to_deliver()
        [survivor] = set(APPS) - {victim}
        cut_at = time.time()
        machines.fail(victim)
        wait_until(
            lambda: machines.delivered_from(survivor, cut_at) > 0,
            timeout=CARRY_ON_SECONDS,
            what=f"delivery to carry on on {survivor}",
        )
        carried_on = time.time() - cut_at
        accepted_before_cut = senders["app1"].ids(cut_at) | senders["app2"].ids(cut_at)
        wait_until(
            lambda: success_ids() >= accepted_before_cut,
            timeout=RECOVERY_SECONDS,
            what=f"what {victim} held to be delivered by {survivor}",
        )
        caught_up = time.time() - cut_at

        machines.network.plug(victim)
        machines.start_app(victim)
        back_at = time.time()
        machines.wait_for_web(victim)
        wait_until(
            lambda: machines.delivered_from(victim, back_at) >= 10 and senders[victim].accepted_since(back_at) >= 10,
            timeout=START_SECONDS,
            what=f"{victim} to take requests and deliver again",
        )
    finally:
        for sender in senders.values():
            sender.stop.set()
            sender.join(timeout=10)

    accepted = senders["app1"].ids() | senders["app2"].ids()
    wait_until(lambda: success_ids() >= accepted, timeout=RECOVERY_SECONDS, what="every postback answered 202")
    sent = Counter(request.headers["X-Postback-Id"] for request in machines.received)
    duplicates = sum(times - 1 for times in sent.values())
    # Sent twice at most: what the victim's workers had in flight, sent and not yet recorded.
    assert duplicates <= WORKERS_PER_HOST * 2 * CONCURRENCY, machines.processes.output()
    successes = Counter(DeliveryAttempt.objects.filter(outcome=Outcome.SUCCESS).values_list("postback_id", flat=True))
    assert all(successes[pid] == 1 for pid in accepted)
    by_host = Counter(request.client_address for request in machines.received)
    print(
        f"\n{len(accepted)} postbacks acknowledged; delivered by {dict(by_host)}; {duplicates} sent twice; "
        f"{victim} cut; {survivor} delivering {carried_on:.1f} s after, "
        f"everything acknowledged before it {caught_up:.1f} s after"
    )


# A transaction a host left open when it died: what the application holds, waiting for the
# client's next statement, until PostgreSQL ends the session.
HOLD_LOCK = """
import time
from django.db import connection, transaction
with transaction.atomic():
    connection.cursor().execute("SELECT pg_advisory_xact_lock(%s)", [LOCK])
    time.sleep(600)
"""
LOCK = 7715


def held(lock: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND granted", [lock])
        return bool(cursor.fetchone()[0])


@pytest.mark.timeout(300)
def test_a_host_dying_inside_a_transaction_does_not_hold_its_locks(machines):
    """Its PostgreSQL session never hears of the death (no packet gets out of a dead host, and
    the server waits in silence for the next statement): without a limit on idle transactions,
    the rollup rows it had locked would stop every other worker's recording for hours."""
    on = machines.network.run("app1", [])
    code = HOLD_LOCK.replace("[LOCK]", f"[{LOCK}]")
    machines.running["app1"] = [
        machines.processes.run(["manage.py", "shell", "-c", code], on, **machines.app_env("app1"))
    ]
    wait_until(lambda: held(LOCK), timeout=START_SECONDS, what="app1 to take the lock")

    died_at = time.monotonic()
    machines.fail("app1")

    wait_until(lambda: not held(LOCK), timeout=IDLE_TRANSACTION_SECONDS + 20, what="the dead host's lock to go")
    assert time.monotonic() - died_at >= IDLE_TRANSACTION_SECONDS - 1  # ended by the limit, not by a hang-up


# --- what the links add: `python -m tests.test_machines measure` ------------------------------


def median_ms(call: Callable[[], object], times: int) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def redis_round_trip(namespace: str, address: str, times: int) -> float:
    with inside(namespace):
        client = Redis(host=address, port=REDIS_PORT)
        client.ping()
        return median_ms(client.ping, times)


def database_round_trip(namespace: str | None, address: str, port: int, database: Database, times: int) -> float:
    user, _, _, name = database
    with (
        inside(namespace) if namespace else contextlib.nullcontext(),
        psycopg.connect(host=address, port=port, user=user, dbname=name, autocommit=True) as db,
        db.cursor() as cursor,
    ):
        return median_ms(lambda: cursor.execute("SELECT 1").fetchone(), times)


def measure(times: int = 2000, requests_each: int = 100, objects: int = 100) -> None:
    """Round trips from an application host over its veth link against loopback, and the
    postbacks/s two application hosts deliver across the links (a fanout: requests of
    `objects` postbacks sent to both web hosts at once, to the benchmark's receiver)."""
    params = connection.settings_dict
    database = (params["USER"], params["HOST"] or "127.0.0.1", int(params["PORT"] or 5432), params["NAME"])
    folder = Path(tempfile.mkdtemp(prefix="postback-machines-"))
    network, processes = Network(), Processes(folder)
    try:
        network.start()
        data, load = network.add_host("data", 2), network.add_host("load", 3)
        for host, number in APPS.items():
            network.add_host(host, number)
        start_data_host(network, processes, folder, database)
        data_ns, app_ns = network.namespace("data"), network.namespace("app1")
        loopback_port = DATABASE_PORT
        processes.run(["-m", "tests.proxy", data_ns, "127.0.0.1", str(loopback_port), database[1], str(database[2])])
        wait_until(lambda: redis_answers(network, data), timeout=START_SECONDS, what="Redis on the data host")
        with inside(app_ns):
            wait_until(lambda: tcp_answers(data, DATABASE_PORT), timeout=30, what="the database forwarder")
        figures = {
            "Redis PING, loopback (on the data host)": redis_round_trip(data_ns, "127.0.0.1", times),
            "Redis PING, veth (app host to data host)": redis_round_trip(app_ns, data, times),
            "SELECT 1, loopback, direct": database_round_trip(None, database[1], database[2], database, times),
            "SELECT 1, loopback, through the forwarder": database_round_trip(
                data_ns, "127.0.0.1", loopback_port, database, times
            ),
            "SELECT 1, veth, through the forwarder": database_round_trip(app_ns, data, DATABASE_PORT, database, times),
        }
        for what, ms in figures.items():
            print(f"{what}: {ms:.3f} ms (median of {times})")
        for colocated in (False, True):
            machines = Machines(network, processes, folder, database, colocated=colocated)
            rate = delivered_per_second(machines, load, requests_each, objects)
            where = "on the data host, over loopback" if colocated else "on their own hosts, over veth"
            print(f"delivered, workers {where}: {rate:,.0f} postbacks/s ({2 * requests_each} requests of {objects})")
    finally:
        processes.stop_all()
        network.stop()
        shutil.rmtree(folder, ignore_errors=True)


def tcp_answers(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=1).close()
    except OSError:
        return False
    return True


def delivered_per_second(machines: Machines, load: str, requests_each: int, objects: int) -> float:
    """Both application hosts as production runs them, each sent `requests_each` requests at
    once from the load host: postbacks delivered to the benchmark's receiver a second, from the
    first request to the last delivery."""
    for host in APPS:
        machines.start_app(host, DELIVERY_CONCURRENCY="256", DELIVERY_DRAINER_IDLE_SECONDS="2")
    for host in APPS:
        machines.wait_for_web(host)
    receiver = BenchmarkReceiver("machines", [Listener(load, 0, Behaviour())])
    with inside(machines.load):
        receiver.start()  # its process is made by this thread: on the load host
    try:
        data = [{"n": n} for n in range(objects)]
        senders = [
            Sender(machines, host, receiver.url("/fan?n={n}"), data, every=0.001, most=requests_each) for host in APPS
        ]
        started = time.time()
        for sender in senders:
            sender.start()
        total = len(senders) * requests_each * objects
        wait_until(lambda: receiver.received() >= total, timeout=600, what="every postback delivered")
        return total / (time.time() - started)
    finally:
        receiver.stop()
        for host in list(machines.running):
            for process in machines.running.pop(host):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        with inside(machines.network.namespace("data")), Redis(host="127.0.0.1", port=REDIS_PORT) as redis:
            redis.flushall()  # the killed drainers' leases with the rest
