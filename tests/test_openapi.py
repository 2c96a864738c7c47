"""The published ingest API: docs/openapi.yaml, served at /openapi.yaml, is valid OpenAPI 3.1
and states the limits the code enforces."""

import re
from typing import Any

import pytest
import yaml
from django.conf import settings
from openapi_spec_validator import validate

from ingestion.validation import MAX_URL_LENGTH
from ingestion.views import OPENAPI_DOCUMENT
from postbackproject.postback import METHODS


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(OPENAPI_DOCUMENT.read_text())
    return loaded


@pytest.mark.django_db
def test_the_document_is_served_to_anyone_as_yaml_and_is_valid_openapi_3_1(client):
    response = client.get("/openapi.yaml")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/yaml"
    assert response.content == OPENAPI_DOCUMENT.read_bytes()
    served = yaml.safe_load(response.content)
    assert served["openapi"].startswith("3.1.")
    validate(served)
    assert set(served["paths"]) == {"/ingest.php", "/i"}
    assert client.post("/openapi.yaml").status_code == 405


def test_the_document_states_the_limits_the_code_enforces():
    schemas = document()["components"]["schemas"]
    assert schemas["IngestRequest"]["properties"]["data"]["maxItems"] == settings.INGEST_MAX_DATA_OBJECTS
    url = schemas["Endpoint"]["properties"]["url"]
    assert url["maxLength"] == MAX_URL_LENGTH
    template = re.compile(url["pattern"])
    assert template.fullmatch("HTTPs://h/{x}") and not template.fullmatch("ftp://h/")
    for code in [*range(0xD800), *range(0xE000, 0x10000)]:  # no white space or control character past these
        character = chr(code)
        refused = character.isspace() or code < 0x20 or code == 0x7F  # as ingestion refuses them
        assert (template.fullmatch(f"http://h/{character}") is None) == refused, hex(code)
    method = re.compile(schemas["Endpoint"]["properties"]["method"]["pattern"])
    for name in METHODS:
        assert method.fullmatch(name) and method.fullmatch(name.lower()) and method.fullmatch(name.title())
    assert not method.fullmatch("TRACE")
    assert not method.fullmatch("po\u017ft")  # the long s: Python's upper() makes it POST, the code refuses it

    limits = document()["info"]["description"]
    for value in (
        settings.INGEST_MAX_BODY_BYTES,
        settings.INGEST_MAX_DATA_OBJECTS,
        MAX_URL_LENGTH,
        settings.INGEST_MAX_PLACEHOLDERS,
        settings.INGEST_MAX_RENDERED_BYTES,
        settings.INGEST_MAX_QUEUED_JOBS,
    ):
        assert f"| {value:,} |" in limits
