"""`outbox dead-letters list|replay`: inspect and republish events the relay could not publish.

A replay sends the stored copy of the event to Kafka exactly as the relay would have (same
event_id, key, value and headers, plus `outbox_replayed_from` naming the dead letter), after the
operator fixed the cause (raised a size limit, granted a topic ACL, changed the topic template).
It is at-least-once and arrives after later events of the same aggregate: consumers deduplicate
on event_id and should not assume the replayed event is the latest.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from kafka import KafkaProducer
from kafka import errors as kerr

from relay.pgoutput import PG_EPOCH_UNIX_US, str_to_lsn
from relay.publisher import classify, producer_config
from relay.redact import Dsn
from relay.router import TABLE_LAYOUT, RouteError, Router, Txn
from relay.settings import Settings

COLUMNS = ("id, event_id::text, slot_name, reason, error, aggregate_type, aggregate_id, event_type, payload, "
           "headers, created_at::text, txid::text, commit_lsn::text, dead_lettered_at, replayed_at")


@dataclass
class DeadLetterRow:
    id: int
    event_id: str
    slot_name: str
    reason: str
    error: str
    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: str | None
    headers: str | None
    created_at: str | None
    txid: str | None
    commit_lsn: str | None
    dead_lettered_at: object
    replayed_at: object


def pg_micros(timestamp: str | None) -> int:
    """µs since 2000-01-01 of a timestamptz rendered as text (the event's creation time)."""
    if not timestamp:
        return 0
    return int(datetime.fromisoformat(timestamp).timestamp() * 1_000_000) - PG_EPOCH_UNIX_US


def list_dead_letters(dsn: Dsn, include_replayed: bool = False, limit: int = 100) -> list[DeadLetterRow]:
    where = "" if include_replayed else "WHERE replayed_at IS NULL"
    with psycopg.connect(dsn.secret()) as conn:
        rows = conn.execute(f"SELECT {COLUMNS} FROM outbox.relay_dead_letters {where} ORDER BY id LIMIT %s",
                            (limit,)).fetchall()
    return [DeadLetterRow(*r) for r in rows]


def replay(settings: Settings, ids: list[int] | None, log=print) -> tuple[int, int]:
    """Republish the given dead letters (all open ones if ids is None). Returns (replayed, failed)."""
    dsn = settings.require_database_url()
    router = Router(settings.topic_template)
    producer = KafkaProducer(**producer_config(settings))
    replayed = failed = 0
    try:
        with psycopg.connect(dsn.secret(), autocommit=True) as conn:
            query = f"SELECT {COLUMNS} FROM outbox.relay_dead_letters WHERE replayed_at IS NULL"
            params: tuple = ()
            if ids is not None:
                query += " AND id = ANY(%s)"
                params = (ids,)
            rows = [DeadLetterRow(*r) for r in conn.execute(query + " ORDER BY id", params).fetchall()]
            missing = sorted(set(ids or []) - {r.id for r in rows})
            if missing:
                log(f"not found or already replayed: {missing}")
            for row in rows:
                values = (row.event_id, row.aggregate_type, row.aggregate_id, row.event_type, row.payload,
                          row.headers or "{}", row.created_at, row.txid)
                encoded = tuple(None if v is None else v.encode() for v in values)
                txn = Txn.of(str_to_lsn(row.commit_lsn or "0/0"), pg_micros(row.created_at))
                try:
                    record = router.route(TABLE_LAYOUT, encoded, txn)
                    record.headers.append(("outbox_replayed_from", f"dead-letter:{row.id}".encode()))
                    metadata = producer.send(record.topic, value=record.value, key=record.key,
                                             headers=record.headers).get(timeout=60)
                except (RouteError, kerr.KafkaError) as exc:
                    failed += 1
                    why = classify(exc).message if isinstance(exc, kerr.KafkaError) else str(exc)
                    log(f"dead letter {row.id} (event {row.event_id}) still cannot be published: {why}")
                    continue
                conn.execute("UPDATE outbox.relay_dead_letters SET replayed_at = now(), replay_note = %s "
                             "WHERE id = %s", (f"{metadata.topic}/{metadata.partition}@{metadata.offset}", row.id))
                replayed += 1
                log(f"replayed dead letter {row.id} (event {row.event_id}) to "
                    f"{metadata.topic}/{metadata.partition}@{metadata.offset}")
    finally:
        producer.close(timeout=10)
    return replayed, failed
