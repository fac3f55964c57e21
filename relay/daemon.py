"""`outbox relay`: sessions, active/standby, retries and the one-time backfill around the pipeline.

A session: connect -> wait for the slot's advisory lock (standby) -> ensure publication and slot
-> settle batches a crashed predecessor left in flight -> backfill events the slot cannot stream
-> stream until stopped or failed. Transient failures end the session and a new one starts after
a capped exponential backoff; FatalErrors stop the daemon with a message that names the fix.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import psycopg
from kafka import errors as kerr
from psycopg import sql

from relay import slot as slots
from relay.checkpoint import Checkpoint
from relay.ledger import Ledger, Outcome, settle_previous_batches
from relay.metrics import RelayMetrics, serve
from relay.pgoutput import PG_EPOCH_UNIX_US, str_to_lsn
from relay.pipeline import Pipeline, Transient
from relay.publisher import Failure, Fenced, Publisher, ensure_checkpoint_topic, read_checkpoint
from relay.replication import ReplicationError, ReplicationStream
from relay.router import TABLE_LAYOUT
from relay.settings import Settings
from relay.slot import FatalError

log = logging.getLogger("outbox.relay")

BACKFILL_QUERY = """
SELECT e.event_id::text, e.aggregate_type, e.aggregate_id, e.event_type, e.payload::text, e.headers::text,
       e.created_at::text, e.txid::text,
       ((extract(epoch FROM e.created_at) * 1000000)::bigint - 946684800000000)::text  -- µs since 2000
  FROM outbox.events e
 WHERE pg_visible_in_snapshot(e.txid, %(snapshot)s::pg_snapshot)
   AND (%(watermark)s::xid8 IS NULL OR e.txid >= %(watermark)s::xid8)
   AND NOT EXISTS (SELECT 1 FROM outbox.relay_batches b, unnest(b.xids) AS x(txid)
                    WHERE b.slot_name = %(slot)s AND b.status IN ('acked', 'committed') AND x.txid = e.txid)
   AND NOT EXISTS (SELECT 1 FROM outbox.relay_dead_letters d WHERE d.event_id = e.event_id)
   AND (%(after_ts)s::timestamptz IS NULL OR (e.created_at, e.event_id) > (%(after_ts)s::timestamptz, %(after_id)s::uuid))
 ORDER BY e.created_at, e.event_id
"""
# Columns in OUTBOX_COLUMNS order (TABLE_LAYOUT), plus created_at in µs.


class Relay:
    def __init__(self, settings: Settings, *, recreate_slot: bool = False, metrics: RelayMetrics | None = None):
        self.s = settings
        self.dsn = settings.require_database_url()
        self.metrics = metrics or RelayMetrics()
        self.recreate_slot = recreate_slot
        self.stop = threading.Event()
        self.poison: dict[bytes, Failure] = {}
        self.transactional_id = f"outbox-relay-{settings.slot_name}" if settings.delivery == "exactly-once" else None

    def request_stop(self) -> None:
        self.stop.set()

    def run(self) -> int:
        server = serve(self.metrics, self.s.metrics_port)
        log.info("relay %s starting: slot=%s publication=%s delivery=%s kafka=%s database=%s",
                 self.s.relay_id, self.s.slot_name, self.s.publication, self.s.delivery, self.s.kafka_description,
                 self.dsn)
        backoff = 1.0
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    self._session()
                    backoff = 1.0
                except FatalError as exc:
                    self.metrics.healthy = False
                    self.metrics.last_error = str(exc)
                    log.error("%s", exc)
                    self._record_error(str(exc))
                    return 1
                except Fenced as exc:
                    log.warning("another relay took over this slot's Kafka transactions (%s); back to standby", exc)
                except (Transient, ReplicationError, psycopg.Error, kerr.KafkaError, OSError, TimeoutError) as exc:
                    message = str(exc)
                    if not message.startswith(type(exc).__name__):  # kafka-python's errors name themselves
                        message = f"{type(exc).__name__}: {message}"
                    self.metrics.restarts.inc()
                    self.metrics.last_error = message
                    log.warning("pipeline stopped, restarting from the slot in %.0f s: %s", backoff, message)
                    self._record_error(message)
                    if time.monotonic() - started > 60:
                        backoff = 1.0
                    self.stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                finally:
                    self.metrics.active.set(0)
            return 0
        finally:
            self._set_role("stopped")
            if server is not None:
                server.shutdown()
            log.info("relay %s stopped", self.s.relay_id)

    # ----- one session

    def _session(self) -> None:
        s = self.s
        with psycopg.connect(self.dsn.secret(), autocommit=True, connect_timeout=10,
                             application_name=f"outbox-relay {s.relay_id}") as control:
            slots.check_server(control)
            self._register(control)
            if not self._become_active(control):
                return
            log.info("relay %s is active for slot %s", s.relay_id, s.slot_name)
            slots.ensure_publication(control, s.publication)
            snapshot = self._prepare_slot(control)
            state = slots.slot_state(control, s.slot_name)
            confirmed = str_to_lsn(state["confirmed_flush_lsn"] or "0/0")

            publisher = Publisher(s, self.transactional_id)
            ledger = None
            stream = ReplicationStream(self.dsn, s.slot_name, s.publication)
            try:
                checkpoint = None
                if self.transactional_id:
                    ensure_checkpoint_topic(s)
                    publisher.init_transactions()  # fences a zombie predecessor, settles its transaction
                    probe = publisher.write_aborted_probe(s.checkpoint_topic)
                    checkpoint = Checkpoint.from_json(read_checkpoint(s, s.slot_name.encode(), probe))
                for batch_id, status in settle_previous_batches(control, s.slot_name, s.delivery, checkpoint):
                    log.warning("batch %s was in flight when the previous relay stopped: %s", batch_id, status)
                pipeline_ref: list[Pipeline] = []
                ledger = Ledger(self.dsn, s.slot_name, lambda: pipeline_ref[0].layout or TABLE_LAYOUT,
                                s.track_deliveries, self._on_persisted)
                ledger.start()
                pipeline = Pipeline(settings=s, control=control, stream=stream, publisher=publisher, ledger=ledger,
                                    metrics=self.metrics, stop=self.stop, confirmed_lsn=confirmed,
                                    checkpoint=checkpoint, poison=self.poison)
                pipeline_ref.append(pipeline)
                if snapshot is not None:
                    self._backfill(control, pipeline, snapshot, confirmed, checkpoint)
                self._open_stream(control, stream)
                self.metrics.role = "active"
                self.metrics.active.set(1)
                self._set_role("active", control)
                try:
                    pipeline.run()
                except ReplicationError as exc:
                    fatal = slots.fatal_stream_error(str(exc), s.slot_name, s.publication)
                    raise (fatal or exc) from None
            finally:
                stream.close()
                if ledger is not None:
                    ledger.stop()
                publisher.close(timeout=10 if self.stop.is_set() else 0)

    def _become_active(self, control: psycopg.Connection) -> bool:
        waiting_since = None
        while not self.stop.is_set():
            if slots.try_lock(control, self.s.slot_name):
                return True
            if waiting_since is None:
                waiting_since = time.monotonic()
                self.metrics.role = "standby"
                log.info("relay %s is standby: another relay holds slot %s", self.s.relay_id, self.s.slot_name)
            control.execute("UPDATE outbox.relay_instances SET heartbeat_at = now(), role = 'standby' "
                            "WHERE relay_id = %s", (self.s.relay_id,))
            self.metrics.tick()
            self.stop.wait(1.0)
        return False

    def _prepare_slot(self, control: psycopg.Connection) -> str | None:
        """Make sure the slot exists and is usable; returns the backfill snapshot if events committed
        before the slot existed still have to be published from the table."""
        s = self.s
        control.execute(
            "INSERT INTO outbox.relay_status (slot_name, delivery, active_relay_id) VALUES (%s, %s, %s) "
            "ON CONFLICT (slot_name) DO UPDATE SET delivery = EXCLUDED.delivery, "
            "active_relay_id = EXCLUDED.active_relay_id, updated_at = now()",
            (s.slot_name, s.delivery, s.relay_id))
        creating, snapshot = control.execute(
            "SELECT slot_creating, backfill_snapshot::text FROM outbox.relay_status WHERE slot_name = %s",
            (s.slot_name,)).fetchone()
        state = slots.slot_state(control, s.slot_name)
        if self.recreate_slot or creating:
            if state is not None:
                if state["active_pid"]:
                    raise FatalError(f"slot {s.slot_name!r} is in use by PID {state['active_pid']}; stop that "
                                     f"process before re-creating the slot")
                log.warning("dropping replication slot %s to re-create it%s", s.slot_name,
                            "" if self.recreate_slot else " (an earlier creation did not finish)")
                slots.drop_slot(control, s.slot_name)
                state = None
            self.recreate_slot = False
        if state is None:
            return self._create_slot(control)
        slots.check_slot(control, s.slot_name, state)
        return snapshot

    def _create_slot(self, control: psycopg.Connection) -> str:
        """Create the slot together with the snapshot of what it will never stream."""
        s = self.s
        control.execute("UPDATE outbox.relay_status SET slot_creating = true WHERE slot_name = %s", (s.slot_name,))
        repl = psycopg.connect(self.dsn.secret(), replication="database", autocommit=True, connect_timeout=10)
        watcher = threading.Thread(target=self._report_slot_wait, args=(repl,), daemon=True)
        watcher.start()
        try:
            row = repl.execute(f'CREATE_REPLICATION_SLOT "{s.slot_name}" LOGICAL pgoutput EXPORT_SNAPSHOT').fetchone()
            with psycopg.connect(self.dsn.secret(), connect_timeout=10) as tx:
                tx.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                tx.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(row[2])))
                snapshot = tx.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
        except psycopg.errors.QueryCanceled:
            raise Transient("slot creation cancelled by a stop request") from None
        finally:
            repl.close()
            watcher.join()
        control.execute("UPDATE outbox.relay_status SET slot_creating = false, backfill_snapshot = %s::pg_snapshot "
                        "WHERE slot_name = %s", (snapshot, s.slot_name))
        log.info("created replication slot %s at %s", s.slot_name, row[1])
        return snapshot

    def _report_slot_wait(self, repl: psycopg.Connection) -> None:
        """A new slot is consistent only once every transaction open at its creation has ended:
        say which ones we wait for, and give up on a stop request."""
        waited = 0.0
        while not repl.closed:
            if self.stop.wait(0.5):
                repl.cancel_safe()
                return
            waited += 0.5
            if waited % 10 == 0:
                try:
                    with psycopg.connect(self.dsn.secret(), autocommit=True, connect_timeout=5) as conn:
                        rows = conn.execute(
                            "SELECT pid, coalesce(application_name, ''), now() - xact_start, left(query, 80) "
                            "FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() "
                            "ORDER BY xact_start LIMIT 5").fetchall()
                except psycopg.Error:
                    rows = []
                log.warning("creating slot %s waits for %d open transaction(s) to end: %s", self.s.slot_name,
                            len(rows), "; ".join(f"pid {p} {a!r} open {age} ({q})" for p, a, age, q in rows))

    def _backfill(self, control: psycopg.Connection, pipeline: Pipeline, snapshot: str, position: int,
                  checkpoint: Checkpoint | None) -> None:
        s = self.s
        watermark = control.execute("SELECT watermark_txid::text FROM outbox.relay_status WHERE slot_name = %s",
                                    (s.slot_name,)).fetchone()[0]
        # Exactly-once resumes an interrupted backfill exactly after the last event Kafka committed.
        after = checkpoint.backfill_after if checkpoint and checkpoint.backfill_snapshot == snapshot else None
        started = time.monotonic()
        with psycopg.connect(self.dsn.secret(), connect_timeout=10) as reader:
            with reader.cursor(name="outbox_backfill") as cur:
                cur.itersize = 2000
                cur.execute(BACKFILL_QUERY, {"snapshot": snapshot, "watermark": watermark, "slot": s.slot_name,
                                             "after_ts": after[0] if after else None,
                                             "after_id": after[1] if after else None})
                rows = (tuple(None if v is None else v.encode() for v in r) for r in cur)
                count = pipeline.backfill(rows, TABLE_LAYOUT, position, snapshot)
        control.execute("UPDATE outbox.relay_status SET backfill_snapshot = NULL WHERE slot_name = %s",
                        (s.slot_name,))
        if count:
            log.info("published %d events committed before the slot existed (%.1f s)", count,
                     time.monotonic() - started)

    def _open_stream(self, control: psycopg.Connection, stream: ReplicationStream) -> None:
        """START_REPLICATION; the walsender of a relay that just died may hold the slot for a moment."""
        deadline = time.monotonic() + 15
        while True:
            try:
                stream.open()
                return
            except ReplicationError as exc:
                fatal = slots.fatal_stream_error(str(exc), self.s.slot_name, self.s.publication)
                if fatal:
                    raise fatal from None
                holder = slots.slot_holder(str(exc))
                if holder is None:
                    raise
                if time.monotonic() > deadline:
                    app = control.execute("SELECT application_name, client_addr::text FROM pg_stat_activity "
                                          "WHERE pid = %s", (holder,)).fetchone()
                    raise FatalError(
                        f"replication slot {self.s.slot_name!r} is held by PID {holder} "
                        f"({app[0] if app else 'unknown application'}), which is not an outbox relay of this "
                        f"group (it does not hold the relay lock). Fix: stop that consumer, or terminate it with "
                        f"SELECT pg_terminate_backend({holder}); or give this relay its own OUTBOX_SLOT_NAME."
                    ) from None
                self.stop.wait(0.5)

    # ----- bookkeeping

    def _on_persisted(self, outcome: Outcome, published: int) -> None:
        m = self.metrics
        m.published.inc(published)
        m.batches.labels(outcome.status).inc()
        for dead in outcome.batch.dead:
            m.dead_lettered.labels(dead.reason).inc()
            log.error("event %s dead-lettered (%s): %s", dead.event_id.decode(), dead.reason, dead.error)
        base = outcome.done_at - PG_EPOCH_UNIX_US / 1e6
        observe = m.latency.observe
        for ts in outcome.batch.commit_ts:
            observe(base - ts / 1e6)

    def _register(self, control: psycopg.Connection) -> None:
        control.execute(
            "INSERT INTO outbox.relay_instances (relay_id, slot_name, role, delivery, host, pid) "
            "VALUES (%s, %s, 'standby', %s, %s, %s) ON CONFLICT (relay_id) DO UPDATE SET role = 'standby', "
            "slot_name = EXCLUDED.slot_name, delivery = EXCLUDED.delivery, heartbeat_at = now()",
            (self.s.relay_id, self.s.slot_name, self.s.delivery, socket.gethostname(), os.getpid()))

    def _set_role(self, role: str, control: psycopg.Connection | None = None) -> None:
        update = "UPDATE outbox.relay_instances SET role = %s, heartbeat_at = now() WHERE relay_id = %s"
        try:
            if control is not None:
                control.execute(update, (role, self.s.relay_id))
                return
            with psycopg.connect(self.dsn.secret(), autocommit=True, connect_timeout=5) as conn:
                conn.execute(update, (role, self.s.relay_id))
        except psycopg.Error as exc:
            log.debug("could not record role %s: %s", role, exc)

    def _record_error(self, message: str) -> None:
        try:
            with psycopg.connect(self.dsn.secret(), autocommit=True, connect_timeout=5) as conn:
                conn.execute("UPDATE outbox.relay_status SET last_error = %s, last_error_at = now() "
                             "WHERE slot_name = %s", (message[:2000], self.s.slot_name))
                conn.execute("UPDATE outbox.relay_instances SET last_error = %s WHERE relay_id = %s",
                             (message[:2000], self.s.relay_id))
        except psycopg.Error:
            pass  # the database may be what failed; the log has it
