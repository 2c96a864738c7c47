"""Inbox entries read back: the tries each one asks for.

Ingestion writes request entries (`postbackproject.inbox.request_entries`) and the sweep
writes entries of tries that came due. Both come back from Redis, which whoever reaches it
can write, so anything not shaped as we write it raises ValueError, and the drainer sets the
entry aside instead of failing on it.
"""

from postbackproject import inbox
from postbackproject.postback import METHODS, METHODS_WITH_BODY, Try, dumps_data_object, loads_keeping_numbers
from postbackproject.templating import render_url


def entry_tries(entry: inbox.Entry, unmatched_default: str) -> list[Try]:
    """The tries an entry asks for: a request's first tries, or tries that came due."""
    try:
        document = loads_keeping_numbers(entry.payload)
    except RecursionError as exc:
        raise ValueError("entry nested too deeply") from exc
    if entry.kind == "t":
        if not isinstance(document, list):
            raise ValueError("a tries entry is a list")
        return [Try.from_fields(fields) for fields in document]
    if entry.kind == "r":
        return request_tries(document, unmatched_default)
    raise ValueError(f"unknown entry kind {entry.kind!r}")


def request_tries(document: object, unmatched_default: str) -> list[Try]:
    """First tries of a request entry `[request id, first index, method, URL template, [objects]]`."""
    if not isinstance(document, list) or len(document) != 5:
        raise ValueError("a request entry has five fields")
    request_id, start, method, template, objects = document
    if not isinstance(request_id, str) or not str(start).isdigit() or method not in METHODS:
        raise ValueError("a request entry starts with its id, first index and method")
    if not isinstance(template, str) or not isinstance(objects, list):
        raise ValueError("a request entry ends with its URL template and data objects")
    with_body = method in METHODS_WITH_BODY
    tries = []
    for index, data in enumerate(objects, start=int(start)):
        if not isinstance(data, dict) or not all(v is None or isinstance(v, (str, bool)) for v in data.values()):
            raise ValueError("a data object maps names to strings, numbers, booleans or null")
        url = render_url(template, data, unmatched_default)
        body = dumps_data_object(data) if with_body else None
        tries.append(Try(inbox.postback_id(request_id, index), 1, 0, method, url, body))
    return tries
