"""The inbox's commit protocol, usable from any poll loop: `process(conn, consumer, records, handler)`.

For a polled batch, ONE PostgreSQL transaction holds: the inbox rows of the new events (repeats
suppressed and counted), the handler's writes for each new event (made on `conn`), the dead
letters of records without a valid event id, and the next offset of every partition in the batch.
It commits or rolls back as one, so after any crash the stored offsets, the inbox and the
handler's state agree: an event's effect in this database happens exactly once.

When the handler raises, the batch is rolled back, the records before the failing one are
committed in a batch of their own, and the failing record is retried alone with exponential
backoff; after `max_attempts` it is dead-lettered and its partition moves on. A handler that
raises NonRetryable says retrying is pointless: that record is dead-lettered after that attempt.
Per-partition order is preserved throughout.

Records are handled in (topic, partition) order, each partition in the order given: two instances
holding the same partitions for a moment (a rebalance) then take their row locks in the same order
instead of deadlocking. A deadlock or serialization failure that happens anyway (e.g. the same
event redelivered at other offsets, or the handler's own rows) is not the handler's fault: the
transaction is rolled back and run again after a short pause, a bounded number of times, without
counting as a failed attempt; if it keeps failing, the rest is left unprocessed for a later poll.
"""

from __future__ import annotations

import logging
import operator
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import psycopg
from psycopg.pq import TransactionStatus

from inbox import codec, store, tracing
from inbox.errors import InboxError, NonRetryable
from inbox.message import Message, Record
from inbox.plan import Partition, Plan, Suppressed, plan_batch
from inbox.retry import DEFAULT_POLICY, RetryPolicy

log = logging.getLogger("inbox")

Handler = Callable[[psycopg.Connection, Message], None]

# serialization_failure, deadlock_detected: PostgreSQL aborted the transaction to resolve a conflict
# with another one; the same transaction run again normally succeeds.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})
TRANSIENT_RETRIES = 8
TRANSIENT_BACKOFF_S = (0.05, 1.0)  # first pause, cap; doubling, jittered so two victims do not collide again

_partition_of = operator.attrgetter("topic", "partition")


def is_transient(exc: BaseException) -> bool:
    return getattr(exc, "sqlstate", None) in TRANSIENT_SQLSTATES


class _GaveUp(Exception):
    """Transient conflicts outlasted their retries, or an interrupt came during their pause."""


@dataclass
class BatchResult:
    processed: int = 0  # handed to the handler and committed
    duplicates: int = 0  # suppressed (already in the inbox, or repeated within the batch)
    dead_lettered: int = 0
    transactions: int = 0  # committed
    committed: dict[Partition, int] = field(default_factory=dict)  # next offset now stored in PostgreSQL
    # First offset per partition that was NOT processed (interrupted, or out of time while retrying).
    # The caller must seek the consumer there before polling again, or those records are skipped.
    unprocessed: dict[Partition, int] = field(default_factory=dict)


@dataclass
class _Failure:
    index: int  # within the attempted chunk
    exc: Exception


def process(conn: psycopg.Connection, consumer: str, records: Iterable[Record] | Mapping[object, list[Record]],
            handler: Handler, *, policy: RetryPolicy = DEFAULT_POLICY, interrupt: threading.Event | None = None,
            deadline: float | None = None, plan: Plan | None = None) -> BatchResult:
    """Process a batch exactly once into the database behind `conn`. See the module docstring.

    records   kafka-python ConsumerRecords in poll order, or poll()'s dict of them
    handler   handler(conn, message): make the event's writes on `conn`, do not commit
    interrupt set it (e.g. on SIGTERM) to stop after the current record once retries are involved
    deadline  time.monotonic() by which to stop retrying; records not reached are left unprocessed
    plan      plan_batch(records), when the caller computed it already (the Runner does so on its
              polling thread, see consumer.py); records must then already be in (topic, partition)
              order (see lock_order)
    """
    if plan is None:
        records = lock_order(records)
    elif isinstance(records, Mapping):
        records = [r for batch in records.values() for r in batch]
    elif not isinstance(records, list):
        records = list(records)
    check_consumer_name(consumer)
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise InboxError("process() runs its own transactions, but the connection has one open. "
                         "Fix: commit or roll back first, or use a connection with autocommit=True.")
    return _Batch(conn, consumer, handler, policy, interrupt or threading.Event(), deadline).run(records, plan)


def lock_order(records: Iterable[Record] | Mapping[object, list[Record]]) -> list[Record]:
    """The records in (topic, partition) order, each partition's records in the order given.

    Every instance then inserts inbox rows, upserts offsets and runs handlers in the same order, so
    two of them working on the same partitions wait for each other instead of deadlocking. A stable
    sort by partition only: within a partition, poll order is offset order and must be kept."""
    if isinstance(records, Mapping):
        records = (r for batch in records.values() for r in batch)
    return sorted(records, key=_partition_of)


def check_consumer_name(consumer: str) -> None:
    if not consumer or len(consumer) > 200 or not consumer.isprintable():
        raise InboxError(f"consumer name {consumer!r} must be 1-200 printable characters "
                         f"(it names the inbox rows and, by default, the Kafka consumer group)")


class _Batch:
    def __init__(self, conn, consumer, handler, policy, interrupt, deadline):
        self.conn, self.consumer, self.policy = conn, consumer, policy
        self.handler = tracing.instrument(handler)
        self.interrupt, self.deadline = interrupt, deadline
        self.result = BatchResult()
        self.retrying = False  # once a handler failed, SIGTERM may stop us between records

    def run(self, records: list[Record], plan: Plan | None) -> BatchResult:
        n = len(records)
        failing: dict[int, tuple[int, Exception, datetime]] = {}  # index -> (attempts made, last error, first failure)
        pos = 0
        while pos < n:
            # Interrupted once retries began: still commit the records just seen succeeding before a
            # failing one, then stop; the rest is redelivered from the stored offsets.
            if self.retrying and self.interrupt.is_set() and (pos in failing or not failing):
                self._leave(records[pos:])
                break
            try:
                if pos in failing:
                    if not self._retry_alone(records[pos], *failing.pop(pos)):
                        self._leave(records[pos:])
                        break
                    pos += 1
                    continue
                end = min((i for i in failing if i > pos), default=n)
                whole = pos == 0 and end == n
                failure = self._attempt(records if whole else records[pos:end], plan=plan if whole else None)
            except _GaveUp:
                self._leave(records[pos:])
                break
            if failure is None:
                pos = end
            else:
                # Commit the records before the failing one on the next turn, then isolate it.
                self.retrying = True
                failing[pos + failure.index] = (1, failure.exc, datetime.now(timezone.utc))
                self._log_failure(records[pos + failure.index], 1, failure.exc)
        return self.result

    # ----- one transaction

    def _transient_retries(self, what: str, transaction: Callable[[], object]):
        """Run `transaction` again while PostgreSQL aborts it to resolve a deadlock or serialization
        conflict. Raises _GaveUp when that outlasts TRANSIENT_RETRIES or an interrupt comes."""
        for retry in range(1, TRANSIENT_RETRIES + 2):
            try:
                return transaction()
            except psycopg.Error as exc:
                if not is_transient(exc) or self.conn.broken:
                    raise
                if retry > TRANSIENT_RETRIES:
                    log.error("consumer %s: %s aborted by PostgreSQL %d times in a row (%s); leaving it for "
                              "the next poll", self.consumer, what, retry, codec.describe_error(exc))
                    raise _GaveUp() from exc
                first, cap = TRANSIENT_BACKOFF_S
                delay = min(cap, first * 2 ** (retry - 1)) * (0.5 + random.random() / 2)
                log.warning("consumer %s: %s rolled back by PostgreSQL (%s); running it again in %.2f s "
                            "(retry %d/%d)", self.consumer, what, codec.describe_error(exc), delay, retry,
                            TRANSIENT_RETRIES)
                if self.interrupt.wait(delay):
                    raise _GaveUp() from exc
        raise AssertionError("unreachable")

    def _attempt(self, chunk: Sequence[Record], attempt: int = 1, plan: Plan | None = None) -> _Failure | None:
        """Run `chunk` in one transaction; on handler failure roll back and say which record failed."""
        plan = plan or plan_batch(chunk)
        first = chunk[0]
        what = (f"the transaction of {len(chunk)} record(s) from {first.topic}[{first.partition}]@{first.offset}")
        return self._transient_retries(what, lambda: self._attempt_once(chunk, attempt, plan))

    def _attempt_once(self, chunk: Sequence[Record], attempt: int, plan: Plan) -> _Failure | None:
        conn, consumer = self.conn, self.consumer
        failure = None
        with conn.transaction():
            new = store.record_batch(conn, consumer, chunk, plan)
            store.count_duplicates(conn, consumer, chunk, plan.suppressed(new))
            for i, reason in plan.invalid.items():
                store.insert_dead_letter(conn, consumer, chunk[i], reason="invalid_envelope", error=reason,
                                         detail=None, attempts=0, event_id=None, first_failed_at=None)
                log.error("dead-lettered %s[%d]@%d for consumer %s: %s", chunk[i].topic, chunk[i].partition,
                          chunk[i].offset, consumer, reason)
            handler, event_ids = self.handler, plan.event_ids
            for i in new:
                try:
                    handler(conn, Message(chunk[i], event_ids[i], consumer, attempt))
                except Exception as exc:  # noqa: BLE001 - any handler error is retried, then dead-lettered
                    if conn.broken or is_transient(exc):
                        raise  # lost connection: the caller's business; a conflict: _transient_retries
                    failure = _Failure(i, exc)
                    raise psycopg.Rollback() from None
        if failure is not None:
            return failure
        self._committed(plan.next_offsets, plan.tallies(chunk, new))
        return None

    def _retry_alone(self, record: Record, attempts: int, error: Exception, first_failed: datetime) -> bool:
        """Retry one failing record with backoff, then dead-letter it. False if interrupted first."""
        # Checked here, off the hot path: only a record that already failed pays for it.
        while attempts < self.policy.max_attempts and not isinstance(error, NonRetryable):
            delay = self.policy.delay(attempts)
            if not self._may_wait(delay):
                return False
            attempts += 1
            failure = self._attempt([record], attempts)
            if failure is None:
                return True
            error = failure.exc
            self._log_failure(record, attempts, error)
        self._dead_letter(record, attempts, error, first_failed)
        return True

    def _dead_letter(self, record: Record, attempts: int, error: Exception, first_failed: datetime) -> None:
        plan = plan_batch([record])
        what = f"dead-lettering {record.topic}[{record.partition}]@{record.offset}"
        self._transient_retries(what, lambda: self._dead_letter_once(record, attempts, error, first_failed, plan))

    def _dead_letter_once(self, record: Record, attempts: int, error: Exception, first_failed: datetime,
                          plan: Plan) -> None:
        conn, consumer = self.conn, self.consumer
        event_id = plan.event_ids[0]
        with conn.transaction():
            claimed = store.claim_for_dead_letter(conn, consumer, record, event_id)
            if claimed:
                store.insert_dead_letter(conn, consumer, record, reason="handler_failed",
                                         error=codec.describe_error(error), detail=codec.error_detail(error),
                                         attempts=attempts, event_id=event_id, first_failed_at=first_failed)
                tallies = {(record.topic, record.partition): (0, 0, 1)}
            else:  # processed meanwhile by another instance: this delivery is a duplicate
                store.count_duplicates(conn, consumer, [record], [Suppressed(event_id, 1, 0, True)])
                tallies = {(record.topic, record.partition): (0, 1, 0)}
            store.advance(conn, consumer, plan.next_offsets, tallies)
        if claimed:
            log.error("dead-lettered event %s (%s[%d]@%d) for consumer %s after %d attempts: %s. "
                      "Replay with: outbox inbox replay --consumer %s --event %s", event_id, record.topic,
                      record.partition, record.offset, consumer, attempts, codec.describe_error(error),
                      consumer, event_id)
        self._committed(plan.next_offsets, tallies)

    # ----- bookkeeping

    def _may_wait(self, delay: float) -> bool:
        if self.interrupt.is_set():
            return False
        # Out of time (the consumer must poll again soon): give up unless nothing was committed yet,
        # so every call makes progress even when one record's retries use the whole budget.
        if self.deadline is not None and self.result.transactions and time.monotonic() + delay > self.deadline:
            return False
        return not self.interrupt.wait(delay)

    def _committed(self, next_offsets: dict[Partition, int], tallies: dict[Partition, tuple[int, int, int]]) -> None:
        r = self.result
        r.transactions += 1
        for tp, nxt in next_offsets.items():
            if nxt > r.committed.get(tp, -1):
                r.committed[tp] = nxt
        for p, d, x in tallies.values():
            r.processed += p
            r.duplicates += d
            r.dead_lettered += x

    def _leave(self, rest: Sequence[Record]) -> None:
        for r in rest:
            tp = (r.topic, r.partition)
            if r.offset < self.result.unprocessed.get(tp, r.offset + 1):
                self.result.unprocessed[tp] = r.offset

    def _log_failure(self, record: Record, attempt: int, exc: Exception) -> None:
        more = attempt < self.policy.max_attempts and not isinstance(exc, NonRetryable)
        log.warning("handler of consumer %s failed on %s[%d]@%d (attempt %d/%d): %s%s", self.consumer,
                    record.topic, record.partition, record.offset, attempt, self.policy.max_attempts,
                    codec.describe_error(exc), "; will retry" if more else "; dead-lettering")
