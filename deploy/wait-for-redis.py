#!/usr/bin/env python3
"""Wait until the Redis named by REDIS_URL (or, with REDIS_SENTINELS, the master the sentinels
name) answers PING, and, with REDIS_CLUSTER_NODES, until that Redis Cluster serves every slot
(cluster_state:ok); then exit 0.

Runs before the web and worker processes start (deploy/local-processes.py, and ExecStartPre in the
systemd units), so that they do not start against a Redis that is still starting or still
loading its append-only file (Redis answers LOADING until it has).

Exit status: 0 when PING succeeds; 1 after the deadline, or at once when Redis refuses the
credentials (waiting would not fix that).

--forget-worker NAME: after PING, mark a leftover registration of the RQ worker NAME as
dead. RQ refuses to start a worker whose name is still registered as alive, and a worker
that was killed (SIGKILL after the stop timeout, OOM, power cut) leaves its registration
alive for up to worker_ttl + 60 s (480 s). The systemd units name workers
postback-<host>-<n>, and systemd runs at most one process per unit, so a registration under
that name is always a dead one when the unit starts.

Usage: python deploy/wait-for-redis.py [--timeout SECONDS] [--forget-worker NAME]
"""

import argparse
import os
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel
from rq.worker import Worker

DEFAULT_REDIS_URL = "redis://127.0.0.1:6380/0"  # the default of postbackproject/settings.py


def redacted(url: str) -> str:
    """The URL without its password, fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def forget_worker(client: redis.Redis, name: str) -> None:
    """Register the death of worker `name` if Redis still holds it as alive."""
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=client)
    if worker is not None and not client.hexists(worker.key, "death"):
        worker.register_death()  # type: ignore[no-untyped-call]  # rq leaves it unannotated
        print(f"wait-for-redis: cleared the stale registration of worker {name}", file=sys.stderr)


def connect() -> tuple[redis.Redis, str]:
    """A client as postbackproject/settings.py builds it (same variables), and how to name it."""
    sentinels = [
        item.strip().rpartition(":") for item in os.environ.get("REDIS_SENTINELS", "").split(",") if item.strip()
    ]
    if sentinels:
        master = os.environ.get("REDIS_SENTINEL_MASTER") or "postback"
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            [(host, int(port)) for host, _, port in sentinels],
            sentinel_kwargs={"password": os.environ.get("REDIS_SENTINEL_PASSWORD") or None, "socket_timeout": 2},
            password=os.environ.get("REDIS_PASSWORD") or None,
            socket_connect_timeout=1,
            socket_timeout=2,
        )
        client: redis.Redis = sentinel.master_for(master)  # type: ignore[no-untyped-call]
        return client, f"the master {master!r} of the sentinels {os.environ['REDIS_SENTINELS']}"
    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2), redacted(url)


def cluster_is_up() -> bool:
    """Whether the Redis Cluster of REDIS_CLUSTER_NODES serves every slot (True without one)."""
    nodes = [item.strip().rpartition(":") for item in os.environ.get("REDIS_CLUSTER_NODES", "").split(",")]
    startup = [ClusterNode(host, int(port)) for host, _, port in nodes if host]  # type: ignore[no-untyped-call]
    if not startup:
        return True
    cluster = RedisCluster(
        startup_nodes=startup, password=os.environ.get("REDIS_PASSWORD") or None, socket_connect_timeout=1
    )
    try:
        return bool(cluster.cluster_info().get("cluster_state") == "ok")
    finally:
        cluster.close()


def wait_for(check: Callable[[], object], name: str, timeout: float) -> bool:
    """Call `check` until it returns a true value, at most `timeout` seconds; say why not."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
            problem = "not ready"
        except redis.AuthenticationError as exc:  # before ConnectionError: it is one
            print(f"wait-for-redis: {name} refuses the credentials: {exc}", file=sys.stderr)
            return False
        except (redis.RedisError, RedisClusterException) as exc:  # refused, LOADING, timeout
            problem = str(exc)
        if time.monotonic() >= deadline:
            print(f"wait-for-redis: no answer from {name} in {timeout:g} s: {problem}", file=sys.stderr)
            return False
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--forget-worker", metavar="NAME", help="see the module docstring")
    args = parser.parse_args()

    client, url = connect()
    if not wait_for(client.ping, url, args.timeout):
        return 1
    if not wait_for(cluster_is_up, f"the Redis Cluster {os.environ.get('REDIS_CLUSTER_NODES')}", args.timeout):
        return 1
    if args.forget_worker:
        forget_worker(client, args.forget_worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
