"""The sharded inbox on one Redis: requests spread over INBOX_SHARDS streams, each drained by
drainers of its own, retries back into their shard, and a change of the shard count that loses
nothing (old shards drained, then dropped). The same code on a Redis Cluster:
tests/test_redis_cluster.py."""

import json
from collections import Counter
from typing import Any

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from dashboard.live import unfolded_accepted
from postbackproject import inbox, keys, shards
from postbackproject.queue import get_connection, get_queue
from postbackproject.shards import Shard
from tests.conftest import (
    Reply,
    deliver_everything,
    ingest_json,
    run_worker,
    scheduled_in,
    success_ids,
)

pytestmark = pytest.mark.django_db(transaction=True)


def document(receiver: Any, path: str, count: int = 2) -> dict[str, object]:
    return {
        "endpoint": {"method": "GET", "url": receiver.url(path + "?n={n}")},
        "data": [{"n": n} for n in range(count)],
    }


def entries_in(shard: Shard) -> list[Any]:
    entries: Any = get_connection().xrange(shard.inbox)
    return list(entries)


def requests_in(shard: Shard) -> set[str]:
    return {json.loads(fields[b"r"])[0] for _, fields in entries_in(shard)}


def ingest(client: Any, receiver: Any, requests: int, path: str = "/s") -> list[str]:
    accepted = []
    for _ in range(requests):
        response = ingest_json(client, document(receiver, path))
        assert response.status_code == 202, response.content
        accepted += response.json()["postbacks"]
    return accepted


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 16])
def test_each_shards_keys_share_one_slot_and_the_shards_slots_lie_in_even_ranges(settings, count):
    settings.REDIS_CLUSTER_NODES = [("127.0.0.1", 7000)]  # names only: nothing connects here
    settings.INBOX_SHARDS = count
    found = shards.configured()

    assert len({shard.id for shard in found}) == count
    for index, shard in enumerate(found):
        names = [shard.inbox, shard.leases, shard.due, shard.due_tries, shard.accepted, shard.rejected]
        assert {key_slot(name.encode()) for name in [*names, shard.folding("token")]} == {shard.slot}
        width = REDIS_CLUSTER_HASH_SLOTS / count
        assert index * width <= shard.slot < (index + 1) * width
        assert shards.shard_of_drainer(shard.new_drainer_id()) == shard


def test_one_shard_on_one_redis_keeps_the_keys_of_the_inbox_before_it_was_sharded(settings):
    settings.INBOX_SHARDS = 1
    assert shards.configured() == [shards.MAIN]
    assert (shards.MAIN.inbox, shards.MAIN.due, shards.MAIN.leases) == (keys.INBOX, keys.DUE, keys.LEASES)
    assert shards.shard_of_drainer(shards.MAIN.new_drainer_id()) == shards.MAIN


def test_requests_spread_over_the_shards_and_every_postback_is_delivered(settings, client, receiver):
    settings.INBOX_SHARDS = 3
    accepted = ingest(client, receiver, 30)

    configured = shards.configured()
    per_shard = [len(requests_in(shard)) for shard in configured]
    assert per_shard == [10, 10, 10]  # each in turn
    assert get_queue().count == 3  # a drainer started for each shard

    run_worker()

    assert success_ids() == set(accepted)
    assert sorted(receiver.postback_ids()) == sorted(accepted)  # each once
    assert all(not entries_in(shard) for shard in configured)


def test_a_retry_waits_in_the_shard_its_request_came_from(settings, client, receiver):
    settings.INBOX_SHARDS = 3
    receiver.answer(Reply(status=503), Reply(status=503), Reply(status=503))
    ingest(client, receiver, 3)  # one request per shard, its first postback failing... or not
    where = {request: shard for shard in shards.configured() for request in requests_in(shard)}

    run_worker()

    waiting = [(item.postback_id, shard) for shard in shards.configured() for item, _ in scheduled_in(shard)]
    assert waiting, "some tries failed and wait"
    for postback_id, shard in waiting:
        assert where[postback_id.rpartition("-")[0]] == shard
    deliver_everything()
    assert not any(scheduled_in(shard) for shard in shards.configured())


def test_the_accepted_counts_of_every_shard_are_folded(settings, client, receiver):
    settings.INBOX_SHARDS = 2
    ingest(client, receiver, 5)  # 10 postbacks
    assert sum(unfolded_accepted().values()) == 10
    assert all(get_connection().hlen(shard.accepted) for shard in shards.configured())


def test_fewer_shards_on_a_live_system_loses_nothing_and_drops_the_old_ones_once_empty(settings, client, receiver):
    settings.INBOX_SHARDS = 3
    before = shards.configured()
    receiver.answer(Reply(status=503))  # one postback of an old shard will wait for a retry
    accepted = ingest(client, receiver, 9)

    settings.INBOX_SHARDS = 1  # every process restarted with the new count (the queued drain jobs name their shards)
    assert shards.configured() == [shards.MAIN]
    old = [shard for shard in before if shard != shards.MAIN]

    deliver_everything()  # the sweep finds the old shards in the registry and drains them

    assert success_ids() == set(accepted)
    assert all(not entries_in(shard) for shard in old)
    # Used a moment ago (by the old count): kept, though empty.
    inbox.sweep()
    registered = set(get_connection().hkeys(keys.SHARDS))
    assert {shard.id.encode() for shard in old} <= registered

    unused_since_long_ago(old)
    fold_everything_but_this_minute(old)
    inbox.sweep()

    registered = set(get_connection().hkeys(keys.SHARDS))
    assert not {shard.id.encode() for shard in old} & registered
    for shard in old:
        assert not get_connection().exists(shard.inbox, shard.due, shard.due_tries, shard.leases)


def test_a_shard_no_process_uses_is_kept_while_it_holds_work(settings, client, receiver):
    settings.INBOX_SHARDS = 2
    second = shards.configured()[1]
    ingest(client, receiver, 2)
    get_queue().empty()  # the drain jobs lost...
    get_connection().delete(second.leases)  # ...and their leases run out
    settings.INBOX_SHARDS = 1
    unused_since_long_ago([second])
    get_connection().delete(second.accepted)  # its counts folded: only its entries keep it

    assert not shards.drop_if_empty(second)
    inbox.sweep()
    assert get_connection().hexists(keys.SHARDS, second.id)
    assert entries_in(second)

    run_worker()  # its drainer, started by the sweep

    assert not entries_in(second)
    inbox.sweep()
    assert not get_connection().hexists(keys.SHARDS, second.id)


def test_more_shards_on_a_live_system_keeps_the_main_shard_and_delivers_both(settings, client, receiver):
    settings.INBOX_SHARDS = 1
    first = ingest(client, receiver, 2, path="/one")
    settings.INBOX_SHARDS = 4
    second = ingest(client, receiver, 8, path="/four")

    deliver_everything()

    assert success_ids() == set(first + second)
    counted = Counter(target.split("?")[0] for target in receiver.targets)
    assert counted == {"/one": 4, "/four": 16}


def unused_since_long_ago(old: list[Shard]) -> None:
    """As if no process had stamped these shards for longer than RETIRE_AFTER_MS."""
    get_connection().hset(keys.SHARDS, mapping={shard.id: 1 for shard in old})


def fold_everything_but_this_minute(old: list[Shard]) -> None:
    """The fold takes past minutes only; the counts of this minute are folded a minute later."""
    get_connection().delete(*(shard.accepted for shard in old))
