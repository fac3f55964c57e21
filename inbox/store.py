"""SQL for inbox rows, consumed offsets, per-minute stats and dead letters. Every function runs on
the caller's connection inside the caller's transaction; none commits."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb

from inbox import codec
from inbox.message import Record
from inbox.plan import Partition, Plan, Suppressed

# One statement, one round trip per batch: insert the inbox rows, move the offsets and add the
# per-minute counts. It runs before the handlers, which is fine: all of it commits or rolls back
# with them. (The handler-failure path still needs the rows first, to know what is new.)
#
# ON CONFLICT DO NOTHING waits for a concurrent transaction inserting the same (event, consumer)
# (a zombie instance after a rebalance) and then skips the row: the second one is a duplicate.
# Offsets only move forward (greatest), so a zombie cannot rewind the new owner either.
#
# The batch travels as scalars, not as per-record Python lists: psycopg dumps lists element by
# element in Python (~4 us a record, a third of kafka-python's own cost per record), whereas one
# bytes object of packed 16-byte ids plus two comma-joined strings cost ~0.5 us. `parts` indexes
# the per-partition arrays (1-based), so multi-topic batches work too. The inserted rows are
# returned but only fetched when some were skipped, which is rare.
_RECORD_BATCH = """
WITH ins AS (
    INSERT INTO outbox.inbox_messages (event_id, consumer, topic, kafka_partition, kafka_offset)
    SELECT encode(substring(%(ids)s::bytea FROM 16 * (u.n - 1)::int + 1 FOR 16), 'hex')::uuid, %(consumer)s,
           (%(topics)s::text[])[u.k], (%(partitions)s::int[])[u.k], u.o
      FROM unnest(string_to_array(%(offsets)s, ',')::bigint[], string_to_array(%(parts)s, ',')::int[])
           WITH ORDINALITY AS u(o, k, n)
    ON CONFLICT DO NOTHING
    RETURNING topic, kafka_partition, kafka_offset
), batch AS (
    SELECT * FROM unnest(%(topics)s::text[], %(partitions)s::int[], %(nexts)s::bigint[], %(totals)s::bigint[],
                         %(invalid)s::bigint[]) AS b(topic, kafka_partition, next_offset, total, invalid)
), advanced AS (
    INSERT INTO outbox.inbox_offsets AS o (consumer, topic, kafka_partition, next_offset)
    SELECT %(consumer)s, topic, kafka_partition, next_offset FROM batch
    ON CONFLICT (consumer, topic, kafka_partition)
    DO UPDATE SET next_offset = greatest(o.next_offset, excluded.next_offset), updated_at = now()
), counted AS (
    INSERT INTO outbox.inbox_stats AS s (minute, consumer, topic, kafka_partition, processed, duplicates, dead_lettered)
    SELECT date_trunc('minute', now()), %(consumer)s, b.topic, b.kafka_partition, coalesce(n.new, 0),
           b.total - coalesce(n.new, 0) - b.invalid, b.invalid
      FROM batch b LEFT JOIN (SELECT topic, kafka_partition, count(*) AS new FROM ins GROUP BY 1, 2) n
           USING (topic, kafka_partition)
    ON CONFLICT (minute, consumer, topic, kafka_partition)
    DO UPDATE SET processed = s.processed + excluded.processed, duplicates = s.duplicates + excluded.duplicates,
                  dead_lettered = s.dead_lettered + excluded.dead_lettered
)
SELECT topic, kafka_partition, kafka_offset FROM ins
"""

# `known` marks a delivery of an event the inbox had before this batch: if the row names the same
# Kafka record, Kafka delivered that record again (a redelivery); otherwise another record carries
# the event id (republished). Repeats inside one batch are always other records.
_COUNT_DUPLICATES = """
WITH d AS (
    SELECT u.e, u.n, u.t, u.p,
           (u.known AND m.topic = u.t AND m.kafka_partition = u.p AND m.kafka_offset = u.o)::int AS again
      FROM unnest(%(ids)s::uuid[], %(counts)s::int[], %(known)s::bool[], %(topics)s::text[], %(partitions)s::int[],
                  %(offsets)s::bigint[]) AS u(e, n, known, t, p, o)
      JOIN outbox.inbox_messages m ON m.event_id = u.e AND m.consumer = %(consumer)s
), counted AS (
    UPDATE outbox.inbox_messages AS m
       SET duplicates = m.duplicates + d.n, redeliveries = m.redeliveries + d.again, last_seen = now()
      FROM d
     WHERE m.event_id = d.e AND m.consumer = %(consumer)s
)
INSERT INTO outbox.inbox_stats AS s (minute, consumer, topic, kafka_partition, redelivered)
SELECT date_trunc('minute', now()), %(consumer)s, t, p, sum(again) FROM d WHERE again = 1 GROUP BY t, p
ON CONFLICT (minute, consumer, topic, kafka_partition) DO UPDATE SET redelivered = s.redelivered + excluded.redelivered
"""

# Offsets and counts of a single record that is dead-lettered (see _RECORD_BATCH for why greatest).
_ADVANCE = """
WITH advanced AS (
    INSERT INTO outbox.inbox_offsets AS o (consumer, topic, kafka_partition, next_offset)
    SELECT %(consumer)s, t, p, n
      FROM unnest(%(topics)s::text[], %(partitions)s::int[], %(nexts)s::bigint[]) AS u(t, p, n)
    ON CONFLICT (consumer, topic, kafka_partition)
    DO UPDATE SET next_offset = greatest(o.next_offset, excluded.next_offset), updated_at = now()
)
INSERT INTO outbox.inbox_stats AS s (minute, consumer, topic, kafka_partition, processed, duplicates, dead_lettered)
SELECT date_trunc('minute', now()), %(consumer)s, t, p, a, b, c
  FROM unnest(%(topics)s::text[], %(partitions)s::int[], %(processed)s::bigint[], %(duplicates)s::bigint[],
              %(dead)s::bigint[]) AS u(t, p, a, b, c)
ON CONFLICT (minute, consumer, topic, kafka_partition)
DO UPDATE SET processed = s.processed + excluded.processed, duplicates = s.duplicates + excluded.duplicates,
              dead_lettered = s.dead_lettered + excluded.dead_lettered
"""


def record_batch(conn: psycopg.Connection, consumer: str, records: Sequence[Record], plan: Plan) -> list[int]:
    """Insert the batch's inbox rows, store its offsets and counts; returns the indices of the
    records that were new to the inbox (the ones to hand to the handler)."""
    tps = list(plan.records_per_partition)
    index = {tp: str(k) for k, tp in enumerate(tps, 1)}
    invalid = plan.invalid_per_partition(records)
    ids, offsets, parts = [], [], []
    event_ids = plan.event_ids
    for i in plan.first:
        r = records[i]
        ids.append(event_ids[i].bytes)
        offsets.append(r.offset)
        parts.append(index[(r.topic, r.partition)])
    cur = conn.execute(_RECORD_BATCH, {
        "ids": b"".join(ids), "consumer": consumer, "offsets": ",".join(map(str, offsets)), "parts": ",".join(parts),
        "topics": [t for t, _ in tps], "partitions": [p for _, p in tps],
        "nexts": [plan.next_offsets[tp] for tp in tps], "totals": [plan.records_per_partition[tp] for tp in tps],
        "invalid": [invalid.get(tp, 0) for tp in tps]})
    candidates = plan.first
    if cur.rowcount == len(candidates):
        return list(candidates)
    inserted = set(cur.fetchall())
    return [i for i in candidates if (records[i].topic, records[i].partition, records[i].offset) in inserted]


def count_duplicates(conn: psycopg.Connection, consumer: str, records: Sequence[Record],
                     suppressed: Sequence[Suppressed]) -> None:
    """Add suppressed deliveries (Plan.suppressed) to their inbox rows and redeliveries to the stats."""
    if suppressed:
        conn.execute(_COUNT_DUPLICATES, {
            "consumer": consumer, "ids": [s.event_id for s in suppressed], "counts": [s.count for s in suppressed],
            "known": [s.known for s in suppressed], "topics": [records[s.index].topic for s in suppressed],
            "partitions": [records[s.index].partition for s in suppressed],
            "offsets": [records[s.index].offset for s in suppressed]})


def advance(conn: psycopg.Connection, consumer: str, next_offsets: dict[Partition, int],
            tallies: dict[Partition, tuple[int, int, int]]) -> None:
    """Store the next offset per partition and add the batch's counts to this minute's stats."""
    tps = list(next_offsets)
    conn.execute(_ADVANCE, {
        "consumer": consumer,
        "topics": [t for t, _ in tps],
        "partitions": [p for _, p in tps],
        "nexts": [next_offsets[tp] for tp in tps],
        "processed": [tallies.get(tp, (0, 0, 0))[0] for tp in tps],
        "duplicates": [tallies.get(tp, (0, 0, 0))[1] for tp in tps],
        "dead": [tallies.get(tp, (0, 0, 0))[2] for tp in tps],
    })


def claim_for_dead_letter(conn: psycopg.Connection, consumer: str, record: Record, event_id: uuid.UUID) -> bool:
    """Insert the inbox row of a record about to be dead-lettered, so redeliveries are suppressed
    until it is replayed. False if the event is already in the inbox (someone processed it)."""
    cur = conn.execute(
        "INSERT INTO outbox.inbox_messages (event_id, consumer, status, topic, kafka_partition, kafka_offset, "
        "processed_at) VALUES (%s, %s, 'dead_lettered', %s, %s, %s, NULL) ON CONFLICT DO NOTHING",
        (event_id, consumer, record.topic, record.partition, record.offset))
    return cur.rowcount == 1


def insert_dead_letter(conn: psycopg.Connection, consumer: str, record: Record, *, reason: str, error: str,
                       detail: str | None, attempts: int, event_id: uuid.UUID | None,
                       first_failed_at: datetime | None) -> int:
    event_type, aggregate_type, aggregate_id = codec.envelope_columns(record.headers)
    payload = codec.payload_json(record.value)
    return conn.execute(
        """INSERT INTO outbox.inbox_dead_letters
               (consumer, reason, error, error_detail, attempts, event_id, event_type, aggregate_type, aggregate_id,
                topic, kafka_partition, kafka_offset, kafka_timestamp, key, value, payload, headers, first_failed_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, coalesce(%s, now()))
           RETURNING id""",
        (consumer, reason, error, detail, attempts, event_id, event_type, aggregate_type, aggregate_id,
         record.topic, record.partition, record.offset, codec.kafka_time(record.timestamp), record.key,
         record.value, None if payload is None else Jsonb(payload), Jsonb(codec.headers_to_json(record.headers)),
         first_failed_at),
    ).fetchone()[0]


def load_positions(conn: psycopg.Connection, consumer: str, partitions: Iterable[Partition]) -> dict[Partition, int]:
    """Stored next offsets for these partitions; partitions never processed are absent."""
    tps = list(partitions)
    if not tps:
        return {}
    rows = conn.execute(
        "SELECT o.topic, o.kafka_partition, o.next_offset FROM outbox.inbox_offsets o "
        "JOIN unnest(%s::text[], %s::int[]) AS u(t, p) ON o.topic = u.t AND o.kafka_partition = u.p "
        "WHERE o.consumer = %s",
        ([t for t, _ in tps], [p for _, p in tps], consumer)).fetchall()
    return {(t, p): n for t, p, n in rows}
