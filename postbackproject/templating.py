"""Turn a URL template and one data object into the URL to call, exactly as it is sent."""

import re
from collections.abc import Mapping
from urllib.parse import quote

from postbackproject.postback import Scalar

PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# Characters a URL carries as they are. Everything else (non-ASCII, spaces, quotes, braces
# left over from the template...) is percent-encoded as UTF-8, as browsers and `requests` do;
# `%` stays, so escapes already in the template go out unchanged.
URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
_NEEDS_QUOTING = re.compile(r"[^A-Za-z0-9\-._~!#$%&'()*+,/:;=?@\[\]]")
# Values made of these alone are the same percent-encoded (most values): no quote() call.
_UNRESERVED = re.compile(r"[A-Za-z0-9\-._~]*")


def scalar_text(value: Scalar) -> str | None:
    """A value as it goes into a URL: numbers as written, true/false; None for null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def render_url(template: str, data: Mapping[str, Scalar], unmatched_default: str) -> str:
    """Replace every {name} in one pass with its value, percent-encoded as a whole.

    One pass means a value that itself contains "{other}" is never expanded again. A name the
    data object lacks, or sets to null, takes the admin's default value.
    """

    def substitute(match: re.Match[str]) -> str:
        text = scalar_text(data.get(match.group(1)))
        value = unmatched_default if text is None else text
        return value if _UNRESERVED.fullmatch(value) else quote(value, safe="")

    return wire_url(PLACEHOLDER.sub(substitute, template))


def wire_url(url: str) -> str:
    """The URL as it goes on the wire: ASCII only, a non-ASCII host in IDNA (punycode) form.

    Only characters outside URL_SAFE change; nothing is reordered or dropped (an empty `?`
    stays), so the recorded URL is the one sent.
    """
    if not _NEEDS_QUOTING.search(url):
        return url
    scheme, separator, rest = url.partition("://")
    end = min((index for index in (rest.find(c) for c in "/?#") if index >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    return f"{scheme}{separator}{_wire_authority(authority)}{quote(tail, safe=URL_SAFE)}"


def _wire_authority(authority: str) -> str:
    if authority.isascii():
        return quote(authority, safe=URL_SAFE)
    userinfo, at, hostport = authority.rpartition("@")
    host, colon, port = hostport.rpartition(":")
    if not colon or not port.isdigit():
        host, colon, port = hostport, "", ""
    try:
        ascii_host = host.encode("idna").decode()
    except UnicodeError:
        ascii_host = quote(host, safe="")  # not a valid name: the request fails, and says so
    return f"{quote(userinfo, safe=URL_SAFE)}{at}{ascii_host}{colon}{port}"
