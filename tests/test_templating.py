"""URL rendering and the number-preserving data encoding (pure functions)."""

import re
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postbackproject.postback import JsonNumber, dumps_data_object, loads_data_object, loads_keeping_numbers
from postbackproject.templating import (
    PLACEHOLDER,
    all_urls_bound,
    always_fits,
    compile_template,
    encode_value,
    render_url,
    rendered_length,
    wire_url,
)

SAMPLE = "http://sample_domain_endpoint.com/data?key={key}&value={value}&foo={bar}"


def test_it_renders_the_sample_with_an_empty_default():
    data = {"key": "Azureus", "value": "Dendrobates"}
    assert render_url(SAMPLE, data, "") == "http://sample_domain_endpoint.com/data?key=Azureus&value=Dendrobates&foo="


def test_it_percent_encodes_values_as_a_whole():
    template = "http://sample_domain_endpoint.com/data?title={mascot}&image={location}&foo={bar}"
    data = {"mascot": "Gopher", "location": "https://blog.golang.org/gopher/gopher.png"}
    assert render_url(template, data, "") == (
        "http://sample_domain_endpoint.com/data?title=Gopher"
        "&image=https%3A%2F%2Fblog.golang.org%2Fgopher%2Fgopher.png&foo="
    )


def test_it_replaces_in_one_pass():
    data = {"a": "{b}", "b": "x"}
    assert render_url("http://h/{a}/{b}", data, "") == "http://h/%7Bb%7D/x"


def test_it_writes_numbers_as_written_and_booleans_in_lowercase():
    data = loads_data_object('{"n":1.50,"e":1e5,"i":-0,"t":true,"f":false}')
    assert (
        render_url("http://h/?n={n}&e={e}&i={i}&t={t}&f={f}", data, "") == "http://h/?n=1.50&e=1e5&i=-0&t=true&f=false"
    )


def test_null_and_missing_take_the_default_encoded():
    data = loads_data_object('{"gone":null}')
    assert render_url("http://h/{gone}/{missing}", data, "n/a") == "http://h/n%2Fa/n%2Fa"


def test_placeholders_work_in_the_path_and_encode_unicode_as_utf8():
    assert render_url("http://h/users/{id}/x", {"id": "é 1"}, "") == "http://h/users/%C3%A9%201/x"


def test_data_objects_round_trip_with_numbers_untouched():
    text = dumps_data_object(loads_keeping_numbers('{"a": 1.0, "b": "é", "c": null, "d": 12345678901234567890}'))  # type: ignore[arg-type]
    assert text == '{"a":1.0,"b":"é","c":null,"d":12345678901234567890}'
    assert loads_data_object(text)["d"] == JsonNumber("12345678901234567890")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_constants_are_refused(constant):
    with pytest.raises(ValueError):
        loads_keeping_numbers(f'{{"a": {constant}}}')


# --- what is recorded is what is sent ------------------------------------------------------


@pytest.mark.parametrize(("value", "segment"), [(".", "%2E"), ("..", "%2E%2E"), ("...", "..."), (".a", ".a")])
def test_a_value_can_never_be_a_dot_segment(value, segment):
    assert render_url("http://h/a/{v}/b", {"v": value}, "") == f"http://h/a/{segment}/b"


def test_escapes_in_the_template_go_out_as_written():
    assert render_url("http://h/p%41th/%2e%2E?q=%zz", {}, "") == "http://h/p%41th/%2e%2E?q=%zz"


def test_a_fragment_is_never_part_of_the_url_sent():
    assert render_url("http://h/f?a={a}#part-{a}", {"a": "x#y"}, "") == "http://h/f?a=x%23y"
    assert compile_template("http://h/{a#b}/x#frag").text == "http://h/{a#b}/x"


def test_a_non_ascii_host_goes_out_in_its_idna_2008_form():
    assert render_url("http://Bücher.example/faß", {}, "") == "http://xn--bcher-kva.example/fa%C3%9F"
    assert render_url("http://faß.de/", {}, "") == "http://xn--fa-hia.de/"  # IDNA 2003 would send fass.de


# --- properties ----------------------------------------------------------------------------

# Values with every character class that matters: delimiters, escapes, dots, braces naming
# other placeholders, non-ASCII, and text that looks like an escape.
VALUES = st.one_of(
    st.text(),
    st.sampled_from([".", "..", "{a}", "{b}", "%41", "%", "/", "?", "#", "&", "=", "é", "\U0001f600", ""]),
    st.lists(st.sampled_from([".", "/", "{", "}", "a", "%", "é", "b}"]), max_size=8).map("".join),
)
TEMPLATE = "http://h.example/x/{a}/{b}?q={a}&r={b}"


@settings(max_examples=500, deadline=None)
@given(a=VALUES, b=st.one_of(st.none(), VALUES), default=VALUES)
def test_each_value_decodes_back_and_is_substituted_once(a, b, default):
    url = render_url(TEMPLATE, {"a": a, "b": b}, default)
    parts = urlsplit(url)
    b_text = default if b is None else b
    assert url.isascii() and (parts.scheme, parts.netloc) == ("http", "h.example")
    assert parts.path.split("/")[1:] == ["x", encoded(a), encoded(b_text)]  # no segment added or removed
    assert [unquote(segment) for segment in parts.path.split("/")[2:]] == [a, b_text]
    assert parse_qsl(parts.query, keep_blank_values=True) == [("q", a), ("r", b_text)]
    assert len(url) == rendered_length(compile_template(TEMPLATE), {"a": a, "b": b}, default)


def encoded(value: str) -> str:
    return value.replace(".", "%2E") if value in (".", "..") else quote(value, safe="-._~")


@settings(max_examples=300, deadline=None)
@given(
    path=st.text(alphabet=st.sampled_from("/ab.%é{}?#&=x y"), max_size=30),
    data=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.one_of(st.none(), st.booleans(), VALUES), max_size=3),
)
def test_the_length_told_ahead_is_the_length_rendered(path, data):
    template = compile_template(f"http://h.example/{path}")
    assert len(render_url(template.text, data, "d/ef")) == rendered_length(template, data, "d/ef")


@settings(max_examples=300, deadline=None)
@given(
    path=st.text(alphabet=st.sampled_from("/ab.%é{}?#&=x y"), max_size=30),
    data=st.dictionaries(st.sampled_from(["a", "b", "c"]), VALUES, max_size=3),
    cap=st.integers(min_value=20, max_value=400),
)
def test_a_template_said_always_to_fit_never_renders_past_the_cap(path, data, cap):
    template = compile_template(f"http://h.example/{path}")
    longest = max((len(value.encode()) for value in data.values()), default=0)
    if always_fits(template, longest, "d/ef", cap):
        assert len(render_url(template.text, data, "d/ef")) <= cap


@settings(max_examples=300, deadline=None)
@given(
    path=st.text(alphabet=st.sampled_from("/ab.%é{}?#&=x y"), max_size=30),
    objects=st.lists(
        st.dictionaries(st.sampled_from(["a", "b", "c"]), st.one_of(st.none(), st.booleans(), VALUES), max_size=3),
        min_size=1,
        max_size=4,
    ),
)
def test_the_bound_on_all_urls_is_never_below_what_they_render_to(path, objects):
    template = compile_template(f"http://h.example/{path}")
    value_bytes = sum(len(dumps_data_object(item).encode()) for item in objects)
    rendered = sum(len(render_url(template.text, item, "d/ef")) for item in objects)
    assert rendered <= all_urls_bound(template, len(objects), value_bytes, "d/ef")


def render_whole(template: str, data: dict[str, str | bool | None], default: str) -> str:
    """Rendering as the contract defines it: substitute in one pass, then quote the whole URL."""

    def substitute(match: re.Match[str]) -> str:
        value = data.get(match.group(1))
        text = default if value is None else ("true" if value is True else "false" if value is False else value)
        return encode_value(text)

    return wire_url(PLACEHOLDER.sub(substitute, compile_template(template).text))


@settings(max_examples=500, deadline=None)
@given(
    host=st.sampled_from(["h.example", "bücher.example", "{h}.example", "u:p@h.example:8080", "[::1]"]),
    path=st.text(alphabet=st.sampled_from("/ab.%é\U0001f600{}?#&=x y[]"), max_size=30),
    data=st.dictionaries(st.sampled_from(["a", "b", "h"]), st.one_of(st.none(), st.booleans(), VALUES), max_size=3),
)
def test_rendering_piece_by_piece_is_substituting_then_quoting_the_whole_url(host, path, data):
    template = f"http://{host}/{path}"
    assert render_url(template, data, "d/é") == render_whole(template, data, "d/é")
