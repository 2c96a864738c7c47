"""Destinations: per-receiver rules matched by host and URL prefix, with real workers and a
real receiver: paused, rate-limited, extra headers, own retries and own signing secrets."""

import time
from collections import Counter

import pytest
from django.contrib.auth.models import User
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from delivery.destinations import RateLimit, Routes, Taken, path_of, throttled_destinations
from delivery.engine import Engine, Work
from delivery.hosts import RememberedLimits
from delivery.models import DeliveryAttempt, DeliverySettings, Destination, DestinationSecret, Outcome, SigningSecret
from postbackproject.postback import Try
from tests.conftest import Reply, deliver_everything, ingest_json, run_worker, wait_until
from tests.test_engine import FakeTransport, OpenGate, run

pytestmark = pytest.mark.django_db(transaction=True)


def send(client, url: str, count: int = 1, headers: dict[str, str] | None = None) -> list[str]:
    endpoint: dict[str, object] = {"method": "POST", "url": url}
    if headers:
        endpoint["headers"] = headers
    response = ingest_json(client, {"endpoint": endpoint, "data": [{"n": n} for n in range(count)]})
    assert response.status_code == 202
    ids: list[str] = response.json()["postbacks"]
    return ids


def host_of_receiver(receiver, host: str = "127.0.0.1") -> str:
    return f"{host}:{receiver.port}"


def tries_of(postback_id: str) -> list[tuple[int, str]]:
    rows = DeliveryAttempt.objects.filter(postback_id=postback_id).order_by("attempt", "id")
    return list(rows.values_list("attempt", "outcome"))


# --- matching ---------------------------------------------------------------------------------


def test_the_longest_matching_prefix_wins_over_a_shorter_one_and_the_host_alone():
    routes = Routes([("a.example", "", "host"), ("a.example", "/v2/", "v2"), ("a.example", "/v2/hooks", "hooks")])

    assert routes.match("a.example", "https://a.example/v2/hooks?x=1") == "hooks"
    assert routes.match("a.example", "https://a.example/v2/other") == "v2"
    assert routes.match("a.example", "https://a.example/v1") == "host"
    assert routes.match("b.example", "https://b.example/v2/hooks") is None


def test_a_prefix_alone_does_not_match_urls_outside_it():
    routes = Routes([("a.example:8080", "/only", "only")])
    assert routes.match("a.example:8080", "http://a.example:8080/other") is None
    assert path_of("http://a.example:8080?q=1") == "?q=1"


def test_a_destinations_host_is_kept_as_circuits_count_it():
    pasted = Destination.objects.create(name="pasted", host="HTTPS://API.Example.com:443/v1/x")
    typed = Destination.objects.create(name="typed", host="10.0.0.5:8080")
    assert (pasted.host, typed.host) == ("api.example.com", "10.0.0.5:8080")


def test_settings_read_with_destinations_cost_two_queries_more_and_none_per_postback(django_assert_num_queries):
    Destination.objects.create(name="a", host="a.example", max_attempts=2)
    DeliverySettings._cache = None
    with django_assert_num_queries(3):  # settings, destinations, their secrets
        config = DeliverySettings.current()
    with django_assert_num_queries(0):
        assert config.rules_for("a.example", "https://a.example/x").max_attempts == 2
        assert config.rules_for("b.example", "https://b.example/x") is config


# --- retries and the global fallback ----------------------------------------------------------


def test_a_destinations_max_attempts_is_honoured_and_other_hosts_keep_the_global_settings(client, receiver):
    DeliverySettings(max_attempts=4, backoff_base_seconds=0).save()
    Destination.objects.create(name="two tries", host=host_of_receiver(receiver), max_attempts=2)
    receiver.default = Reply(503)
    own = send(client, receiver.url("/d"))[0]
    unmatched = send(client, receiver.url("/g", host="localhost"))[0]

    deliver_everything()

    assert [outcome for _, outcome in tries_of(own)] == [Outcome.RETRY, Outcome.FAILED]
    assert [outcome for _, outcome in tries_of(unmatched)] == [Outcome.RETRY] * 3 + [Outcome.FAILED]


def test_a_prefix_match_takes_the_rules_of_the_more_specific_destination(client, receiver):
    DeliverySettings(max_attempts=4, backoff_base_seconds=0).save()
    Destination.objects.create(name="host", host=host_of_receiver(receiver), max_attempts=3)
    Destination.objects.create(name="v2", host=host_of_receiver(receiver), url_prefix="/v2/", max_attempts=1)
    receiver.default = Reply(503)
    v2 = send(client, receiver.url("/v2/x"))[0]
    other = send(client, receiver.url("/v1/x"))[0]

    deliver_everything()

    assert len(tries_of(v2)) == 1
    assert len(tries_of(other)) == 3


# --- paused -------------------------------------------------------------------------------------


def test_a_paused_destination_receives_nothing_then_everything_in_order_of_arrival(client, receiver):
    # One request at a time (its own in-flight cap), so that the receiver sees the order they leave in.
    destination = Destination.objects.create(
        name="migrating", host=host_of_receiver(receiver), paused=True, max_in_flight_per_host=1
    )
    ids = send(client, receiver.url("/p?n={n}"), count=5) + send(client, receiver.url("/p?n={n}"), count=5)

    run_worker()
    run_worker()  # the deferred ones come round again, and wait again

    assert receiver.requests == []
    rows = DeliveryAttempt.objects.filter(postback_id__in=ids)
    assert {row.outcome for row in rows} == {Outcome.DEFERRED}
    assert {row.attempt for row in rows} == {1}  # nothing spent
    assert all("migrating is paused" in row.error for row in rows)

    destination.paused = False
    destination.save()

    def all_arrived() -> bool:
        run_worker()
        return len(receiver.requests) >= len(ids)

    wait_until(all_arrived, timeout=30, what="every postback once resumed")
    assert receiver.postback_ids() == ids
    assert all(tries_of(pid)[-1] == (1, Outcome.SUCCESS) for pid in ids)


# --- extra headers ------------------------------------------------------------------------------


def test_destination_headers_arrive_exactly_and_beat_a_senders_header_of_the_same_name(client, receiver):
    Destination.objects.create(
        name="api key",
        host=host_of_receiver(receiver),
        headers=[["Authorization", "Bearer dest-token"], ["X-Api-Key", "k=1; v=é"], ["X-Empty", ""]],
    )
    send(client, receiver.url("/h"), headers={"authorization": "Bearer sender", "X-From-Sender": "s"})

    deliver_everything()

    (request,) = receiver.requests
    headers = {name.lower(): value.encode("latin-1").decode() for name, value in request.headers.items()}
    assert headers["authorization"] == "Bearer dest-token"
    assert headers["x-api-key"] == "k=1; v=é"
    assert headers["x-empty"] == ""
    assert headers["x-from-sender"] == "s"
    assert list(request.headers).count("Authorization") + list(request.headers).count("authorization") == 1


def test_destination_headers_are_never_recorded_with_attempts(client, receiver):
    Destination.objects.create(name="k", host=host_of_receiver(receiver), headers=[["Authorization", "Bearer s3cr3t"]])
    pid = send(client, receiver.url("/h"))[0]
    deliver_everything()

    page = client.get(f"/postbacks/{pid}")
    assert b"s3cr3t" not in page.content
    assert "s3cr3t" not in str(list(DeliveryAttempt.objects.values()))


@pytest.fixture
def staff_client(client):
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "a-long-test-password"))
    return client


def destination_form(**changes: str) -> dict[str, str]:
    form = {
        "name": "api",
        "host": "api.example.com",
        "url_prefix": "",
        "header_lines": "",
        "secrets-TOTAL_FORMS": "0",
        "secrets-INITIAL_FORMS": "0",
        "secrets-MIN_NUM_FORMS": "0",
        "secrets-MAX_NUM_FORMS": "1000",
    }
    return {**form, **changes}


def test_admin_never_shows_a_saved_header_value_and_a_blank_value_keeps_it(staff_client):
    added = staff_client.post(
        "/admin/delivery/destination/add/", destination_form(header_lines="Authorization: Bearer s3cr3t\nX-A: one")
    )
    assert added.status_code == 302, added.content.decode()[:3000]
    destination = Destination.objects.get()
    page = staff_client.get(f"/admin/delivery/destination/{destination.pk}/change/")
    listing = staff_client.get("/admin/delivery/destination/")

    assert b"s3cr3t" not in page.content and b"s3cr3t" not in listing.content
    assert b"Authorization: (set)" in page.content

    kept = staff_client.post(
        f"/admin/delivery/destination/{destination.pk}/change/",
        destination_form(header_lines="Authorization: (set)\nX-A:\nX-B: two"),
    )
    assert kept.status_code == 302
    destination.refresh_from_db()
    assert destination.header_pairs == (("Authorization", "Bearer s3cr3t"), ("X-A", "one"), ("X-B", "two"))


@pytest.mark.parametrize(
    "lines", ["Host: evil", "X-Postback-Id: 1", "webhook-signature: v1,x", "Bad Name: x", "X-New:", "no colon"]
)
def test_admin_refuses_headers_a_sender_could_not_send_either(staff_client, lines):
    response = staff_client.post("/admin/delivery/destination/add/", destination_form(header_lines=lines))
    assert response.status_code == 200
    assert not Destination.objects.exists()


# --- signing ------------------------------------------------------------------------------------


def test_each_destination_signs_with_its_own_secret_which_the_other_cannot_verify(client, receiver):
    first = Destination.objects.create(name="first", host=host_of_receiver(receiver))
    second = Destination.objects.create(name="second", host=host_of_receiver(receiver, "localhost"))
    first_secret = DestinationSecret.objects.create(destination=first, label="1").secret
    second_secret = DestinationSecret.objects.create(destination=second, label="2").secret
    send(client, receiver.url("/one"))
    send(client, receiver.url("/two", host="localhost"))

    deliver_everything()

    by_target = {request.target: request for request in receiver.requests}
    one, two = by_target["/one"], by_target["/two"]
    Webhook(first_secret).verify(one.body, one.headers)
    Webhook(second_secret).verify(two.body, two.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(second_secret).verify(one.body, one.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(first_secret).verify(two.body, two.headers)


def test_a_destination_without_secrets_falls_back_to_the_global_ones(client, receiver):
    global_secret = SigningSecret.objects.create(label="global").secret
    DeliverySettings(sign_postbacks=True).save()
    Destination.objects.create(name="no secret", host=host_of_receiver(receiver), max_attempts=3)
    send(client, receiver.url("/g"))

    deliver_everything()

    (request,) = receiver.requests
    Webhook(global_secret).verify(request.body, request.headers)


def test_during_a_rotation_both_active_secrets_of_a_destination_verify(client, receiver):
    destination = Destination.objects.create(name="rotating", host=host_of_receiver(receiver))
    old = DestinationSecret.objects.create(destination=destination, label="old").secret
    new = DestinationSecret.objects.create(destination=destination, label="new").secret
    send(client, receiver.url("/r"))

    deliver_everything()

    (request,) = receiver.requests
    Webhook(old).verify(request.body, request.headers)
    Webhook(new).verify(request.body, request.headers)


# --- rate limit ---------------------------------------------------------------------------------

RATE, BURST = 20, 5


def test_two_workers_together_keep_a_destination_within_its_rate(client, processes, receiver):
    Destination.objects.create(name="limited", host=host_of_receiver(receiver), rate_per_second=RATE, rate_burst=BURST)
    ids: list[str] = []
    for _ in range(6):
        ids += send(client, receiver.url("/r?n={n}"), count=10)
    processes.worker()
    processes.worker()

    wait_until(lambda: len(receiver.requests) >= len(ids), timeout=60, what="every postback delivered")

    times = sorted(request.received_at for request in receiver.requests)
    # GCRA allows BURST at once and RATE a second after: any window of w seconds holds at most
    # BURST + RATE * w requests (a request's time here is when it arrived, a little after it
    # was charged: 2 more allowed for that).
    for start, first in enumerate(times):
        in_window = sum(1 for later in times[start:] if later - first <= 1.0)
        assert in_window <= BURST + RATE + 2
    assert times[-1] - times[0] >= (len(ids) - BURST) / RATE - 0.5
    assert Counter(receiver.postback_ids()) == Counter(ids)  # each once: nothing was spent twice
    deferred = DeliveryAttempt.objects.filter(outcome=Outcome.DEFERRED)
    assert deferred.exists() and all("rate limit" in row.error for row in deferred)
    assert not DeliveryAttempt.objects.filter(attempt__gt=1).exists()


def test_a_throttled_destination_is_marked_for_the_dashboard(client, receiver):
    destination = Destination.objects.create(
        name="slow", host=host_of_receiver(receiver), rate_per_second=0.1, rate_burst=1
    )
    send(client, receiver.url("/t?n={n}"), count=3)
    started = time.monotonic()

    run_worker()

    assert len(receiver.requests) == 1  # the burst; the next fits ten seconds later
    assert time.monotonic() - started < 10
    assert throttled_destinations([destination.pk]) == {destination.pk}


# --- dashboard ----------------------------------------------------------------------------------


def test_the_host_table_and_host_view_show_each_destinations_rules_and_state(client, receiver, staff_client):
    host = host_of_receiver(receiver)
    paused = Destination.objects.create(
        name="paused one", host=host, url_prefix="/v2/", paused=True, headers=[["Authorization", "Bearer s3cr3t"]]
    )
    limited = Destination.objects.create(name="slow", host=host, rate_per_second=0.1, rate_burst=1, max_attempts=2)
    DestinationSecret.objects.create(destination=limited, label="own")
    send(client, receiver.url("/x?n={n}"), count=2)
    run_worker()  # the second postback waits for the rate: "slow" is throttled

    body = staff_client.get("/dashboard/api/hosts", {"range": "1h", "host": host}).json()

    [row] = [row for row in body["hosts"] if row["host"] == host]
    shown = {d["name"]: d for d in row["destinations"]}
    assert shown["paused one"]["paused"] and not shown["paused one"]["throttled"]
    assert shown["slow"]["throttled"] and not shown["slow"]["paused"]
    assert shown["slow"]["rules"] == ["at most 0.1/s, burst 1", "2 attempts", "own signing secrets"]
    assert shown["paused one"]["rules"] == ["headers Authorization"]
    assert shown["paused one"]["admin_url"] == f"/admin/delivery/destination/{paused.pk}/change/"
    assert body["host_view"]["destinations"] == row["destinations"]
    assert body["host_view"]["circuit"] == {"state": "closed"}
    assert "s3cr3t" not in str(body)


def test_a_destination_without_traffic_is_listed_in_the_host_table(staff_client):
    Destination.objects.create(name="quiet", host="quiet.example")
    body = staff_client.get("/dashboard/api/hosts", {"range": "1h"}).json()
    assert [row["host"] for row in body["hosts"]] == ["quiet.example"]
    assert body["hosts"][0]["attempts"] == 0


# --- the engine's choices (fake transport and throttle: no Redis, no receiver) ------------------


class FakeThrottle:
    """Grants `allowance` requests, then says the next fits at `fits_at`."""

    def __init__(self, allowance: int, fits_at: float = 1000.0) -> None:
        self.allowance = allowance
        self.fits_at = fits_at

    def take(self, limit: RateLimit) -> Taken:
        if self.allowance > 0:
            self.allowance -= 1
            return Taken(True, 0.0)
        return Taken(False, self.fits_at)

    def now(self) -> float:
        return 500.0


def engine_rules(*destinations: Destination) -> DeliverySettings:
    config = DeliverySettings()
    config.routes = Routes([(row.host, row.url_prefix, row.rules(config, ())) for row in destinations])
    return config


def try_to(url: str, number: int) -> Work:
    return Work(Try(f"p-{number}", 1, 0, "GET", url, None))


def test_over_its_rate_a_destinations_waiting_postbacks_are_deferred_one_interval_apart_and_others_go():
    limited = Destination(pk=1, name="limited", host="a.example", url_prefix="/slow", rate_per_second=10)
    config = engine_rules(limited)
    transport = FakeTransport()
    engine = Engine(transport, OpenGate(), 64, RememberedLimits(), FakeThrottle(allowance=2))
    engine.add([try_to("http://a.example/slow", n) for n in range(5)], config)
    engine.add([try_to("http://a.example/fast", n) for n in range(5, 8)], config)

    finished = run(engine, config)

    assert [request.postback_id for request in transport.started] == ["p-0", "p-1", "p-5", "p-6", "p-7"]
    deferred = [(item.work.item.postback_id, item.deferred_until) for item in finished if item.response is None]
    assert deferred == [("p-2", 1000.0), ("p-3", 1000.1), ("p-4", 1000.2)]
    assert all("over its rate limit" in item.reason for item in finished if item.response is None)


def test_a_paused_destinations_postbacks_wait_in_order_and_nothing_else_does():
    paused = Destination(pk=2, name="paused", host="a.example", paused=True, max_attempts=1)
    config = engine_rules(paused)
    transport = FakeTransport()
    engine = Engine(transport, OpenGate(), 64, RememberedLimits(), FakeThrottle(allowance=0))
    engine.add([try_to("http://a.example/x", n) for n in range(3)] + [try_to("http://b.example/x", 3)], config)

    finished = run(engine, config)

    assert [request.postback_id for request in transport.started] == ["p-3"]
    waits = [item.deferred_until for item in finished if item.response is None]
    assert len(waits) == 3 and waits == sorted(waits) and waits[0] > 500.0


def test_admin_refuses_a_third_active_secret_on_a_destination(staff_client):
    destination = Destination.objects.create(name="api", host="api.example.com")
    for label in ("one", "two"):
        DestinationSecret.objects.create(destination=destination, label=label)
    rows = list(destination.secrets.order_by("id"))
    form = destination_form(
        **{
            "secrets-TOTAL_FORMS": "3",
            "secrets-INITIAL_FORMS": "2",
            "secrets-0-id": str(rows[0].pk),
            "secrets-0-label": "one",
            "secrets-0-active": "on",
            "secrets-1-id": str(rows[1].pk),
            "secrets-1-label": "two",
            "secrets-1-active": "on",
            "secrets-2-label": "three",
            "secrets-2-active": "on",
        }
    )

    response = staff_client.post(f"/admin/delivery/destination/{destination.pk}/change/", form)

    assert response.status_code == 200
    assert b"At most 2 secrets of a destination can be active at once" in response.content
    assert destination.secrets.count() == 2


def test_a_destination_without_secrets_is_unsigned_while_signing_is_off(client, receiver):
    SigningSecret.objects.create(label="global")
    Destination.objects.create(name="plain", host=host_of_receiver(receiver))
    send(client, receiver.url("/u"))

    deliver_everything()

    (request,) = receiver.requests
    assert not {name.lower() for name in request.headers} & {"webhook-id", "webhook-signature"}
