"""The streaming stage: replication frames -> pgoutput changes -> Kafka records -> acknowledgements.

One thread runs this loop; kafka-python's sender thread does the network I/O and the ledger
thread writes outcomes to PostgreSQL. Per event the loop decodes, routes and hands a record to
the producer; everything else (batch bookkeeping, feedback, maintenance) is per batch or timed.

Backpressure: when more than OUTBOX_MAX_INFLIGHT_EVENTS / _BYTES are unacknowledged the loop
stops reading the replication socket (the walsender then waits) but keeps sending feedback, so
memory stays bounded whatever the size of a source transaction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from kafka import errors as kerr

from relay import ledger as ledger_sql
from relay.checkpoint import AckQueue, Batch, Checkpoint, DeadLetter
from relay.ledger import Ledger, Outcome
from relay.metrics import RelayMetrics
from relay.pgoutput import (
    Begin, Commit, Delete, Insert, Relation, Truncate, Update, decode, insert_at, lsn_to_str, str_to_lsn,
)
from relay.publisher import Failure, Fenced, Publisher, classify
from relay.replication import Keepalive, ReplicationStream, XLogData, now_pg, parse_frame
from relay.router import Layout, Router, RouteError, Txn
from relay.settings import Settings
from relay.slot import PUBLICATION_GONE_FIX, FatalError

log = logging.getLogger("outbox.relay")

HEARTBEAT_PREFIX = "outbox.heartbeat"
BATCH_MAX_BYTES = 16 * 1024 * 1024
MAINTENANCE_EVERY_S = 2.0
STAGE_EVENTS = 256
STOP_GRACE_S = 10.0


class Transient(Exception):
    """Something outside the relay failed for now (broker, network, database); restart the pipeline
    from the slot's confirmed position. Nothing unacknowledged is lost, some may be sent twice."""


class Refused:
    """Stands in for the future of a record the producer refused on the spot (e.g. too large)."""

    __slots__ = ("failure", "exception")
    is_done = True

    def __init__(self, failure: Failure):
        self.failure = failure
        self.exception = RuntimeError(failure.message)


@dataclass(slots=True)
class OpenTxn:
    info: Txn
    final_lsn: int
    commit_ts: int
    skip_all: bool = False  # exactly-once: already fully in a committed Kafka transaction
    skip_left: int = 0  # exactly-once: this many leading events already committed
    index: int = 0  # outbox events of this transaction seen so far (skipped included)
    events: int = 0  # events of this transaction in the current session's batches
    txid: bytes | None = None


class Pipeline:
    def __init__(self, *, settings: Settings, control: psycopg.Connection, stream: ReplicationStream,
                 publisher: Publisher, ledger: Ledger, metrics: RelayMetrics, stop: threading.Event,
                 confirmed_lsn: int, checkpoint: Checkpoint | None, poison: dict[bytes, Failure]):
        self.s = settings
        self.control = control
        self.stream = stream
        self.publisher = publisher
        self.ledger = ledger
        self.metrics = metrics
        self.stop = stop
        self.eos = settings.delivery == "exactly-once"
        self.checkpoint = checkpoint or Checkpoint()
        self.poison = poison
        self.router = Router(settings.topic_template)
        self.layouts: dict[int, Layout] = {}
        self.layout: Layout | None = None
        self.queue = AckQueue(confirmed_lsn)
        self.batch: Batch | None = None
        self.txn: OpenTxn | None = None
        self.inflight_events = 0
        self.inflight_bytes = 0
        self.received_lsn = confirmed_lsn
        self.status_due = False
        self.watermarks: list[tuple[int, str]] = []
        self.watermark: str | None = None
        self.outbox_activity = False
        self.staged: list[tuple[Batch, int, object]] = []  # routed, not yet handed to the producer
        self.backfill_snapshot = ""
        self._warned: set[str] = set()

    # ----- the loop

    def run(self) -> None:
        s = self.s
        read = self.stream.read_raw
        on_message = self._on_message
        on_row = self._on_row
        now = time.monotonic()
        next_status, next_maintenance, next_heartbeat = now, now, now + s.heartbeat_interval_s
        stopping_since = 0.0
        while True:
            if self.ledger.error is not None:
                raise Transient(f"writing the relay ledger failed: {self.ledger.error}")
            self._collect()
            if self.queue.advance():
                self.status_due = True
            now = time.monotonic()
            if self.stop.is_set():
                # Let the source transaction in progress finish first (bounded), so that a graceful
                # stop leaves nothing to replay: no duplicates even in at-least-once mode.
                stopping_since = stopping_since or now
                if self.txn is None or now - stopping_since > STOP_GRACE_S:
                    self.drain()
                    return
            if self.status_due or now >= next_status:
                self._send_status()
                next_status = now + s.status_interval_s
            if now >= next_maintenance:
                self._maintenance()
                next_maintenance = now + MAINTENANCE_EVERY_S
            if now >= next_heartbeat:
                self._heartbeat()
                next_heartbeat = now + s.heartbeat_interval_s
            self.metrics.tick()
            if self._saturated():
                time.sleep(0.001)  # backpressure: let Kafka catch up before reading more
                continue
            timeout = 0.002 if (self.batch is not None or not self.queue.idle) else 0.2
            for i in range(5000):
                raw = read(0)
                if raw is None:
                    # Nothing more buffered: send what is staged before waiting, or a quiet stream
                    # would hold a record back until the stage fills (latency).
                    self._send_staged()
                    raw = read(timeout)
                    if raw is None:
                        self._on_idle()
                        break
                if raw[0] == 0x77 and raw[25] == 0x49:  # XLogData carrying an Insert: the hot path
                    on_row(*insert_at(bytes(raw), 25))
                    continue
                frame = parse_frame(raw)
                if type(frame) is XLogData:
                    on_message(frame.payload)
                else:
                    self._on_keepalive(frame)
                if (i & 63) == 63 and (self._saturated() or (self.txn is None and self.stop.is_set())):
                    break
            self._send_staged()

    def _saturated(self) -> bool:
        return self.inflight_events >= self.s.max_inflight_events or self.inflight_bytes >= self.s.max_inflight_bytes

    # ----- messages

    def _on_message(self, payload: bytes) -> None:
        msg = decode(payload)
        kind = type(msg)
        if kind is Insert:
            self._on_row(msg.relation_oid, msg.new)
        elif kind is Begin:
            self._on_begin(msg)
        elif kind is Commit:
            self._on_commit(msg)
        elif kind is Relation:
            if (msg.namespace, msg.name) == ("outbox", "events"):
                self.layout = self.layouts[msg.oid] = Layout.of(msg)
            else:
                self._warn_once("relation", f"publication {self.s.publication!r} also publishes "
                                f"{msg.namespace}.{msg.name}; only outbox.events is relayed")
        elif kind in (Update, Delete, Truncate):
            self._warn_once("dml", f"publication {self.s.publication!r} publishes {kind.__name__.lower()}s; "
                            f"they are ignored. Fix: ALTER PUBLICATION {self.s.publication} SET (publish = 'insert')")
        # Logical messages (our heartbeats, other applications'), Origin and Type carry nothing to relay.

    def _on_begin(self, m: Begin) -> None:
        txn = OpenTxn(Txn.of(m.final_lsn, m.commit_ts), m.final_lsn, m.commit_ts)
        if self.eos:
            txn.skip_all = self.checkpoint.skip_transaction(m.final_lsn)
            txn.skip_left = self.checkpoint.events_to_skip(m.final_lsn)
        self.txn = txn

    def _on_row(self, relation_oid: int, row: tuple) -> None:
        layout = self.layouts.get(relation_oid)
        txn = self.txn
        if layout is None or txn is None:
            return
        self.outbox_activity = True
        if txn.skip_all or txn.skip_left:
            txn.index += 1
            if txn.skip_left:
                txn.skip_left -= 1
            return
        # Rotate batches before counting this event: a batch closed here must record how many of the
        # transaction's events it (and earlier ones) hold, and this one goes to the next batch.
        batch = self._batch_for_event()
        txn.index += 1
        txn.txid = row[layout.txid]
        txn.events += 1
        event_id = row[layout.event_id]
        poisoned = self.poison.get(event_id)
        if poisoned is not None:
            batch.dead.append(DeadLetter(event_id, poisoned.reason, poisoned.message, None, row, txn.final_lsn))
            return
        try:
            record = self.router.route(layout, row, txn.info)
        except RouteError as exc:
            batch.dead.append(DeadLetter(event_id, exc.reason, str(exc), None, row, txn.final_lsn))
            return
        batch.add(None, event_id, txn.commit_ts, record.size)
        batch.rows.append(row)
        self.inflight_events += 1
        self.inflight_bytes += record.size
        staged = self.staged
        staged.append((batch, len(batch.futures) - 1, record))
        if len(staged) >= STAGE_EVENTS:
            self._send_staged()

    def _send_staged(self) -> None:
        """Hand staged records to the producer. Decoding a run of events and then sending the run
        costs ~20% less CPU than alternating per event (measured: the two code paths evict each
        other from the CPU caches), and kafka-python's send() is most of the relay's time."""
        send = self.publisher.send
        for batch, index, record in self.staged:
            try:
                batch.futures[index] = send(record.topic, record.value, record.key, record.headers)
            except kerr.MessageSizeTooLargeError as exc:
                batch.futures[index] = Refused(classify(exc))
            except ValueError as exc:
                batch.futures[index] = Refused(Failure(True, "invalid_record", str(exc)))
            except (kerr.KafkaTimeoutError, kerr.IllegalStateError) as exc:
                raise Transient(f"Kafka did not accept a record: {exc}") from exc
        self.staged.clear()

    def _on_commit(self, m: Commit) -> None:
        txn, self.txn = self.txn, None
        batch = self.batch
        if txn is not None and txn.events and batch is not None:
            batch.xids.append(txn.txid)
            batch.partial_commit_lsn = batch.partial_events = 0
        if batch is not None:
            batch.ack_lsn = m.end_lsn
            batch.last_commit_lsn = m.commit_lsn
            if time.monotonic() - batch.opened_at >= self.s.batch_max_age_ms / 1000:
                self._close_batch()
        else:
            self.queue.mark(m.end_lsn)  # nothing of ours in it: acknowledge once everything before is
        self.received_lsn = max(self.received_lsn, m.end_lsn)

    def _on_keepalive(self, k: Keepalive) -> None:
        self.received_lsn = max(self.received_lsn, k.wal_end)
        # Only between transactions and with nothing pending may the slot move to the server's
        # position: that is what lets it advance past WAL of unrelated tables.
        if self.txn is None and self.batch is None and self.queue.idle:
            self.queue.mark(k.wal_end)
        if k.reply_requested:
            self.status_due = True

    def _on_idle(self) -> None:
        batch = self.batch
        if batch is not None and self.txn is None and \
                time.monotonic() - batch.opened_at >= self.s.batch_max_age_ms / 1000:
            self._close_batch()

    # ----- batches

    def _batch_for_event(self) -> Batch:
        batch = self.batch
        if batch is not None and (len(batch.futures) + len(batch.dead) >= self.s.batch_max_events
                                  or batch.nbytes >= BATCH_MAX_BYTES):
            self._close_batch()
            batch = None
        if batch is None:
            batch = self._open_batch()
        return batch

    def _open_batch(self) -> Batch:
        first = self.txn.final_lsn if self.txn else self.received_lsn
        batch_id = ledger_sql.open_batch(self.control, self.s.slot_name, self.s.relay_id, self.s.delivery, first)
        if self.eos:
            self.publisher.begin()
        batch = Batch(batch_id, first)
        self.queue.add(batch)
        self.batch = batch
        return batch

    def _close_batch(self) -> None:
        self._send_staged()
        batch, self.batch = self.batch, None
        txn = self.txn
        if txn is not None and not txn.skip_all:
            # Closing inside a source transaction (size limit): remember how far into it we are.
            batch.partial_commit_lsn, batch.partial_events = txn.final_lsn, txn.index
        batch.closed = True
        if self.eos:
            self._commit(batch)

    def _commit(self, batch: Batch) -> None:
        checkpoint = Checkpoint.after(batch, self.checkpoint, self.backfill_snapshot)
        try:
            self.publisher.commit(self.s.checkpoint_topic, self.s.slot_name.encode(), checkpoint.to_json())
        except Fenced:
            raise
        except kerr.KafkaError as exc:
            for event_id, future in zip(batch.event_ids, batch.futures):
                if future.is_done and future.exception is not None:
                    failure = future.failure if type(future) is Refused else classify(future.exception)
                    if failure.permanent:
                        self.poison[event_id] = failure  # dead-lettered when the slot replays it
            self.publisher.abort()
            raise Transient(f"Kafka transaction of batch {batch.batch_id} failed and was aborted: {exc}") from exc
        self.checkpoint = checkpoint

    def _collect(self) -> None:
        """Hand batches whose records all have an outcome to the ledger, in stream order."""
        for batch in self.queue.pending_batches():
            if batch.handed_over:
                continue
            if not batch.closed or not batch.kafka_done():
                return
            for row, event_id, future in zip(batch.rows, batch.event_ids, batch.futures):
                if future.exception is None:
                    continue
                failure = future.failure if type(future) is Refused else classify(future.exception)
                if not failure.permanent:
                    raise Transient(f"Kafka did not acknowledge batch {batch.batch_id}: {failure.message}")
                batch.dead.append(DeadLetter(event_id, failure.reason, failure.message, None, row,
                                             batch.first_lsn))
            batch.handed_over = True
            self.inflight_events -= len(batch.futures)
            self.inflight_bytes -= batch.nbytes
            self.ledger.submit(Outcome(batch, "committed" if self.eos else "acked", time.time()))

    def drain(self, timeout: float = 60) -> None:
        """Graceful stop: finish the open batch, wait for Kafka and the ledger, acknowledge."""
        self._send_staged()
        if self.batch is not None:
            self._close_batch()
        self.publisher.producer.flush(timeout=timeout)
        deadline = time.monotonic() + timeout
        while not self.queue.idle and time.monotonic() < deadline:
            if self.ledger.error is not None:
                raise Transient(f"writing the relay ledger failed: {self.ledger.error}")
            self._collect()
            self.queue.advance()
            time.sleep(0.005)
        self._send_status()

    def backfill(self, rows: Iterable[tuple], layout: Layout, slot_start: int, snapshot: str) -> int:
        """Publish rows read from the table (events the slot will never stream), then wait for them.

        Their real commit LSN is unknown. They are given slot_start - 1: below every streamed commit,
        so an exactly-once checkpoint taken during the backfill never skips a streamed transaction
        (the first one may commit exactly at the slot's start). outbox_commit_ts carries the event's
        created_at (the last column of each row)."""
        self.layouts[layout.oid] = layout
        self.backfill_snapshot = snapshot
        commit_lsn = slot_start - 1
        count = 0
        for row in rows:
            txid = row[layout.txid]
            if self.txn is None or self.txn.txid != txid:
                if self.txn is not None:
                    self._on_commit(Commit(0, commit_lsn, commit_lsn, self.txn.commit_ts))
                self._on_begin(Begin(commit_lsn, int(row[-1]), 0))
                self.txn.skip_all, self.txn.skip_left = False, 0
                self.txn.txid = txid
            self._on_row(layout.oid, row)
            if self.batch is not None:
                self.batch.backfill_after = (row[layout.created_at].decode(), row[layout.event_id].decode())
            count += 1
            while self._saturated():
                self._send_staged()
                self._collect()
                self.queue.advance()
                time.sleep(0.001)
        if self.txn is not None:
            self._on_commit(Commit(0, commit_lsn, commit_lsn, self.txn.commit_ts))
        self.drain()
        return count

    # ----- feedback and maintenance

    def _send_status(self) -> None:
        if not self.stream.is_open:  # backfilling before the stream starts
            return
        self.stream.send_status(max(self.received_lsn, self.queue.confirmed), self.queue.confirmed)
        self.metrics.confirmed_lsn.set(self.queue.confirmed)
        self.status_due = False

    def _maintenance(self) -> None:
        c = self.control
        insert_lsn, xmin = c.execute(
            "SELECT pg_current_wal_insert_lsn()::text, pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
        # Once everything up to insert_lsn is acknowledged, every transaction below xmin has been
        # published: it had finished before that position was read.
        self.watermarks.append((str_to_lsn(insert_lsn), xmin))
        while self.watermarks and self.watermarks[0][0] <= self.queue.confirmed:
            self.watermark = self.watermarks.pop(0)[1]
        lag = c.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, wal_status, "
                        "EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND schemaname = 'outbox' "
                        "AND tablename = 'events') FROM pg_replication_slots WHERE slot_name = %s",
                        (self.s.publication, self.s.slot_name)).fetchone()
        if lag is not None:
            if not lag[2]:
                # PostgreSQL 18 no longer fails decoding when a publication disappears; it silently
                # stops publishing the table. Stop instead of acknowledging past lost events.
                raise FatalError(PUBLICATION_GONE_FIX.format(
                    detail=f"publication {self.s.publication!r} no longer publishes outbox.events",
                    pub=self.s.publication))
            self.metrics.slot_lag_bytes.set(lag[0] or 0)
            if lag[1] == "unreserved":
                self._warn_once("unreserved", f"slot {self.s.slot_name!r} is about to be invalidated "
                                f"(wal_status=unreserved): the relay is too far behind max_slot_wal_keep_size")
        pending = self.queue.pending_batches()
        oldest = next((b.commit_ts[0] for b in pending if b.commit_ts), None)
        self.metrics.slot_lag_seconds.set(max(0.0, (now_pg() - oldest) / 1e6) if oldest is not None else 0.0)
        self.metrics.inflight_events.set(self.inflight_events)
        self.metrics.inflight_bytes.set(self.inflight_bytes)
        c.execute("UPDATE outbox.relay_status SET confirmed_lsn = %s, watermark_txid = "
                  "CASE WHEN %s::text IS NULL THEN watermark_txid ELSE greatest(watermark_txid, %s::text::xid8) END, "
                  "active_relay_id = %s, updated_at = now() WHERE slot_name = %s",
                  (lsn_to_str(self.queue.confirmed), self.watermark, self.watermark, self.s.relay_id,
                   self.s.slot_name))
        c.execute("UPDATE outbox.relay_instances SET heartbeat_at = now(), role = 'active' WHERE relay_id = %s",
                  (self.s.relay_id,))

    def _heartbeat(self) -> None:
        # A tiny transaction in this database gives the slot a position to confirm (and its
        # restart_lsn a chance to move) even when the outbox is idle and other databases are busy.
        if not self.outbox_activity:
            self.control.execute("SELECT pg_logical_emit_message(true, %s, %s)", (HEARTBEAT_PREFIX, self.s.relay_id))
        self.outbox_activity = False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)
