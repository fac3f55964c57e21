"""The relay's bookkeeping as one pure state machine: no I/O, no clock, no threads.

Decoded stream messages and the outcomes of earlier actions go in; actions come out in the order
they must be performed (`Bookkeeper.actions`, drained by the pipeline):

    (OPEN, batch)            record the batch's intent in PostgreSQL (exactly-once: begin a Kafka
                             transaction) before any of its records is sent
    (SEND, batch, i, record) hand record i of the batch to the producer
    (CLOSE, batch)           no more records join the batch; exactly-once: flush, report outcomes
                             with records_done(), write prepared(), commit with checkpoint_for(),
                             then committed()
    (PERSIST, batch)         write the batch's outcome to PostgreSQL; then persisted()

Three positions matter, always in this order: Kafka has every record of a batch (or the batch's
Kafka transaction committed), the batch's outcome (dead letters included) is in PostgreSQL, and
only then may the slot's confirmed LSN move past the batch. `confirmed` never passes an event
that is neither in Kafka nor durably dead-lettered. Positions are Commit end LSNs (acking the
commit LSN itself would replay the transaction) or idle keepalive positions with nothing pending.

No input can stall it: a batch is closed the moment the in-flight budget is used up, so the
records that fill the budget always get an outcome and release it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from relay.checkpoint import Checkpoint

OPEN, SEND, CLOSE, PERSIST = "open", "send", "close", "persist"


class Restart(Exception):
    """Kafka did not take a batch; the pipeline restarts from the slot's confirmed position."""


@dataclass(frozen=True, slots=True)
class Failure:
    permanent: bool  # the broker will never accept this record: dead-letter it
    reason: str
    message: str
    refused: bool = False  # refused by the producer before sending (never part of a Kafka transaction)


@dataclass(slots=True)
class DeadLetter:
    event_id: bytes
    reason: str
    error: str
    row: tuple  # the decoded outbox row, for the dead-letter copy
    layout: object  # its column layout
    commit_lsn: int


@dataclass(eq=False, slots=True)
class Batch:
    """A run of consecutive events tracked together (one Kafka transaction in exactly-once mode)."""

    first_lsn: int
    opened_at: float
    layout: object = None  # column layout of `rows`
    batch_id: int = 0  # the relay_batches row, set when the OPEN action is performed
    event_ids: list = field(default_factory=list)  # of the records sent
    rows: list = field(default_factory=list)  # decoded rows of the records sent
    commit_ts: list = field(default_factory=list)  # µs since 2000 of each sent event's transaction
    handles: list = field(default_factory=list)  # the producer's futures, filled by the pipeline
    nbytes: int = 0
    dead: list = field(default_factory=list)  # DeadLetter
    xids: list = field(default_factory=list)  # producing transactions whose last event is in this batch
    ack_lsn: int | None = None  # end LSN of the last transaction completed in this batch
    last_commit_lsn: int = 0  # its commit LSN (exactly-once checkpoint)
    partial_commit_lsn: int = 0  # a transaction still open when the batch closed...
    partial_events: int = 0  # ...and how many of its events this and earlier batches hold
    backfill_after: tuple[str, str] | None = None  # (created_at, event_id) of its last backfilled event
    closed: bool = False
    kafka_done: bool = False  # every record has an outcome in Kafka (or the transaction committed)
    persisted: bool = False
    checked: int = 0  # handles[:checked] are known to be done (the pipeline's scan resumes there)

    @property
    def backfilled(self) -> bool:
        """Rows read from the table: their commit_ts are the events' created_at, not commit times."""
        return self.backfill_after is not None


@dataclass(slots=True)
class _Txn:
    final_lsn: int
    commit_ts: int
    skip_all: bool = False  # exactly-once: already fully in a committed Kafka transaction
    skip_left: int = 0  # exactly-once: this many leading events already committed
    index: int = 0  # outbox events of this transaction seen so far (skipped included)
    events: int = 0  # events of this transaction in this session's batches
    txid: bytes | None = None


class Bookkeeper:
    def __init__(self, *, exactly_once: bool, batch_max_events: int, batch_max_bytes: int, batch_max_age_s: float,
                 max_inflight_events: int, max_inflight_bytes: int, confirmed: int, now: float,
                 checkpoint: Checkpoint | None = None, poison: dict | None = None):
        self.eos = exactly_once
        self.batch_max_events = batch_max_events
        self.batch_max_bytes = batch_max_bytes
        self.batch_max_age_s = batch_max_age_s
        self.max_inflight_events = max_inflight_events
        self.max_inflight_bytes = max_inflight_bytes
        self.confirmed = confirmed
        self.received = confirmed
        # What the Kafka checkpoint says is in Kafka at the start (skipped), and the latest one.
        self.resume = checkpoint or Checkpoint()
        self.checkpoint = self.resume
        self.poison: dict[bytes, Failure] = poison if poison is not None else {}
        self.actions: list = []
        self.queue: deque = deque()  # Batch, or an int: a bare position with nothing to wait for
        self.batch: Batch | None = None
        self.txn: _Txn | None = None
        self.layout = None
        self.inflight_events = 0
        self.inflight_bytes = 0
        self.last_progress = now
        self.backfill_snapshot = ""

    # ----- state

    @property
    def saturated(self) -> bool:
        return self.inflight_events >= self.max_inflight_events or self.inflight_bytes >= self.max_inflight_bytes

    @property
    def idle(self) -> bool:
        """Nothing open and nothing waiting: the slot may move to any position the server reports."""
        return self.txn is None and self.batch is None and not self.queue

    def stalled(self, now: float, timeout_s: float) -> bool:
        """Work is waiting and nothing has been acknowledged for timeout_s."""
        return bool(self.queue) and now - self.last_progress > timeout_s

    def pending(self) -> list[Batch]:
        return [item for item in self.queue if type(item) is Batch]

    def awaiting_kafka(self):
        """Closed batches whose records still need an outcome from Kafka (at-least-once)."""
        for item in self.queue:
            if type(item) is Batch:
                if not item.closed:
                    return
                if not item.kafka_done:
                    yield item

    # ----- the stream

    def set_layout(self, layout) -> None:
        """The outbox table's column layout changed (a Relation message): rows of a batch share one."""
        if self.batch is not None and self.batch.rows and self.batch.layout is not layout:
            self._close()
        self.layout = layout

    def begin(self, final_lsn: int, commit_ts: int) -> None:
        txn = self.txn = _Txn(final_lsn, commit_ts)
        if self.eos:
            txn.skip_all = self.resume.skip_transaction(final_lsn)
            txn.skip_left = self.resume.events_to_skip(final_lsn)

    def skip_event(self) -> bool:
        """True (and counted) if the next event of the open transaction is already in Kafka."""
        txn = self.txn
        if txn is None:
            return True  # a row outside a transaction cannot happen in pgoutput; nothing to track
        if txn.skip_all:
            txn.index += 1
            return True
        if txn.skip_left:
            txn.skip_left -= 1
            txn.index += 1
            return True
        return False

    def event(self, event_id: bytes, txid: bytes, row: tuple, record, now: float) -> None:
        """An event of the open transaction, routed to `record` (topic, key, value, headers, size)."""
        batch = self._batch_for_event(now)
        txn = self.txn
        txn.index += 1
        txn.events += 1
        txn.txid = txid
        failure = self.poison.get(event_id)
        if failure is not None:
            batch.dead.append(DeadLetter(event_id, failure.reason, failure.message, row, self.layout, txn.final_lsn))
            return
        i = len(batch.event_ids)
        batch.event_ids.append(event_id)
        batch.rows.append(row)
        batch.commit_ts.append(txn.commit_ts)
        batch.handles.append(None)
        size = record.size
        batch.nbytes += size
        self.inflight_events += 1
        self.inflight_bytes += size
        self.actions.append((SEND, batch, i, record))
        if self.inflight_events >= self.max_inflight_events or self.inflight_bytes >= self.max_inflight_bytes:
            self._close()  # never hold an open batch while waiting for the budget: it would wait forever

    def unroutable(self, event_id: bytes, txid: bytes, row: tuple, reason: str, error: str, now: float) -> None:
        """An event of the open transaction that cannot become a Kafka record: dead-letter it."""
        batch = self._batch_for_event(now)
        txn = self.txn
        txn.index += 1
        txn.events += 1
        txn.txid = txid
        batch.dead.append(DeadLetter(event_id, reason, error, row, self.layout, txn.final_lsn))

    def commit(self, commit_lsn: int, end_lsn: int | None, now: float) -> None:
        """The open transaction committed. end_lsn None: a backfilled group (no position to confirm)."""
        txn, self.txn = self.txn, None
        if txn is not None and txn.events:
            # The commit must travel with a batch: it carries the xid that says the transaction is done.
            batch = self.batch or self._open(now, txn.final_lsn)
            batch.xids.append(txn.txid)
        batch = self.batch
        if batch is not None:
            if end_lsn is not None:
                batch.ack_lsn = end_lsn
            if commit_lsn:
                batch.last_commit_lsn = commit_lsn
            batch.partial_commit_lsn = batch.partial_events = 0
            if now - batch.opened_at >= self.batch_max_age_s:
                self._close()
        elif end_lsn is not None:
            self._mark(end_lsn)
        if end_lsn is not None and end_lsn > self.received:
            self.received = end_lsn

    def keepalive(self, wal_end: int) -> None:
        if wal_end > self.received:
            self.received = wal_end
        # Only with nothing pending may the slot move to the server's position: that is what lets it
        # advance past WAL of unrelated tables.
        if self.idle and wal_end > self.confirmed:
            self.confirmed = wal_end

    def tick(self, now: float) -> None:
        """Time passes: close a batch that is old enough once no transaction is open in it."""
        batch = self.batch
        if batch is not None and self.txn is None and now - batch.opened_at >= self.batch_max_age_s:
            self._close()

    def close(self) -> None:
        """Close the open batch now (graceful stop, end of a backfill)."""
        if self.batch is not None:
            self._close()

    # ----- backfill: rows read from the table, grouped by producing transaction

    def backfill(self, event_id: bytes, txid: bytes, row: tuple, record, error: tuple[str, str] | None,
                 commit_ts: int, after: tuple[str, str], now: float) -> None:
        txn = self.txn
        if txn is None or txn.txid != txid:
            if txn is not None:
                self.commit(0, None, now)
            self.txn = _Txn(self.received, commit_ts, txid=txid)
        if error is None:
            self.event(event_id, txid, row, record, now)
        else:
            self.unroutable(event_id, txid, row, error[0], error[1], now)
        batch = self.batch
        if batch is not None:
            batch.backfill_after = after

    def end_backfill(self, now: float) -> None:
        if self.txn is not None:
            self.commit(0, None, now)
        self.close()

    # ----- outcomes

    def records_done(self, batch: Batch, failures: list[tuple[int, Failure]]) -> None:
        """Every record of a closed batch has an outcome; failures are (index, Failure).

        Permanent failures are dead-lettered. A transient one, or (exactly-once) any record the
        broker failed inside the transaction, means the batch did not make it: Restart."""
        if self.eos:
            doomed = [(i, f) for i, f in failures if not f.refused]
            if doomed:
                for i, f in doomed:
                    if f.permanent:  # dead-lettered when the slot replays it
                        self.poison[batch.event_ids[i]] = f
                raise Restart(f"Kafka refused {len(doomed)} record(s) of batch {batch.batch_id}: "
                              f"{doomed[0][1].message}; its transaction is aborted")
        for i, f in failures:
            if not f.permanent:
                raise Restart(f"Kafka did not acknowledge batch {batch.batch_id}: {f.message}")
        for i, f in failures:
            batch.dead.append(DeadLetter(batch.event_ids[i], f.reason, f.message, batch.rows[i], batch.layout,
                                         batch.first_lsn))
        batch.kafka_done = True
        self.inflight_events -= len(batch.event_ids)
        self.inflight_bytes -= batch.nbytes
        if not self.eos:
            self.actions.append((PERSIST, batch))

    def checkpoint_for(self, batch: Batch) -> Checkpoint:
        """The checkpoint to commit with `batch` (exactly-once), after records_done()."""
        previous = self.checkpoint
        if batch.backfill_after:
            snapshot, after = self.backfill_snapshot, batch.backfill_after
        else:
            snapshot, after = previous.backfill_snapshot, previous.backfill_after
        dead = tuple((d.event_id.decode(), d.reason, d.error[:500]) for d in batch.dead)
        return Checkpoint(previous.identity, batch.last_commit_lsn or previous.commit_lsn, batch.partial_commit_lsn,
                          batch.partial_events, batch.batch_id, snapshot, after, dead)

    def committed(self, batch: Batch, checkpoint: Checkpoint) -> None:
        """Exactly-once: the batch's Kafka transaction committed with `checkpoint`."""
        self.checkpoint = checkpoint
        self.actions.append((PERSIST, batch))

    def persisted(self, batch: Batch, now: float) -> None:
        """The batch's outcome is in PostgreSQL: positions up to the next unfinished batch are confirmed."""
        batch.persisted = True
        self.last_progress = now
        queue = self.queue
        while queue:
            item = queue[0]
            if type(item) is Batch:
                if not item.persisted:
                    break
                lsn = item.ack_lsn
            else:
                lsn = item
            queue.popleft()
            if lsn is not None and lsn > self.confirmed:
                self.confirmed = lsn

    # ----- batches

    def _batch_for_event(self, now: float) -> Batch:
        batch = self.batch
        if batch is not None and (len(batch.event_ids) + len(batch.dead) >= self.batch_max_events
                                  or batch.nbytes >= self.batch_max_bytes):
            self._close()
            batch = None
        if batch is None:
            batch = self._open(now, self.txn.final_lsn)
        return batch

    def _open(self, now: float, first_lsn: int) -> Batch:
        batch = Batch(first_lsn, now, self.layout)
        if not self.queue:
            self.last_progress = now  # the stall clock starts when work starts waiting
        self.queue.append(batch)
        self.batch = batch
        self.actions.append((OPEN, batch))
        return batch

    def _close(self) -> None:
        batch, self.batch = self.batch, None
        txn = self.txn
        if txn is not None and not txn.skip_all:
            # Closing inside a source transaction: remember how far into it we are.
            batch.partial_commit_lsn, batch.partial_events = txn.final_lsn, txn.index
        batch.closed = True
        self.actions.append((CLOSE, batch))

    def _mark(self, lsn: int) -> None:
        if self.queue:
            self.queue.append(lsn)
        elif lsn > self.confirmed:
            self.confirmed = lsn
