"""Headers from senders (`endpoint.headers`): refused at ingestion when they are not a sender's
to set, rendered per data object, sent on every try below the product's own, recorded with
the postback, shown on its page and in admin, and sent again by a replay."""

import json

import pytest
from django.contrib.auth.models import User
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook

from delivery import entries
from delivery.models import DeliveryAttempt, DeliverySettings, PostbackRequest, SigningSecret
from delivery.replay import replay
from delivery.transport import Request, header_lines
from postbackproject import inbox
from postbackproject.headers import templates_of
from postbackproject.postback import JsonNumber, Try, dumps_data_object
from tests.conftest import Reply, deliver_everything, ingest_json, run_worker, scheduled_retries
from tests.test_openapi import assert_documented

pytestmark = pytest.mark.django_db(transaction=True)

PATHS = ["/ingest.php", "/i"]


def document(
    receiver, headers: object, data: list[dict[str, object]] | None = None, method: str = "GET"
) -> dict[str, object]:
    return {
        "endpoint": {"method": method, "url": receiver.url("/h?n={n}"), "headers": headers},
        "data": data if data is not None else [{"n": "1"}],
    }


def by_postback(receiver) -> dict[str, dict[str, str]]:
    """Each request's headers as received, by postback id (a receiver reads header bytes as
    Latin-1: UTF-8 text is read back as sent)."""
    return {
        request.headers["X-Postback-Id"]: {
            name: value.encode("latin-1").decode() for name, value in request.headers.items()
        }
        for request in receiver.requests
    }


# --- what ingestion refuses ------------------------------------------------------------------

REFUSED = [
    ({"Host": "evil.example"}, "endpoint.headers.Host"),
    ({"Content-Length": "5"}, "endpoint.headers.Content-Length"),
    ({"transfer-encoding": "chunked"}, "endpoint.headers.transfer-encoding"),
    ({"Connection": "close"}, "endpoint.headers.Connection"),
    ({"Keep-Alive": "timeout=5"}, "endpoint.headers.Keep-Alive"),
    ({"Proxy-Authorization": "Basic eA=="}, "endpoint.headers.Proxy-Authorization"),
    ({"TE": "trailers"}, "endpoint.headers.TE"),
    ({"Trailer": "X"}, "endpoint.headers.Trailer"),
    ({"Upgrade": "h2c"}, "endpoint.headers.Upgrade"),
    ({"Expect": "100-continue"}, "endpoint.headers.Expect"),
    ({"X-Postback-Id": "mine"}, "endpoint.headers.X-Postback-Id"),
    ({"x-postback-attempt": "1"}, "endpoint.headers.x-postback-attempt"),
    ({"Webhook-Signature": "v1,forged"}, "endpoint.headers.Webhook-Signature"),
    ({"Bad Name": "x"}, "endpoint.headers.Bad Name"),
    ({"X-A:b": "x"}, "endpoint.headers.X-A:b"),
    ({"": "x"}, "endpoint.headers."),
    ({"X-A\r\nX-Injected": "x"}, "endpoint.headers.X-A\r\nX-Injected"),
    ({"X-A": "one\r\nX-Injected: two"}, "endpoint.headers.X-A"),
    ({"X-A": "nul\x00"}, "endpoint.headers.X-A"),
    ({"X-A": "line\nfeed"}, "endpoint.headers.X-A"),
    ({"X-A": 5}, "endpoint.headers.X-A"),
    ({"X-A": None}, "endpoint.headers.X-A"),
    ({"X-A": True}, "endpoint.headers.X-A"),
    ({"X-A": ["x"]}, "endpoint.headers.X-A"),
    ({"X-A": "1", "x-a": "2"}, "endpoint.headers.x-a"),
    (["X-A: 1"], "endpoint.headers"),
    (None, "endpoint.headers"),
    ("X-A: 1", "endpoint.headers"),
    ({f"X-H{n}": "v" for n in range(33)}, "endpoint.headers"),
    ({"X-Big": "v" * (8 * 1024)}, "endpoint.headers"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("headers", "field"), REFUSED)
def test_headers_not_a_senders_to_set_are_refused_naming_the_field(client, receiver, path, headers, field):
    response = ingest_json(client, document(receiver, headers), path)

    assert response.status_code == 400
    assert response.json()["field"] == field
    assert response.json()["error"].startswith(f"{field}: ")
    assert inbox.waiting_counts()["entries"] == 0


@pytest.mark.parametrize(("headers", "status"), [({"Host": "x"}, 400), ({"X-A": "a\nb"}, 400), ({"X-A": "{n}"}, 202)])
def test_answers_about_headers_keep_to_the_published_document(client, receiver, headers, status):
    body = json.dumps(document(receiver, headers)).encode()
    response = client.generic("POST", "/ingest.php", body)
    assert response.status_code == status
    assert_documented(response, body)


@pytest.mark.parametrize("path", PATHS)
def test_thirty_two_headers_in_eight_kib_are_accepted(client, receiver, path):
    headers = {f"X-H{n:02}": "v" * 240 for n in range(32)}  # 32 * (5 + 240) bytes: under 8 KiB
    assert ingest_json(client, document(receiver, headers), path).status_code == 202


@pytest.mark.parametrize("path", PATHS)
def test_a_value_that_would_put_a_line_break_in_a_header_is_refused_naming_the_object(client, receiver, path):
    data = [{"n": 1, "who": "fine"}, {"n": 2, "who": "evil\r\nX-Injected: yes"}]
    response = ingest_json(client, document(receiver, {"X-Who": "{who}"}, data), path)

    assert response.status_code == 400
    assert response.json()["field"] == "data[1].who"
    assert inbox.waiting_counts()["entries"] == 0


@pytest.mark.parametrize("path", PATHS)
def test_header_placeholders_count_with_the_urls_against_the_limit(client, receiver, path, settings):
    settings.INGEST_MAX_PLACEHOLDERS = 3  # the URL has one
    accepted = ingest_json(client, document(receiver, {"X-A": "{a}{b}"}), path)
    refused = ingest_json(client, document(receiver, {"X-A": "{a}{b}", "X-B": "{c}"}), path)

    assert accepted.status_code == 202
    assert refused.status_code == 400
    assert refused.json()["field"] == "endpoint.headers"
    assert "INGEST_MAX_PLACEHOLDERS" in refused.json()["error"]


@pytest.mark.parametrize("path", PATHS)
def test_rendered_headers_count_against_the_rendered_bytes_of_a_request(client, receiver, path, settings):
    data = [{"n": n, "v": "x" * 1000} for n in range(10)]
    without = ingest_json(client, document(receiver, {}, data), path)
    settings.INGEST_MAX_RENDERED_BYTES = 8000  # the URLs alone take far less; the headers 10 * 3 KB
    refused = ingest_json(client, document(receiver, {"X-V": "{v}{v}{v}"}, data), path)

    assert without.status_code == 202
    assert refused.status_code == 400
    assert refused.json()["field"] == "data"
    assert "headers" in refused.json()["error"]


# --- what arrives --------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_headers_arrive_exactly_with_placeholders_rendered_per_object(client, receiver, path):
    headers = {
        "Authorization": "Bearer {token}",
        "X-Plain": "no placeholders, {braces} kept as text: /?&=",
        "X-Mixed": "{n}-{missing}-{flag}-{nothing}",
        "X-Empty": "",
        "X-Unicode": "é {name}",
    }
    data = [
        {"n": 1, "token": "a/b c", "flag": True, "nothing": None, "name": "ü", "braces": "B"},
        {"n": 20, "token": "{n}", "flag": False, "name": "x"},
    ]
    ids = ingest_json(client, document(receiver, headers, data), path).json()["postbacks"]

    run_worker()

    got = by_postback(receiver)
    assert {name: got[ids[0]][name] for name in headers} == {
        "Authorization": "Bearer a/b c",  # plain text: nothing percent-encoded
        "X-Plain": "no placeholders, B kept as text: /?&=",
        "X-Mixed": "1--true-",
        "X-Empty": "",
        "X-Unicode": "é ü",
    }
    assert got[ids[1]]["Authorization"] == "Bearer {n}"  # one pass: a value is never expanded again
    assert got[ids[1]]["X-Mixed"] == "20--false-"
    assert sorted(receiver.targets) == ["/h?n=1", "/h?n=20"]


def test_unmatched_placeholders_in_headers_take_the_admins_default(client, receiver):
    DeliverySettings(unmatched_default="none given").save()
    ingest_json(client, document(receiver, {"X-A": "{missing}"}))
    run_worker()
    assert receiver.requests[0].headers["X-A"] == "none given"


def test_a_default_that_cannot_stand_in_a_header_fails_the_postback_unsent(client, receiver):
    ids = ingest_json(client, document(receiver, {"X-A": "{missing}"})).json()["postbacks"]
    DeliverySettings(unmatched_default="two\r\nlines").save()

    run_worker()

    assert receiver.requests == []
    [attempt] = DeliveryAttempt.objects.filter(postback_id=ids[0])
    assert attempt.outcome == "failed"
    assert "invalid header" in attempt.error


def test_a_sender_may_replace_content_type_user_agent_and_accept(client, receiver):
    headers = {"content-type": "application/vnd.x+json", "User-Agent": "sender/2", "Accept": "text/plain"}
    ingest_json(client, document(receiver, headers, method="POST"))
    run_worker()

    [request] = receiver.requests
    received = {name.lower(): value for name, value in request.headers.items()}
    assert received["content-type"] == "application/vnd.x+json"
    assert received["user-agent"] == "sender/2"
    assert received["accept"] == "text/plain"
    assert request.body == b'{"n":"1"}'
    assert len([name for name in request.headers if name.lower() == "content-type"]) == 1


def test_without_headers_of_the_sender_the_products_defaults_go(client, receiver):
    ingest_json(client, document(receiver, {}, method="POST"))
    run_worker()
    [request] = receiver.requests
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == "postback-delivery/1.0"


def test_signed_postbacks_carry_the_senders_headers_and_verify(client, receiver):
    secret = SigningSecret.objects.create(label="test")
    DeliverySettings(sign_postbacks=True).save()
    ingest_json(client, document(receiver, {"Authorization": "Bearer t", "Content-Type": "text/plain"}, method="POST"))
    run_worker()

    [request] = receiver.requests
    assert request.headers["Authorization"] == "Bearer t"
    assert request.headers["Content-Type"] == "text/plain"
    Webhook(secret.secret).verify(request.body, request.headers)  # raises if it does not verify


def test_the_products_own_headers_win_over_a_senders_of_the_same_name():
    """Ingestion refuses these names; the merge point stands for tries it did not check."""
    request = Request(
        postback_id="p-0",
        attempt=3,
        method="POST",
        url="http://x/",
        body=b"{}",
        headers=("webhook-id: p-0",),
        sender_headers=(("x-postback-id", "forged"), ("Webhook-Id", "forged"), ("Content-Type", "text/csv")),
    )
    lines = header_lines(request, with_body=True)

    assert lines == [
        "X-Postback-Id: p-0",
        "X-Postback-Attempt: 3",
        "Expect:",
        "webhook-id: p-0",
        "Content-Type: text/csv",
    ]


def test_the_merge_sends_an_empty_value_and_utf8_as_libcurl_needs():
    request = Request("p-0", 1, "GET", "http://x/", None, sender_headers=(("X-Empty", ""), ("X-U", "é")))
    assert header_lines(request, with_body=False)[-2:] == ["X-Empty;", "X-U: é".encode()]


def test_retries_send_the_same_headers(client, receiver):
    DeliverySettings(backoff_base_seconds=60).save()
    receiver.answer(Reply(503), Reply(200))
    [pid] = ingest_json(client, document(receiver, {"X-Token": "t-{n}"})).json()["postbacks"]

    run_worker()
    [(retry, _)] = scheduled_retries()
    assert retry.headers == (("X-Token", "t-1"),)
    deliver_everything()

    assert [request.headers["X-Token"] for request in receiver.requests] == ["t-1", "t-1"]
    assert [request.headers["X-Postback-Attempt"] for request in receiver.requests] == ["1", "2"]
    assert [row.outcome for row in DeliveryAttempt.objects.filter(postback_id=pid).order_by("attempt")] == [
        "retry",
        "success",
    ]


# --- recorded, shown, replayed ---------------------------------------------------------------


def test_headers_are_recorded_with_the_request_and_their_names_in_the_log_line(client, receiver, caplog):
    with caplog.at_level("INFO", logger="delivery.attempts"):
        [pid] = ingest_json(client, document(receiver, {"Authorization": "Bearer {n}", "X-B": "b"})).json()["postbacks"]
        run_worker()

    assert PostbackRequest.objects.get(postback_id=pid).headers == {"Authorization": "Bearer 1", "X-B": "b"}
    [line] = [json.loads(record.getMessage()) for record in caplog.records if record.name == "delivery.attempts"]
    assert line["header_names"] == ["Authorization", "X-B"]
    assert "Bearer 1" not in json.dumps(line)


def test_a_postback_without_headers_records_none(client, receiver):
    [pid] = ingest_json(client, document(receiver, {})).json()["postbacks"]
    run_worker()
    assert PostbackRequest.objects.get(postback_id=pid).headers == {}


def test_the_postback_page_shows_the_senders_headers(client, receiver):
    [pid] = ingest_json(client, document(receiver, {"X-Who": "<b>{n}</b>"})).json()["postbacks"]
    run_worker()
    client.force_login(User.objects.create_user("analyst", password="a-long-test-password"))

    page = client.get(f"/dashboard/postbacks/{pid}/").content.decode()

    assert "<h2>Sender's headers</h2>" in page
    assert '<div class="scroll-x">\n    <table class="numbers sender-headers" id="sender-headers">' in page
    assert "<code>X-Who</code>" in page
    assert "&lt;b&gt;1&lt;/b&gt;" in page  # escaped, as anything a sender wrote


def test_admins_attempt_page_shows_the_senders_headers(client, receiver):
    [pid] = ingest_json(client, document(receiver, {"X-Who": "w-{n}"})).json()["postbacks"]
    run_worker()
    client.force_login(User.objects.create_superuser("admin", "a@example.com", "a-long-test-password"))
    attempt = DeliveryAttempt.objects.get(postback_id=pid)

    page = client.get(f"/admin/delivery/deliveryattempt/{attempt.pk}/change/").content.decode()

    assert "sender&#x27;s headers" in page.lower()
    assert '<table id="sender-headers"><tr><th>X-Who</th><td>w-1</td></tr></table>' in page


def test_a_replay_sends_the_same_headers_again(client, receiver):
    receiver.answer(Reply(404))
    [pid] = ingest_json(client, document(receiver, {"X-Token": "t-{n}"})).json()["postbacks"]
    deliver_everything()
    DeliverySettings(unmatched_default="changed").save()

    assert replay([pid]) == 1
    deliver_everything()

    first, again = receiver.requests
    assert again.headers["X-Token"] == first.headers["X-Token"] == "t-1"
    assert again.headers["X-Postback-Attempt"] == "2"


# --- the shapes that travel through Redis ------------------------------------------------------


def test_a_try_carries_its_headers_as_an_eighth_field_after_its_sender():
    item = Try("p-0", 1, 0, "GET", "http://x/", None, "", (("X-A", "1"),))
    fields = json.loads(item.to_json())

    assert fields == ["p-0", 1, 0, "GET", "http://x/", None, "", {"X-A": "1"}]
    assert Try.from_fields(fields) == item


def test_a_traced_try_carries_its_headers_then_its_trace():
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    item = Try("p-0", 1, 0, "GET", "http://x/", None, "key 1", (("X-A", "1"),), traceparent)
    fields = json.loads(item.to_json())

    assert fields == ["p-0", 1, 0, "GET", "http://x/", None, "key 1", {"X-A": "1"}, traceparent]
    assert Try.from_fields(fields) == item


def test_the_traceparent_the_product_sends_wins_over_a_senders():
    ours = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request = Request(
        "p-0", 1, "GET", "http://x/", None, sender_headers=(("Traceparent", "00-theirs-01"),), traceparent=ours
    )

    assert [line for line in header_lines(request, False) if str(line).lower().startswith("traceparent")] == [
        f"traceparent: {ours}"
    ]


@pytest.mark.parametrize(
    "fields",
    [
        ["p-0", 2, 1, "GET", "http://x/", None],
        ["p-0", 2, 1, "GET", "http://x/", None, "key 1"],
        ["p-0", 2, 1, "GET", "http://x/", None, "key 1", {}],
        ["p-0", 2, 1, "GET", "http://x/", None, "key 1", {"X-A": "1"}, "00-trace-later-01"],
    ],
)
def test_tries_of_every_shape_are_read(fields):
    item = Try.from_fields(fields)
    assert (item.postback_id, item.attempt, item.sender) == ("p-0", 2, "key 1" if len(fields) > 6 else "")
    assert item.headers == ((("X-A", "1"),) if len(fields) == 9 else ())


@pytest.mark.parametrize(
    "fields",
    [
        ["p-0", 2, 1, "GET", "http://x/", None, "", ["X-A: 1"]],
        ["p-0", 2, 1, "GET", "http://x/", None, "", {"X-A": 1}],
        ["p-0", 2, 1, "GET", "http://x/", None, "", {}, {"not": "text"}],
        ["p-0", 2, 1, "GET", "http://x/", None, "", {}, "", "tenth"],
    ],
)
def test_tries_not_shaped_as_ours_are_refused(fields):
    with pytest.raises(ValueError):
        Try.from_fields(fields)


def test_a_tries_entry_with_a_header_no_sender_may_send_is_refused():
    payload = json.dumps([["p-0", 1, 0, "GET", "http://x/", None, "", {"Host": "evil"}]]).encode()
    with pytest.raises(ValueError):
        entries.read_entry(inbox.Entry("1-0", "t", payload))


def test_request_entries_keep_their_positions():
    assert json.loads(inbox.request_entries("r", "GET", "http://x/", ["{}"], 10)[0]) == [
        "r",
        0,
        "GET",
        "http://x/",
        [{}],
    ]
    [with_sender] = inbox.request_entries("r", "GET", "http://x/", ["{}"], 10, "key 1")
    assert json.loads(with_sender)[5:] == ["key 1"]
    [without_sender] = inbox.request_entries("r", "GET", "http://x/", ["{}"], 10, "", {"X-A": "{n}"})
    assert json.loads(without_sender)[5:] == ["", {"X-A": "{n}"}]


@pytest.mark.parametrize(
    "document",
    [
        ["r", 0, "GET", "http://x/?n={n}", [{"n": "1"}]],
        ["r", 0, "GET", "http://x/?n={n}", [{"n": "1"}], "key 1"],
        ["r", 0, "GET", "http://x/?n={n}", [{"n": "1"}], "", {"X-N": "n={n}"}],
    ],
)
def test_request_entries_of_every_shape_are_read(document):
    read = entries.read_request(document, 100)
    [item] = read.take(DeliverySettings(), 1.0).tries
    assert item.headers == ((("X-N", "n=1"),) if len(document) == 7 else ())


@pytest.mark.parametrize("headers", [{"Host": "evil"}, {"X-A": "a\r\nb"}, ["X-A"], {"X-A": 1}])
def test_a_request_entry_with_headers_ingestion_would_refuse_is_refused(headers):
    with pytest.raises(ValueError):
        entries.read_request(["r", 0, "GET", "http://x/", [{}], "", headers], 100)


# --- the header templates' lengths, told without rendering ---------------------------------

HEADER_TEXT = st.text(alphabet=st.sampled_from("ab é\U0001f600{}\t/%"), max_size=20)
HEADER_VALUES = st.one_of(st.text(max_size=10).map(str), st.integers().map(lambda n: JsonNumber(str(n))))


# Generating the objects is slow on a busy machine: that is not the property under test.
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    values=st.lists(HEADER_TEXT, min_size=1, max_size=4),
    objects=st.lists(
        st.dictionaries(st.sampled_from(["a", "b", "c"]), st.one_of(st.none(), st.booleans(), HEADER_VALUES)),
        min_size=1,
        max_size=4,
    ),
)
def test_header_lengths_told_ahead_are_the_lengths_rendered_and_never_above_the_bound(values, objects):
    templates = templates_of({f"X-{n}": value for n, value in enumerate(values)})
    value_bytes = sum(len(dumps_data_object(item).encode()) for item in objects)
    total = 0
    for item in objects:
        rendered = templates.render(item, "dé")
        length = sum(len(name.encode()) + len(value.encode()) for name, value in rendered)
        assert templates.rendered_bytes(item, "dé") == length
        total += length
    assert total <= templates.all_bound(len(objects), value_bytes, "dé")
