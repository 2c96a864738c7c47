"""The inbox on a real Redis Cluster (three masters, a replica each): ingestion spreads requests
over INBOX_SHARDS streams, each on its own master; worker processes drain every shard; a master
killed during ingestion and delivery fails over to its replica with no process restarted, and
every postback answered 202 is delivered. With REDIS_WAIT_FOR_REPLICAS=1 a 202 means a replica
holds the request.

RQ's own keys (the drain jobs' queue, the workers) stay on the suite's single redis-server
(REDIS_URL): RQ 2 cannot run on a cluster (settings.REDIS_CLUSTER_NODES says why).
"""

import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from rq.registry import FailedJobRegistry

from delivery import circuit, transport
from postbackproject import keys, shards
from postbackproject.queue import forget_connections, get_connection, get_queue
from tests.conftest import free_port, ingest_json, service_env, success_ids, wait_until
from tests.redis_cluster import RedisClusterUnderTest, node_client, redis_cluster  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

SHARDS = 3


@pytest.fixture
def on_the_cluster(redis_cluster: RedisClusterUnderTest) -> Iterator[RedisClusterUnderTest]:  # noqa: F811
    """This process (ingestion) keeps the inbox on the cluster, as the workers will."""
    saved = (settings.REDIS_CLUSTER_NODES, settings.INBOX_SHARDS, settings.REDIS_WAIT_FOR_REPLICAS)
    settings.REDIS_CLUSTER_NODES = [
        ("127.0.0.1", int(node.rpartition(":")[2])) for node in redis_cluster.nodes.split(",")
    ]
    settings.INBOX_SHARDS = SHARDS
    settings.REDIS_WAIT_FOR_REPLICAS = 1
    forget_clients()
    yield redis_cluster
    settings.REDIS_CLUSTER_NODES, settings.INBOX_SHARDS, settings.REDIS_WAIT_FOR_REPLICAS = saved
    forget_clients()


def forget_clients() -> None:
    forget_connections()
    shards.turns = shards.Turns()
    transport.process_transport.cache_clear()
    circuit.process_circuits.cache_clear()


def cluster_env(cluster: RedisClusterUnderTest) -> dict[str, str]:
    return {"REDIS_CLUSTER_NODES": cluster.nodes, "INBOX_SHARDS": str(SHARDS), "REDIS_WAIT_FOR_REPLICAS": "1"}


def document(receiver: Any, path: str) -> dict[str, object]:
    return {"endpoint": {"method": "GET", "url": receiver.url(path + "?n={n}")}, "data": [{"n": 1}, {"n": 2}]}


def test_each_shard_lives_on_its_own_master_and_every_postback_is_delivered_once(
    client, receiver, processes, on_the_cluster, settings
):
    cluster = on_the_cluster
    configured = shards.configured()
    masters = {cluster.master_of(shard.inbox) for shard in configured}
    assert len(masters) == SHARDS  # the tags put each shard in another third of the slots
    workers = [processes.worker(**cluster_env(cluster)) for _ in range(2)]  # fewer workers than shards
    accepted: list[str] = []
    for _ in range(60):
        response = ingest_json(client, document(receiver, "/c"))
        assert response.status_code == 202, response.content
        accepted += response.json()["postbacks"]

    wait_until(lambda: success_ids() >= set(accepted), timeout=60, what="every postback delivered")
    assert Counter(receiver.postback_ids()) == Counter(accepted)  # each once
    entries = [get_connection().xlen(shard.inbox) for shard in configured]
    assert entries == [0] * SHARDS
    ready = client.get("/readyz")
    assert ready.status_code == 200 and set(ready.json()["checks"].values()) == {"ok"}, ready.content
    settings.METRICS_TOKEN = "scrape-me"
    scraped = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-me").content.decode()
    assert "postback_redis_up 1.0" in scraped
    assert all(f'postback_inbox_shard_depth{{shard="{shard.id}"}} 0.0' in scraped for shard in configured)
    registered = {shards.Shard(shard_id.decode()) for shard_id in get_connection().hkeys(keys.SHARDS)}  # type: ignore[union-attr]
    assert registered == set(configured)
    assert all(worker.poll() is None for worker in workers), processes.output()


def test_a_master_killed_during_ingestion_and_delivery_loses_no_postback_answered_202(
    client, receiver, processes, on_the_cluster
):
    cluster = on_the_cluster
    workers = [processes.worker(**cluster_env(cluster)) for _ in range(SHARDS)]
    victim_shard = shards.configured()[1]
    victim = cluster.master_of(victim_shard.inbox)
    assert cluster.master_of(keys.CIRCUITS_OPEN) == victim  # every drainer reports there
    accepted: list[str] = []
    refused = 0

    def send() -> None:
        nonlocal refused
        response = ingest_json(client, document(receiver, "/k"))
        if response.status_code == 202:
            accepted.extend(response.json()["postbacks"])
        else:
            assert response.status_code == 503 and response["Retry-After"], response.content
            refused += 1

    for _ in range(60):
        send()
    wait_until(lambda: len(success_ids()) >= 60, timeout=30, what="steady delivery before the kill")

    cluster.kill(victim)
    taken_at_kill = len(accepted)

    def carried_on() -> bool:
        send()
        return len(accepted) - taken_at_kill >= 120

    wait_until(carried_on, timeout=60, what="ingestion to carry on while the master fails over")
    cluster.wait_for_failover(victim)
    accepted_by_failover = set(accepted)
    for _ in range(30):
        send()

    # The dead master's shard was passed over, and no request had to wait for a replica the
    # promoted master lacks: the sender never heard "later".
    assert refused == 0
    wait_until(lambda: success_ids() >= set(accepted), timeout=90, what="every postback answered 202 delivered")
    assert all(worker.poll() is None for worker in workers), processes.output()  # nothing was restarted
    # Only the dead master's shard lost its drainers: the others delivered on through the
    # failover (the circuits' tag lies in the dead master's slots, the sweep asks every shard).
    failed = FailedJobRegistry(queue=get_queue()).get_job_ids()
    others = [job_id for job_id in failed if shards.shard_of_drainer(job_id) != victim_shard]
    assert not others, [why_it_failed(job_id) for job_id in others]
    sent_twice = {postback for postback, times in Counter(receiver.postback_ids()).items() if times > 1}
    # Only what was in flight while the master was dying is sent again: postbacks accepted before
    # its replica took over (being sent by a drainer whose job failed then, or a request whose
    # reply the dead master never sent, taken by the next shard too), none accepted after.
    assert sent_twice <= accepted_by_failover
    # The victim's slots moved to its replica, which holds what was written before the kill.
    assert cluster.master_of(victim_shard.inbox) != victim


def test_wait_for_redis_waits_for_the_cluster_to_serve_every_slot(redis_cluster: RedisClusterUnderTest):  # noqa: F811
    script = [sys.executable, "deploy/wait-for-redis.py", "--timeout", "3"]
    up = subprocess.run(script, env=service_env(REDIS_CLUSTER_NODES=redis_cluster.nodes), capture_output=True)
    assert up.returncode == 0, up.stderr

    nowhere = f"127.0.0.1:{free_port()}"
    down = subprocess.run(script, env=service_env(REDIS_CLUSTER_NODES=nowhere), capture_output=True, text=True)
    assert down.returncode == 1
    assert f"no answer from the Redis Cluster {nowhere}" in down.stderr


def test_with_wait_for_replicas_a_202_means_the_shards_replica_holds_the_request(
    client, receiver, on_the_cluster, settings
):
    cluster = on_the_cluster
    settings.INBOX_SHARDS = 1  # every request to the one shard, whose replica the test stops
    settings.REDIS_WAIT_TIMEOUT_MS = 300
    [shard] = shards.configured()
    master = cluster.master_of(shard.inbox)
    [replica] = cluster.replicas_of(master)

    taken = ingest_json(client, document(receiver, "/w"))
    assert taken.status_code == 202
    follower = node_client(replica)
    follower.execute_command("READONLY")
    assert follower.xlen(shard.inbox) == 1  # already there when the 202 came back

    cluster.processes[replica].send_signal(signal.SIGSTOP)  # the replica hears nothing for now
    try:
        refused = ingest_json(client, document(receiver, "/w"))
    finally:
        cluster.processes[replica].send_signal(signal.SIGCONT)
    assert refused.status_code == 503
    assert "could not confirm" in refused.json()["error"]


def test_a_senders_rate_limit_holds_across_the_shards(client, receiver, on_the_cluster, settings):
    settings.INGEST_RATE_LIMIT_PER_ADDRESS = 0.1  # one request, then one each 10 s

    assert ingest_json(client, document(receiver, "/r")).status_code == 202
    refused = [ingest_json(client, document(receiver, "/r")) for _ in range(SHARDS)]  # each to another shard

    assert [response.status_code for response in refused] == [429] * SHARDS
    assert all(response["Retry-After"] for response in refused)
    assert sum(get_connection().xlen(shard.inbox) for shard in shards.configured()) == 1  # nothing else queued


def why_it_failed(job_id: str) -> str:
    job = get_queue().fetch_job(job_id)
    result = job.latest_result() if job else None
    return str(result.exc_string) if result else "no result kept"
