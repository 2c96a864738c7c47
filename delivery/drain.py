"""The drainer: one RQ job that reads the inbox and delivers what it finds until it runs dry.

Each turn of its loop it reads new entries (blocking briefly only when it has nothing else to
do), hands their postbacks to the engine, and settles what finished: attempt rows in one
INSERT, then one Redis transaction that schedules retries and deferrals and acknowledges the
entries whose postbacks are all recorded. An entry is acknowledged only after its records are
written, so a drainer that dies at any instant leaves its entries pending; they go to the next
drainer that looks, which first reads the attempt log (`progress.resume`) and sends only what
was not recorded.

A drainer leaves when it has been idle DELIVERY_DRAINER_IDLE_SECONDS with nothing unread, or
after DELIVERY_DRAINER_MAX_SECONDS (or on a warm shutdown) by handing over to a successor job,
so that RQ's own bookkeeping stays short-lived and no job runs unbounded.
"""

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from django.conf import settings
from django.db import DatabaseError
from redis.exceptions import ResponseError

from delivery.circuit import Circuits, HostReport
from delivery.engine import Engine, Finished, Work, refused_try
from delivery.entries import entry_tries
from delivery.models import DeliverySettings, Outcome
from delivery.policy import host_answered, outcome_of, retry_delay_seconds
from delivery.progress import resume
from delivery.recording import Record, attempt_record, count_in_metrics, deferral_record, log_attempts, save_attempts
from delivery.rollups import fold_accepted_now_and_then
from delivery.transport import process_transport
from postbackproject import inbox
from postbackproject.postback import Try
from postbackproject.queue import get_connection

logger = logging.getLogger(__name__)

# Entries that cannot be read (not written by ingestion) are kept here for a person to look at.
REJECTED = "postback:inbox:rejected"
# Finished tries are settled when this many have gathered, or the oldest has waited this long.
SETTLE_BATCH = 500
SETTLE_WAIT_SECONDS = 0.1
HOUSEKEEPING_SECONDS = 1.0
# Longest a read waits for new entries when the drainer has nothing else to do.
IDLE_BLOCK_MS = 200
# After a read that emptied the stream, the next waits this long while requests are out.
READ_PAUSE_SECONDS = 0.003
# Longest a turn of the loop waits for replies.
POLL_SECONDS = 0.005
# After a drain job fails, its entries wait this long before another drainer takes them.
FAILURE_PAUSE_MS = 5000
# An entry read by this many drainers that all died or failed is set aside, not read again.
MAX_DELIVERIES = 5

_stop = threading.Event()


def host_reports(finished: list[Finished]) -> dict[str, HostReport]:
    """What each host did, in the order its tries finished, for its circuit."""
    reports: dict[str, HostReport] = {}
    for item in finished:
        if item.response is None:
            continue
        answered = host_answered(item.response)
        if answered is not None or item.work.probe:
            report = reports.setdefault(item.work.host, HostReport())
            report.add(bool(answered))
            report.probed = report.probed or item.work.probe
    return reports


def request_stop() -> None:
    """Warm shutdown (SIGTERM to the worker): stop reading, finish what is in flight, hand over."""
    _stop.set()


@dataclass(eq=False)
class EntryState:
    """An entry read and not yet acknowledged: acknowledged once nothing of it is outstanding."""

    id: str
    outstanding: int
    follow_ups: list[tuple[Try, float]] = field(default_factory=list)


class Drainer:
    def __init__(self, drainer_id: str) -> None:
        self.id = drainer_id
        self.connection = get_connection()
        self.circuits = Circuits(drainer_id)
        self.engine = Engine(process_transport(), self.circuits, settings.DELIVERY_CONCURRENCY)
        self.finished: list[Finished] = []
        self.finished_since = 0.0
        # Failures in a row per host among `finished`, and whether a circuit must hear now.
        self.failing: Counter[str] = Counter()
        self.urgent = False
        self.settled_entries: list[EntryState] = []  # done, waiting to be acknowledged
        self.unchecked: list[tuple[inbox.Entry, bool]] = []  # waiting for the database (reclaimed?)
        self.postbacks_per_entry = 10.0  # running estimate, to size reads
        self.next_read_at = 0.0
        self.stop_seen_at = 0.0
        self.counts: Counter[str] = Counter()

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        if not self._take_lease():
            return {"not needed": 1}
        self._create_group()
        started = time.monotonic()
        last_work = started
        next_housekeeping = 0.0
        try:
            while True:
                config = DeliverySettings.current()
                now = time.monotonic()
                if now >= next_housekeeping:
                    self._housekeeping(config)
                    next_housekeeping = now + HOUSEKEEPING_SECONDS
                accepting = not _stop.is_set() and now - started < settings.DELIVERY_DRAINER_MAX_SECONDS
                if not accepting:
                    self._give_back_unsent()
                    if self._stop_grace_over(now):
                        self._leave(handing_over=True)
                        break
                read = self._read(config) if accepting and self._may_read(config) else 0
                self._collect(self.engine.step(config, timeout=0.0 if read else self._poll_wait()), config)
                if self._settle_due(idle=not read and not self.engine.busy):
                    self._settle(config)
                if read or self._busy():
                    last_work = time.monotonic()
                elif not accepting:
                    self._leave(handing_over=True)
                    break
                elif time.monotonic() - last_work >= settings.DELIVERY_DRAINER_IDLE_SECONDS and self._leave():
                    break
        except BaseException:
            self._release_after_failure()
            raise
        return dict(self.counts)

    def _stop_grace_over(self, now: float) -> bool:
        """A warm shutdown waits for requests in flight DELIVERY_STOP_GRACE_SECONDS at most; what
        is still out then is cut off, and sent again by the next drainer (never recorded)."""
        if not _stop.is_set():
            return False
        self.stop_seen_at = self.stop_seen_at or now
        if now - self.stop_seen_at < settings.DELIVERY_STOP_GRACE_SECONDS:
            return False
        if self.engine.in_flight:
            logger.warning("drainer %s: stopping with %d requests cut off", self.id, self.engine.in_flight)
            self.engine.transport.abandon()
        if self.finished:
            self._settle(DeliverySettings.current())
        return True

    def _busy(self) -> bool:
        return self.engine.busy or bool(self.finished) or bool(self.settled_entries) or bool(self.unchecked)

    def _may_read(self, config: DeliverySettings) -> bool:
        """Read when there is room, and not again at once after a read that emptied the stream
        while requests are out: entries trickling in are then read a few at a time."""
        return self._has_room(config) and (not self._busy() or time.monotonic() >= self.next_read_at)

    def _poll_wait(self) -> float:
        return max(0.0, min(POLL_SECONDS, self.next_read_at - time.monotonic())) if self._busy() else POLL_SECONDS

    def _has_room(self, config: DeliverySettings) -> bool:
        return self.engine.waiting + self.engine.in_flight < self._hold_limit(config)

    def _hold_limit(self, config: DeliverySettings) -> int:
        """Postbacks read ahead of sending: enough to keep every connection busy and hosts
        that stall from blocking others, bounded so memory is."""
        return max(16 * self.engine.concurrency, 4 * config.batch_size)

    # --- reading ----------------------------------------------------------------------------

    def _read(self, config: DeliverySettings) -> int:
        room = self._hold_limit(config) - self.engine.waiting - self.engine.in_flight
        count = max(1, min(256, int(room / max(1.0, self.postbacks_per_entry))))
        idle = not self._busy()
        block = min(IDLE_BLOCK_MS, int(settings.DELIVERY_DRAINER_IDLE_SECONDS * 1000)) if idle else 0
        reply = self._xreadgroup(count, block or None)
        entries = inbox.entries_from_reply(reply[0][1]) if reply else []
        self.next_read_at = time.monotonic() + (READ_PAUSE_SECONDS if len(entries) < count else 0)
        if entries:
            self._accept(entries, config, reclaimed=False)
            if len(entries) == count:
                self._recruit()
        return len(entries)

    def _xreadgroup(self, count: int, block: int | None) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
        try:
            return self.connection.xreadgroup(inbox.GROUP, self.id, {inbox.INBOX: ">"}, count=count, block=block)  # type: ignore[return-value]
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._create_group()
            return []

    def _create_group(self) -> None:
        try:
            self.connection.xgroup_create(inbox.INBOX, inbox.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _accept(self, entries: list[inbox.Entry], config: DeliverySettings, reclaimed: bool) -> None:
        """Turn entries into work for the engine; tries come round again only after a check."""
        for entry in entries:
            try:
                asked = entry_tries(entry, config)
            except ValueError as exc:
                self._reject(entry, str(exc))
                continue
            tries = asked.tries
            self.postbacks_per_entry = 0.9 * self.postbacks_per_entry + 0.1 * len(tries)
            state = EntryState(entry.id, 0)
            if reclaimed or entry.kind == "t":
                try:
                    resumed = resume(tries, config)
                except DatabaseError:
                    # Which of them were recorded cannot be told now: they wait for the database.
                    logger.warning("drainer %s: database unavailable, entry %s waits", self.id, entry.id)
                    self.unchecked.append((entry, reclaimed))
                    continue
                tries, state.follow_ups = resumed.to_send, resumed.follow_ups
                self.counts["already recorded"] += resumed.settled
            state.outstanding = len(tries)
            if not tries:
                self._entry_done(state)
            refused = [
                refused_try(Work(item, state), asked.refused[item.postback_id])
                for item in tries
                if item.postback_id in asked.refused
            ]
            self._collect(refused, config)
            self.engine.add((Work(item, state) for item in tries if item.postback_id not in asked.refused), config)

    def _reject(self, entry: inbox.Entry, why: str) -> None:
        """Set an entry aside, kept whole for a person to read: it is not ours, or it has
        already brought down MAX_DELIVERIES drainers."""
        logger.error("inbox entry %s set aside in %s: %s", entry.id, REJECTED, why)
        kept = {"id": entry.id, "kind": entry.kind, "why": why, "payload": entry.payload.decode("utf-8", "replace")}
        with self.connection.pipeline() as pipe:
            pipe.rpush(REJECTED, json.dumps(kept))
            pipe.xack(inbox.INBOX, inbox.GROUP, entry.id)
            pipe.xdel(inbox.INBOX, entry.id)
            pipe.execute()

    # --- settling ---------------------------------------------------------------------------

    def _collect(self, finished: list[Finished], config: DeliverySettings) -> None:
        if finished and not self.finished:
            self.finished_since = time.monotonic()
        self.finished.extend(finished)
        for item in finished:
            self._watch_circuit(item, config)

    def _watch_circuit(self, item: Finished, config: DeliverySettings) -> None:
        """Settle at once when a host reaches its failure threshold or a probe lands, so that
        its circuit opens (or closes) before more of its postbacks go out."""
        if item.response is None:
            return
        host = item.work.host
        answered = host_answered(item.response)
        if answered:
            self.failing[host] = 0
        elif answered is False:
            self.failing[host] += 1
            if self.circuits.failures_in_row(host) + self.failing[host] >= config.circuit_failure_threshold:
                self.urgent = True
        if item.work.probe:
            self.urgent = True

    def _settle_due(self, idle: bool) -> bool:
        """Settle in batches: when many have finished, the oldest has waited long enough, a
        circuit must hear now, or nothing else is going on (before an idle read blocks)."""
        if not self.finished:
            return bool(self.settled_entries)
        waited = time.monotonic() - self.finished_since
        return self.urgent or idle or len(self.finished) >= SETTLE_BATCH or waited >= SETTLE_WAIT_SECONDS

    def _settle(self, config: DeliverySettings) -> None:
        """Record what finished, then schedule its follow-ups and acknowledge done entries."""
        finished, self.finished = self.finished, []
        self.failing.clear()
        self.urgent = False
        rows, follow_ups = self._records(finished, config)
        save_attempts(rows, wait=lambda seconds: self._wait_for_database(seconds, config))
        self._commit_to_redis(follow_ups)
        self.circuits.report(host_reports(finished), config.circuit_failure_threshold, config.circuit_open_seconds)
        self.engine.reconsider()
        count_in_metrics(rows)
        log_attempts(rows)

    def _wait_for_database(self, seconds: float, config: DeliverySettings) -> None:
        """Between retries of a database write: keep the lease, and take the replies of requests
        already out (left unread, they would time out on our side). Nothing new is sent."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            self._renew_lease()
            end = time.monotonic() + min(left, HOUSEKEEPING_SECONDS)
            while time.monotonic() < end:
                self._collect(self.engine.step(config, timeout=min(0.05, end - time.monotonic()), start=False), config)
                if not self.engine.in_flight:
                    time.sleep(max(0.0, end - time.monotonic()))

    def _records(
        self, finished: list[Finished], config: DeliverySettings
    ) -> tuple[list[Record], list[tuple[Try, float]]]:
        """An attempt row for each finished try, and the tries that follow (due Unix time)."""
        rows: list[Record] = []
        follow_ups: list[tuple[Try, float]] = []
        now = time.time()
        for item in finished:
            tried, response = item.work.item, item.response
            if response is None:
                until = datetime.fromtimestamp(item.deferred_until, UTC)
                rows.append(deferral_record(tried, item.work.host, item.reason, until))
                follow_ups.append((tried, item.deferred_until))  # the same try, later
            else:
                outcome = outcome_of(response, tried.try_in_series, config)
                rows.append(attempt_record(tried, item.work.host, response, outcome))
                if outcome == Outcome.RETRY:
                    delay = retry_delay_seconds(tried.try_in_series, response.retry_after_seconds, config)
                    follow_ups.append((replace(tried, attempt=tried.attempt + 1), now + delay))
            self.counts[rows[-1].outcome] += 1
            self._one_done(item.work)
        return rows, follow_ups

    def _one_done(self, work: Work) -> None:
        state = work.origin
        assert isinstance(state, EntryState)
        state.outstanding -= 1
        if state.outstanding == 0:
            self._entry_done(state)

    def _entry_done(self, state: EntryState) -> None:
        self.settled_entries.append(state)

    def _commit_to_redis(self, follow_ups: list[tuple[Try, float]]) -> None:
        entries, self.settled_entries = self.settled_entries, []
        for state in entries:
            follow_ups.extend(state.follow_ups)
        if not follow_ups and not entries:
            return
        ids = [state.id for state in entries]
        with self.connection.pipeline(transaction=True) as pipe:
            inbox.schedule_tries(follow_ups, pipe)
            if ids:
                pipe.xack(inbox.INBOX, inbox.GROUP, *ids)
                pipe.xdel(inbox.INBOX, *ids)
            pipe.execute()

    # --- leases and housekeeping ------------------------------------------------------------

    def _take_lease(self) -> bool:
        """Start under the lease registered for this job; a job queued so long that its lease
        ran out still runs, unless enough drainers are alive already."""
        live = self.connection.zscore(inbox.LEASES, self.id)
        if live is None:
            started = inbox.run_script("recruit", [inbox.LEASES, inbox.recruit_key()], [inbox.LEASE_MS, self.id])
            if not started:
                return False
        self._renew_lease()
        return True

    def _renew_lease(self) -> None:
        self.connection.zadd(inbox.LEASES, {self.id: inbox.redis_now_ms() + inbox.LEASE_MS}, gt=True)

    def _housekeeping(self, config: DeliverySettings) -> None:
        self._renew_lease()
        inbox.sweep()
        try:
            fold_accepted_now_and_then()
        except DatabaseError:
            logger.warning("drainer %s: accepted counts not folded, the database is unavailable", self.id)
        self._retry_unchecked(config)
        if self._has_room(config):
            self._take_over_orphans(config)
        self.circuits.report({}, config.circuit_failure_threshold, config.circuit_open_seconds)
        self.engine.reconsider()

    def _retry_unchecked(self, config: DeliverySettings) -> None:
        """Entries that waited for the database to tell what was recorded: try them again."""
        waiting, self.unchecked = self.unchecked, []
        for entry, reclaimed in waiting:
            self._accept([entry], config, reclaimed)

    def _take_over_orphans(self, config: DeliverySettings) -> None:
        """Claim the entries of a drainer that left or died; one that has brought down
        MAX_DELIVERIES drainers already is set aside rather than tried again."""
        claimed, deliveries = inbox.run_script("reclaim", [inbox.INBOX, inbox.LEASES], [inbox.GROUP, self.id, 100])
        entries = inbox.entries_from_reply(claimed)
        if not entries:
            return
        logger.info("drainer %s took over %d entries of a drainer that left or died", self.id, len(entries))
        counts = {inbox.text(entry_id): int(count) for entry_id, count in deliveries}
        for entry in entries:
            if counts.get(entry.id, 0) > MAX_DELIVERIES:
                self._reject(entry, f"taken over {MAX_DELIVERIES} times: its drainers kept dying")
        self._accept([entry for entry in entries if counts.get(entry.id, 0) <= MAX_DELIVERIES], config, reclaimed=True)

    def _recruit(self) -> None:
        colleague = inbox.new_drainer_id()
        if inbox.run_script("recruit", [inbox.LEASES, inbox.recruit_key()], [inbox.LEASE_MS, colleague]):
            inbox.start_drainer(colleague)

    def _give_back_unsent(self) -> None:
        """Stop sending: tries not yet started stay pending in their entries for a successor."""
        dropped = len(self.engine.drop_waiting()) + len(self.unchecked)
        self.unchecked.clear()
        if dropped:
            self.counts["handed over"] += dropped

    def _leave(self, handing_over: bool = False) -> bool:
        """Retire (idle) or hand over; False when there is still work to read."""
        successor = inbox.new_drainer_id() if handing_over else ""
        verdict = inbox.run_script(
            "leave", [inbox.INBOX, inbox.LEASES], [inbox.GROUP, self.id, successor, inbox.LEASE_MS]
        )
        if verdict == 1:
            inbox.start_drainer(successor)
        return bool(verdict != -1)

    def _release_after_failure(self) -> None:
        """The job is failing: its entries go to another drainer after a short pause, not after
        the whole lease, and not at once either (a failure that repeats must not spin)."""
        try:
            self.connection.zadd(inbox.LEASES, {self.id: inbox.redis_now_ms() + FAILURE_PAUSE_MS})
        except Exception:  # already failing; the lease runs out by itself
            logger.warning("drainer %s could not shorten its lease", self.id, exc_info=True)
