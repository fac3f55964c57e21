"""Dead-letter replay: an operator requests it (`outbox inbox replay`), the consumer performs it.

Replay re-runs the consumer's own handler on the stored record, in one transaction with the inbox
row flipping from dead_lettered to processed and the dead letter marked replayed. It does not go
through Kafka or the dedupe check, so a replayed event can never be mistaken for a duplicate of
itself, and it is applied at most once: a second request for a replayed dead letter is refused.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import psycopg
from psycopg.rows import dict_row

from inbox import codec, tracing
from inbox.message import Message, StoredRecord
from inbox.process import Handler

log = logging.getLogger("inbox")

_NEXT_REQUESTED = """
SELECT id, event_id, topic, kafka_partition, kafka_offset,
       (extract(epoch FROM kafka_timestamp) * 1000)::bigint AS ts, key, value, headers, attempts, replay_attempts
  FROM outbox.inbox_dead_letters
 WHERE consumer = %s AND status = 'replay_requested' AND id > %s
 ORDER BY id
 LIMIT 1
   FOR UPDATE SKIP LOCKED
"""


@dataclass
class ReplayReport:
    replayed: list[int]
    failed: dict[int, str]  # dead letter id -> error of the replay attempt


def replay_requested(conn: psycopg.Connection, consumer: str, handler: Handler, *, limit: int = 100) -> ReplayReport:
    """Run the handler on this consumer's dead letters whose replay was requested, oldest first.
    A failure puts the dead letter back to `dead` with the new error; nothing is retried here."""
    report = ReplayReport([], {})
    handler = tracing.instrument(handler)
    last_id = 0
    for _ in range(limit):
        outcome = _replay_one(conn, consumer, handler, last_id)
        if outcome is None:
            break
        last_id, error = outcome
        if error is None:
            report.replayed.append(last_id)
        else:
            report.failed[last_id] = error
    return report


def _replay_one(conn, consumer, handler, after_id) -> tuple[int, str | None] | None:
    failure: Exception | None = None
    with conn.transaction():
        row = conn.execute(_NEXT_REQUESTED, (consumer, after_id)).fetchone()
        if row is None:
            return None
        dl_id, event_id, topic, part, offset, ts, key, value, headers, attempts, replays = row
        record = StoredRecord(topic, part, offset, ts, key, value, codec.headers_from_json(headers))
        try:
            handler(conn, Message(record, event_id, consumer, attempts + replays + 1))
        except Exception as exc:  # noqa: BLE001 - recorded on the dead letter for the operator
            if conn.broken:
                raise
            failure = exc
            raise psycopg.Rollback() from None
        # The inbox row normally exists (dead_lettered); recreate it if an operator deleted it.
        conn.execute(
            "INSERT INTO outbox.inbox_messages (event_id, consumer, topic, kafka_partition, kafka_offset) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (event_id, consumer) "
            "DO UPDATE SET status = 'processed', processed_at = now()",
            (event_id, consumer, topic, part, offset))
        conn.execute("UPDATE outbox.inbox_dead_letters SET status = 'replayed', replayed_at = now(), "
                     "updated_at = now(), replay_attempts = replay_attempts + 1 WHERE id = %s", (dl_id,))
        conn.execute(
            "INSERT INTO outbox.inbox_stats AS s (minute, consumer, topic, kafka_partition, processed) "
            "VALUES (date_trunc('minute', now()), %s, %s, %s, 1) "
            "ON CONFLICT (minute, consumer, topic, kafka_partition) DO UPDATE SET processed = s.processed + 1",
            (consumer, topic, part))
    if failure is None:
        log.info("replayed dead letter %d (event %s) for consumer %s", dl_id, event_id, consumer)
        return dl_id, None
    error = codec.describe_error(failure)
    with conn.transaction():
        conn.execute("UPDATE outbox.inbox_dead_letters SET status = 'dead', replay_attempts = replay_attempts + 1, "
                     "error = %s, error_detail = %s, updated_at = now() WHERE id = %s",
                     (error, codec.error_detail(failure), dl_id))
    log.error("replay of dead letter %d (event %s) for consumer %s failed: %s; it is dead again",
              dl_id, event_id, consumer, error)
    return dl_id, error


# ----- operator side (CLI)

@dataclass
class Selection:
    """Which dead letters an operator means: ids, event ids, or all open ones of a consumer."""

    consumer: str
    ids: list[int] | None = None
    event_ids: list[uuid.UUID] | None = None

    def where(self) -> tuple[str, list]:
        if self.ids is not None:
            return "consumer = %s AND id = ANY(%s)", [self.consumer, self.ids]
        if self.event_ids is not None:
            return "consumer = %s AND event_id = ANY(%s)", [self.consumer, self.event_ids]
        return "consumer = %s", [self.consumer]


def request_replay(conn: psycopg.Connection, selection: Selection) -> tuple[list[int], dict[int, str]]:
    """Mark dead letters for replay. Returns (requested ids, {id: why not}) for the ones refused."""
    where, params = selection.where()
    with conn.transaction():
        rows = conn.execute(f"SELECT id, status, reason FROM outbox.inbox_dead_letters WHERE {where} "
                            "ORDER BY id FOR UPDATE", params).fetchall()
        refused: dict[int, str] = {}
        wanted = []
        for dl_id, status, reason in rows:
            if reason == "invalid_envelope":
                if selection.ids is not None:
                    refused[dl_id] = ("has no valid event_id, so it cannot go through the inbox; fix the producer "
                                      "and discard it with `outbox inbox discard`")
            elif status == "dead":
                wanted.append(dl_id)
            elif selection.ids is not None or selection.event_ids is not None:
                refused[dl_id] = f"is {status.replace('_', ' ')}"
        if wanted:
            conn.execute("UPDATE outbox.inbox_dead_letters SET status = 'replay_requested', "
                         "replay_requested_at = now(), updated_at = now() WHERE id = ANY(%s)", (wanted,))
    return wanted, refused


def discard(conn: psycopg.Connection, selection: Selection) -> list[int]:
    where, params = selection.where()
    with conn.transaction():
        return [r[0] for r in conn.execute(
            f"UPDATE outbox.inbox_dead_letters SET status = 'discarded', updated_at = now() "
            f"WHERE {where} AND status = 'dead' RETURNING id", params)]


def list_dead_letters(conn: psycopg.Connection, consumer: str | None = None, *, include_resolved: bool = False,
                      ids: list[int] | None = None) -> list[dict]:
    clauses, params = [], []
    if consumer is not None:
        clauses.append("consumer = %s")
        params.append(consumer)
    if ids is not None:
        clauses.append("id = ANY(%s)")
        params.append(ids)
    if not include_resolved:
        clauses.append("status IN ('dead', 'replay_requested')")
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT id, consumer, status, reason, error, attempts, replay_attempts, event_id, event_type, topic, "
            f"kafka_partition, kafka_offset, created_at, replay_requested_at, replayed_at "
            f"FROM outbox.inbox_dead_letters {where} ORDER BY id", params).fetchall()
