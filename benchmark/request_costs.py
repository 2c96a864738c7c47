"""What the largest requests ingestion accepts cost a worker (`manage.py requestcosts`): the CPU
to make their tries (fill in the URLs, write the bodies), and the longest slice of a drainer's
loop spent on it.

Each case is a request at the door's limits (INGEST_MAX_PLACEHOLDERS placeholders, about
INGEST_MAX_RENDERED_BYTES once rendered, or a body near INGEST_MAX_BODY_BYTES whose every value
must be percent-encoded), checked by ingestion's own validation, cut into entries as ingestion
cuts them, and made the way a drainer makes them: a slice of RENDER_SLICE_SECONDS at a time.
"""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from delivery import collector, drain
from delivery.entries import read_entry
from delivery.models import DeliverySettings
from ingestion.validation import Limits, parse_body
from postbackproject.inbox import Entry, request_entries
from postbackproject.postback import DataObject

# Names for 64 placeholders that each take their own value: a, b, ..., z, aa, bb, ...
NAMES = [chr(97 + n % 26) * (1 + n // 26) for n in range(64)]


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    url: str
    objects: Callable[[], list[DataObject]]


CASES = (
    Case("64 empty {} in a 1.5 KiB URL, 10,000 objects", "GET", "http://127.0.0.1/" + "a" * 1500 + "{}" * 64,
         lambda: [{} for _ in range(10_000)]),
    Case("64 {v}, v = 8 x '/' (24 bytes encoded), 10,000 objects", "GET", "http://127.0.0.1/" + "{v}" * 64,
         lambda: [{"v": "/" * 8} for _ in range(10_000)]),
    Case("8 KiB URLs with a non-ASCII literal, 2,000 objects", "GET", "http://127.0.0.1/é" + "x" * 8000 + "{v}",
         lambda: [{"v": "a"} for _ in range(2_000)]),
    Case("POST, 64 {v} and a 50-byte field, 10,000 objects", "POST", "http://127.0.0.1/" + "{v}" * 64,
         lambda: [{"v": "/" * 8, "w": "x" * 50} for _ in range(10_000)]),
    Case("64 names, each value encoded ('/é'), 1,200 objects", "GET",
         "http://127.0.0.1/" + "".join(f"{{{name}}}" for name in NAMES),
         lambda: [dict.fromkeys(NAMES, "/é") for _ in range(1_200)]),
)  # fmt: skip


@dataclass(frozen=True)
class RenderingCost:
    case: str
    body_bytes: int
    objects: int
    rendered_bytes: int  # URLs and bodies of every postback
    cpu_seconds: float
    longest_slice_ms: float  # CPU of the longest `take` of one slice


def limits() -> Limits:
    config = DeliverySettings()
    return Limits(
        settings.INGEST_MAX_DATA_OBJECTS,
        config.max_url_bytes,
        config.unmatched_default,
        settings.INGEST_MAX_PLACEHOLDERS,
        settings.INGEST_MAX_RENDERED_BYTES,
    )


def rendering_cost(case: Case) -> RenderingCost:
    """Make every try of the case's request, a slice at a time, as a worker does (with the
    collector on its timer, as in a worker: none runs in the middle of a slice)."""
    objects = case.objects()
    document = {"endpoint": {"method": case.method, "url": case.url}, "data": objects}
    body = json.dumps(document, ensure_ascii=False).encode()
    if len(body) > settings.INGEST_MAX_BODY_BYTES:
        raise ValueError(f"{case.name}: the body is over INGEST_MAX_BODY_BYTES")
    parsed = parse_body(body, limits())  # InvalidRequest if the door would refuse it
    config = DeliverySettings()
    texts = request_entries("0" * 32, parsed.method, parsed.url, parsed.data_texts, config.batch_size)
    collector.take_over_from_the_allocation_counter()
    rendered, longest = 0, 0.0
    started = time.process_time()
    for text in texts:
        source = read_entry(Entry("0-0", "r", text.encode()))
        while source.remaining:
            slice_started = time.thread_time()
            part = source.take(config, drain.RENDER_SLICE_SECONDS)
            longest = max(longest, time.thread_time() - slice_started)
            rendered += sum(len(item.url) + len((item.body or "").encode()) for item in part.tries)
    cpu = time.process_time() - started
    return RenderingCost(case.name, len(body), len(objects), rendered, cpu, longest * 1000)
