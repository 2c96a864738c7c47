"""What strangers send: URLs that cannot be sent are refused at the door, the work one request
can cause is bounded, what is recorded is what went on the wire, and no body gets a 5xx."""

import json
import random
from typing import Any
from urllib.parse import unquote

import pytest

from delivery.models import DeliveryAttempt, DeliverySettings
from delivery.recording import ERROR_MAX_CHARS, TEXT_MAX_CHARS, storable
from postbackproject import inbox, keys, shards
from postbackproject.postback import Try
from postbackproject.queue import get_connection
from tests.conftest import Receiver, deliver_everything, ingest_json, sent_url

pytestmark = pytest.mark.django_db(transaction=True)


def ingest_url(client, url: str, data: list[dict[str, Any]] | None = None):
    return ingest_json(client, {"endpoint": {"method": "GET", "url": url}, "data": data or [{}]})


def attempts() -> list[DeliveryAttempt]:
    return list(DeliveryAttempt.objects.order_by("postback_id", "attempt"))


# --- URLs checked at the door --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://h.example:65536/", "port must be a number from 1 to 65535"),
        ("http://h.example:0/", "port must be a number from 1 to 65535"),
        ("http://h.example:+36353/", "port must be a number from 1 to 65535"),
        ("http://h.example:\uff18\uff10/", "port must be a number from 1 to 65535"),  # full-width digits
        ("http://\uff11\uff12\uff17.0.0.1/", "must be an IPv4 address"),
        ("http://\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com/", "not a valid internationalised name"),
        ("http://[fe80::1%25eth0]/", "zone ids"),
        ("http://[fe80::1%eth0]:80/", "zone ids"),
        ("http://[::1/", "IPv6 address is written in brackets"),
        ("http://[v7.future]/", "is not an IPv6 address"),
        ("http://2130706433/", "must be an IPv4 address written as four decimal numbers"),
        ("http://0x7f.1/", "must be an IPv4 address"),
        ("http://127.1/", "must be an IPv4 address"),
        ("http://010.0.0.1/", "must be an IPv4 address"),
        ("http://a..b/", "not a valid host name"),
        ("http://-a.example/", "not a valid host name"),
        ("http://xn--zz.example/", "not a valid host name"),
        (f"http://{'a' * 64}.example/", "not a valid host name"),
        (f"http://{'a.' * 127}ab/", "longer than 253"),
        ("http://user@/x", "must name a host"),
        ("http:///x", "must name a host"),
        ("ftp://h.example/", "absolute http:// or https://"),
        ("http:/h.example/", "absolute http:// or https://"),
        ("//h.example/", "absolute http:// or https://"),
        ("http://é{h}.example/", "must otherwise be ASCII"),
    ],
)
def test_a_url_that_can_never_be_sent_gets_400_naming_endpoint_url(client, url, why):
    response = ingest_url(client, url)

    assert response.status_code == 400
    assert response.json()["field"] == "endpoint.url"
    assert why in response.json()["error"]
    assert not get_connection().exists(keys.INBOX)


@pytest.mark.parametrize(
    ("url", "sent_as"),
    [
        ("http://sample_domain_endpoint.com/data?key={key}", "http://sample_domain_endpoint.com/data?key=k"),
        ("http://Bücher.example/", "http://xn--bcher-kva.example/"),
        ("https://[2001:db8::1]:8443/x", "https://[2001:db8::1]:8443/x"),
        ("http://192.0.2.1:8080/x", "http://192.0.2.1:8080/x"),
        ("http://h.example.:/x#part", "http://h.example.:/x"),
        ("http://user:pa%20ss@h.example/x", "http://user:pa%20ss@h.example/x"),
        ("HTTP://h.example/x", "HTTP://h.example/x"),
    ],
)
def test_urls_that_can_be_sent_are_accepted_as_they_will_be_sent(client, url, sent_as, settings):
    settings.DELIVERY_ALLOW_NETWORKS = []  # nothing leaves: the refusal at the socket is recorded
    DeliverySettings(max_attempts=1).save()  # names that do not resolve are not retried here
    response = ingest_url(client, url, [{"key": "k"}])
    assert response.status_code == 202

    deliver_everything()

    [attempt] = attempts()
    assert sent_url(attempt.postback_id) == sent_as


# --- placeholders in the host: checked once rendered ----------------------------------------


def test_a_host_from_a_value_is_sent_when_it_is_a_host(client, receiver: Receiver):
    url = f"http://{{h}}:{receiver.port}/to/{{h}}"
    assert ingest_url(client, url, [{"h": "127.0.0.1"}]).status_code == 202

    deliver_everything()

    assert receiver.targets == ["/to/127.0.0.1"]
    assert [a.outcome for a in attempts()] == ["success"]


@pytest.mark.parametrize("value", ["a b", "127.1", "h:99999", "x@127.0.0.1", "\uff11\uff12\uff17.0.0.1", ""])
def test_a_host_from_a_value_that_is_not_a_host_fails_without_sending(client, receiver: Receiver, value):
    url = f"http://{{h}}:{receiver.port}/x"
    assert ingest_url(client, url, [{"h": value}]).status_code == 202

    deliver_everything()

    [attempt] = attempts()
    assert (attempt.outcome, attempt.response_code) == ("failed", None)
    assert attempt.error.startswith("not sent: invalid URL: ")
    assert receiver.requests == []


# --- bounded work per byte accepted --------------------------------------------------------


def test_one_value_named_thousands_of_times_is_refused_at_the_door(client):
    """The amplification found (a 1 MB request that would render a 2.8 GB URL), within the
    placeholder limit: a 1 MB request that would render a 66 MB URL."""
    url = "http://h.example/amp?" + "{k}" * 64
    response = ingest_url(client, url, [{}, {"k": "a" * 1_040_000}])

    assert response.status_code == 400
    assert response.json()["field"] == "data[1]"
    assert "would be 66560021 bytes; at most 16384" in response.json()["error"]
    assert not get_connection().exists(keys.INBOX)


@pytest.mark.parametrize(("placeholders", "status"), [(64, 202), (65, 400)])
def test_a_template_may_hold_64_placeholders_and_no_more(client, placeholders, status):
    response = ingest_url(client, "http://h.example/p?" + "{p}" * placeholders)

    assert response.status_code == status
    if status == 400:
        assert response.json()["field"] == "endpoint.url"
        assert "has 65 placeholders" in response.json()["error"]
        assert "INGEST_MAX_PLACEHOLDERS is 64" in response.json()["error"]
        assert not get_connection().exists(keys.INBOX)


def test_the_placeholder_attack_is_refused_at_the_door(client):
    """The attack found: an 8 KiB URL of 4,083 empty placeholders over 10,000 objects kept a
    worker busy 12.8 s."""
    url = "http://h.example/" + "{}" * 4083
    response = ingest_url(client, url, [{}] * 10_000)

    assert response.status_code == 400
    assert "INGEST_MAX_PLACEHOLDERS is 64" in response.json()["error"]
    assert not get_connection().exists(keys.INBOX)


def test_a_request_whose_postbacks_would_render_past_16_mib_gets_400_naming_the_limit(client):
    """A 0.3 MB request: 10,000 objects, each URL 64 times a value that triples once encoded."""
    response = ingest_url(client, "http://h.example/" + "{v}" * 64, [{"v": "/" * 20}] * 10_000)

    assert response.status_code == 400
    assert response.json()["field"] == "data"
    assert "would be 38570000 bytes once rendered" in response.json()["error"]
    assert "INGEST_MAX_RENDERED_BYTES is 16777216" in response.json()["error"]
    assert not get_connection().exists(keys.INBOX)


def test_the_rendered_bytes_limit_counts_urls_and_bodies_exactly_as_sent(client, receiver: Receiver, settings):
    """The size told at the door is the size on the wire: a request exactly at the limit is
    accepted, one byte under it refused, and nothing of the refused one is queued."""
    DeliverySettings(unmatched_default="ü").save()
    document = {
        "endpoint": {"method": "POST", "url": receiver.url("/s/{v}?w={w}&d={none}&again={v}")},
        "data": [{"v": "é/ x", "w": 12.50}, {"v": True, "w": None}, {"x": "y"}],
    }
    assert ingest_json(client, document).status_code == 202
    deliver_everything()
    on_the_wire = sum(len(receiver.url(request.target)) + len(request.body) for request in receiver.requests)

    settings.INGEST_MAX_RENDERED_BYTES = on_the_wire
    assert ingest_json(client, document).status_code == 202
    queued = get_connection().xlen(keys.INBOX)
    settings.INGEST_MAX_RENDERED_BYTES = on_the_wire - 1
    over = ingest_json(client, document)

    assert over.status_code == 400
    assert f"would be {on_the_wire} bytes once rendered" in over.json()["error"]
    assert f"INGEST_MAX_RENDERED_BYTES is {on_the_wire - 1}" in over.json()["error"]
    assert get_connection().xlen(keys.INBOX) == queued


@pytest.mark.parametrize("cap", [16384, 300])
def test_the_cap_is_exact_in_bytes_once_encoded(client, receiver: Receiver, cap):
    DeliverySettings(max_url_bytes=cap, unmatched_default="é").save()
    template = receiver.url("/c?v={v}&d={missing}")
    fixed = len(template) - len("{v}") - len("{missing}") + len("%C3%A9")
    at_cap = "é" * ((cap - fixed) // 6) + "a" * ((cap - fixed) % 6)

    assert ingest_url(client, template, [{"v": at_cap}]).status_code == 202
    over = ingest_url(client, template, [{"v": at_cap}, {"v": at_cap + "a"}])
    assert over.status_code == 400 and over.json()["field"] == "data[1]"

    deliver_everything()
    [attempt] = attempts()
    assert attempt.outcome == "success"
    assert len(sent_url(attempt.postback_id)) == cap
    assert receiver.url(receiver.targets[0]) == sent_url(attempt.postback_id)


def test_delivery_checks_the_cap_again_and_records_a_failure_without_building_the_url(client, receiver: Receiver):
    """Settings lowered after a request was accepted: the worker does not render or send."""
    template = receiver.url("/late?v={v}&w={v}")
    [pid, short] = ingest_url(client, template, [{"v": "x" * 400}, {"v": "y"}]).json()["postbacks"]
    DeliverySettings(max_url_bytes=256).save()

    deliver_everything()

    refused, sent = attempts()
    assert (refused.postback_id, refused.outcome, refused.response_code) == (pid, "failed", None)
    assert (
        refused.error
        == f"not sent: the URL would be {len(receiver.url('/late?v=&w=')) + 800} bytes, over max_url_bytes (256)"
    )
    assert sent_url(refused.postback_id) == template  # the template, not an 800-byte URL
    assert (sent.postback_id, sent.outcome) == (short, "success")
    assert receiver.targets == ["/late?v=y&w=y"]


def test_an_entry_written_straight_into_redis_is_bounded_too(client, receiver: Receiver):
    """Whoever reaches Redis can skip ingestion; the worker still refuses to build the URL."""
    template = receiver.url("/r?" + "{k}" * 2000)
    [entry] = inbox.request_entries("feedface", "GET", template, [json.dumps({"k": "z" * 100_000})], 100)
    inbox.append_request([entry], 1)

    deliver_everything()

    [attempt] = attempts()
    assert attempt.postback_id == "feedface-0"
    assert (attempt.outcome, sent_url(attempt.postback_id)) == ("failed", template)
    assert "over max_url_bytes" in attempt.error
    assert receiver.requests == []


def test_a_try_written_straight_into_redis_with_a_huge_url_is_not_sent(receiver: Receiver):
    huge = receiver.url("/t?" + "q" * 20_000)
    inbox.schedule_tries(shards.MAIN, [(Try("cafe-0", 2, 1, "GET", huge, None), 0.0)])
    inbox.sweep()

    deliver_everything()

    [attempt] = attempts()
    assert (attempt.postback_id, attempt.outcome) == ("cafe-0", "failed")
    assert attempt.error == f"not sent: the URL would be {len(huge)} bytes, over max_url_bytes (16384)"
    assert receiver.requests == []


def test_every_stored_text_is_bounded():
    assert len(storable("e" * 5000, ERROR_MAX_CHARS)) == ERROR_MAX_CHARS
    assert len(storable("u" * (TEXT_MAX_CHARS + 10))) == TEXT_MAX_CHARS


# --- what is recorded is what is sent ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "data", "target"),
    [
        ("/a/{v}/b", {"v": ".."}, "/a/%2E%2E/b"),
        ("/a/{v}/b", {"v": "."}, "/a/%2E/b"),
        ("/p%41th?q=%41", {}, "/p%41th?q=%41"),
        ("/a/../b/./c", {}, "/a/../b/./c"),
        ("/f?x={v}#fragment", {"v": "1#2"}, "/f?x=1%232"),
        ("/{v}", {"v": "a/b?c=d&e"}, "/a%2Fb%3Fc%3Dd%26e"),
        ("/é?q=ü{v}", {"v": "ß "}, "/%C3%A9?q=%C3%BC%C3%9F%20"),
    ],
)
def test_the_request_target_sent_is_the_one_recorded(client, receiver: Receiver, path, data, target):
    ingest_url(client, receiver.url(path), [data])

    deliver_everything()

    assert receiver.targets == [target]
    [attempt] = attempts()
    assert sent_url(attempt.postback_id) == receiver.url(target)


def test_random_values_are_recorded_as_sent_and_decode_back(client, receiver: Receiver):
    """Two hundred objects of random text, dots, delimiters and escapes, through the real path."""
    chooser = random.Random(8)
    alphabet = ["a", ".", "..", "/", "?", "#", "%", "%41", "&", "=", "{v}", "é", "\U0001f600", " ", "+", "~"]
    values = ["".join(chooser.choices(alphabet, k=chooser.randrange(0, 6))) for _ in range(200)]
    ids = ingest_url(client, receiver.url("/v/{v}/x?v={v}"), [{"v": value} for value in values]).json()["postbacks"]

    deliver_everything()

    sent = {request.headers["X-Postback-Id"]: request.target for request in receiver.requests}
    recorded = {a.postback_id: sent_url(a.postback_id) for a in attempts()}
    for pid, value in zip(ids, values, strict=True):
        assert recorded[pid] == receiver.url(sent[pid])
        segment = sent[pid].split("/")[2]
        assert len(sent[pid].split("/")) == 4  # no segment added or removed
        assert unquote(segment, errors="strict") == value


# --- no body gets a 5xx --------------------------------------------------------------------

SEED_DOCUMENT = {
    "endpoint": {"method": "POST", "url": "http://sample_domain_endpoint.com/data?key={key}&v={value}"},
    "data": [{"key": "Azureus", "value": 1.50}, {"key": None, "value": True}],
}
TOKENS = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\\u", b"\\ud800", b"\x00", b"\xff", b"\xc3",
          b"null", b"1e999", b"-", b"NaN", b"Infinity", b"{}", b"[]", b'"url"', b'"data"', b'"endpoint"',
          b'"http://[::1%25x]:99999/{a}"', b"9" * 400, b"\xef\xbb\xbf", b" ", b"\t"]  # fmt: skip


def malformed_bodies(count: int, seed: int) -> list[bytes]:
    """Valid requests cut, spliced and sprinkled with tokens; random bytes; deep nesting."""
    chooser = random.Random(seed)
    valid = json.dumps(SEED_DOCUMENT).encode()
    bodies = []
    for _ in range(count):
        kind = chooser.randrange(5)
        body = bytearray(valid)
        if kind == 0:
            body = body[: chooser.randrange(len(body))]
        elif kind in (1, 2):
            for _ in range(chooser.randrange(1, 6)):
                at = chooser.randrange(len(body) + 1)
                body[at : at + chooser.randrange(3)] = chooser.choice(TOKENS)
        elif kind == 3:
            body = bytearray(chooser.randbytes(chooser.randrange(1, 300)))
        else:
            depth = chooser.choice([10, 1000, 100_000])
            body = bytearray(b'{"endpoint": ' + b"[" * depth + b"]" * chooser.randrange(depth + 1))
        bodies.append(bytes(body))
    return bodies


def test_ten_thousand_malformed_bodies_get_no_5xx(client):
    statuses: dict[int, int] = {}
    for index, body in enumerate(malformed_bodies(10_000, seed=20261129)):
        response = client.generic("POST", "/i" if index % 2 else "/ingest.php", body)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, body[:200]
        assert "error" in response.json() or response.status_code == 202
    assert statuses.get(400, 0) > 5000 and statuses.get(202, 0) > 100  # both paths really exercised
