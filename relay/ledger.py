"""The relay's bookkeeping in PostgreSQL: batch intents and outcomes, delivery rows, dead letters.

Intents are written synchronously on the daemon's control connection before a batch's first
record is sent. Outcomes are written by a background thread on its own connection, several
batches per transaction under load, and only then is a batch marked `persisted` so the slot may
advance past it. Nothing here is on the per-event path of the daemon's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from relay.checkpoint import Batch, Checkpoint, DeadLetter
from relay.pgoutput import lsn_to_str
from relay.redact import Dsn
from relay.router import Layout

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


def settle_previous_batches(conn: psycopg.Connection, slot: str, delivery: str,
                            checkpoint: Checkpoint | None) -> list[tuple[int, str]]:
    """Batches a crashed relay left in flight: their outcome was unknown at the crash.

    Exactly-once: the Kafka checkpoint says which committed (batch ids are increasing).
    At-least-once: unknown; the slot replays their events, so they are delivered, maybe twice.
    Returns (batch_id, new status) for logging.
    """
    rows = conn.execute("SELECT batch_id FROM outbox.relay_batches WHERE slot_name = %s AND status = 'in_flight' "
                        "ORDER BY batch_id", (slot,)).fetchall()
    settled = []
    for (batch_id,) in rows:
        if checkpoint is not None and delivery == "exactly-once":
            committed = batch_id <= checkpoint.batch_id
            status = "committed" if committed else "aborted"
            resolution = ("the Kafka checkpoint shows this transaction committed before the crash" if committed else
                          "never committed in Kafka (read_committed consumers never saw it); its events are "
                          "published again from the slot")
        else:
            status = "unknown"
            resolution = ("relay stopped before Kafka acknowledged this batch; its events are replayed from the "
                          "slot, so consumers may see some of them twice (deduplicate on event_id)")
        conn.execute("UPDATE outbox.relay_batches SET status = %s, resolution = %s, finished_at = now() "
                     "WHERE batch_id = %s", (status, resolution, batch_id))
        settled.append((batch_id, status))
    return settled


# ----- the background writer


class Ledger:
    def __init__(self, dsn: Dsn, slot: str, layout_of: Callable[[], Layout], track_deliveries: bool,
                 on_persisted: Callable[[Outcome, int], None]):
        self.dsn = dsn
        self.slot = slot
        self.layout_of = layout_of  # the outbox row layout, to read dead-lettered rows
        self.track_deliveries = track_deliveries
        self.on_persisted = on_persisted  # (outcome, published) -> None, for metrics
        self.error: BaseException | None = None
        self._queue: queue.Queue[Outcome | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="outbox-ledger", daemon=True)
        self._conn: psycopg.Connection | None = None

    def start(self) -> None:
        self._conn = psycopg.connect(self.dsn.secret(), autocommit=True, application_name="outbox-relay-ledger")
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
            for event_id, future in zip(o.batch.event_ids, o.batch.futures):
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
                    if b.dead:
                        self._dead_letters(cur, b.batch_id, b.dead)
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
            o.batch.persisted = True
            self.on_persisted(o, published)

    def _dead_letters(self, cur: psycopg.Cursor, batch_id: int, dead: list[DeadLetter]) -> None:
        layout: Layout = self.layout_of()
        rows = []
        for d in dead:
            r = d.row
            rows.append((d.event_id.decode(), self.slot, batch_id, d.topic, d.reason, d.error,
                         _text(r, layout.aggregate_type), _text(r, layout.aggregate_id), _text(r, layout.event_type),
                         _text(r, layout.payload), _text(r, layout.headers), lsn_to_str(d.commit_lsn),
                         _text(r, layout.txid), _text(r, layout.created_at)))
        cur.executemany(
            "INSERT INTO outbox.relay_dead_letters (event_id, slot_name, batch_id, topic, reason, error, "
            "aggregate_type, aggregate_id, event_type, payload, headers, commit_lsn, txid, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::text::xid8, %s)", rows)


def _text(row: tuple, i: int) -> str | None:
    """Column i of a decoded row as text (None if absent or NULL), for the dead-letter copy."""
    v = row[i] if i < len(row) else None
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else None
