"""The drainer: one RQ job that reads the inbox and delivers what it finds until it runs dry.

Each turn of its loop it reads new entries (blocking briefly only when it has nothing else to
do), hands their postbacks to the engine, and settles what finished. Its parts:

- `Lease` (`delivery.lease`): the job's lease among live drainers; recruiting colleagues,
  taking over a dead drainer's entries, leaving or handing over.
- `Intake` (here): entries read or taken over become the engine's work, their tries made a
  slice a turn (a large request's URLs take a while to fill in); entries that are not ours
  are set aside.
- `Settler` (`delivery.settling`): attempt rows, follow-up tries, acknowledged entries, and
  what hosts did, for their circuits.
- `Drainer` (here): the loop, which decides when to read, step the engine, settle, and leave.

A drainer leaves when it has been idle DELIVERY_DRAINER_IDLE_SECONDS with nothing unread, or
after DELIVERY_DRAINER_MAX_SECONDS (or on a warm shutdown) by handing over to a successor job,
so that RQ's own bookkeeping stays short-lived and no job runs unbounded.

Every dependency (Redis connection, engine and its transport, circuits, clock) is passed in:
`Drainer.in_this_process` builds the real ones; tests drive the loop with a fake transport and
a fake clock.
"""

import json
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from redis import Redis
from redis.exceptions import ResponseError

from delivery import collector
from delivery.circuit import Circuits, process_circuits
from delivery.clock import Clock
from delivery.engine import Engine, Work, refused_try
from delivery.entries import EntryTries, ReadEntry, read_entry
from delivery.full_redis import unless_redis_is_full
from delivery.lease import Lease
from delivery.models import DeliverySettings
from delivery.progress import resume
from delivery.rollups import fold_accepted_now_and_then
from delivery.settling import EntryState, FollowUp, Settler
from delivery.transport import process_transport
from postbackproject import inbox, keys, shards
from postbackproject.queue import get_connection, get_queue
from postbackproject.shards import shard_of_drainer

logger = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 1.0
# Longest a read waits for new entries when the drainer has nothing else to do.
IDLE_BLOCK_MS = 200
# After a read that emptied the stream, the next waits this long while requests are out; each
# read after it that finds nothing doubles the wait, up to READ_PAUSE_MAX_SECONDS (a drainer
# waiting on slow receivers then asks Redis forty times a second, not three hundred).
READ_PAUSE_SECONDS = 0.003
READ_PAUSE_MAX_SECONDS = 0.025
# A drainer that has run this long hands over when the drain job of a shard that nobody drains
# waits for a worker: with more shards than workers, shards are drained in turn.
FAIR_SHARE_SECONDS = 10.0
# Queued drain jobs looked at for a starving shard.
QUEUED_LOOKED_AT = 16
# A drainer asks for a colleague at most this often.
RECRUIT_PAUSE_SECONDS = 1.0
# Longest a turn of the loop waits for replies (a ready socket ends the wait at once).
POLL_SECONDS = 0.1
# An entry read by this many drainers that all died or failed is set aside, not read again.
MAX_DELIVERIES = 5
# Most entries read at once.
READ_MOST = 256
# Longest a turn of the loop spends making tries (filling in URLs, writing bodies) before it
# takes replies and sends: making the largest request ingestion accepts takes up to ~0.5 s.
RENDER_SLICE_SECONDS = 0.01

_stop = threading.Event()


def request_stop() -> None:
    """Warm shutdown (SIGTERM to the worker): stop reading, finish what is in flight, hand over."""
    _stop.set()


@dataclass(eq=False)
class Unmade:
    """An entry taken in whose tries are still to be made (some, or all)."""

    source: ReadEntry
    state: EntryState
    check_log: bool  # its tries may have been made before: check the attempt log first


class Intake:
    """Reading the inbox: entries read, or taken over from a drainer that is gone, become the
    engine's work; entries that are not ours are set aside."""

    def __init__(self, drainer_id: str, connection: Redis, engine: Engine, settler: Settler, lease: Lease) -> None:
        self.id = drainer_id
        self.connection = connection
        self.engine = engine
        self.settler = settler
        self.lease = lease
        self.shard = lease.shard
        self.clock = settler.clock
        self.unmade: deque[Unmade] = deque()  # entries taken in, with tries still to make
        self.unchecked: list[tuple[Unmade, EntryTries]] = []  # tries waiting for the database
        self.postbacks_per_entry = 10.0  # running estimate, to size reads

    def read(self, count: int, block_ms: int) -> list[inbox.Entry]:
        """Up to `count` new entries, waiting up to `block_ms` for one (0: no wait)."""
        try:
            reply: Any = self.connection.xreadgroup(
                keys.GROUP, self.id, {self.shard.inbox: ">"}, count=count, block=block_ms or None
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.create_group()
            return []
        return inbox.entries_from_reply(reply[0][1]) if reply else []

    def create_group(self) -> None:
        try:
            self.connection.xgroup_create(self.shard.inbox, keys.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def accept(self, entries: list[inbox.Entry], config: DeliverySettings, reclaimed: bool) -> None:
        """Take entries in: their tries are made a slice a turn (`make_tries`); tries that may
        have been made before (taken over, or come round again) are first checked against the
        attempt log."""
        for entry in entries:
            try:
                source = read_entry(entry)
            except ValueError as exc:
                self.reject(entry, str(exc))
                continue
            self.postbacks_per_entry = 0.9 * self.postbacks_per_entry + 0.1 * source.remaining
            state = EntryState(entry.id, 0, unmade=source.remaining)
            self.unmade.append(Unmade(source, state, check_log=reclaimed or entry.kind == "t"))

    @property
    def holding(self) -> int:
        """Tries taken in and not yet handed to the engine."""
        unchecked = sum(len(part.tries) for _, part in self.unchecked)
        return unchecked + sum(unmade.source.remaining for unmade in self.unmade)

    def make_tries(self, config: DeliverySettings) -> None:
        """Make the tries of the entries taken in (fill in URLs, write bodies) for
        RENDER_SLICE_SECONDS at most, and hand them to the engine: a large request is made
        across turns of the loop, which takes replies in between."""
        until = time.perf_counter() + RENDER_SLICE_SECONDS
        while self.unmade:
            unmade = self.unmade[0]
            part = unmade.source.take(config, until - time.perf_counter())
            if not unmade.source.remaining:
                self.unmade.popleft()
            self.hand_over(unmade, part, config)
            if time.perf_counter() >= until:
                return

    def hand_over(self, unmade: Unmade, part: EntryTries, config: DeliverySettings) -> None:
        """Tries made of an entry to the engine, those refused straight to the settler."""
        state, tries = unmade.state, part.tries
        if unmade.check_log:
            try:
                resumed = resume(tries, config)
            except DatabaseError:
                # Which of them were recorded cannot be told now: they wait for the database.
                logger.warning("drainer %s: database unavailable, entry %s waits", self.id, state.id)
                self.unchecked.append((unmade, part))
                return
            now = self.clock.monotonic()
            tries = resumed.to_send
            state.follow_ups += [FollowUp(item, now + delay) for item, delay in resumed.follow_ups]
            self.settler.counts["already recorded"] += resumed.settled
        state.unmade -= len(part.tries)
        state.outstanding += len(tries)
        if state.done:
            self.settler.entry_done(state)
        refused = [
            refused_try(Work(item, state), part.refused[item.postback_id])
            for item in tries
            if item.postback_id in part.refused
        ]
        self.settler.collect(refused, config)
        self.engine.add((Work(item, state) for item in tries if item.postback_id not in part.refused), config)

    def reject(self, entry: inbox.Entry, why: str) -> None:
        """Set an entry aside, kept whole for a person to read: it is not ours, or it has
        already brought down MAX_DELIVERIES drainers."""
        shard = self.shard
        logger.error("inbox entry %s set aside in %s: %s", entry.id, shard.rejected, why)
        kept = {"id": entry.id, "kind": entry.kind, "why": why, "payload": entry.payload.decode("utf-8", "replace")}
        with self.connection.pipeline() as pipe:
            pipe.rpush(shard.rejected, json.dumps(kept))
            pipe.xack(shard.inbox, keys.GROUP, entry.id)
            pipe.xdel(shard.inbox, entry.id)
            pipe.execute()

    def retry_unchecked(self, config: DeliverySettings) -> None:
        """Tries that waited for the database to tell what was recorded: check them again."""
        waiting, self.unchecked = self.unchecked, []
        for unmade, part in waiting:
            self.hand_over(unmade, part, config)

    def take_over_orphans(self, config: DeliverySettings) -> None:
        """Claim the entries of a drainer that left or died; one that has brought down
        MAX_DELIVERIES drainers already is set aside rather than tried again."""
        claimed = self.lease.reclaim()
        if not claimed:
            return
        logger.info("drainer %s took over %d entries of a drainer that left or died", self.id, len(claimed))
        for taken in claimed:
            if taken.deliveries > MAX_DELIVERIES:
                self.reject(taken.entry, f"taken over {MAX_DELIVERIES} times: its drainers kept dying")
        self.accept([taken.entry for taken in claimed if taken.deliveries <= MAX_DELIVERIES], config, reclaimed=True)

    def drop_held(self) -> int:
        """Forget the tries not yet made or waiting for the database (handing over: they stay
        pending in their entries for a successor); returns how many."""
        dropped = self.holding
        self.unmade.clear()
        self.unchecked.clear()
        return dropped


class Drainer:
    """The loop of one drain job."""

    def __init__(self, drainer_id: str, connection: Redis, engine: Engine, circuits: Circuits, clock: Clock) -> None:
        self.id = drainer_id
        self.connection = connection
        self.engine = engine
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.lease = Lease(connection, drainer_id, settings.POSTBACK_QUEUE, circuits.redis_clock)
        self.settler = Settler(connection, engine, circuits, clock, self.counts, self.lease.shard)
        self.intake = Intake(drainer_id, connection, engine, self.settler, self.lease)
        self.next_read_at = 0.0
        self.read_pause = 0.0
        self.next_recruit_at = 0.0
        self.stop_seen_at = 0.0
        self.started = 0.0
        self.yielding = False  # handing over to a drain job that waits for a worker

    @classmethod
    def in_this_process(cls, drainer_id: str) -> "Drainer":
        """A drainer on the process's Redis client, transport, circuits and clocks."""
        circuits = process_circuits()
        engine = Engine(process_transport(), circuits, settings.DELIVERY_CONCURRENCY)
        return cls(drainer_id, get_connection(), engine, circuits, circuits.clock)

    def run(self) -> dict[str, int]:
        if not self.lease.take():
            return {"not needed": 1}
        self.intake.create_group()
        started = self.started = self.clock.monotonic()
        last_work = started
        next_housekeeping = 0.0
        try:
            # The process's view of the circuits is kept between jobs: a job starts with it fresh.
            self.settler.tell_circuits(DeliverySettings.current(), {}, fresh=True)
            while True:
                config = DeliverySettings.current()
                now = self.clock.monotonic()
                if now >= next_housekeeping:
                    self._housekeeping(config)
                    next_housekeeping = now + HOUSEKEEPING_SECONDS
                accepting = (
                    not _stop.is_set() and not self.yielding and now - started < settings.DELIVERY_DRAINER_MAX_SECONDS
                )
                if not accepting:
                    self._give_back_unsent()
                    if self._stop_grace_over(now):
                        self.lease.leave(handing_over=True)
                        break
                read = self._read(config) if accepting and self._may_read(config) else 0
                if accepting:
                    self.intake.make_tries(config)
                more_to_make = bool(self.intake.unmade)
                wait = 0.0 if read or more_to_make else self._poll_wait(reading=accepting and self._has_room(config))
                self.settler.collect(self.engine.step(config, timeout=wait), config)
                if self.settler.is_due(idle=not read and not self.engine.busy):
                    self._settle(config)
                if read or self._busy():
                    last_work = self.clock.monotonic()
                elif not accepting:
                    self.lease.leave(handing_over=True)
                    break
                elif self._idle_since(last_work) and self.lease.leave():
                    break
        except BaseException:
            self._release_after_failure()
            raise
        return dict(self.counts)

    def _idle_since(self, last_work: float) -> bool:
        return self.clock.monotonic() - last_work >= settings.DELIVERY_DRAINER_IDLE_SECONDS

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
        if self.settler.finished:
            self._settle(DeliverySettings.current())
        return True

    def _busy(self) -> bool:
        return self.engine.busy or self.settler.holding or bool(self.intake.holding)

    def _may_read(self, config: DeliverySettings) -> bool:
        """Read when there is room, and not again at once after a read that emptied the stream
        while requests are out: entries trickling in are then read a few at a time."""
        return self._has_room(config) and (not self._busy() or self.clock.monotonic() >= self.next_read_at)

    def _poll_wait(self, reading: bool) -> float:
        """How long to wait for replies (a ready socket ends the wait at once): POLL_SECONDS,
        or less when the next read or the next settle is due sooner."""
        now = self.clock.monotonic()
        wait = POLL_SECONDS
        if reading and self._busy():
            wait = min(wait, self.next_read_at - now)
        settle_at = self.settler.due_at()
        if settle_at is not None:
            wait = min(wait, settle_at - now)
        return max(0.0, wait)

    def _has_room(self, config: DeliverySettings) -> bool:
        return self._held() < self._hold_limit(config)

    def _held(self) -> int:
        """Postbacks this drainer holds: to make, waiting to start, in flight."""
        return self.intake.holding + self.engine.waiting + self.engine.in_flight

    def _hold_limit(self, config: DeliverySettings) -> int:
        """Postbacks read ahead of sending: enough to keep every connection busy and hosts
        that stall from blocking others, bounded so memory is, and no more than this drainer
        can start soon: what it leaves in the stream, other drainers read."""
        return max(2 * self.engine.concurrency, 4 * config.batch_size)

    def _read(self, config: DeliverySettings) -> int:
        room = self._hold_limit(config) - self._held()
        count = max(1, min(READ_MOST, int(room / max(1.0, self.intake.postbacks_per_entry))))
        idle = not self._busy()
        block = min(IDLE_BLOCK_MS, int(settings.DELIVERY_DRAINER_IDLE_SECONDS * 1000)) if idle else 0
        entries = self.intake.read(count, self.clock.read_block_ms(block) if block else 0)
        self._pause_reading(found=len(entries), asked=count)
        if entries:
            self.intake.accept(entries, config, reclaimed=False)
            if len(entries) == count or self._needs_help():
                self._recruit()
        return len(entries)

    def _pause_reading(self, found: int, asked: int) -> None:
        """When to read next: at once after a full read; after READ_PAUSE_SECONDS after one
        that found some; after twice the last pause (to READ_PAUSE_MAX_SECONDS) after one that
        found none."""
        if found == asked:
            self.read_pause = 0.0
        elif found:
            self.read_pause = READ_PAUSE_SECONDS
        else:
            self.read_pause = min(READ_PAUSE_MAX_SECONDS, max(READ_PAUSE_SECONDS, 2 * self.read_pause))
        self.next_read_at = self.clock.monotonic() + self.read_pause

    def _recruit(self) -> None:
        """Ask for a colleague, at most once a RECRUIT_PAUSE_SECONDS (each ask is a script call;
        the lease refuses once every worker has a drainer)."""
        now = self.clock.monotonic()
        if now >= self.next_recruit_at:
            self.next_recruit_at = now + RECRUIT_PAUSE_SECONDS
            unless_redis_is_full(self.lease.recruit, "recruiting a colleague")

    def _settle(self, config: DeliverySettings) -> None:
        self.settler.settle(config, wait=lambda seconds: self._wait_for_database(seconds, config))

    def _wait_for_database(self, seconds: float, config: DeliverySettings) -> None:
        """Between retries of a database write: keep the lease, and take the replies of requests
        already out (left unread, they would time out on our side). Nothing new is sent."""
        until = self.clock.monotonic() + seconds
        while (left := until - self.clock.monotonic()) > 0:
            self.lease.renew()
            end = self.clock.monotonic() + min(left, HOUSEKEEPING_SECONDS)
            while self.clock.monotonic() < end:
                timeout = min(0.05, end - self.clock.monotonic())
                self.settler.collect(self.engine.step(config, timeout=timeout, start=False), config)
                if not self.engine.in_flight:
                    self.clock.sleep(max(0.0, end - self.clock.monotonic()))

    def _housekeeping(self, config: DeliverySettings) -> None:
        """Each second: what only moves work along (due tries, orphans, colleagues, counts)
        waits while Redis is full; the drainer goes on delivering what it holds."""
        collector.collect_when_due()
        self.lease.renew()
        unless_redis_is_full(inbox.sweep, "moving due tries into the inbox")
        self.yielding = self.yielding or self._a_starving_shard_waits()
        try:
            unless_redis_is_full(fold_accepted_now_and_then, "folding accepted counts")
        except DatabaseError:
            logger.warning("drainer %s: accepted counts not folded, the database is unavailable", self.id)
        self.intake.retry_unchecked(config)
        if self._has_room(config):
            unless_redis_is_full(lambda: self.intake.take_over_orphans(config), "taking over orphaned entries")
        if self._needs_help():
            self._recruit()
        unless_redis_is_full(lambda: self.settler.tell_circuits(config, {}), "reading the circuits")

    def _a_starving_shard_waits(self) -> bool:
        """This drainer has run FAIR_SHARE_SECONDS and a drain job waits in RQ's queue for a
        shard that no running drainer serves: with more shards than workers, that shard would
        wait for DELIVERY_DRAINER_MAX_SECONDS. Handing over (the successor queues behind it)
        drains the shards in turn. A job queued for a shard that is drained already (a
        colleague recruited while every worker is busy) is no reason to stop."""
        if self.clock.monotonic() - self.started < FAIR_SHARE_SECONDS:
            return False
        queued = set(get_queue().get_job_ids(0, QUEUED_LOOKED_AT - 1))
        now_ms = round(self.lease.redis_clock.now() * 1000)
        for shard in {shard_of_drainer(job_id) for job_id in queued} - {self.lease.shard}:
            leases: list[bytes] | None = None
            with shards.unless_a_master_is_down(f"looking at inbox shard {shard.id}'s drainers"):
                leases = self.connection.zrangebyscore(shard.leases, now_ms, "+inf")  # type: ignore[assignment]
            if leases is not None and not {lease.decode() for lease in leases} - queued:
                return True
        return False

    def _needs_help(self) -> bool:
        """Every connection busy with work waiting, or a round of connections' worth waiting
        to start: another worker's drainer would deliver some of it now (the lease allows one
        drainer per worker at most). Full reads recruit too, but behind slow receivers the
        connections fill, and work waits, long before reads come back full."""
        engine = self.engine
        saturated = engine.in_flight >= engine.concurrency and engine.waiting > 0
        return saturated or engine.waiting >= engine.concurrency

    def _give_back_unsent(self) -> None:
        """Stop sending: tries not yet started stay pending in their entries for a successor."""
        dropped = len(self.engine.drop_waiting()) + self.intake.drop_held()
        if dropped:
            self.counts["handed over"] += dropped

    def _release_after_failure(self) -> None:
        """The job is failing: drop what it has in flight (the transport outlives the job, and
        the next job's engine must not receive its replies; its entries are sent again by the
        drainer that takes them over), and let its entries go soon."""
        self.engine.transport.abandon()
        try:
            self.lease.release_after_failure()
        except Exception:  # already failing; the lease runs out by itself
            logger.warning("drainer %s could not shorten its lease", self.id, exc_info=True)
