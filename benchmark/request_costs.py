"""What the largest requests ingestion accepts cost (`manage.py requestcosts`): the CPU for a
worker to make their tries (fill in the URLs, write the bodies), the longest slice of a
drainer's loop spent on it, and what recording one try of each makes the service store.

Each case is a request at the door's limits (INGEST_MAX_PLACEHOLDERS placeholders, about
INGEST_MAX_RENDERED_BYTES once rendered, or a body near INGEST_MAX_BODY_BYTES whose every value
must be percent-encoded), checked by ingestion's own validation, cut into entries as ingestion
cuts them, and made the way a drainer makes them: a slice of RENDER_SLICE_SECONDS at a time.
"""

import gc
import json
import random
import string
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from delivery import collector, drain
from delivery.entries import read_entry
from delivery.models import DeliverySettings, Outcome
from delivery.recording import Record, attempt_log_line, attempt_record, save_attempts
from delivery.transport import Response
from ingestion.validation import Limits, parse_body
from postbackproject.inbox import Entry, request_entries
from postbackproject.postback import DataObject, Try

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
    try:
        for text in texts:
            source = read_entry(Entry("0-0", "r", text.encode()))
            while source.remaining:
                slice_started = time.thread_time()
                part = source.take(config, drain.RENDER_SLICE_SECONDS)
                longest = max(longest, time.thread_time() - slice_started)
                rendered += sum(len(item.url) + len((item.body or "").encode()) for item in part.tries)
        cpu = time.process_time() - started
    finally:  # Python's own collector back, for whatever runs next in this process
        gc.unfreeze()
        gc.enable()
    return RenderingCost(case.name, len(body), len(objects), rendered, cpu, longest * 1000)


# --- what a request makes the service store -------------------------------------------------


@dataclass(frozen=True)
class StorageCase:
    """One request's postbacks at INGEST_MAX_RENDERED_BYTES, each tried once: URLs and bodies of
    random letters (what a sender who wants to fill the disk sends: nothing compresses)."""

    name: str
    postbacks: int
    url_bytes: int
    body_bytes: int
    reply_bytes: int  # what the receiver answers (kept up to response_body_max_bytes)
    host_per_postback: bool  # a host from a placeholder: a rollup row per host and minute


STORAGE_CASES = (
    StorageCase("GET, 10,000 URLs of 1.6 KiB, one host, reply 'ok'", 10_000, 1_677, 0, 2, False),
    StorageCase("GET, 10,000 URLs of 1.6 KiB, a host each, 4 KiB replies", 10_000, 1_677, 0, 4096, True),
    StorageCase("POST, 1,000 URLs and bodies of 8 KiB, one host", 1_000, 8_388, 8_388, 2, False),
)


@dataclass(frozen=True)
class StorageCost:
    case: str
    postbacks: int
    rendered_bytes: int
    database_bytes: int  # attempt rows, their indexes and TOAST, and rollups
    log_bytes: int  # the workers' attempt lines
    insert_seconds: float


def storage_cost(case: StorageCase) -> StorageCost:
    """Record one try of each of the case's postbacks as a worker does (`save_attempts`), inside
    a transaction that is rolled back, and measure what the database grew by."""
    config = DeliverySettings.current()
    rows = [_attempt_row(case, index, config.response_body_max_bytes) for index in range(case.postbacks)]
    rendered = sum(len(row.url) + len(row.request_body) for row in rows)
    with transaction.atomic():
        before = database_bytes()
        started = time.perf_counter()
        save_attempts(rows)
        seconds = time.perf_counter() - started
        grown = database_bytes() - before
        transaction.set_rollback(True)
    logged = sum(len(attempt_log_line(row).encode()) + 1 for row in rows)
    return StorageCost(case.name, case.postbacks, rendered, grown, logged, seconds)


def _attempt_row(case: StorageCase, index: int, reply_max: int) -> Record:
    host = f"h{index}.example" if case.host_per_postback else "h.example"
    prefix = f"https://{host}/"
    url = prefix + _random_text(case.url_bytes - len(prefix))
    body = _random_text(case.body_bytes) if case.body_bytes else None
    method = "POST" if body is not None else "GET"
    reply = Response(timezone.now(), 200, 12.5, _random_text(case.reply_bytes)[:reply_max])
    return attempt_record(Try(f"{uuid.uuid4().hex}-{index}", 1, 0, method, url, body), host, reply, Outcome.SUCCESS)


def _random_text(length: int) -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=length))


def database_bytes() -> int:
    """Bytes the delivery tables take on disk, indexes and TOAST included (this transaction's
    own rows counted: they take their pages as they are written)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            tables = "SELECT oid FROM pg_class WHERE relkind = 'r' AND relname LIKE 'delivery_%%'"
            cursor.execute(f"SELECT sum(pg_total_relation_size(oid)) FROM ({tables}) AS t")
            return int(cursor.fetchone()[0])
        cursor.execute("PRAGMA page_count")
        pages = int(cursor.fetchone()[0])
        cursor.execute("PRAGMA page_size")
        return pages * int(cursor.fetchone()[0])
