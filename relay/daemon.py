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
from dataclasses import replace

import psycopg
from kafka import errors as kerr
from psycopg import sql

from outbox.core.lsn import str_to_lsn
from outbox.core.redact import redact
from outbox.core.refusals import refusal
from outbox.core.settings import Settings
from outbox.core.sqlident import quote_ident
from relay import ledger as ledger_sql
from relay import slot as slots
from relay.bookkeeper import Failure, Restart
from relay.checkpoint import Checkpoint, Identity, mismatch
from relay.ledger import Ledger, restore_dead_letters, settle_previous_batches
from relay.metrics import RelayMetrics, serve
from relay.pipeline import Pipeline, Transient
from relay.publisher import (
    Fenced,
    Publisher,
    TopicProvisioner,
    ensure_checkpoint_topic,
    make_publisher,
    read_checkpoint,
)
from relay.replication import ReplicationError, ReplicationStream, ServerPosition, identify_server
from relay.router import TABLE_LAYOUT
from relay.slot import FatalError

log = logging.getLogger("outbox.relay")

# The events listed in relay_backfill when the slot was created, minus what was published or
# dead-lettered since (an at-least-once backfill interrupted by a crash), in creation order.
BACKFILL_QUERY = """
SELECT e.event_id::text, e.aggregate_type, e.aggregate_id, e.event_type, e.payload::text, e.headers::text,
       e.created_at::text, e.txid::text,
       (extract(epoch FROM e.created_at - timestamptz '2000-01-01 00:00:00+00') * 1000000)::bigint::text  -- the PG clock
  FROM outbox.relay_backfill f JOIN outbox.events e ON e.event_id = f.event_id
 WHERE f.slot_name = %(slot)s
   AND NOT EXISTS (SELECT 1 FROM outbox.relay_batches b, unnest(b.xids) AS x(txid)
                    WHERE b.slot_name = %(slot)s AND b.status IN ('acked', 'committed') AND x.txid = e.txid)
   AND NOT outbox.dead_lettered(e.event_id, %(slot)s)
   AND (%(after_ts)s::timestamptz IS NULL
        OR (f.created_at, f.event_id) > (%(after_ts)s::timestamptz, %(after_id)s::uuid))
 ORDER BY f.created_at, f.event_id
"""
# What a new slot will never stream, listed inside the slot's exported snapshot.
BACKFILL_LIST = """
INSERT INTO outbox.relay_backfill (slot_name, created_at, event_id)
SELECT %(slot)s, e.created_at, e.event_id
  FROM outbox.events e, outbox.relay_status s
 WHERE s.slot_name = %(slot)s
   AND (s.watermark_txid IS NULL OR e.txid >= s.watermark_txid)
   AND NOT EXISTS (SELECT 1 FROM outbox.relay_batches b, unnest(b.xids) AS x(txid)
                    WHERE b.slot_name = %(slot)s AND b.status IN ('acked', 'committed') AND x.txid = e.txid)
   AND NOT outbox.dead_lettered(e.event_id, %(slot)s)
"""
# Columns in OUTBOX_COLUMNS order (TABLE_LAYOUT), plus created_at in µs.


RESET_FIX = (
    "Fix: if this database really replaced the one the recorded positions describe (restored from a dump or a "
    "backup, point-in-time recovery, failover to a replica that had not received everything), run "
    "`outbox relay --reset-checkpoint` once. It forgets the checkpoint and the positions recorded for the other "
    "server or history and publishes every event of this database not recorded as published here; consumers "
    "may see some events again (the inbox deduplicates them on event_id). If this is a separate deployment "
    "sharing the Kafka cluster, give it its own OUTBOX_SLOT_NAME and OUTBOX_CHECKPOINT_TOPIC."
)


class Relay:
    def __init__(self, settings: Settings, *, recreate_slot: bool = False, reset_checkpoint: bool = False,
                 metrics: RelayMetrics | None = None):
        self.s = settings
        self.dsn = settings.require_database_url()
        self.metrics = metrics or RelayMetrics(settings.kafka_client)
        self.recreate_slot = recreate_slot
        self.reset_checkpoint = reset_checkpoint
        self.stop = threading.Event()
        self.poison: dict[bytes, Failure] = {}
        self.identity: Identity | None = None
        # The cause of the retries going on, if any: the log gets one line when it starts, changes
        # or ends, not one per attempt (a broker down for an hour would bury everything else).
        self._failing: str | None = None

    def request_stop(self) -> None:
        self.stop.set()

    def run(self) -> int:
        if not log.isEnabledFor(logging.DEBUG):
            # kafka-python logs each reconnect attempt at ERROR/WARNING; the relay says once per
            # state change what is wrong with Kafka and how to fix it.
            logging.getLogger("kafka.net").setLevel(logging.CRITICAL)
        server = serve(self.metrics, self.s.metrics_port, self.s.metrics_host)
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
                    self._fail(str(exc))
                    return exc.code
                except Fenced as exc:
                    log.warning("another relay took over this slot's Kafka transactions (%s); back to standby", exc)
                except (Transient, Restart, ReplicationError, psycopg.Error, kerr.KafkaError, OSError,
                        TimeoutError) as exc:
                    # A refused login or a missing privilege or REPLICATION attribute comes back on
                    # every retry: stop with the fix (and a code saying which) instead of looping.
                    refused = refusal(exc, self.dsn, component="relay") or refusal(exc.__cause__, self.dsn,
                                                                                   component="relay")
                    if refused is not None:
                        self._fail(refused.message)
                        return refused.code
                    message = redact(str(exc))
                    if not message.startswith(type(exc).__name__):  # kafka-python's errors name themselves
                        message = f"{type(exc).__name__}: {message}"
                    self.metrics.restarts.inc()
                    self.metrics.last_error = message
                    if isinstance(exc, (kerr.KafkaError, Fenced)) or "Kafka" in message:
                        self.metrics.kafka_ok = False
                    if message != self._failing:
                        log.warning("pipeline stopped, restarting from the slot in %.0f s: %s (retrying; logged "
                                    "again when the cause changes)", backoff, message)
                    else:
                        log.debug("still failing, restarting in %.0f s: %s", backoff, message)
                    self._failing = message
                    self._record_error(message)  # last_error_at: the dashboard shows the failure is current
                    if time.monotonic() - started > 60:
                        backoff = 1.0
                    self.stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                except Exception as exc:  # noqa: BLE001 - a bug: recorded where operators look, then exit 1
                    log.exception("relay stopped by an unexpected error")
                    self._fail(f"unexpected {type(exc).__name__}: {exc}. This is a bug in the relay; nothing after "
                               f"the slot's confirmed position was acknowledged. Please report it with the log.")
                    return 1
                finally:
                    self.metrics.active.set(0)
                    self.metrics.streaming = False
            return 0
        finally:
            self._set_role("stopped")
            if server is not None:
                server.shutdown()
            log.info("relay %s stopped", self.s.relay_id)

    def _fail(self, message: str) -> None:
        message = redact(message)
        self.metrics.healthy = False
        self.metrics.last_error = message
        log.error("%s", message)
        self._record_error(message)

    # ----- one session

    def _session(self) -> None:
        s = self.s
        with psycopg.connect(self.dsn.secret(), autocommit=True, connect_timeout=10, client_encoding="utf8",
                             application_name=f"outbox-relay {s.relay_id}") as control:
            slots.check_server(control)
            self._register(control)
            if not self._become_active(control):
                return
            (log.debug if self._failing else log.info)("relay %s is active for slot %s", s.relay_id, s.slot_name)
            server = identify_server(self.dsn)
            dboid = self._check_recorded_identity(control, server)
            slots.ensure_publication(control, s.publication)
            snapshot = self._prepare_slot(control)
            state = slots.slot_state(control, s.slot_name)
            confirmed = str_to_lsn(state["confirmed_flush_lsn"] or "0/0")
            identity = self.identity = self._identity(control, server, dboid)

            eos = s.delivery == "exactly-once"
            publisher = make_publisher(s, f"outbox-relay-{identity.key}" if eos else None)
            self.metrics.kafka_ok = True  # bootstrapped: the brokers answered
            topics = TopicProvisioner(s)
            ledger = None
            stream = ReplicationStream(self.dsn, s.slot_name, s.publication)
            try:
                checkpoint = None
                if eos:
                    checkpoint = self._checkpoint(control, publisher, identity, server)
                for batch_id, status in settle_previous_batches(control, s.slot_name, s.delivery, checkpoint):
                    log.warning("batch %s was in flight when the previous relay stopped: %s", batch_id, status)
                if checkpoint is not None and checkpoint.dead:
                    restored = restore_dead_letters(control, s.slot_name, checkpoint)
                    if restored:
                        log.warning("restored %d dead letter(s) named by the Kafka checkpoint that this database "
                                    "had lost", restored)
                ledger = Ledger(self.dsn, s.slot_name, s.track_deliveries)
                ledger.start()
                resume = checkpoint
                if checkpoint is not None and checkpoint.identity is not None and \
                        checkpoint.identity.slot_created_lsn != identity.slot_created_lsn:
                    # The slot was created after this checkpoint: everything it streams is newer than
                    # the checkpoint's positions, so they must skip nothing (and the backfill is new).
                    resume = checkpoint.without_positions()
                pipeline = Pipeline(settings=s, control=control, stream=stream, publisher=publisher, ledger=ledger,
                                    metrics=self.metrics, stop=self.stop, confirmed_lsn=confirmed,
                                    checkpoint=resume, poison=self.poison, topics=topics)
                if snapshot is not None:
                    self._backfill(control, pipeline, snapshot, resume)
                self._open_stream(control, stream)
                self.metrics.streaming = True
                if self._failing is not None:
                    log.info("relay %s streams again (it had failed with: %s)", s.relay_id, self._failing)
                    self._failing = None
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
                topics.close()
                publisher.close(timeout=10 if self.stop.is_set() else 0)

    # ----- identity: what the recorded positions belong to

    def _check_recorded_identity(self, control: psycopg.Connection, server: ServerPosition) -> int:
        """relay_status must describe this server: positions, xids and the watermark recorded on
        another one (the database restored from a dump into a new cluster) would skip or prune
        events that were never published."""
        s = self.s
        dboid = control.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
        control.execute(
            "INSERT INTO outbox.relay_status (slot_name, delivery, active_relay_id) VALUES (%s, %s, %s) "
            "ON CONFLICT (slot_name) DO UPDATE SET delivery = EXCLUDED.delivery, "
            "active_relay_id = EXCLUDED.active_relay_id, updated_at = now()",
            (s.slot_name, s.delivery, s.relay_id))
        recorded = control.execute("SELECT system_identifier, database_oid FROM outbox.relay_status "
                                   "WHERE slot_name = %s", (s.slot_name,)).fetchone()
        if self.reset_checkpoint:
            log.warning("--reset-checkpoint: forgetting the positions recorded for slot %s (system %s, database "
                        "oid %s) and adopting this server (system %s, database oid %s)", s.slot_name, recorded[0],
                        recorded[1], server.system_identifier, dboid)
            control.execute("UPDATE outbox.relay_status SET watermark_txid = NULL, confirmed_lsn = NULL, "
                            "system_identifier = NULL, slot_created_lsn = NULL WHERE slot_name = %s", (s.slot_name,))
            if recorded[0] is not None and recorded[0] != server.system_identifier:
                # Another server's slot snapshot and backfill list mean nothing here.
                control.execute("UPDATE outbox.relay_status SET backfill_snapshot = NULL, slot_creating = false "
                                "WHERE slot_name = %s", (s.slot_name,))
                control.execute("DELETE FROM outbox.relay_backfill WHERE slot_name = %s", (s.slot_name,))
            recorded = (None, None)
        elif recorded[0] is not None and (recorded[0], recorded[1]) != (server.system_identifier, dboid):
            raise FatalError(
                f"outbox.relay_status of slot {s.slot_name!r} was recorded on PostgreSQL system {recorded[0]} "
                f"(database oid {recorded[1]}), but this server is system {server.system_identifier} (database oid "
                f"{dboid}): the database was copied to another server. Its recorded positions, transaction ids and "
                f"watermark mean nothing here and would skip or prune unpublished events, so the relay stops. "
                + RESET_FIX)
        control.execute("UPDATE outbox.relay_status SET system_identifier = %s, database_oid = %s, timeline = %s "
                        "WHERE slot_name = %s", (server.system_identifier, dboid, server.timeline, s.slot_name))
        if s.delivery != "exactly-once":
            self.reset_checkpoint = False  # nothing in Kafka to reset
        return dboid

    def _identity(self, control: psycopg.Connection, server: ServerPosition, dboid: int) -> Identity:
        database, created = control.execute(
            "SELECT current_database(), coalesce(slot_created_lsn::text, '') FROM outbox.relay_status "
            "WHERE slot_name = %s", (self.s.slot_name,)).fetchone()
        return Identity(server.system_identifier, server.timeline, int(dboid), database, self.s.slot_name, created)

    def _checkpoint(self, control: psycopg.Connection, publisher: Publisher, identity: Identity,
                    server: ServerPosition) -> Checkpoint:
        """The exactly-once checkpoint of this identity, verified to describe this database."""
        s = self.s
        ensure_checkpoint_topic(s)
        publisher.init_transactions()  # fences a zombie predecessor, settles its transaction
        probe = publisher.write_aborted_probe(s.checkpoint_topic)
        key = identity.key.encode()
        if self.reset_checkpoint:
            fresh = Checkpoint(identity)
            publisher.begin()
            publisher.commit(s.checkpoint_topic, key, fresh.to_json())
            self.reset_checkpoint = False
            log.warning("--reset-checkpoint: wrote an empty checkpoint for %s to %s", identity.key, s.checkpoint_topic)
            return fresh
        doc = read_checkpoint(s, key, probe)
        if doc is None:
            return Checkpoint(identity)
        checkpoint = Checkpoint.from_json(doc)
        known = checkpoint.batch_id == 0 or control.execute(
            "SELECT EXISTS (SELECT 1 FROM outbox.relay_batches WHERE batch_id = %s AND slot_name = %s)",
            (checkpoint.batch_id, s.slot_name)).fetchone()[0]
        why = mismatch(checkpoint, identity, history=server.history, wal_lsn=server.wal_lsn, batch_known=known)
        if why is not None:
            raise FatalError(
                f"the exactly-once checkpoint in Kafka (topic {s.checkpoint_topic!r}, key {identity.key!r}) does not "
                f"describe this database: {why}. Using it could skip events that never reached Kafka, so the relay "
                f"stops without skipping anything. " + RESET_FIX)
        self.reset_checkpoint = False
        # Positions and batch stay; the identity becomes this server's (a promotion moves the timeline on).
        return replace(checkpoint, identity=identity)

    def _become_active(self, control: psycopg.Connection) -> bool:
        waiting_since = None
        while not self.stop.is_set():
            if slots.try_lock(control, self.s.slot_name):
                return True
            if waiting_since is None:
                waiting_since = time.monotonic()
                self.metrics.role = "standby"
                log.info("relay %s is standby: another relay holds slot %s", self.s.relay_id, self.s.slot_name)
            ledger_sql.heartbeat(control, self.s.relay_id, "standby")
            self.metrics.tick()
            self.stop.wait(1.0)
        return False

    def _prepare_slot(self, control: psycopg.Connection) -> str | None:
        """Make sure the slot exists and is usable; returns the backfill snapshot if events committed
        before the slot existed still have to be published from the table."""
        s = self.s
        creating, snapshot = control.execute(
            "SELECT slot_creating, backfill_snapshot::text FROM outbox.relay_status WHERE slot_name = %s",
            (s.slot_name,)).fetchone()
        state = slots.slot_state(control, s.slot_name)
        recreating = self.recreate_slot or creating
        if recreating:
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
            created = control.execute("SELECT slot_created_lsn::text FROM outbox.relay_status WHERE slot_name = %s",
                                      (s.slot_name,)).fetchone()[0]
            if created is not None and not recreating:
                # This relay created the slot once and it is gone: dropped, or lost in a failover to a
                # standby that did not have it synchronized. A new slot would start now and never
                # stream what was committed since the old one's position, so a human decides.
                raise FatalError(slots.SLOT_MISSING_FIX.format(slot=s.slot_name, created=created))
            return self._create_slot(control)
        slots.check_slot(control, s.slot_name, state)
        self._ensure_failover(control, state)
        return snapshot

    def _failover(self, control: psycopg.Connection) -> bool:
        supported = control.info.server_version >= 170000
        if self.s.slot_failover == "on" and not supported:
            raise FatalError(f"OUTBOX_SLOT_FAILOVER=on needs PostgreSQL 17 or newer (this is "
                             f"{control.info.server_version // 10000}). Fix: set OUTBOX_SLOT_FAILOVER=auto or off; "
                             f"after a failover the relay then stops and asks for --recreate-slot.")
        return supported and self.s.slot_failover != "off"

    def _ensure_failover(self, control: psycopg.Connection, state: dict) -> None:
        """A slot created before failover slots were turned on (or by an older relay) becomes one."""
        if self._failover(control) and state.get("failover") == "false":
            with psycopg.connect(self.dsn.secret(), replication="database", autocommit=True, connect_timeout=10,
                                 client_encoding="utf8") as repl:
                repl.execute(f"ALTER_REPLICATION_SLOT {quote_ident(self.s.slot_name)} (FAILOVER true)")
            log.info("replication slot %s is now a failover slot (synchronized to standbys)", self.s.slot_name)

    def _create_slot(self, control: psycopg.Connection) -> str:
        """Create the slot together with the snapshot of what it will never stream."""
        s = self.s
        control.execute("UPDATE outbox.relay_status SET slot_creating = true WHERE slot_name = %s", (s.slot_name,))
        repl = psycopg.connect(self.dsn.secret(), replication="database", autocommit=True, connect_timeout=10,
                               client_encoding="utf8")
        created = threading.Event()
        watcher = threading.Thread(target=self._report_slot_wait, args=(repl, created), daemon=True)
        watcher.start()
        try:
            if self._failover(control):
                # A failover slot (PostgreSQL 17+) is synchronized to standbys that run with
                # sync_replication_slots=on, so a promoted standby can resume where we were.
                command = f"CREATE_REPLICATION_SLOT {quote_ident(s.slot_name)} LOGICAL pgoutput " \
                          f"(SNAPSHOT 'export', FAILOVER true)"
            else:
                command = f"CREATE_REPLICATION_SLOT {quote_ident(s.slot_name)} LOGICAL pgoutput EXPORT_SNAPSHOT"
            row = repl.execute(command).fetchone()
            # From here on the open transaction is our own backfill listing, not one the slot waits for.
            created.set()
            with psycopg.connect(self.dsn.secret(), connect_timeout=10, client_encoding="utf8") as tx:
                tx.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                tx.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(row[2])))
                snapshot = tx.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
                # Exactly the committed events this slot will never stream, as of its own snapshot.
                tx.execute("DELETE FROM outbox.relay_backfill WHERE slot_name = %s", (s.slot_name,))
                listed = tx.execute(BACKFILL_LIST, {"slot": s.slot_name}).rowcount
        except psycopg.errors.QueryCanceled:
            raise Transient("slot creation cancelled by a stop request") from None
        finally:
            repl.close()
            watcher.join()
        control.execute("UPDATE outbox.relay_status SET slot_creating = false, backfill_snapshot = %s::pg_snapshot, "
                        "slot_created_lsn = %s::pg_lsn, slot_created_at = now() WHERE slot_name = %s",
                        (snapshot, row[1], s.slot_name))
        log.info("created replication slot %s at %s (%d earlier event(s) to publish from the table)", s.slot_name,
                 row[1], listed)
        return snapshot

    def _report_slot_wait(self, repl: psycopg.Connection, created: threading.Event) -> None:
        """A new slot is consistent only once every transaction open at its creation has ended:
        say which ones we wait for, and give up on a stop request."""
        waited = 0.0
        while not repl.closed and not created.is_set():
            if self.stop.wait(0.5):
                if not created.is_set():
                    repl.cancel_safe()
                return
            if created.is_set():
                return
            waited += 0.5
            if waited % 10 == 0:
                try:
                    with psycopg.connect(self.dsn.secret(), autocommit=True, connect_timeout=5,
                                         client_encoding="utf8") as conn:
                        rows = conn.execute(
                            "SELECT pid, coalesce(application_name, ''), now() - xact_start, left(query, 80) "
                            "FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() "
                            "ORDER BY xact_start LIMIT 5").fetchall()
                except psycopg.Error:
                    rows = []
                log.warning("creating slot %s waits for %d open transaction(s) to end: %s", self.s.slot_name,
                            len(rows), "; ".join(f"pid {p} {a!r} open {age} ({q})" for p, a, age, q in rows))

    def _backfill(self, control: psycopg.Connection, pipeline: Pipeline, snapshot: str,
                  checkpoint: Checkpoint | None) -> None:
        s = self.s
        # Exactly-once resumes an interrupted backfill exactly after the last event Kafka committed.
        after = checkpoint.backfill_after if checkpoint and checkpoint.backfill_snapshot == snapshot else None
        started = time.monotonic()
        with psycopg.connect(self.dsn.secret(), connect_timeout=10) as reader:
            with reader.cursor(name="outbox_backfill") as cur:
                cur.itersize = 2000
                cur.execute(BACKFILL_QUERY, {"slot": s.slot_name, "after_ts": after[0] if after else None,
                                             "after_id": after[1] if after else None})
                # A SQL_ASCII database hands text over as bytes already (anything but UTF-8 is dead-lettered).
                rows = (tuple(v if v is None or type(v) is bytes else v.encode() for v in r) for r in cur)
                count = pipeline.backfill(rows, TABLE_LAYOUT, snapshot)
        with control.transaction():
            control.execute("UPDATE outbox.relay_status SET backfill_snapshot = NULL WHERE slot_name = %s",
                            (s.slot_name,))
            control.execute("DELETE FROM outbox.relay_backfill WHERE slot_name = %s", (s.slot_name,))
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

    def _register(self, control: psycopg.Connection) -> None:
        control.execute(
            "INSERT INTO outbox.relay_instances (relay_id, slot_name, role, delivery, host, pid) "
            "VALUES (%s, %s, 'standby', %s, %s, %s) ON CONFLICT (relay_id) DO UPDATE SET role = 'standby', "
            "slot_name = EXCLUDED.slot_name, delivery = EXCLUDED.delivery, heartbeat_at = now()",
            (self.s.relay_id, self.s.slot_name, self.s.delivery, socket.gethostname(), os.getpid()))

    def _set_role(self, role: str, control: psycopg.Connection | None = None) -> None:
        try:
            if control is not None:
                ledger_sql.heartbeat(control, self.s.relay_id, role)
                return
            with psycopg.connect(self.dsn.secret(), autocommit=True, connect_timeout=5, client_encoding="utf8") as conn:
                ledger_sql.heartbeat(conn, self.s.relay_id, role)
        except psycopg.Error as exc:
            log.debug("could not record role %s: %s", role, exc)

    def _record_error(self, message: str) -> None:
        try:
            with psycopg.connect(self.dsn.secret(), autocommit=True, connect_timeout=5, client_encoding="utf8") as conn:
                message = redact(message)[:2000]
                conn.execute("UPDATE outbox.relay_status SET last_error = %s, last_error_at = now() "
                             "WHERE slot_name = %s", (message, self.s.slot_name))
                conn.execute("UPDATE outbox.relay_instances SET last_error = %s WHERE relay_id = %s",
                             (message, self.s.relay_id))
        except psycopg.Error:
            pass  # the database may be what failed; the log has it
