"""The suite's Redis Cluster (tests/redis_cluster.py) fails over as a real one does: kill the
master of a key's slot and its replica takes the slot over, with the key, and a RedisCluster
client carries on with the key without being made anew (it finds the new master by itself)."""

from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError

from tests.conftest import wait_until
from tests.redis_cluster import HOST, RedisClusterUnderTest, node_client, redis_cluster  # noqa: F401

KEY = "postback:cluster-fixture"


def test_a_replica_takes_the_slots_of_a_killed_master_and_the_client_carries_on(
    redis_cluster: RedisClusterUnderTest,  # noqa: F811 (the fixture imported above)
) -> None:
    cluster = redis_cluster
    client = RedisCluster(
        startup_nodes=[ClusterNode(HOST, port) for port in cluster.processes],
        decode_responses=True,
        socket_timeout=1,
        socket_connect_timeout=1,
    )
    written = {f"{KEY}:{n}": str(n) for n in range(200)}
    for key, value in written.items():
        client.set(key, value)
    old_master = cluster.master_of(KEY)
    replicas = cluster.replicas_of(old_master)
    assert len(replicas) == 1
    # Replication is asynchronous: wait for the replica to have every write before the kill, so
    # that every key must survive it.
    assert node_client(old_master).execute_command("WAIT", 1, 5000) == 1

    cluster.kill(old_master)
    cluster.wait_for_failover(old_master)

    new_master = cluster.master_of(KEY)
    assert new_master != old_master
    assert new_master in replicas and cluster.processes[new_master].poll() is None
    assert old_master not in cluster.masters() and new_master in cluster.masters()

    def writes_and_reads() -> bool:
        try:
            client.set(KEY, "after the failover")
            return bool(client.get(KEY) == "after the failover")
        except RedisError:
            return False

    wait_until(writes_and_reads, timeout=10, what="the same client to write and read the key again")
    assert {key: client.get(key) for key in written} == written
    client.close()
