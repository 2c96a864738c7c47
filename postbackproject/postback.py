"""The postback as it travels between ingestion and delivery.

Data objects travel as compact JSON text in which numbers keep the exact text the sender wrote
(`1.50` stays `1.50`, `1e5` stays `1e5`): Python's float would rewrite them, and the URL must
carry a number as written. A request's postbacks travel in inbox entries
(`postbackproject.inbox`); a postback that must be tried again travels as a `Try`.
"""

import json
from dataclasses import dataclass

# The drain job, named by path so that ingestion never imports delivery code.
DRAIN = "delivery.jobs.drain"

METHODS_WITHOUT_BODY = frozenset({"GET", "DELETE"})
METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
METHODS = METHODS_WITHOUT_BODY | METHODS_WITH_BODY


class JsonNumber(str):
    """A JSON number kept as the text it was written with."""

    __slots__ = ()


Scalar = str | bool | None  # JsonNumber is a str
DataObject = dict[str, Scalar]


def is_method(value: object) -> bool:
    """One of METHODS (a list or object from Redis is not, and is not hashable either)."""
    return isinstance(value, str) and value in METHODS


# A try's seventh to ninth fields when it has fewer: no sender, no headers, no trace.
_ABSENT: tuple[object, ...] = ("", {}, "")


@dataclass(frozen=True)
class Try:
    """One request to make for one postback: a first try, a retry, a deferral or a replay.

    Retries and replays carry the URL as it was first sent, so a postback goes to the same
    URL on every try even if the unmatched default changes meanwhile.
    """

    postback_id: str
    attempt: int  # 1-based number of this try in the postback's history
    offset: int  # tries made before this series (a replay starts a new series)
    method: str
    url: str  # final, as it goes on the wire
    body: str | None  # the data object's JSON text, for methods that send one
    sender: str = ""  # who sent the request (`ingestion.senders.Admission`), "" if unknown
    # The sender's headers (`endpoint.headers`) rendered for this postback: names and values,
    # sent on every try (`postbackproject.headers`).
    headers: tuple[tuple[str, str], ...] = ()
    traceparent: str = ""  # the W3C traceparent of the ingest request's span, "" if untraced

    @property
    def try_in_series(self) -> int:
        return self.attempt - self.offset

    def to_json(self) -> str:
        """`[id, attempt, offset, method, URL, body]`, then as far as needed: the sender ("" if
        none), the sender's headers (an object, `{}` if none), the traceparent."""
        fields: list[object] = [self.postback_id, self.attempt, self.offset, self.method, self.url, self.body]
        later: list[object] = [self.sender, dict(self.headers), self.traceparent]
        while later and later[-1] in _ABSENT:
            later.pop()
        fields += later
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_fields(cls, fields: object) -> "Try":
        """The inverse of to_json's list (six to nine fields); ValueError for anything else
        (Redis is not trusted)."""
        if not isinstance(fields, list) or len(fields) not in (6, 7, 8, 9):
            raise ValueError(f"a try is six to nine fields, not {fields!r:.100}")
        postback_id, attempt, offset, method, url, body = fields[:6]
        extra = [*fields[6:], *_ABSENT[len(fields) - 6 :]]
        sender, headers, traceparent = extra[0], extra[1], extra[2]
        if not isinstance(sender, str) or not isinstance(headers, dict) or not isinstance(traceparent, str):
            raise ValueError(f"a try's sender and traceparent are text, its headers an object: {fields!r:.100}")
        if not all(type(v) is str for v in headers.values()):
            raise ValueError(f"a try's headers map names to text: {fields!r:.100}")
        numbers = (attempt, offset)
        if not all(isinstance(n, (int, str)) and str(n).isdigit() for n in numbers) or int(offset) >= int(attempt):
            raise ValueError(f"a try's attempt and offset are whole numbers, offset below attempt: {fields!r:.100}")
        if not isinstance(postback_id, str) or not isinstance(url, str) or not is_method(method):
            raise ValueError(f"a try has a postback id, a method and a URL: {fields!r:.100}")
        if body is not None and not isinstance(body, str):
            raise ValueError(f"a try's body is JSON text or null: {fields!r:.100}")
        headers_items = tuple(headers.items())
        return cls(postback_id, int(attempt), int(offset), method, url, body, sender, headers_items, traceparent)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def loads_keeping_numbers(text: str | bytes) -> object:
    """Parse JSON, keeping every number as a JsonNumber and refusing NaN and Infinity."""
    return json.loads(
        text,
        parse_float=JsonNumber,
        parse_int=JsonNumber,
        parse_constant=_reject_constant,
    )


def _scalar_json(value: Scalar) -> str:
    if isinstance(value, JsonNumber):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps_data_object(data: DataObject) -> str:
    """Compact JSON text of a flat data object, numbers exactly as they were written."""
    if not any(isinstance(value, JsonNumber) for value in data.values()):
        return _COMPACT.encode(data)  # no number to keep as written: the C encoder does it all
    members = (f"{json.dumps(key, ensure_ascii=False)}:{_scalar_json(value)}" for key, value in data.items())
    return "{" + ",".join(members) + "}"


def loads_data_object(text: str) -> DataObject:
    """Inverse of dumps_data_object."""
    data = loads_keeping_numbers(text)
    assert isinstance(data, dict)
    return data
