"""Headers from senders: the rules for `endpoint.headers`, and its templates.

A sender may add headers to its postbacks: names to values, the values templates like the
URL (`render_text`: the same placeholders, as plain text). Ingestion refuses what the product
must decide itself (docs/security.md, "Headers from senders"):

- hop-by-hop and framing headers (Host, Content-Length, Transfer-Encoding, Connection, ...):
  they would let a sender split or smuggle requests, or steer the connection libcurl reuses;
- the product's own (`X-Postback-*`, `webhook-*`): receivers deduplicate and verify by them;
- names that are not RFC 7230 tokens, and control characters (CR, LF, NUL...) in a name or a
  value: a header line must stay one line;
- more than MAX_HEADERS headers, or more than MAX_HEADER_BYTES of names and values.

Both ingest paths (`/ingest.php` and `/i`) read the body with `ingestion.validation`, which
checks with `templates_of`; delivery checks again what it reads from Redis (`templates_of` for
a request entry, `check_rendered` for a try) and sends them through one merge point
(`delivery.transport.header_lines`).
"""

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from postbackproject.postback import JsonNumber, Scalar
from postbackproject.templating import TextTemplate, compile_text, render_text, text_rendered_bytes

MAX_HEADERS = 32
MAX_HEADER_BYTES = 8 * 1024  # names and values, in UTF-8, as the sender wrote them
FIELD = "endpoint.headers"

# Hop-by-hop (RFC 9110 7.6.1) and framing headers, and those libcurl itself must set.
REFUSED_NAMES = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "trailers",
        "upgrade",
        "expect",
    }
)
# Proxy-* (hop-by-hop), and the product's own headers.
REFUSED_PREFIXES = ("proxy-", "x-postback-", "webhook-")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A header line must stay one line: no control character but the tab (RFC 9110 5.5).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

Headers = tuple[tuple[str, str], ...]  # names and values, in the sender's order


class HeaderProblem(ValueError):
    """A header a sender may not send; `field` names it (`endpoint.headers.Host`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def has_control(text: str) -> bool:
    """Whether the text would break a header line (CR, LF, NUL or another control character)."""
    return _CONTROL.search(text) is not None


def refused_name(name: str) -> str:
    """Why a sender may not send this header name; empty when it may."""
    if not _TOKEN.fullmatch(name):
        return "is not a valid header name (RFC 7230 token: letters, digits and !#$%&'*+-.^_`|~)"
    lowered = name.lower()
    if lowered in REFUSED_NAMES or lowered.startswith("proxy-"):
        return "is a hop-by-hop or framing header, which delivery sets itself"
    if lowered.startswith(REFUSED_PREFIXES):
        return "is one of the product's own headers (X-Postback-*, webhook-*), which receivers rely on"
    return ""


@dataclass(frozen=True)
class HeaderTemplates:
    """A sender's headers, read once: names and value templates, and what the limits need."""

    items: Headers
    templates: tuple[TextTemplate, ...]
    uses: Counter[str]  # placeholder name -> how often the values name it
    placeholders: int
    literal_bytes: int  # names and the values' text around their placeholders

    def render(self, data: Mapping[str, Scalar], unmatched_default: str) -> Headers:
        return tuple((name, render_text(value, data, unmatched_default)) for name, value in self.items)

    def rendered_bytes(self, data: Mapping[str, Scalar], unmatched_default: str) -> int:
        """UTF-8 bytes of the names and values rendered for this data object."""
        names = sum(len(name.encode()) for name, _ in self.items)
        return names + sum(text_rendered_bytes(template, data, unmatched_default) for template in self.templates)

    def all_bound(self, objects: int, value_bytes: int, unmatched_default: str) -> int:
        """Most bytes the headers of `objects` data objects can come to, when their values
        together take no more than value_bytes (as `templating.all_urls_bound`)."""
        most_uses = max(self.uses.values(), default=0)
        every_default = self.literal_bytes + self.placeholders * len(unmatched_default.encode())
        return objects * every_default + most_uses * value_bytes


NO_HEADERS = HeaderTemplates((), (), Counter(), 0, 0)


def templates_of(headers: object) -> HeaderTemplates:
    """A sender's `endpoint.headers` (absent: None), checked; HeaderProblem naming the field."""
    if headers is None:
        return NO_HEADERS
    if not isinstance(headers, dict):
        raise HeaderProblem(FIELD, "must be an object of header names to string values")
    if not headers:
        return NO_HEADERS  # most requests: nothing to read, nothing made
    if len(headers) > MAX_HEADERS:
        raise HeaderProblem(FIELD, f"has {len(headers)} headers; at most {MAX_HEADERS} are accepted")
    seen: set[str] = set()
    total = 0
    for name, value in headers.items():
        field = f"{FIELD}.{name[:100]}"
        if why := refused_name(name):
            raise HeaderProblem(field, why)
        if name.lower() in seen:
            raise HeaderProblem(field, "is given twice (header names are case-insensitive)")
        seen.add(name.lower())
        if not isinstance(value, str) or isinstance(value, JsonNumber):
            raise HeaderProblem(field, "must be a string")
        if has_control(value):
            raise HeaderProblem(field, "must not contain CR, LF, NUL or other control characters")
        try:
            total += len(name) + len(value.encode())
        except UnicodeEncodeError as exc:
            raise HeaderProblem(field, "contains an unpaired UTF-16 surrogate escape") from exc
    if total > MAX_HEADER_BYTES:
        raise HeaderProblem(FIELD, f"names and values take {total} bytes; at most {MAX_HEADER_BYTES} are accepted")
    items = tuple(headers.items())
    templates = tuple(compile_text(value) for _, value in items)
    uses: Counter[str] = Counter()
    for template in templates:
        uses.update(template.uses)
    literal = sum(len(name) for name, _ in items) + sum(template.literal_bytes for template in templates)
    return HeaderTemplates(items, templates, uses, sum(t.placeholders for t in templates), literal)


def check_rendered(headers: Headers) -> Headers:
    """Rendered headers as a try carries them, checked again (they come back from Redis): the
    names a sender may send, and nothing a header line cannot hold; ValueError otherwise."""
    if len(headers) > MAX_HEADERS:
        raise ValueError(f"a try carries at most {MAX_HEADERS} headers")
    for name, value in headers:
        if refused_name(name) or has_control(value):
            raise ValueError(f"a try's header {name[:100]!r} cannot be sent")
    return headers
