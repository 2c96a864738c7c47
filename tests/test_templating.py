"""URL rendering and the number-preserving data encoding (pure functions)."""

import pytest

from postbackproject.postback import JsonNumber, dumps_data_object, loads_data_object, loads_keeping_numbers
from postbackproject.templating import render_url

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
