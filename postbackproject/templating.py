"""Turn a URL template and one data object into the URL to call, exactly as it is sent (and a
header template into the header's value: `render_text`, the same rules without the encoding).

Each value is percent-encoded as a whole, so a value can never add a path segment, a query
parameter or a fragment: `/` becomes `%2F`, `?` `%3F`, `&` `%26`. A value that is `.` or `..`
is encoded too (`%2E`, `%2E%2E`), so it cannot remove one either. The rendered URL is sent
byte for byte as recorded: libcurl is told not to squash dot segments, and nothing here
decodes what the template already escaped (`%41` stays `%41`).

What one request can make the workers do is bounded: `rendered_length` tells, without
building it, how long an object's URL would be, so that ingestion refuses one over
`max_url_bytes` and delivery checks again before rendering.
"""

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote

from postbackproject.endpoints import InvalidEndpoint, ascii_host, split_url
from postbackproject.postback import Scalar

PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# Characters a URL carries as they are. Everything else (non-ASCII, spaces, quotes, braces
# left over from the template...) is percent-encoded as UTF-8, as browsers and `requests` do;
# `%` stays, so escapes already in the template go out unchanged.
URL_SAFE = "!$%&'()*+,/:;=?@[]~"
_NEEDS_QUOTING = re.compile(r"[^A-Za-z0-9\-._~!$%&'()*+,/:;=?@\[\]]")
# Values made of these alone are the same percent-encoded (most values): no quote() call.
_UNRESERVED = re.compile(r"[A-Za-z0-9\-._~]*")
# Values that, alone in a path segment, would make it a dot segment that removes a segment.
_DOT_SEGMENTS = {".": "%2E", "..": "%2E%2E"}


@dataclass(frozen=True)
class Template:
    """An endpoint URL template, read once: what rendering and length checks need of it."""

    text: str  # the template without its fragment (never sent)
    literal_length: int  # bytes of the wire URL that come from the template itself
    uses: Counter[str]  # placeholder name -> how many times it appears
    placeholders: int
    host_has_placeholders: bool  # then the rendered host is checked at delivery
    # Literal text as it goes on the wire, and placeholder names, in turn: literal, name, ...,
    # literal. Encoded values need no quoting, so a URL is these joined, with no pass over it.
    pieces: tuple[str, ...]


@lru_cache(maxsize=1024)
def compile_template(text: str) -> Template:
    """Read a template; InvalidEndpoint when it is not an absolute http(s) URL, or a host
    with placeholders is not ASCII around them (its wire length could not be told ahead)."""
    masked = PLACEHOLDER.sub(lambda match: "\0" * len(match.group()), text)
    parts = split_url(text, masked)
    host_has_placeholders = PLACEHOLDER.search(parts.authority) is not None
    if host_has_placeholders and not parts.authority.isascii():
        raise InvalidEndpoint("a host with {placeholders} must otherwise be ASCII")
    names = [match.group(1) for match in PLACEHOLDER.finditer(parts.url)]
    return Template(
        text=parts.url,
        literal_length=len(wire_url(PLACEHOLDER.sub("", parts.url))),
        uses=Counter(names),
        placeholders=len(names),
        host_has_placeholders=host_has_placeholders,
        pieces=_wire_pieces(PLACEHOLDER.split(parts.url), parts.authority),
    )


def _wire_pieces(pieces: list[str], authority: str) -> tuple[str, ...]:
    """The template's literal pieces in wire form (names between them unchanged). Quoting is
    character by character, so each piece can be quoted alone; a non-ASCII host (never one with
    placeholders) lies whole in the first piece, which is then made a wire URL as a whole."""
    wire = [quote(piece, safe=URL_SAFE) if index % 2 == 0 else piece for index, piece in enumerate(pieces)]
    if not authority.isascii():
        wire[0] = wire_url(pieces[0])
    return tuple(wire)


def scalar_text(value: Scalar) -> str | None:
    """A value as it goes into a URL: numbers as written, true/false; None for null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def encode_value(value: str) -> str:
    """A value percent-encoded as a whole: it stays inside the one URL component it fills."""
    if _UNRESERVED.fullmatch(value):
        return _DOT_SEGMENTS.get(value, value)
    return quote(value, safe="")


def always_fits(template: Template, value_bytes: int, unmatched_default: str, max_bytes: int) -> bool:
    """Whether no data object can make this template's URL longer than max_bytes, when no value
    is longer than value_bytes in UTF-8 (a value read from a JSON text never is longer than the
    text) and each byte encodes to at most 3. Most requests (a few short values) pass, and skip
    `rendered_length` for each object."""
    longest = max(3 * value_bytes, len(encode_value(unmatched_default)))
    return template.literal_length + template.placeholders * longest <= max_bytes


def all_urls_bound(template: Template, objects: int, value_bytes: int, unmatched_default: str) -> int:
    """Most bytes the URLs of `objects` data objects can come to, when their values together
    take no more than value_bytes in UTF-8 (they are read from a JSON text that long): each
    placeholder takes the default, or a value that encodes to at most 3 bytes a byte, named at
    most as often as the most used name. Most requests pass under a limit on this bound, and
    skip `rendered_length` for each object."""
    most_uses = max(template.uses.values(), default=0)
    every_default = template.literal_length + template.placeholders * len(encode_value(unmatched_default))
    return objects * every_default + most_uses * 3 * value_bytes


def rendered_length(template: Template, data: Mapping[str, Scalar], unmatched_default: str) -> int:
    """Bytes of the URL `render_url` would make, computed from each value's encoded length
    once, without building the URL: a 1 MB value named 2,000 times costs one encoding here."""
    default = len(encode_value(unmatched_default))
    length = template.literal_length + template.placeholders * default
    names = template.uses.keys() if len(template.uses) < len(data) else data.keys()
    for name in names:
        uses = template.uses.get(name, 0)
        text = scalar_text(data.get(name)) if uses else None
        if text is not None:
            length += uses * (len(encode_value(text)) - default)
    return length


def render_url(template: str, data: Mapping[str, Scalar], unmatched_default: str) -> str:
    """Replace every {name} in one pass with its value, percent-encoded as a whole.

    One pass means a value that itself contains "{other}" is never expanded again. A name the
    data object lacks, or sets to null, takes the admin's default value. Each name's value is
    encoded once, however often the template names it.
    """
    compiled = compile_template(template)
    return _fill(compiled.pieces, compiled.uses, data, unmatched_default, encode_value)


@dataclass(frozen=True)
class TextTemplate:
    """A template of plain text (a header value), read once: its literal pieces and names in
    turn (literal, name, ..., literal), as a URL template's."""

    pieces: tuple[str, ...]
    uses: Counter[str]
    placeholders: int
    literal_bytes: int  # UTF-8 bytes of the text around its placeholders


@lru_cache(maxsize=1024)
def compile_text(text: str) -> TextTemplate:
    pieces = tuple(PLACEHOLDER.split(text))
    names = pieces[1::2]
    return TextTemplate(pieces, Counter(names), len(names), len("".join(pieces[0::2]).encode()))


def render_text(template: str, data: Mapping[str, Scalar], unmatched_default: str) -> str:
    """Replace every {name} in one pass with its value as plain text (not encoded), by the same
    rules as `render_url`: numbers as written, true/false, the default for a missing or null
    value, and a value holding "{other}" never expanded again."""
    compiled = compile_text(template)
    return _fill(compiled.pieces, compiled.uses, data, unmatched_default, str)


def text_rendered_bytes(template: TextTemplate, data: Mapping[str, Scalar], unmatched_default: str) -> int:
    """UTF-8 bytes of the text `render_text` would make, without building it."""
    return template.literal_bytes + sum(
        uses * len(_value_text(data, name, unmatched_default).encode()) for name, uses in template.uses.items()
    )


def _fill(
    pieces: tuple[str, ...],
    uses: Counter[str],
    data: Mapping[str, Scalar],
    unmatched_default: str,
    encode: Callable[[str], str],
) -> str:
    """The pieces joined, each name replaced by its value made text and encoded once."""
    encoded = {name: encode(_value_text(data, name, unmatched_default)) for name in uses}
    filled = list(pieces)
    filled[1::2] = [encoded[name] for name in pieces[1::2]]
    return "".join(filled)


def _value_text(data: Mapping[str, Scalar], name: str, unmatched_default: str) -> str:
    text = scalar_text(data.get(name))
    return unmatched_default if text is None else text


def wire_url(url: str) -> str:
    """The URL as it goes on the wire: ASCII only, a non-ASCII host in IDNA (punycode) form,
    no fragment (HTTP never sends one).

    Only characters outside URL_SAFE change; nothing is reordered, decoded or dropped (an
    empty `?` stays), so the recorded URL is the one sent. InvalidEndpoint when the host
    cannot be written in ASCII.
    """
    if not _NEEDS_QUOTING.search(url):
        return url
    parts = split_url(url)
    return f"{parts.scheme}://{_wire_authority(parts.authority)}{quote(parts.target, safe=URL_SAFE)}"


def _wire_authority(authority: str) -> str:
    if authority.isascii():
        return quote(authority, safe=URL_SAFE)
    userinfo, at, hostport = authority.rpartition("@")
    host, colon, port = hostport.rpartition(":")
    if not colon or not port.isdigit():
        host, colon, port = hostport, "", ""
    return f"{quote(userinfo, safe=URL_SAFE)}{at}{ascii_host(host)}{colon}{port}"
