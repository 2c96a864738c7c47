"""The postback batch: what ingestion puts on the queue and delivery takes off it.

One batch travels as one RQ job. It carries the endpoint once and, for each postback, its id
and its data object. Data objects travel as compact JSON text in which numbers keep the
exact text the sender wrote (`1.50` stays `1.50`, `1e5` stays `1e5`): Python's float would
rewrite them, and the URL must carry a number as written.
"""

import json
from typing import NotRequired, TypedDict

# The job function, named by path so that ingestion never imports delivery code.
DELIVER_BATCH = "delivery.jobs.deliver_batch"

METHODS_WITHOUT_BODY = frozenset({"GET", "DELETE"})
METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
METHODS = METHODS_WITHOUT_BODY | METHODS_WITH_BODY


class JsonNumber(str):
    """A JSON number kept as the text it was written with."""

    __slots__ = ()


Scalar = str | bool | None  # JsonNumber is a str
DataObject = dict[str, Scalar]


class Batch(TypedDict):
    """One job's payload. Retries carry the same ids with a higher `attempt`."""

    batch: str  # batch id; the job ids of its tries derive from it
    attempt: int  # 1-based number of this try
    offset: int  # tries made before this series (a replay starts a new series)
    method: str
    url: str  # URL template with {name} placeholders
    postbacks: list[list[str]]  # [postback id, data object as JSON text]
    rendered: NotRequired[bool]  # url is final, as last sent (a replay): fill in nothing


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


def dumps_data_object(data: DataObject) -> str:
    """Compact JSON text of a flat data object, numbers exactly as they were written."""
    members = (f"{json.dumps(key, ensure_ascii=False)}:{_scalar_json(value)}" for key, value in data.items())
    return "{" + ",".join(members) + "}"


def loads_data_object(text: str) -> DataObject:
    """Inverse of dumps_data_object."""
    data = loads_keeping_numbers(text)
    assert isinstance(data, dict)
    return data


def batch_job_id(batch: Batch) -> str:
    """Job id of one try of a batch: stable, so a try scheduled twice is one job."""
    return f"{batch['batch']}-{batch['attempt']}"
