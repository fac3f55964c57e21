"""The relay's bookkeeping in PostgreSQL: batch intents and outcomes, delivery rows, dead letters.

Intents are written synchronously on the daemon's control connection before a batch's first
record is sent; in exactly-once mode the batch's xids and dead letters are also written there
before its Kafka transaction commits (prepare_batch). Outcomes are written by a background thread
on its own connection, several batches per transaction under load; each written batch is handed
back through `Ledger.done` so the pipeline's thread may let the slot advance past it. Nothing here
is on the per-event path of the daemon's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import psycopg

from outbox.core.lsn import lsn_to_str
from outbox.core.redact import Dsn
from relay.bookkeeper import Batch, DeadLetter
from relay.checkpoint import Checkpoint

log = logging.getLogger("outbox.relay")


@dataclass(slots=True)
class Outcome:
    batch: Batch  # closed, every record with an outcome in Kafka
    status: str  # 'acked' (at-least-once) or 'committed' (exactly-once)
    done_at: float  # time.time() when the daemon saw Kafka's last acknowledgement


# ----- synchronous statements on the control connection


def open_batch(conn: psycopg.Connection, slot: str, relay_id: str, delivery: str, first_lsn: int) -> int:
    return conn.execute(
        "INSERT INTO outbox.relay_batches (slot_name, relay_id, delivery, status, first_lsn) "
        "VALUES (%s, %s, %s, 'in_flight', %s) RETURNING batch_id",
        (slot, relay_id, delivery, lsn_to_str(first_lsn)),
    ).fetchone()[0]


def prepare_batch(conn: psycopg.Connection, slot: str, batch: Batch) -> None:
    """Exactly-once, before the batch's Kafka transaction commits: its xids (what the in-flight view and
    a backfill need to know the batch's transactions are done) and its dead letters, tagged with the
    batch. settle_previous_batches() deletes them again if the Kafka transaction never committed."""
    xids = [x.decode() for x in batch.xids]
    with conn.transaction():
        conn.execute("UPDATE outbox.relay_batches SET xids = %s::text[]::xid8[], "
                     "max_xid = (SELECT max(x) FROM unnest(%s::text[]::xid8[]) x), ack_lsn = %s, dead_lettered = %s "
                     "WHERE batch_id = %s",
                     (xids, xids, lsn_to_str(batch.ack_lsn) if batch.ack_lsn is not None else None, len(batch.dead),
                      batch.batch_id))
        if batch.dead:
            with conn.cursor() as cur:
                insert_dead_letters(cur, slot, batch.batch_id, batch.dead)


def record_progress(conn: psycopg.Connection, slot: str, relay_id: str, confirmed: int, watermark: str | None,
                    failover: tuple[bool | None, str, int | None]) -> None:
    """Position, watermark and failover readiness (slot.failover_readiness()) in one statement."""
    ready, detail, standby_lag = failover
    conn.execute("UPDATE outbox.relay_status SET confirmed_lsn = %s, watermark_txid = "
                 "CASE WHEN %s::text IS NULL THEN watermark_txid ELSE greatest(watermark_txid, %s::text::xid8) END, "
                 "active_relay_id = %s, failover_ready = %s, failover_detail = %s, standby_lag_bytes = %s, "
                 "updated_at = now() WHERE slot_name = %s",
                 (lsn_to_str(confirmed), watermark, watermark, relay_id, ready, detail, standby_lag, slot))
    heartbeat(conn, relay_id, "active")


def heartbeat(conn: psycopg.Connection, relay_id: str, role: str) -> None:
    conn.execute("UPDATE outbox.relay_instances SET heartbeat_at = now(), role = %s WHERE relay_id = %s",
                 (role, relay_id))


def settle(batch_ids: list[int], delivery: str, checkpoint: Checkpoint | None) -> list[tuple[int, str, str]]:
    """Pure: what became of batches a stopped relay left in flight. (batch_id, status, resolution).

    Exactly-once: the Kafka checkpoint says which committed (batch ids are increasing, and batches
    commit in order). At-least-once: unknown; the slot replays their events, maybe twice."""
    settled = []
    for batch_id in batch_ids:
        if checkpoint is not None and delivery == "exactly-once":
            if batch_id <= checkpoint.batch_id:
                settled.append((batch_id, "committed",
                                "the Kafka checkpoint shows this transaction committed before the stop"))
            else:
                settled.append((batch_id, "aborted", "never committed in Kafka (read_committed consumers never "
                                                     "saw it); its events are published again from the slot"))
        else:
            settled.append((batch_id, "unknown", "relay stopped before Kafka acknowledged this batch; its events "
                                                 "are replayed from the slot, so consumers may see some of them "
                                                 "twice (deduplicate on event_id)"))
    return settled


def settle_previous_batches(conn: psycopg.Connection, slot: str, delivery: str,
                            checkpoint: Checkpoint | None) -> list[tuple[int, str]]:
    """Record settle()'s verdicts; an aborted batch's prepared dead letters are withdrawn (its events
    are decided again when the slot replays them)."""
    rows = conn.execute("SELECT batch_id FROM outbox.relay_batches WHERE slot_name = %s AND status = 'in_flight' "
                        "ORDER BY batch_id", (slot,)).fetchall()
    out = []
    for batch_id, status, resolution in settle([r[0] for r in rows], delivery, checkpoint):
        with conn.transaction():
            conn.execute("UPDATE outbox.relay_batches SET status = %s, resolution = %s, finished_at = now() "
                         "WHERE batch_id = %s", (status, resolution, batch_id))
            if status == "aborted":
                conn.execute("DELETE FROM outbox.relay_dead_letters WHERE slot_name = %s AND batch_id = %s",
                             (slot, batch_id))
        out.append((batch_id, status))
    return out


def restore_dead_letters(conn: psycopg.Connection, slot: str, checkpoint: Checkpoint) -> int:
    """Dead letters the last checkpoint names but this database lacks (it lost the relay's last writes,
    e.g. a failover): copied again from the outbox table. Returns how many were restored."""
    restored = 0
    for event_id, reason, error in checkpoint.dead:
        restored += conn.execute(
            "INSERT INTO outbox.relay_dead_letters (event_id, slot_name, batch_id, reason, error, aggregate_type, "
            "aggregate_id, event_type, payload, headers, txid, created_at) "
            "SELECT e.event_id, %(slot)s, NULL, %(reason)s, %(error)s, e.aggregate_type, e.aggregate_id, e.event_type, "
            "e.payload::text, e.headers::text, e.txid, e.created_at FROM outbox.events e WHERE e.event_id = %(id)s "
            "AND NOT EXISTS (SELECT 1 FROM outbox.relay_dead_letters d WHERE d.event_id = %(id)s "
            "AND d.slot_name = %(slot)s)",
            {"slot": slot, "reason": reason, "error": error, "id": event_id}).rowcount
    return restored


# ----- the background writer


class Ledger:
    def __init__(self, dsn: Dsn, slot: str, track_deliveries: bool):
        self.dsn = dsn
        self.slot = slot
        self.track_deliveries = track_deliveries
        self.error: BaseException | None = None
        self.done: queue.SimpleQueue[tuple[Outcome, int]] = queue.SimpleQueue()  # (outcome, events published)
        self._queue: queue.Queue[Outcome | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="outbox-ledger", daemon=True)
        self._conn: psycopg.Connection | None = None

    def start(self) -> None:
        self._conn = psycopg.connect(self.dsn.secret(), autocommit=True, application_name="outbox-relay-ledger",
                                      client_encoding="utf8")
        self._thread.start()

    def submit(self, outcome: Outcome) -> None:
        self._queue.put(outcome)

    def stop(self, timeout: float = 30) -> None:
        """Write what was submitted, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._conn is not None:
            self._conn.close()

    def _run(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                outcomes = [first]
                while len(outcomes) < 50:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._write(outcomes)
                        return
                    outcomes.append(nxt)
                self._write(outcomes)
        except BaseException as exc:  # noqa: BLE001 - handed to the daemon thread, which restarts the pipeline
            self.error = exc

    def _write(self, outcomes: list[Outcome]) -> None:
        conn = self._conn
        counts = []
        last = None
        lines: list[str] = []
        for o in outcomes:
            published = 0
            bid = o.batch.batch_id
            for event_id, future in zip(o.batch.event_ids, o.batch.handles):
                if future.exception is None:
                    published += 1
                    last = event_id
                    if self.track_deliveries:
                        md = future.value
                        lines.append(f"{event_id.decode()}\t{bid}\t{md.topic}\t{md.partition}\t{md.offset}\n")
            counts.append(published)
        with conn.transaction():
            with conn.cursor() as cur:
                for o, published in zip(outcomes, counts):
                    b = o.batch
                    xids = [x.decode() for x in b.xids]
                    cur.execute(
                        "UPDATE outbox.relay_batches SET status = %s, events = %s, dead_lettered = %s, "
                        "xids = %s::text[]::xid8[], max_xid = (SELECT max(x) FROM unnest(%s::text[]::xid8[]) x), "
                        "ack_lsn = %s, finished_at = now() WHERE batch_id = %s",
                        (o.status, published, len(b.dead), xids, xids,
                         lsn_to_str(b.ack_lsn) if b.ack_lsn is not None else None, b.batch_id))
                    if b.dead and o.status != "committed":  # exactly-once wrote them in prepare_batch()
                        insert_dead_letters(cur, self.slot, b.batch_id, b.dead)
                if lines:
                    with cur.copy("COPY outbox.deliveries (event_id, batch_id, topic, kafka_partition, kafka_offset) "
                                  "FROM STDIN") as copy:
                        copy.write("".join(lines))
                published = sum(counts)
                dead = sum(len(o.batch.dead) for o in outcomes)
                last = last.decode() if last else None
                cur.execute(
                    "UPDATE outbox.relay_status SET events_published = events_published + %s, "
                    "events_dead_lettered = events_dead_lettered + %s, batches_acked = batches_acked + %s, "
                    "last_event_id = coalesce(%s, last_event_id), "
                    "last_published_at = CASE WHEN %s > 0 THEN now() ELSE last_published_at END, updated_at = now() "
                    "WHERE slot_name = %s",
                    (published, dead, len(outcomes), last, published, self.slot))
        for o, published in zip(outcomes, counts):
            self.done.put((o, published))


def insert_dead_letters(cur: psycopg.Cursor, slot: str, batch_id: int, dead: list[DeadLetter]) -> None:
    rows = []
    for d in dead:
        r, layout = d.row, d.layout
        rows.append((d.event_id.decode(errors="backslashreplace"), slot, batch_id, None, d.reason, d.error,
                     _text(r, layout.aggregate_type), _text(r, layout.aggregate_id), _text(r, layout.event_type),
                     _text(r, layout.payload), _text(r, layout.headers), lsn_to_str(d.commit_lsn),
                     _text(r, layout.txid), _text(r, layout.created_at)))
    cur.executemany(
        "INSERT INTO outbox.relay_dead_letters (event_id, slot_name, batch_id, topic, reason, error, "
        "aggregate_type, aggregate_id, event_type, payload, headers, commit_lsn, txid, created_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::text::xid8, %s)", rows)


def _text(row: tuple, i: int) -> str | None:
    """Column i of a decoded row as text (None if absent, NULL or not in the layout), for the dead-letter
    copy. Bytes that are not UTF-8 (a SQL_ASCII database) are kept as backslash escapes, not dropped."""
    v = row[i] if 0 <= i < len(row) else None
    return v.decode("utf-8", errors="backslashreplace") if isinstance(v, bytes) else None
