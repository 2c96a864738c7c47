"""Inbox entries read back: the tries each one asks for.

Ingestion writes request entries (`postbackproject.inbox.request_entries`) and the sweep
writes entries of tries that came due. Both come back from Redis, which whoever reaches it
can write, so anything not shaped as we write it raises ValueError, and the drainer sets the
entry aside instead of failing on it. An entry is read and checked whole (`read_entry`) and
its tries made a few at a time (`take`), so that the drainer renders a large request across
turns of its loop.

A postback whose URL cannot be sent (longer than `max_url_bytes` once rendered, or a rendered
host that is not a host) is refused here, before anything is built or sent: the drainer
records a failed attempt for it saying why.
"""

import math
import time
from dataclasses import dataclass, field

from delivery.models import DeliverySettings
from postbackproject import inbox
from postbackproject.endpoints import InvalidEndpoint, check_authority, split_url
from postbackproject.headers import NO_HEADERS, Headers, HeaderTemplates, check_rendered, has_control, templates_of
from postbackproject.postback import (
    METHODS_WITH_BODY,
    DataObject,
    Try,
    dumps_data_object,
    is_method,
    loads_keeping_numbers,
)
from postbackproject.templating import Template, always_fits, compile_template, render_url, rendered_length


@dataclass
class EntryTries:
    """What an entry asks for: tries to send, and those refused (postback id -> why)."""

    tries: list[Try]
    refused: dict[str, str] = field(default_factory=dict)


@dataclass
class RequestEntry:
    """A request entry read and checked, whose first tries are made a few at a time (`take`):
    filling in a request's URLs can take a worker a good part of a second, and the drainer
    takes replies in between."""

    request_id: str
    first: int  # the index of its first postback in the request
    method: str
    template: Template
    objects: list[DataObject]
    payload_bytes: int
    sender: str = ""
    headers: HeaderTemplates = NO_HEADERS
    traceparent: str = ""  # the entry's `tp`: the ingest request's span
    made: int = 0

    @property
    def remaining(self) -> int:
        return len(self.objects) - self.made

    def take(self, config: DeliverySettings, seconds: float) -> EntryTries:
        """First tries for the next objects, made for about `seconds` (at least one)."""
        until = time.perf_counter() + seconds
        fits = always_fits(self.template, self.payload_bytes, config.unmatched_default, config.max_url_bytes)
        with_body = self.method in METHODS_WITH_BODY
        found = EntryTries([])
        while self.made < len(self.objects):
            data = self.objects[self.made]
            postback_id = inbox.postback_id(self.request_id, self.first + self.made)
            self.made += 1
            url, refusal = first_url(self.template, data, config, fits)
            body = dumps_data_object(data) if with_body else None
            headers = self.headers.render(data, config.unmatched_default)
            refusal = refusal or unsendable_headers(headers)
            found.tries.append(Try(postback_id, 1, 0, self.method, url, body, self.sender, headers, self.traceparent))
            if refusal:
                found.refused[postback_id] = refusal
            if time.perf_counter() >= until:
                break
        return found


@dataclass
class TriesEntry:
    """A tries entry read and checked: its tries are made already, and taken all at once."""

    tries: list[Try]
    made: int = 0

    @property
    def remaining(self) -> int:
        return len(self.tries) - self.made

    def take(self, config: DeliverySettings, seconds: float) -> EntryTries:
        tries, self.made = self.tries[self.made :], len(self.tries)
        return EntryTries(tries, {item.postback_id: why for item in tries if (why := too_long(len(item.url), config))})


ReadEntry = RequestEntry | TriesEntry


def read_entry(entry: inbox.Entry) -> ReadEntry:
    """An entry's payload read and checked whole, its tries still to make: a request's first
    tries, or tries that came due. ValueError when it is not shaped as ours."""
    try:
        document = loads_keeping_numbers(entry.payload)
    except RecursionError as exc:
        raise ValueError("entry nested too deeply") from exc
    if entry.kind == "t":
        if not isinstance(document, list):
            raise ValueError("a tries entry is a list")
        tries = [Try.from_fields(fields) for fields in document]
        for item in tries:
            check_rendered(item.headers)
        return TriesEntry(tries)
    if entry.kind == "r":
        request = read_request(document, len(entry.payload))
        request.traceparent = entry.traceparent
        return request
    raise ValueError(f"unknown entry kind {entry.kind!r}")


def entry_tries(entry: inbox.Entry, config: DeliverySettings) -> EntryTries:
    """Every try an entry asks for, made at once."""
    return read_entry(entry).take(config, math.inf)


def read_request(document: object, payload_bytes: int) -> RequestEntry:
    """A request entry `[request id, first index, method, URL template, [objects]]`, with its
    sender as a sixth field and its sender's header templates (an object) as a seventh when it
    has them (its JSON text `payload_bytes` long), checked whole before any of its tries is made."""
    if not isinstance(document, list) or len(document) not in (5, 6, 7):
        raise ValueError("a request entry has five fields, six with its sender, seven with its headers")
    request_id, start, method, template, objects = document[:5]
    sender = document[5] if len(document) > 5 else ""
    headers = document[6] if len(document) > 6 else None
    if not isinstance(sender, str):
        raise ValueError("a request entry's sender is text")
    if not isinstance(request_id, str) or not str(start).isdigit() or not is_method(method):
        raise ValueError("a request entry starts with its id, first index and method")
    if not isinstance(template, str) or not isinstance(objects, list):
        raise ValueError("a request entry ends with its URL template and data objects")
    try:
        compiled = compile_template(template)
    except InvalidEndpoint as exc:
        raise ValueError(f"a request entry's URL template cannot be sent: {exc}") from exc
    for data in objects:
        check_data_object(data)
    header_templates = templates_of(headers)  # a HeaderProblem is a ValueError
    return RequestEntry(request_id, int(start), method, compiled, objects, payload_bytes, sender, header_templates)


def check_data_object(data: object) -> None:
    """ValueError unless `data` maps names to scalars whose text can be sent (UTF-8: a lone
    surrogate escape, which ingestion refuses, cannot be)."""
    if not isinstance(data, dict) or not all(v is None or isinstance(v, (str, bool)) for v in data.values()):
        raise ValueError("a data object maps names to strings, numbers, booleans or null")
    for text in (*data, *(v for v in data.values() if isinstance(v, str))):
        if not text.isascii():
            text.encode()  # UnicodeEncodeError is a ValueError


def first_url(template: Template, data: DataObject, config: DeliverySettings, fits: bool) -> tuple[str, str]:
    """The URL to send a postback to, and why it must not be sent (empty when it may).

    Ingestion checked both already, with the settings of the time; these checks stand for
    entries it did not write, and settings that changed since. Unless the template always
    `fits`, the length is computed first: a URL too long is not built, and the refused try
    carries its template instead.
    """
    if not fits and (why := too_long(rendered_length(template, data, config.unmatched_default), config)):
        return template.text, why
    url = template.text
    try:
        url = render_url(template.text, data, config.unmatched_default)
        if template.host_has_placeholders:
            check_authority(split_url(url).authority)
    except InvalidEndpoint as exc:
        return url, f"invalid URL: {exc}"
    return url, ""


def unsendable_headers(headers: Headers) -> str:
    """Why a postback's rendered headers must not be sent (a value ingestion checked may still
    take the unmatched default, or come from an entry it did not write); empty when they may."""
    for name, value in headers:
        if has_control(value):
            return f"invalid header: {name}'s value holds a control character (CR, LF, NUL...)"
    return ""


def too_long(length: int, config: DeliverySettings) -> str:
    """Why a URL of this many bytes is not sent; empty when it may be."""
    if length <= config.max_url_bytes:
        return ""
    return f"the URL would be {length} bytes, over max_url_bytes ({config.max_url_bytes})"
