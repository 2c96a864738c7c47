"""Inbox entries read back into tries: good entries as ingestion and the sweep write them, and
hostile ones as anyone who can write to Redis might. Pure: no Redis, no database."""

import contextlib
import json
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from delivery.entries import EntryTries, entry_tries
from delivery.models import DeliverySettings
from postbackproject.inbox import Entry, request_entries
from postbackproject.postback import Try

CONFIG = DeliverySettings(unmatched_default="", max_url_bytes=16384)


@pytest.fixture(autouse=True)
def clean_redis() -> Iterator[None]:
    """These tests need no Redis: the suite's own is not started for them."""
    yield None


def request_entry(method: str, url: str, objects: list[str], first: int = 0) -> Entry:
    [payload] = request_entries("req", method, url, objects[first:], 1000)
    payload = payload.replace('"req",0,', f'"req",{first},', 1)
    return Entry("1-0", "r", payload.encode())


def tries_entry(*tries: Try) -> Entry:
    return Entry("2-0", "t", ("[" + ",".join(item.to_json() for item in tries) + "]").encode())


def test_a_request_entry_gives_one_first_try_per_data_object_with_its_url_filled_in():
    entry = request_entry("GET", "http://h.example/d?k={key}&v={value}&foo={bar}", ['{"key":"a b","value":1.50}', "{}"])

    found = entry_tries(entry, CONFIG)

    assert found == EntryTries(
        [
            Try("req-0", 1, 0, "GET", "http://h.example/d?k=a%20b&v=1.50&foo=", None),
            Try("req-1", 1, 0, "GET", "http://h.example/d?k=&v=&foo=", None),
        ]
    )


def test_a_request_entry_that_starts_further_on_numbers_its_postbacks_from_there():
    entry = request_entry("POST", "http://h.example/", ["{}", '{"n":true}', '{"n":null}'], first=1)

    found = entry_tries(entry, CONFIG)

    assert [(item.postback_id, item.body) for item in found.tries] == [("req-1", '{"n":true}'), ("req-2", '{"n":null}')]


def test_the_unmatched_default_fills_missing_values_and_nulls():
    config = DeliverySettings(unmatched_default="none", max_url_bytes=16384)

    [item] = entry_tries(request_entry("GET", "http://h.example/{a}/{b}", ['{"b":null}']), config).tries

    assert item.url == "http://h.example/none/none"


def test_a_tries_entry_gives_its_tries_back_as_they_were_scheduled():
    retry = Try("p-3", 2, 0, "PUT", "http://h.example/x?q=%2F", '{"a":1e5}')
    replay = Try("p-4", 7, 6, "GET", "http://h.example/y", None)

    assert entry_tries(tries_entry(retry, replay), CONFIG) == EntryTries([retry, replay])


def test_a_url_over_the_limit_is_refused_not_built():
    config = DeliverySettings(unmatched_default="", max_url_bytes=300)
    entry = request_entry("GET", "http://h.example/{v}", [json.dumps({"v": "x" * 400}), '{"v":"short"}'])

    found = entry_tries(entry, config)

    assert found.tries[0].url == "http://h.example/{v}"  # the template: the long URL was never built
    assert found.refused == {"req-0": "the URL would be 417 bytes, over max_url_bytes (300)"}


def test_a_tried_url_over_the_limit_is_refused_too():
    config = DeliverySettings(unmatched_default="", max_url_bytes=300)
    long = Try("p-0", 2, 0, "GET", "http://h.example/" + "q" * 400, None)

    assert list(entry_tries(tries_entry(long), config).refused) == ["p-0"]


def test_a_host_made_of_placeholders_that_is_not_a_host_once_filled_in_is_refused():
    entry = request_entry("GET", "http://{host}/p", ['{"host":"a b"}', '{"host":"ok.example"}'])

    found = entry_tries(entry, CONFIG)

    assert list(found.refused) == ["req-0"] and found.refused["req-0"].startswith("invalid URL")
    assert found.tries[1].url == "http://ok.example/p"


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        ("r", b"not json"),
        ("r", b"\xff\xfe"),
        ("r", b"[NaN]"),
        ("r", b"{}"),
        ("r", b'["abc", 0, "GET", "http://h/"]'),
        ("r", b'["abc", -1, "GET", "http://h/", []]'),
        ("r", b'["abc", 1.5, "GET", "http://h/", []]'),
        ("r", b'["abc", 0, "TRACE", "http://h/", []]'),
        ("r", b'["abc", 0, ["GET"], "http://h/", []]'),
        ("r", b'["abc", 0, {"GET": 1}, "http://h/", []]'),
        ("r", b'["abc", 0, "GET", "ftp://h/", [{}]]'),
        ("r", b'["abc", 0, "GET", "http://h/", {}]'),
        ("r", b'["abc", 0, "GET", "http://h/{x}", [{"x": [1]}]]'),
        ("r", b"[" * 100_000 + b"]" * 100_000),
        ("t", b'{"p-0": 1}'),
        ("t", b'[["p-0", 1, 0, "GET", "http://h/"]]'),
        ("t", b'[["p-0", 1, 1, "GET", "http://h/", null]]'),
        ("t", b'[["p-0", true, 0, "GET", "http://h/", null]]'),
        ("t", b'[["p-0", 1, 0, ["GET"], "http://h/", null]]'),
        ("t", b'[["p-0", 1, 0, "GET", "http://h/", {"not": "text"}]]'),
        ("x", b"[]"),
        ("", b""),
    ],
)
def test_an_entry_not_shaped_as_ours_is_a_value_error(kind, payload):
    with pytest.raises(ValueError):
        entry_tries(Entry("3-0", kind, payload), CONFIG)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300)
@given(kind=st.sampled_from(["r", "t"]), document=JSON)
def test_whatever_json_an_entry_holds_it_gives_tries_or_a_value_error(kind, document):
    try:
        found = entry_tries(Entry("4-0", kind, json.dumps(document).encode()), CONFIG)
    except ValueError:
        return
    assert all(isinstance(item, Try) for item in found.tries)
    assert set(found.refused) <= {item.postback_id for item in found.tries}


@settings(max_examples=300)
@given(
    request_id=st.text(max_size=10) | st.integers(),
    start=st.integers(min_value=-5, max_value=10**20) | st.text(max_size=5),
    method=st.sampled_from(["GET", "POST", "get", "", "TRACE"]) | st.lists(st.text(max_size=3), max_size=2),
    template=st.text(max_size=40) | st.just("http://h.example/{a}?b={b}"),
    objects=st.lists(st.dictionaries(st.sampled_from("ab"), JSON, max_size=2) | JSON, max_size=3),
)
def test_whatever_shape_a_request_entry_has_it_gives_tries_or_a_value_error(
    request_id, start, method, template, objects
):
    payload = json.dumps([request_id, start, method, template, objects]).encode()
    with contextlib.suppress(ValueError):  # anything else (TypeError...) would fail the drainer
        entry_tries(Entry("5-0", "r", payload), CONFIG)
