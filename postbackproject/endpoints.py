"""What an endpoint URL may be: checked at the door, and again after rendering when values
fill in its host.

A URL that can never be sent must be refused when it is offered, with a 400 the sender can act
on, not accepted and then failed by the HTTP library at delivery. The host is a DNS name (ASCII
letters, digits, hyphens and underscores, or an internationalised name valid under IDNA 2008),
a dotted-quad IPv4 address or a bracketed IPv6 address without a zone id; the port, when
given, is 1-65535 in ASCII digits. The same code turns a non-ASCII host into the ASCII form
that goes on the wire (`ascii_host`), so what is checked is what is sent.
"""

import ipaddress
import re
from dataclasses import dataclass

import idna

# A label of an ASCII host. Underscores are not allowed in host names by RFC 952, but they
# occur in real ones (and in the brief's sample); resolvers and libcurl accept them.
_ASCII_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# A last label of this shape makes the host an IPv4 address to URL parsers (WHATWG): then it
# must be one, written as four decimal parts.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
_PORT = re.compile(r"[0-9]{1,5}")
_BRACKETED = re.compile(r"\[([^\]]*)\](?::(.*))?")
MAX_HOST_LENGTH = 253


class InvalidEndpoint(ValueError):
    """The URL cannot be sent; the message says why, in words for the sender."""


@dataclass(frozen=True)
class UrlParts:
    """A URL cut where HTTP cuts it: the fragment is never sent, so it is not kept."""

    scheme: str
    authority: str
    target: str  # path and query: the request target as it goes on the wire

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"


def split_url(url: str, mask: str | None = None) -> UrlParts:
    """Cut an absolute http(s) URL into scheme, authority and request target.

    `mask` is the same text with characters that must not count as delimiters (those inside
    template placeholders) replaced: the cuts are found in it and applied to `url`.
    """
    masked = url if mask is None else mask
    scheme, separator, _ = masked.partition("://")
    if not separator or scheme.lower() not in ("http", "https"):
        raise InvalidEndpoint("must be an absolute http:// or https:// URL")
    start = len(scheme) + 3
    ends = [index for index in (masked.find(c, start) for c in "/?#") if index >= 0]
    end = min(ends, default=len(url))
    fragment = masked.find("#", end)
    return UrlParts(url[: len(scheme)], url[start:end], url[end : fragment if fragment >= 0 else len(url)])


def check_authority(authority: str) -> None:
    """Raise InvalidEndpoint unless the authority's host and port can be connected to."""
    hostport = authority.rpartition("@")[2]
    bracketed = _BRACKETED.fullmatch(hostport)
    if bracketed:
        check_ipv6(bracketed.group(1))
        port = bracketed.group(2)
    elif hostport.startswith("["):
        raise InvalidEndpoint("host: an IPv6 address is written in brackets, e.g. http://[2001:db8::1]/")
    else:
        host, colon, port_text = hostport.rpartition(":")
        host, port = (host, port_text) if colon else (hostport, None)
        ascii_host(host)
    if port is not None and port != "" and not (_PORT.fullmatch(port) and 1 <= int(port) <= 65535):
        raise InvalidEndpoint(f"port must be a number from 1 to 65535 in ASCII digits, not {port[:20]!r}")


def check_ipv6(text: str) -> None:
    if "%" in text:
        raise InvalidEndpoint("host: IPv6 zone ids (%...) name an interface of the sender's machine; not allowed")
    try:
        ipaddress.IPv6Address(text)
    except ValueError as exc:
        raise InvalidEndpoint(f"host: {text[:60]!r} is not an IPv6 address") from exc


def ascii_host(host: str) -> str:
    """The host as it goes on the wire: as given when ASCII, else its IDNA 2008 ASCII form.

    Raises InvalidEndpoint for anything that is not a name or a dotted-quad IPv4 address.
    """
    if not host:
        raise InvalidEndpoint("must name a host")
    name = host[:-1] if host.endswith(".") else host  # a fully qualified name's final dot
    if _NUMERIC_LABEL.fullmatch(name.rpartition(".")[2]):
        check_ipv4(name)
        return host
    labels = [wire_label(label, host) for label in name.split(".")]
    wire = ".".join(labels) + host[len(name) :]
    if len(wire) > MAX_HOST_LENGTH + (1 if host.endswith(".") else 0):
        raise InvalidEndpoint(f"host is longer than {MAX_HOST_LENGTH} characters")
    return wire


def wire_label(label: str, host: str) -> str:
    """One label of a name as sent: ASCII letters, digits, `-` and `_` as they are, anything
    else as its IDNA 2008 A-label (`xn--...`), which must then be valid."""
    if label.isascii():
        if _ASCII_LABEL.fullmatch(label) and not (label[:4].lower() == "xn--" and not _is_idna(label)):
            return label
        raise InvalidEndpoint(f"host {host[:100]!r} is not a valid host name")
    try:
        return idna.alabel(label.lower()).decode("ascii")
    except idna.IDNAError as exc:
        raise InvalidEndpoint(f"host {host[:100]!r} is not a valid internationalised name: {exc}") from exc


def check_ipv4(name: str) -> None:
    try:
        ipaddress.IPv4Address(name)
    except ValueError as exc:
        raise InvalidEndpoint(
            f"host {name[:60]!r} ends in a number, so it must be an IPv4 address written as four "
            "decimal numbers (e.g. 192.0.2.1)"
        ) from exc


def _is_idna(label: str) -> bool:
    try:
        idna.decode(label)
    except idna.IDNAError:
        return False
    return True
