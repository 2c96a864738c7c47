"""Parse and validate an ingest request body into an endpoint and its data objects.

Every problem raises InvalidRequest naming the field, so the sender can fix it; nothing here
can raise anything else for any input.
"""

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from postbackproject.postback import METHODS, JsonNumber, dumps_data_object, loads_keeping_numbers

MAX_URL_LENGTH = 8192
# Python's \s is exactly str.isspace(): Unicode white space as well as ASCII.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")


class InvalidRequest(Exception):
    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


@dataclass(frozen=True)
class IngestRequest:
    method: str
    url: str
    data_texts: list[str]  # each data object as compact JSON, ready for the queue


def parse_body(body: bytes, max_data_objects: int) -> IngestRequest:
    document = _parse_json(body)
    if not isinstance(document, dict):
        raise InvalidRequest(None, "body must be a JSON object with 'endpoint' and 'data'")
    endpoint = document.get("endpoint")
    if not isinstance(endpoint, dict):
        raise InvalidRequest("endpoint", "must be an object with 'method' and 'url'")
    return IngestRequest(
        method=_validate_method(endpoint.get("method")),
        url=_validate_url(endpoint.get("url")),
        data_texts=_validate_data(document.get("data"), max_data_objects),
    )


def _parse_json(body: bytes) -> object:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(None, f"body is not UTF-8 (byte {exc.start})") from exc
    if not text.strip():
        raise InvalidRequest(None, "body is empty; send the postback as raw JSON")
    try:
        return loads_keeping_numbers(text)
    except RecursionError as exc:
        raise InvalidRequest(None, "body is nested too deeply") from exc
    except ValueError as exc:  # json.JSONDecodeError, NaN/Infinity
        raise InvalidRequest(None, f"body is not valid JSON: {exc}") from exc


def _validate_method(method: object) -> str:
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise InvalidRequest("endpoint.method", f"must be one of {', '.join(sorted(METHODS))}")
    return method.upper()


def _validate_url(url: object) -> str:
    if not isinstance(url, str) or isinstance(url, JsonNumber) or not url:
        raise InvalidRequest("endpoint.url", "must be a non-empty string")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRequest("endpoint.url", f"must be at most {MAX_URL_LENGTH} characters")
    if not _is_utf8_encodable(url) or _SPACE_OR_CONTROL.search(url):
        raise InvalidRequest("endpoint.url", "must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidRequest("endpoint.url", f"is not a URL: {exc}") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidRequest("endpoint.url", "must be an absolute http:// or https:// URL")
    if not parts.netloc:
        raise InvalidRequest("endpoint.url", "must name a host")
    return url


def _validate_data(data: object, max_data_objects: int) -> list[str]:
    if not isinstance(data, list) or not data:
        raise InvalidRequest("data", "must be a non-empty list of objects")
    if len(data) > max_data_objects:
        raise InvalidRequest("data", f"has {len(data)} objects; at most {max_data_objects} are accepted per request")
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise InvalidRequest(f"data[{index}]", "must be an object")
        for key, value in item.items():
            if not (value is None or isinstance(value, (str, bool))):
                raise InvalidRequest(f"data[{index}].{key}", "must be a string, number, boolean or null")
    return [_data_text(index, item) for index, item in enumerate(data)]


def _data_text(index: int, item: dict[str, object]) -> str:
    text = dumps_data_object(item)  # type: ignore[arg-type]  # values checked above
    if not _is_utf8_encodable(text):
        raise InvalidRequest(f"data[{index}]", "contains an unpaired UTF-16 surrogate escape")
    return text


def _is_utf8_encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
