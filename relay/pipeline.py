"""The streaming stage: the I/O loop around the Bookkeeper.

replication frames -> pgoutput messages -> Router -> Bookkeeper -> actions performed here:
intents and exactly-once preparations on the control connection, records to kafka-python's
producer, outcomes to the ledger thread, confirmed positions back to PostgreSQL. Every decision
(what joins which batch, what is skipped, dead-lettered or confirmed) is the Bookkeeper's; this
module only moves bytes and reports what happened. One thread runs it; kafka-python's sender
thread does the network I/O and the ledger thread writes outcomes, handing finished batches back
through a queue so that the Bookkeeper is only ever touched by this thread.

Backpressure: when more than OUTBOX_MAX_INFLIGHT_EVENTS / _BYTES are unacknowledged the loop
stops reading the replication socket (the walsender then waits) but keeps sending feedback, so
memory stays bounded whatever the size of a source transaction.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable

import psycopg
from kafka import errors as kerr

from outbox.core.lsn import now_pg, str_to_lsn, unix_to_pg
from outbox.core.settings import Settings
from relay import ledger as ledger_sql
from relay.bookkeeper import CLOSE, OPEN, PERSIST, SEND, Batch, Bookkeeper, Failure, Restart
from relay.checkpoint import Checkpoint
from relay.ledger import Ledger, Outcome
from relay.metrics import WAL_STATES, RelayMetrics
from relay.pgoutput import (
    Begin,
    Commit,
    Delete,
    Insert,
    Relation,
    Truncate,
    Update,
    decode,
    insert_at,
)
from relay.publisher import Fenced, Publisher, TopicProvisioner, classify
from relay.replication import ReplicationStream, XLogData, parse_frame
from relay.router import Layout, RouteError, Router, SchemaError, Txn
from relay.slot import PUBLICATION_GONE_FIX, FatalError, failover_readiness

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


def failure_of(handle) -> Failure:
    return handle.failure if type(handle) is Refused else classify(handle.exception)


class Pipeline:
    def __init__(self, *, settings: Settings, control: psycopg.Connection, stream: ReplicationStream,
                 publisher: Publisher, ledger: Ledger, metrics: RelayMetrics, stop: threading.Event,
                 confirmed_lsn: int, checkpoint: Checkpoint | None, poison: dict[bytes, Failure],
                 topics: TopicProvisioner):
        s = self.s = settings
        self.control = control
        self.stream = stream
        self.publisher = publisher
        self.ledger = ledger
        self.metrics = metrics
        self.stop = stop
        self.eos = settings.delivery == "exactly-once"
        self.topics = topics
        self.bk = Bookkeeper(
            exactly_once=self.eos, batch_max_events=s.batch_max_events, batch_max_bytes=BATCH_MAX_BYTES,
            batch_max_age_s=s.batch_max_age_ms / 1000, max_inflight_events=s.max_inflight_events,
            max_inflight_bytes=s.max_inflight_bytes, confirmed=confirmed_lsn, now=time.monotonic(),
            checkpoint=checkpoint, poison=poison)
        self.router = Router(settings.topic_template, reserved=frozenset({settings.checkpoint_topic}))
        self.layouts: dict[int, Layout] = {}
        self.txn_info: Txn | None = None
        self.status_due = False
        self.watermarks: list[tuple[int, str]] = []
        self.watermark: str | None = None
        self.outbox_activity = False
        self.staged: list = []  # SEND actions not yet handed to the producer
        self._warned: set[str] = set()
        self._failover_ready: bool | None = None
        self._sent_confirmed = confirmed_lsn

    # ----- the loop

    def run(self) -> None:
        s, bk = self.s, self.bk
        read = self.stream.read_raw
        on_message = self._on_message
        on_row = self._on_row
        now = time.monotonic()
        next_status, next_maintenance, next_heartbeat = now, now, now + s.heartbeat_interval_s
        stopping_since = 0.0
        while True:
            self._collect()
            now = time.monotonic()
            if self.stop.is_set():
                # Let the source transaction in progress finish first (bounded), so that a graceful
                # stop leaves nothing to replay: no duplicates even in at-least-once mode.
                stopping_since = stopping_since or now
                if bk.txn is None or now - stopping_since > STOP_GRACE_S:
                    self.drain()
                    return
            if self.status_due or now >= next_status or bk.confirmed != self._sent_confirmed:
                self._send_status()
                next_status = now + s.status_interval_s
            if now >= next_maintenance:
                self._maintenance()
                next_maintenance = now + MAINTENANCE_EVERY_S
            if now >= next_heartbeat:
                self._heartbeat()
                next_heartbeat = now + s.heartbeat_interval_s
            self.metrics.tick()
            self.metrics.stalled = bk.stalled(now, s.stall_timeout_s)
            if bk.saturated:
                time.sleep(0.001)  # backpressure: let Kafka catch up before reading more
                continue
            timeout = 0.002 if not bk.idle else 0.2
            for i in range(5000):
                raw = read(0)
                if raw is None:
                    # Nothing more buffered: perform what is staged before waiting, or a quiet stream
                    # would hold a record back until the stage fills (latency). A steady trickle keeps
                    # this inner loop going for seconds, so acknowledgements are served here too.
                    self._perform()
                    self.publisher.poll()
                    raw = read(timeout)
                    if raw is None:
                        bk.tick(time.monotonic())
                        break
                if raw[0] == 0x77 and raw[25] == 0x49:  # XLogData carrying an Insert: the hot path
                    on_row(*insert_at(bytes(raw), 25))
                    continue
                frame = parse_frame(raw)
                if type(frame) is XLogData:
                    on_message(frame.payload)
                else:
                    bk.keepalive(frame.wal_end)
                    if frame.reply_requested:
                        self.status_due = True
                if (i & 63) == 63 and (bk.saturated or (bk.txn is None and self.stop.is_set())):
                    break
            self._perform()

    # ----- messages

    def _on_message(self, payload: bytes) -> None:
        msg = decode(payload)
        kind = type(msg)
        bk = self.bk
        now = time.monotonic()
        if kind is Insert:
            self._on_row(msg.relation_oid, msg.new)
        elif kind is Begin:
            self.txn_info = Txn.of(msg.final_lsn, msg.commit_ts)
            bk.begin(msg.final_lsn, msg.commit_ts)
        elif kind is Commit:
            bk.commit(msg.commit_lsn, msg.end_lsn, now)
            self._perform_if_structural()
        elif kind is Relation:
            if (msg.namespace, msg.name) == ("outbox", "events"):
                self._on_relation(msg)
            else:
                self._warn_once("relation", f"publication {self.s.publication!r} also publishes "
                                f"{msg.namespace}.{msg.name}; only outbox.events is relayed")
        elif kind in (Update, Delete, Truncate):
            self._warn_once("dml", f"publication {self.s.publication!r} publishes {kind.__name__.lower()}s; "
                            f"they are ignored. Fix: ALTER PUBLICATION {self.s.publication} SET (publish = 'insert')")
        # Logical messages (our heartbeats, other applications'), Origin and Type carry nothing to relay.

    def _on_relation(self, msg: Relation) -> None:
        try:
            layout = Layout.of(msg)
        except SchemaError as exc:
            # event_id itself is gone: nothing could even be dead-lettered. Stop with the fix.
            raise FatalError(str(exc)) from None
        if layout.missing:
            log.error("outbox.events changed while the relay runs: %s", layout.problem)
        self.layouts[msg.oid] = layout
        self.bk.set_layout(layout)

    def _on_row(self, relation_oid: int, row: tuple) -> None:
        layout = self.layouts.get(relation_oid)
        bk = self.bk
        if layout is None or bk.skip_event():
            return
        self.outbox_activity = True
        event_id = row[layout.event_id]
        txid = row[layout.txid] if layout.txid >= 0 else None
        try:
            record = self.router.route(layout, row, self.txn_info)
        except RouteError as exc:
            bk.unroutable(event_id, txid, row, exc.reason, str(exc), time.monotonic())
            return
        bk.event(event_id, txid, row, record, time.monotonic())
        if len(bk.actions) >= STAGE_EVENTS or bk.saturated:
            self._perform()

    # ----- actions

    def _perform_if_structural(self) -> None:
        """Perform at once what closes batches (the commit order must not wait for the stage)."""
        actions = self.bk.actions
        if actions and actions[-1][0] is not SEND:
            self._perform()

    def _perform(self) -> None:
        """Do what the Bookkeeper asked, in order. Sends are handed to the producer in runs: decoding
        a run of events and then sending the run costs ~20% less CPU than alternating per event."""
        bk = self.bk
        while bk.actions:
            actions, bk.actions = bk.actions, []
            send = self.publisher.send
            for action in actions:
                kind = action[0]
                if kind is SEND:
                    _, batch, i, record = action
                    if record.topic not in self.topics.known:
                        self.topics.ensure(record.topic)
                    try:
                        batch.handles[i] = send(record.topic, record.value, record.key, record.headers)
                    except kerr.MessageSizeTooLargeError as exc:
                        batch.handles[i] = Refused(_refused(classify(exc)))
                    except ValueError as exc:
                        batch.handles[i] = Refused(Failure(True, "invalid_record", str(exc), refused=True))
                    except (kerr.KafkaTimeoutError, kerr.IllegalStateError) as exc:
                        raise Transient(f"Kafka did not accept a record: {exc}") from exc
                elif kind is OPEN:
                    batch = action[1]
                    first = batch.first_lsn or bk.received
                    batch.batch_id = ledger_sql.open_batch(self.control, self.s.slot_name, self.s.relay_id,
                                                           self.s.delivery, first)
                    if self.eos:
                        self.publisher.begin()
                elif kind is CLOSE:
                    if self.eos:
                        self._commit(action[1])
                    elif not action[1].event_ids:
                        bk.records_done(action[1], [])
                elif kind is PERSIST:
                    batch = action[1]
                    self.ledger.submit(Outcome(batch, "committed" if self.eos else "acked", time.time()))

    def _commit(self, batch: Batch) -> None:
        """Exactly-once: every record in Kafka's hands, dead letters durable, then one commit."""
        bk = self.bk
        try:
            self.publisher.producer.flush(timeout=130)  # past delivery_timeout_ms every record has an outcome
        except kerr.KafkaError as exc:
            self.publisher.abort()
            raise Transient(f"Kafka did not take batch {batch.batch_id}: {exc}") from exc
        failures = [(i, failure_of(h)) for i, h in enumerate(batch.handles) if h.exception is not None]
        try:
            bk.records_done(batch, failures)
        except Restart:
            self.publisher.abort()
            raise
        checkpoint = bk.checkpoint_for(batch)
        # A source transaction may be skipped only when every event of it is in Kafka or durably
        # dead-lettered: the dead letters and the batch's xids are written before the commit.
        ledger_sql.prepare_batch(self.control, self.s.slot_name, batch)
        try:
            self.publisher.commit(self.s.checkpoint_topic, self.checkpoint_key, checkpoint.to_json())
        except Fenced:
            raise
        except kerr.KafkaError as exc:
            self.publisher.abort()
            raise Transient(f"Kafka transaction of batch {batch.batch_id} failed and was aborted: {exc}") from exc
        bk.committed(batch, checkpoint)

    @property
    def checkpoint_key(self) -> bytes:
        identity = self.bk.checkpoint.identity
        return (identity.key if identity else self.s.slot_name).encode()

    def _collect(self) -> None:
        """Outcomes: records Kafka finished (at-least-once) and batches the ledger wrote."""
        bk = self.bk
        self.publisher.poll()
        if self.ledger.error is not None:
            raise Transient(f"writing the relay ledger failed: {self.ledger.error}") from self.ledger.error
        if not self.eos:
            for batch in list(bk.awaiting_kafka()):
                handles = batch.handles
                i = batch.checked
                while i < len(handles) and handles[i].is_done:
                    i += 1
                batch.checked = i
                if i < len(handles):
                    break  # batches finish in order; the rest can wait
                failures = [(k, failure_of(h)) for k, h in enumerate(handles) if h.exception is not None]
                try:
                    bk.records_done(batch, failures)
                except Restart as exc:
                    raise Transient(str(exc)) from None
            self._perform()
        done = self.ledger.done
        while True:
            try:
                outcome, published = done.get_nowait()
            except queue.Empty:
                break
            bk.persisted(outcome.batch, time.monotonic())
            self._on_persisted(outcome, published)

    def _on_persisted(self, outcome: Outcome, published: int) -> None:
        m = self.metrics
        m.kafka_ok = True
        m.published.inc(published)
        m.batches.labels(outcome.status).inc()
        for dead in outcome.batch.dead:
            m.dead_lettered.labels(dead.reason).inc()
            log.error("event %s dead-lettered (%s): %s", dead.event_id.decode(errors="replace"), dead.reason,
                      dead.error)
        if outcome.batch.backfilled:
            return  # their commit time is unknown: created_at would read as minutes of latency
        m.observe_latencies(unix_to_pg(outcome.done_at) / 1e6, outcome.batch.commit_ts)

    def drain(self, timeout: float = 60) -> None:
        """Graceful stop: finish the open batch, wait for Kafka and the ledger, acknowledge."""
        self.bk.close()
        self._perform()
        self.publisher.producer.flush(timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.bk.queue and time.monotonic() < deadline:
            self._collect()
            time.sleep(0.005)
        self._send_status()

    def backfill(self, rows: Iterable[tuple], layout: Layout, snapshot: str) -> int:
        """Publish rows read from the table (events the slot will never stream), then wait for them.
        outbox_commit_ts carries the event's created_at (the last column of each row)."""
        bk = self.bk
        bk.set_layout(layout)
        bk.backfill_snapshot = snapshot
        count = 0
        for row in rows:
            event_id, txid = row[layout.event_id], row[layout.txid]
            commit_ts = int(row[-1])
            after = (row[layout.created_at].decode(), event_id.decode())
            record = error = None
            try:
                record = self.router.route(layout, row, Txn.of(0, commit_ts))
            except RouteError as exc:
                error = (exc.reason, str(exc))
            bk.backfill(event_id, txid, row, record, error, commit_ts, after, time.monotonic())
            count += 1
            if len(bk.actions) >= STAGE_EVENTS:
                self._perform()
            while bk.saturated:
                self._perform()
                self._collect()
                time.sleep(0.001)
        bk.end_backfill(time.monotonic())
        self.drain()
        return count

    # ----- feedback and maintenance

    def _send_status(self) -> None:
        if not self.stream.is_open:  # backfilling before the stream starts
            return
        confirmed = self.bk.confirmed
        self.stream.send_status(max(self.bk.received, confirmed), confirmed)
        self._sent_confirmed = confirmed
        self.metrics.confirmed_lsn.set(confirmed)
        self.status_due = False

    def _maintenance(self) -> None:
        c, bk = self.control, self.bk
        insert_lsn, xmin = c.execute(
            "SELECT pg_current_wal_insert_lsn()::text, pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
        # Once everything up to insert_lsn is acknowledged, every transaction below xmin has been
        # published: it had finished before that position was read.
        self.watermarks.append((str_to_lsn(insert_lsn), xmin))
        while self.watermarks and self.watermarks[0][0] <= bk.confirmed:
            self.watermark = self.watermarks.pop(0)[1]
        lag = c.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, wal_status, "
                        "EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND schemaname = 'outbox' "
                        "AND tablename = 'events'), safe_wal_size FROM pg_replication_slots WHERE slot_name = %s",
                        (self.s.publication, self.s.slot_name)).fetchone()
        self.metrics.set_wal_status(lag[1] if lag is not None and lag[1] in WAL_STATES else "missing")
        self.metrics.slot_safe_wal_size.set(float("nan") if lag is None or lag[3] is None else lag[3])
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
        oldest = next((b.commit_ts[0] for b in bk.pending() if b.commit_ts and not b.backfilled), None)
        self.metrics.slot_lag_seconds.set(max(0.0, (now_pg() - oldest) / 1e6) if oldest is not None else 0.0)
        self.metrics.inflight_events.set(bk.inflight_events)
        self.metrics.inflight_bytes.set(bk.inflight_bytes)
        failover = failover_readiness(c, self.s.slot_name)
        if failover[0] is not self._failover_ready:
            # One line per change: the dashboard and the gauge carry the state in between.
            if failover[0] is False:
                log.warning("a promotion of the standby now would not keep the relay's position: %s", failover[1])
            elif self._failover_ready is False:
                log.info("failover readiness restored: %s", failover[1])
            self._failover_ready = failover[0]
        self.metrics.failover_ready.set(-1 if failover[0] is None else int(failover[0]))
        self.metrics.standby_lag_bytes.set(failover[2] or 0)
        ledger_sql.record_progress(c, self.s.slot_name, self.s.relay_id, bk.confirmed, self.watermark, failover)

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


def _refused(failure: Failure) -> Failure:
    return Failure(failure.permanent, failure.reason, failure.message, refused=True)
