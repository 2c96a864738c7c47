"""Parse and validate an ingest request body into an endpoint and its data objects.

Every problem raises InvalidRequest naming the field, so the sender can fix it; nothing here
can raise anything else for any input.
"""

import re
from dataclasses import dataclass
from functools import lru_cache

from postbackproject.endpoints import InvalidEndpoint, check_authority, split_url
from postbackproject.headers import HeaderProblem, HeaderTemplates, has_control, templates_of
from postbackproject.postback import (
    METHODS,
    METHODS_WITH_BODY,
    DataObject,
    JsonNumber,
    dumps_data_object,
    loads_keeping_numbers,
)
from postbackproject.templating import Template, all_urls_bound, always_fits, compile_template, rendered_length

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
    url: str  # the URL template as delivery renders it (any fragment dropped: never sent)
    data_texts: list[str]  # each data object as compact JSON, ready for the queue
    headers: dict[str, str] | None = None  # the sender's header templates (`endpoint.headers`)


@dataclass(frozen=True)
class Limits:
    """What a request may ask for: objects per request, placeholders in its template, the URL
    each object renders to, and the bytes all of them render to (URLs and bodies)."""

    max_data_objects: int
    max_url_bytes: int
    unmatched_default: str
    max_placeholders: int
    max_rendered_bytes: int


def parse_body(body: bytes, limits: Limits) -> IngestRequest:
    document = _parse_json(body)
    if not isinstance(document, dict):
        raise InvalidRequest(None, "body must be a JSON object with 'endpoint' and 'data'")
    endpoint = document.get("endpoint")
    if not isinstance(endpoint, dict):
        raise InvalidRequest("endpoint", "must be an object with 'method' and 'url'")
    method = _validate_method(endpoint.get("method"))
    template = _validate_url(endpoint.get("url"), limits.max_placeholders)
    headers = _validate_headers(endpoint.get("headers", {}), template, limits.max_placeholders)
    objects = _validate_data(document.get("data"), limits.max_data_objects)
    _check_header_values(objects, headers)
    data_texts = [_data_text(index, item) for index, item in enumerate(objects)]
    body_bytes = _utf8_length(data_texts) if method in METHODS_WITH_BODY else 0
    _check_rendered_sizes(body, template, headers, objects, body_bytes, limits)
    return IngestRequest(method, template.text, data_texts, dict(headers.items) or None)


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
    # ASCII letters only: str.upper() turns the long s (U+017F) into S, U+FB05 and U+FB06 into ST.
    if not isinstance(method, str) or not method.isascii() or method.upper() not in METHODS:
        raise InvalidRequest("endpoint.method", f"must be one of {', '.join(sorted(METHODS))}")
    return method.upper()


def _validate_url(url: object, max_placeholders: int) -> Template:
    """The template, if every URL it can render to can be sent and it holds no more than
    max_placeholders placeholders. A host with placeholders is checked once rendered, at
    delivery; every other host and port are checked here."""
    if not isinstance(url, str) or isinstance(url, JsonNumber) or not url:
        raise InvalidRequest("endpoint.url", "must be a non-empty string")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRequest("endpoint.url", f"must be at most {MAX_URL_LENGTH} characters")
    if not _is_utf8_encodable(url) or _SPACE_OR_CONTROL.search(url):
        raise InvalidRequest("endpoint.url", "must not contain spaces or control characters")
    try:
        template = checked_template(url)
    except InvalidEndpoint as exc:
        raise InvalidRequest("endpoint.url", str(exc)) from exc
    if template.placeholders > max_placeholders:
        raise InvalidRequest(
            "endpoint.url",
            f"has {template.placeholders} placeholders; at most {max_placeholders} are accepted "
            f"(INGEST_MAX_PLACEHOLDERS is {max_placeholders})",
        )
    return template


def _validate_headers(headers: object, template: Template, max_placeholders: int) -> HeaderTemplates:
    """The sender's headers (`postbackproject.headers` has the rules), whose placeholders count
    with the URL's against max_placeholders."""
    try:
        checked = templates_of(headers if headers is not None else [])  # null is no object either
    except HeaderProblem as exc:
        raise InvalidRequest(exc.field, exc.message) from exc
    if checked.placeholders and template.placeholders + checked.placeholders > max_placeholders:
        raise InvalidRequest(
            "endpoint.headers",
            f"has {checked.placeholders} placeholders, and the URL {template.placeholders}; at most "
            f"{max_placeholders} are accepted in all (INGEST_MAX_PLACEHOLDERS is {max_placeholders})",
        )
    return checked


def _check_header_values(objects: list[DataObject], headers: HeaderTemplates) -> None:
    """400 naming the first value a header would take that cannot stand in a header line."""
    for index, item in enumerate(objects if headers.uses else ()):
        for name in headers.uses:
            value = item.get(name)
            if isinstance(value, str) and has_control(value):
                raise InvalidRequest(
                    f"data[{index}].{name}",
                    "fills a placeholder of endpoint.headers, and a header value cannot hold CR, LF, NUL "
                    "or other control characters",
                )


@lru_cache(maxsize=1024)
def checked_template(url: str) -> Template:
    """A template whose host and port can be sent to (senders repeat theirs: cached)."""
    template = compile_template(url)
    if not template.host_has_placeholders:
        check_authority(split_url(template.text).authority)
    return template


def _check_rendered_sizes(
    body: bytes,
    template: Template,
    headers: HeaderTemplates,
    objects: list[DataObject],
    body_bytes: int,
    limits: Limits,
) -> None:
    """400 naming the first object whose URL would pass max_url_bytes, or the request when its
    URLs, headers and bodies together would pass max_rendered_bytes. Both are told from each
    value's encoded length, without rendering; most requests pass on bounds, with no look at each
    object (no value takes more than 4 bytes a character in UTF-8, nor more bytes than the body)."""
    longest_value = min(len(body), 4 * _longest_value_characters(objects))
    default = limits.unmatched_default
    if always_fits(template, longest_value, default, limits.max_url_bytes) and (
        body_bytes
        + all_urls_bound(template, len(objects), len(body), default)
        + headers.all_bound(len(objects), len(body), default)
        <= limits.max_rendered_bytes
    ):
        return
    total = body_bytes
    for index, item in enumerate(objects):
        total += _checked_rendered_length(index, template, item, limits)
        if headers.items:
            total += headers.rendered_bytes(item, default)
    if total > limits.max_rendered_bytes:
        raise InvalidRequest(
            "data",
            f"the postbacks of this request would be {total} bytes once rendered (URLs, headers and bodies); "
            f"at most {limits.max_rendered_bytes} are accepted per request "
            f"(INGEST_MAX_RENDERED_BYTES is {limits.max_rendered_bytes})",
        )


def _longest_value_characters(objects: list[DataObject]) -> int:
    return max((len(value) for item in objects for value in item.values() if isinstance(value, str)), default=0)


def _checked_rendered_length(index: int, template: Template, item: DataObject, limits: Limits) -> int:
    length = rendered_length(template, item, limits.unmatched_default)
    if length > limits.max_url_bytes:
        raise InvalidRequest(
            f"data[{index}]",
            f"the URL for this object would be {length} bytes; at most {limits.max_url_bytes} are sent "
            "(setting max_url_bytes)",
        )
    return length


def _validate_data(data: object, max_data_objects: int) -> list[DataObject]:
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
    return data  # values checked above


def _data_text(index: int, item: DataObject) -> str:
    text = dumps_data_object(item)
    if not _is_utf8_encodable(text):
        raise InvalidRequest(f"data[{index}]", "contains an unpaired UTF-16 surrogate escape")
    return text


def _utf8_length(texts: list[str]) -> int:
    """Bytes of these texts in UTF-8 (as bodies are sent), in one C call for all of them."""
    return len("".join(texts).encode())


def _is_utf8_encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
