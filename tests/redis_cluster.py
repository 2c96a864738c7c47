"""A real Redis Cluster on loopback for the suite: masters with replicas, each redis-server in its
own folder, persisting as production does (AOF, everysec), joined by `redis-cli --cluster create`.

What the suite needs from it is a failover it can cause and watch: kill a master (SIGKILL, no
goodbye) and wait until its replica serves its slots. Every question about who serves what is put
to the cluster itself (CLUSTER NODES, CLUSTER KEYSLOT), never worked out from the order the nodes
were started in: redis-cli picks which node replicates which.

A test module takes the fixture by importing it (`from tests.redis_cluster import redis_cluster
# noqa: F401`; the test's parameter of that name then needs `# noqa: F811`).

Each node's cluster bus port is chosen free too (--cluster-port): the default, the port + 10000,
is past 65535 for most of the ephemeral range free ports come from. A master sends its replica
the first copy at once (--repl-diskless-sync-delay 0) rather than wait 5 s for more replicas.
The masters that live on keep serving their slots while one fails over
(--cluster-require-full-coverage no), as docs/operations.md tells production to run them.
"""

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import RedisError

from tests.conftest import free_port, wait_until

HOST = "127.0.0.1"
SLOTS = 16384
# How long a node goes unanswered before the others count it failed: short, so a failover
# takes a couple of seconds rather than the default fifteen.
NODE_TIMEOUT_MS = 1000


@dataclass
class NodeView:
    """One line of CLUSTER NODES, as far as the suite needs it."""

    id: str
    port: int
    flags: set[str]
    master_id: str  # for a replica, its master's id; "-" for a master
    slots: list[tuple[int, int]]  # inclusive ranges; only a master has any

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        """Counted failed by the node asked: for sure (fail) or so far only by itself (fail?)."""
        return bool(self.flags & {"fail", "fail?", "noaddr"})

    def serves(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def parse_cluster_nodes(text: str) -> list[NodeView]:
    """CLUSTER NODES: `id host:port@bus[,hostname] flags master ping pong epoch link slot...`;
    slots being migrated (`[slot->-id]`) are not served yet, so are left out."""
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@")[0].split(",")[0]
        slots: list[tuple[int, int]] = []
        for item in fields[8:]:
            if item.startswith("["):
                continue
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        port = int(address.rsplit(":", 1)[1])
        nodes.append(NodeView(fields[0], port, set(fields[2].split(",")), fields[3], slots))
    return nodes


def node_client(port: int) -> Redis:
    return Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)


def answers(port: int) -> bool:
    try:
        return bool(node_client(port).ping())
    except RedisError:
        return False


def cluster_state_ok(port: int) -> bool:
    """Whether the node says cluster_state:ok (it serves queries: every slot it knows is served)."""
    try:
        return "cluster_state:ok" in str(node_client(port).execute_command("CLUSTER", "INFO"))
    except RedisError:
        return False


@dataclass
class RedisClusterUnderTest:
    folder: Path
    processes: dict[int, subprocess.Popen[bytes]]  # port -> redis-server

    @property
    def nodes(self) -> str:
        """Every node, as REDIS_CLUSTER_NODES lists them: `127.0.0.1:p1,127.0.0.1:p2,...`."""
        return ",".join(f"{HOST}:{port}" for port in self.processes)

    def live(self) -> list[int]:
        """Ports of the nodes whose process still runs."""
        return [port for port, process in self.processes.items() if process.poll() is None]

    def cluster_nodes(self, port: int | None = None) -> list[NodeView]:
        """The cluster as one node (the given one, else the first live one that answers) sees it."""
        for asked in [port] if port is not None else self.live():
            try:
                return parse_cluster_nodes(str(node_client(asked).execute_command("CLUSTER", "NODES")))
            except RedisError:
                if port is not None:
                    raise
        raise AssertionError("no node of the cluster answers")

    def masters(self) -> list[int]:
        """Ports of the nodes the cluster now counts masters, leaving out those it counts failed."""
        return sorted(node.port for node in self.cluster_nodes() if node.is_master and not node.failed)

    def replicas_of(self, port: int) -> list[int]:
        """Ports of the nodes replicating the one on port, as a live node sees it."""
        nodes = self.cluster_nodes()
        ids = {node.id for node in nodes if node.port == port}
        return sorted(node.port for node in nodes if node.master_id in ids)

    def master_of(self, key: str) -> int:
        """The port of the master serving key's slot, in the slot map of a live node. Until a
        failover is over, that can be a master that is gone (wait_for_failover first)."""
        for port in self.live():
            try:
                slot = int(node_client(port).execute_command("CLUSTER", "KEYSLOT", key))
                nodes = self.cluster_nodes(port)
            except RedisError:
                continue
            for node in nodes:
                if node.is_master and node.serves(slot):
                    return node.port
            raise AssertionError(f"no master serves slot {slot} (asked {port})")
        raise AssertionError("no node of the cluster answers")

    def kill(self, port: int) -> None:
        """SIGKILL: no shutdown, no final fsync; its replica has what it had sent it."""
        self.processes[port].kill()
        self.processes[port].wait(timeout=10)

    def settled(self) -> bool:
        """Whether every live node says cluster_state:ok and sees every slot served by a master
        that is alive and not counted failed."""
        live = self.live()
        for port in live:
            if not cluster_state_ok(port):
                return False
            try:
                nodes = self.cluster_nodes(port)
            except RedisError:
                return False
            serving = [node for node in nodes if node.is_master and not node.failed and node.port in live]
            if sum(last - first + 1 for node in serving for first, last in node.slots) != SLOTS:
                return False
        return bool(live)

    def wait_for_failover(self, old_master_port: int, timeout: float = 30) -> None:
        """Until the old master's replica took its slots over, as every live node sees it (asking
        one node only would let the next question, put to another, get the old answer)."""
        assert self.processes[old_master_port].poll() is not None, "the old master still runs"
        wait_until(self.settled, timeout=timeout, what=f"a replica to take over from {old_master_port}")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


def replicas_in_sync(ports: list[int]) -> bool:
    """Whether every replica among the nodes has its link to its master up."""
    for port in ports:
        try:
            info = node_client(port).info("replication")
        except RedisError:
            return False
        if info["role"] != "master" and info.get("master_link_status") != "up":
            return False
    return True


def distinct_free_ports(count: int) -> list[int]:
    """free_port closes its socket, so two calls can hand out the same port: ask until distinct."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def start_redis_cluster(masters: int = 3, replicas: int = 1) -> RedisClusterUnderTest:
    """Start the nodes, join them (redis-cli assigns the slots and the replicas), and return once
    every node says cluster_state:ok and every replica is in sync with its master."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise RuntimeError("redis-server and redis-cli are not installed (apt-get install redis-server)")
    count = masters * (1 + replicas)
    ports = distinct_free_ports(2 * count)
    folder = Path(tempfile.mkdtemp(prefix="postback-test-cluster-"))
    cluster = RedisClusterUnderTest(folder, {})
    try:
        for port, bus_port in zip(ports[:count], ports[count:], strict=True):
            data = folder / f"redis-{port}"
            data.mkdir()
            cluster.processes[port] = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", HOST, "--dir", str(data),
                 "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                 "--cluster-require-full-coverage", "no",
                 "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                 "--repl-diskless-sync-delay", "0"],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        wait_until(lambda: all(answers(port) for port in cluster.processes), what="the cluster's redis-servers")
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *cluster.nodes.split(","),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout.decode(errors='replace')}")
        nodes = list(cluster.processes)
        wait_until(lambda: all(cluster_state_ok(port) for port in nodes), timeout=20, what="cluster_state:ok on each")
        wait_until(lambda: replicas_in_sync(nodes), timeout=20, what="every replica in sync with its master")
        wait_until(
            lambda: len(cluster.masters()) == masters and cluster.settled(), timeout=20, what="one view of the cluster"
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture
def redis_cluster() -> Iterator[RedisClusterUnderTest]:
    """A fresh cluster of three masters with a replica each, stopped (and its folder removed)
    after the test."""
    cluster = start_redis_cluster()
    yield cluster
    cluster.stop()
