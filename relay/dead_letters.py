"""`outbox dead-letters list|replay`: inspect and republish events the relay could not publish.

A replay sends the stored copy of the event to Kafka exactly as the relay would have (same
event_id, key, value and headers, plus `outbox_replayed_from` naming the dead letter), after the
operator fixed the cause (raised a size limit, granted a topic ACL, changed the topic template).
It is at-least-once and arrives after later events of the same aggregate: consumers deduplicate
on event_id and should not assume the replayed event is the latest.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from kafka import KafkaProducer
from kafka import errors as kerr

from outbox.core.lsn import iso_to_pg, str_to_lsn
from outbox.core.redact import Dsn
from outbox.core.settings import Settings
from relay.publisher import classify, producer_config
from relay.router import TABLE_LAYOUT, RouteError, Router, Txn

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



def list_dead_letters(dsn: Dsn, include_replayed: bool = False, limit: int = 100,
                      ids: list[int] | None = None) -> list[DeadLetterRow]:
    with psycopg.connect(dsn.secret()) as conn:
        rows = conn.execute(f"SELECT {COLUMNS} FROM outbox.relay_dead_letters "
                            "WHERE (%s OR replayed_at IS NULL) AND (%s::bigint[] IS NULL OR id = ANY(%s::bigint[])) "
                            "ORDER BY id LIMIT %s", (include_replayed, ids, ids, limit)).fetchall()
    return [DeadLetterRow(*r) for r in rows]


@dataclass
class ReplayReport:
    replayed: int = 0
    failed: int = 0
    skipped: int = 0  # claimed by a concurrent replay at the time; its outcome is that replay's


def replay(settings: Settings, ids: list[int] | None, log=print) -> ReplayReport:
    """Republish the given dead letters (all open ones if ids is None).

    Each dead letter is claimed in a transaction of its own (FOR UPDATE SKIP LOCKED) that is held
    across the publish and the mark: two operators replaying the same dead letter publish it once,
    the second one skips it and says so. A replay that dies between the publish and the commit of
    the mark leaves the row open and replayable (the event may then reach Kafka twice, which
    consumers deduplicate on event_id), never marked without having been published."""
    dsn = settings.require_database_url()
    router = Router(settings.topic_template, reserved=frozenset({settings.checkpoint_topic}))
    producer = KafkaProducer(**producer_config(settings))
    report = ReplayReport()
    try:
        with psycopg.connect(dsn.secret(), autocommit=True) as conn:
            if ids is None:
                wanted = [r[0] for r in conn.execute("SELECT id FROM outbox.relay_dead_letters "
                                                     "WHERE replayed_at IS NULL ORDER BY id").fetchall()]
            else:
                wanted = sorted(set(ids))
            missing, already = [], []
            for dead_letter_id in wanted:
                with conn.transaction():
                    found = conn.execute(f"SELECT {COLUMNS} FROM outbox.relay_dead_letters WHERE id = %s "
                                         f"AND replayed_at IS NULL FOR UPDATE SKIP LOCKED",
                                         (dead_letter_id,)).fetchone()
                    if found is None:
                        state = conn.execute("SELECT replayed_at IS NOT NULL FROM outbox.relay_dead_letters "
                                             "WHERE id = %s", (dead_letter_id,)).fetchone()
                        if state is None:
                            missing.append(dead_letter_id)
                        elif state[0]:
                            already.append(dead_letter_id)
                        else:
                            report.skipped += 1
                            log(f"dead letter {dead_letter_id} is being replayed by another replay right now: "
                                f"skipped (see `outbox dead-letters list --all` for its outcome)")
                        continue
                    row = DeadLetterRow(*found)
                    note = _publish(router, producer, row, log)
                    if note is None:
                        report.failed += 1
                        continue
                    conn.execute("UPDATE outbox.relay_dead_letters SET replayed_at = now(), replay_note = %s "
                                 "WHERE id = %s", (note, row.id))
                report.replayed += 1
                log(f"replayed dead letter {row.id} (event {row.event_id}) to {note}")
            if missing or already:
                log(f"not found or already replayed: {sorted(missing + already)}")
    finally:
        producer.close(timeout=10)
    return report


def _publish(router: Router, producer: KafkaProducer, row: DeadLetterRow, log) -> str | None:
    """Send the stored copy and wait for Kafka's ack; topic/partition@offset, or None (logged)."""
    values = (row.event_id, row.aggregate_type, row.aggregate_id, row.event_type, row.payload,
              row.headers or "{}", row.created_at, row.txid)
    encoded = tuple(None if v is None else v.encode() for v in values)
    txn = Txn.of(str_to_lsn(row.commit_lsn or "0/0"), iso_to_pg(row.created_at))
    try:
        record = router.route(TABLE_LAYOUT, encoded, txn)
        record.headers.append(("outbox_replayed_from", f"dead-letter:{row.id}".encode()))
        metadata = producer.send(record.topic, value=record.value, key=record.key,
                                 headers=record.headers).get(timeout=60)
    except (RouteError, kerr.KafkaError) as exc:
        why = classify(exc).message if isinstance(exc, kerr.KafkaError) else str(exc)
        log(f"dead letter {row.id} (event {row.event_id}) still cannot be published: {why}")
        return None
    return f"{metadata.topic}/{metadata.partition}@{metadata.offset}"
