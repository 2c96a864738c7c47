"""Destination hosts: what counts as one, and how many requests each may have in flight."""

DEFAULT_PORTS = {"http": ":80", "https": ":443"}
# Requests a host may have in flight before it has answered any; each answer earns one more.
INITIAL_IN_FLIGHT = 8


def host_of(url: str) -> str:
    """The destination a URL names, as limits and circuits count it: `host[:port]`, lower case.

    The port is kept when it is not the scheme's default (two services on one machine are two
    destinations); user info is dropped.
    """
    scheme, _, rest = url.partition("://")
    end = len(rest)
    for stop in "/?#":
        index = rest.find(stop)
        if 0 <= index < end:
            end = index
    authority = rest[:end].rpartition("@")[2].lower()
    default_port = DEFAULT_PORTS.get(scheme.lower())
    if default_port and authority.endswith(default_port):
        authority = authority[: -len(default_port)]
    return authority


class InFlightLimit:
    """How many requests one host may have in flight from this worker: earned, not granted.

    A host starts at INITIAL_IN_FLIGHT and gains one for every answer, up to the cap, so a
    healthy host reaches the cap within a few round trips (the count doubles each round trip).
    A timeout or a failed connection halves it. A host that stalls therefore never holds more
    than a handful of this worker's connections, while a slow but answering one uses them all.
    """

    __slots__ = ("cap", "limit")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.limit = float(min(cap, INITIAL_IN_FLIGHT))

    def allows(self, in_flight: int) -> bool:
        return in_flight < min(self.limit, self.cap)

    def answered(self) -> None:
        self.limit = min(float(self.cap), self.limit + 1)

    def went_silent(self) -> None:
        self.limit = max(1.0, self.limit / 2)
