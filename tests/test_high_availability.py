"""Redis Sentinel: kill the master during steady ingestion and delivery, and the service carries
on after the failover, without a restart, delivering every postback it answered 202.

Real processes: three redis-servers (a master and two replicas), three sentinels, two
workers; ingestion runs in the suite's process. With REDIS_WAIT_FOR_REPLICAS=1 a 202 means a
replica holds the request, so the master's sudden death loses none of them.
"""

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from redis import Redis
from redis.exceptions import RedisError

from delivery import circuit, transport
from postbackproject.queue import forget_connections
from tests.conftest import free_port, ingest_json, success_ids, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MASTER = "postback"


@dataclass
class Cluster:
    folder: Path
    servers: dict[int, subprocess.Popen[bytes]]
    sentinels: dict[int, subprocess.Popen[bytes]]

    @property
    def sentinel_list(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinels)

    def master_port(self) -> int:
        for port in self.sentinels:
            try:
                address: Any = Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(MASTER)
            except RedisError:
                continue
            if address:
                return int(address[1])
        raise AssertionError("no sentinel answers")

    def stop(self) -> None:
        for process in [*self.servers.values(), *self.sentinels.values()]:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


def answers(port: int) -> bool:
    try:
        return bool(Redis(port=port, socket_timeout=1).ping())
    except RedisError:
        return False


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    folder = Path(tempfile.mkdtemp(prefix="postback-test-sentinel-"))
    ports = [free_port() for _ in range(3)]
    servers: dict[int, subprocess.Popen[bytes]] = {}
    for index, port in enumerate(ports):
        data = folder / f"redis-{port}"
        data.mkdir()
        replica = ["--replicaof", "127.0.0.1", str(ports[0])] if index else []
        servers[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", *replica],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    wait_until(lambda: all(answers(port) for port in ports), what="the redis-servers")
    wait_until(lambda: Redis(port=ports[0]).info("replication")["connected_slaves"] == 2, what="both replicas in sync")
    sentinels: dict[int, subprocess.Popen[bytes]] = {}
    for _ in range(3):
        port = free_port()
        config = folder / f"sentinel-{port}.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\nsentinel monitor {MASTER} 127.0.0.1 {ports[0]} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\nsentinel failover-timeout {MASTER} 5000\n"
        )
        sentinels[port] = subprocess.Popen(["redis-server", str(config), "--sentinel"], stdout=subprocess.DEVNULL)
    found = Cluster(folder, servers, sentinels)
    wait_until(lambda: all(answers(port) for port in sentinels), what="the sentinels")
    wait_until(
        lambda: all(
            len(Redis(port=port).sentinel_slaves(MASTER)) == 2 and Redis(port=port).sentinel_sentinels(MASTER)
            for port in sentinels
        ),
        timeout=20,
        what="the sentinels to know the replicas and each other",
    )
    yield found
    found.stop()


@pytest.fixture
def through_sentinels(cluster: Cluster) -> Iterator[Cluster]:
    """This process (ingestion) finds Redis through the sentinels, as the workers will."""
    saved = (settings.REDIS_SENTINELS, settings.REDIS_WAIT_FOR_REPLICAS)
    settings.REDIS_SENTINELS = [("127.0.0.1", port) for port in cluster.sentinels]
    settings.REDIS_WAIT_FOR_REPLICAS = 1
    forget_clients()
    yield cluster
    settings.REDIS_SENTINELS, settings.REDIS_WAIT_FOR_REPLICAS = saved
    forget_clients()


def forget_clients() -> None:
    forget_connections()
    transport.process_transport.cache_clear()
    circuit.process_circuits.cache_clear()


def test_the_service_carries_on_through_a_failover_and_delivers_every_202(
    client, receiver, processes, through_sentinels
):
    cluster = through_sentinels
    sentinel_env = {"REDIS_SENTINELS": cluster.sentinel_list, "REDIS_SENTINEL_MASTER": MASTER}
    workers = [processes.worker(**sentinel_env) for _ in range(2)]
    document = {"endpoint": {"method": "GET", "url": receiver.url("/ha?n={n}")}, "data": [{"n": 1}, {"n": 2}]}
    old_master = cluster.master_port()
    accepted: list[str] = []
    refused = 0
    after_failover = 0

    def send() -> None:
        nonlocal refused, after_failover
        response = ingest_json(client, document)
        if response.status_code == 202:
            accepted.extend(response.json()["postbacks"])
            after_failover += cluster.servers[old_master].poll() is not None
        else:
            assert response.status_code == 503 and response["Retry-After"]
            refused += 1

    for _ in range(50):
        send()
    wait_until(lambda: len(success_ids()) >= 40, timeout=30, what="steady delivery before the failover")

    cluster.servers[old_master].kill()

    def carried_on() -> bool:
        send()
        return after_failover >= 50

    wait_until(carried_on, timeout=60, what="ingestion to carry on after the failover")

    # The sentinel that ran the failover tells the others within a second or two: wait for the
    # one asked to have heard, rather than race it.
    wait_until(lambda: cluster.master_port() != old_master, timeout=30, what="the sentinels to name a new master")
    # 503 only while the failover lasted: once a new master is named, every request is taken.
    # (How many were refused before depends on how fast a refusal comes back, so is not counted.)
    refused_during_failover = refused
    for _ in range(20):
        send()
    assert refused == refused_during_failover
    wait_until(lambda: success_ids() >= set(accepted), timeout=60, what="every postback answered 202 delivered")
    assert all(worker.poll() is None for worker in workers), processes.output()  # nothing was restarted
