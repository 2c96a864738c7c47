"""Settling what a drainer delivered: attempt rows, follow-up tries, acknowledged entries.

Finished tries gather until a batch is due (`Settler.is_due`); then their attempt rows are
written in one INSERT, and one script call schedules the tries that follow (retries, deferrals)
and acknowledges the entries whose postbacks are all recorded. An entry is acknowledged only
after its records are written, so a drainer that dies at any instant leaves its entries pending
for the next one, which reads the attempt log before sending (`delivery.progress`).

Follow-ups are due at a time on this process's monotonic clock until they are scheduled: the
script then makes each due that long after Redis's now, so no machine's wall clock decides when
a try comes round (docs/decisions.md, "Redis's clock").
"""

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from redis import Redis

from delivery.circuit import Circuits, HostReport
from delivery.clock import Clock
from delivery.engine import Finished, Work
from delivery.full_redis import unless_redis_is_full
from delivery.models import DeliverySettings, Outcome
from delivery.policy import host_answered, outcome_of, retry_delay_seconds
from delivery.recording import Record, attempt_record, count_in_metrics, deferral_record, log_attempts, save_attempts
from postbackproject import inbox, shards, tracing
from postbackproject.postback import Try
from postbackproject.shards import Shard

# Finished tries are settled when this many have gathered, or the oldest has waited this long.
SETTLE_BATCH = 500
SETTLE_WAIT_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class FollowUp:
    """A try to make later: due at `due` on this process's monotonic clock."""

    item: Try
    due: float


@dataclass(eq=False)
class EntryState:
    """An entry read and not yet acknowledged: acknowledged once all its tries are made and
    none of them is outstanding."""

    id: str
    outstanding: int
    follow_ups: list[FollowUp] = field(default_factory=list)
    unmade: int = 0  # tries not yet made, or waiting for the database to be checked

    @property
    def done(self) -> bool:
        return not self.outstanding and not self.unmade


class HostTurns(Protocol):
    """What settling needs of the engine: give hosts whose circuits changed another turn."""

    def reconsider(self, hosts: Iterable[str] | None = None) -> None: ...


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


def end_span(item: Finished, row: Record) -> None:
    """The attempt's span ends with what its row records (a try without one, deferred or
    refused, gets its span now), while traces are on."""
    work = item.work
    if work.span is None and tracing.tracer() is None:
        return
    tried = work.item
    facts = (tried.traceparent, tried.method, work.host, tried.attempt, tried.postback_id)
    tracing.end_attempt(work.span, facts, row.outcome, row.response_code, row.response_time_ms, row.error)
    work.span = None


class Settler:
    """Gathers finished tries and settles them in batches; tells circuits what hosts did.
    Follow-up tries wait in the inbox shard the entries came from."""

    def __init__(
        self,
        connection: Redis,
        engine: HostTurns,
        circuits: Circuits,
        clock: Clock,
        counts: Counter[str],
        shard: Shard,
    ) -> None:
        self.connection = connection
        self.shard = shard
        self.engine = engine
        self.circuits = circuits
        self.clock = clock
        self.counts = counts  # by outcome, for the job's result
        self.finished: list[Finished] = []
        self.finished_since = 0.0
        # Failures in a row per host among `finished`, and whether a circuit must hear now.
        self.failing: Counter[str] = Counter()
        self.urgent = False
        self.done_entries: list[EntryState] = []  # nothing outstanding, waiting to be acknowledged

    @property
    def holding(self) -> bool:
        """Whether anything waits to be settled or acknowledged."""
        return bool(self.finished) or bool(self.done_entries)

    def collect(self, finished: list[Finished], config: DeliverySettings) -> None:
        if finished and not self.finished:
            self.finished_since = self.clock.monotonic()
        self.finished.extend(finished)
        for item in finished:
            self._watch_circuit(item, config)

    def entry_done(self, state: EntryState) -> None:
        self.done_entries.append(state)

    def due_at(self) -> float | None:
        """When what has finished must be settled at the latest (monotonic); None: nothing."""
        if not self.finished:
            return self.clock.monotonic() if self.done_entries else None
        return self.clock.monotonic() if self.urgent else self.finished_since + SETTLE_WAIT_SECONDS

    def is_due(self, idle: bool) -> bool:
        """Settle in batches: when many have finished, the oldest has waited long enough, a
        circuit must hear now, or nothing else is going on (before an idle read blocks)."""
        if not self.finished:
            return bool(self.done_entries)
        waited = self.clock.monotonic() - self.finished_since
        return self.urgent or idle or len(self.finished) >= SETTLE_BATCH or waited >= SETTLE_WAIT_SECONDS

    def settle(self, config: DeliverySettings, wait: Callable[[float], None]) -> None:
        """Record what finished, then schedule its follow-ups and acknowledge done entries;
        `wait(seconds)` passes the time while the database is unavailable."""
        finished, self.finished = self.finished, []
        self.failing.clear()
        self.urgent = False
        rows, follow_ups = self._records(finished, config)
        written = save_attempts(rows, wait=wait, bodies=config.store_response_body)
        self._commit(follow_ups)
        reports = host_reports(finished)
        unless_redis_is_full(lambda: self.tell_circuits(config, reports), "reporting to the circuits")
        count_in_metrics(rows)
        log_attempts(written)

    def tell_circuits(self, config: DeliverySettings, reports: dict[str, HostReport], fresh: bool = False) -> None:
        """Report to the circuits (with nothing to report: refresh this process's view), and
        give the hosts whose circuits changed another turn in the engine.

        The circuits live under one hash tag, so on a Redis Cluster on one master, maybe not
        this shard's: while that master fails over, the drainer delivers on with its view of
        the circuits as last read, and this report's failures go uncounted (a circuit opens a
        few failures later), rather than stop every shard's drainers."""
        threshold, open_seconds = config.circuit_failure_threshold, config.circuit_open_seconds
        changed: set[str] = set()
        with shards.unless_a_master_is_down(f"reporting {len(reports)} hosts to the circuits"):
            changed = self.circuits.report(reports, threshold, open_seconds, fresh)
        if changed:
            self.engine.reconsider(changed)

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

    def _records(self, finished: list[Finished], config: DeliverySettings) -> tuple[list[Record], list[FollowUp]]:
        """An attempt row for each finished try, and the tries that follow."""
        rows: list[Record] = []
        follow_ups: list[FollowUp] = []
        now = self.clock.monotonic()
        redis_now = self.circuits.redis_clock.now() if any(item.response is None for item in finished) else 0.0
        for item in finished:
            tried, response = item.work.item, item.response
            if response is None:
                until = datetime.fromtimestamp(item.deferred_until, UTC)
                rows.append(deferral_record(tried, item.work.host, item.reason, until))
                follow_ups.append(FollowUp(tried, now + item.deferred_until - redis_now))  # the same try, later
            else:
                rules = item.work.config or config  # its destination's (a refused try has none)
                outcome = outcome_of(response, tried.try_in_series, rules)
                rows.append(attempt_record(tried, item.work.host, response, outcome))
                if outcome == Outcome.RETRY:
                    delay = retry_delay_seconds(tried.try_in_series, response.retry_after_seconds, rules)
                    follow_ups.append(FollowUp(replace(tried, attempt=tried.attempt + 1), now + delay))
            self.counts[rows[-1].outcome] += 1
            self._one_done(item.work)
            end_span(item, rows[-1])
        return rows, follow_ups

    def _one_done(self, work: Work) -> None:
        state = work.origin
        assert isinstance(state, EntryState)
        state.outstanding -= 1
        if state.done:
            self.entry_done(state)

    def _commit(self, follow_ups: list[FollowUp]) -> None:
        """Schedule the follow-ups and acknowledge the done entries, in one script call."""
        entries, self.done_entries = self.done_entries, []
        for state in entries:
            follow_ups.extend(state.follow_ups)
        if not follow_ups and not entries:
            return
        now = self.clock.monotonic()
        tries = [(follow_up.item, follow_up.due - now) for follow_up in follow_ups]
        redis_clock = self.circuits.redis_clock
        asked_at = redis_clock.asking()
        done = [state.id for state in entries]
        redis_clock.heard(inbox.schedule_tries(self.shard, tries, done, self.connection), asked_at)
