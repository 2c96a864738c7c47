"""Backpressure in a real flood: ingestion answers 503 with Retry-After before Redis reaches
its memory cap (noeviction would refuse writes), loses nothing it accepted, and accepts again
once workers have drained the backlog."""

import pytest

from postbackproject import keys
from postbackproject.queue import get_connection
from tests.conftest import ingest_json, start_redis, success_ids, use_redis, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MAXMEMORY = 8 * 1024 * 1024


def test_a_flood_is_refused_before_redis_fills_up_and_taken_again_once_drained(client, receiver, processes):
    server = start_redis()
    use_redis(server.url)
    try:
        redis = get_connection()
        redis.config_set("maxmemory", MAXMEMORY)
        redis.config_set("maxmemory-policy", "noeviction")
        document = {
            "endpoint": {"method": "POST", "url": receiver.url("/flood")},
            "data": [{"n": n, "pad": "x" * 4000} for n in range(20)],
        }
        accepted: list[str] = []
        while (response := ingest_json(client, document)).status_code == 202:
            accepted.extend(response.json()["postbacks"])
            assert len(accepted) < 100_000, "never refused"

        assert response.status_code == 503
        assert int(response["Retry-After"]) > 0
        assert response.json()["error"] == "queue storage is nearly full"
        assert int(redis.info("memory")["used_memory"]) < MAXMEMORY  # refused before Redis would
        assert redis.xlen(keys.INBOX) * 20 == len(accepted)  # everything answered 202 is in the inbox

        processes.worker(REDIS_URL=server.url)
        wait_until(
            lambda: ingest_json(client, document).status_code == 202, timeout=120, what="ingestion to accept again"
        )
        wait_until(lambda: success_ids() >= set(accepted), timeout=120, what="the flood delivered")
    finally:
        server.stop()
