"""Duplicates: what each consumer's inbox recognised as seen before and suppressed."""

from __future__ import annotations

import pandas as pd
import psycopg

from dashboard.queries.common import frame, storable


def duplicate_totals(conn: psycopg.Connection, hours: int = 24) -> pd.DataFrame:
    """Per consumer over the last `hours`: records processed, suppressed as duplicates (split by cause:
    `redelivered` the same Kafka record again, `republished` another record of the event), dead-lettered."""
    return frame(conn, """
        SELECT consumer, sum(processed)::bigint AS processed, sum(duplicates)::bigint AS suppressed,
               sum(redelivered)::bigint AS redelivered, (sum(duplicates) - sum(redelivered))::bigint AS republished,
               sum(dead_lettered)::bigint AS dead_lettered,
               round(100.0 * sum(duplicates) / nullif(sum(processed) + sum(duplicates), 0), 2)::float8
                   AS suppressed_pct
          FROM outbox.inbox_stats
         WHERE minute >= date_trunc('minute', now()) - make_interval(hours => %(hours)s)
         GROUP BY consumer
         ORDER BY consumer""", {"hours": hours})


def duplicates_over_time(conn: psycopg.Connection, hours: int = 24) -> pd.DataFrame:
    """Suppressed duplicates per consumer and bucket (minutes up to 6 h, hours beyond), long format."""
    bucket = "1 minute" if hours <= 6 else "1 hour"
    return frame(conn, """
        SELECT date_bin(%(bucket)s::interval, minute, timestamptz '2000-01-01') AS bucket, consumer,
               sum(duplicates)::bigint AS suppressed
          FROM outbox.inbox_stats
         WHERE minute >= date_trunc('minute', now()) - make_interval(hours => %(hours)s)
         GROUP BY 1, 2
         ORDER BY 1, 2""", {"bucket": bucket, "hours": hours})


def most_duplicated(conn: psycopg.Connection, consumer: str | None = None, *, order: str = "count",
                    limit: int = 50) -> pd.DataFrame:
    """Events suppressed at least once, most duplicated first (order='count') or most recently seen
    first (order='recent'), with when each duplicate was last seen."""
    if order not in ("count", "recent"):
        raise ValueError(f"order must be 'count' or 'recent', not {order!r}")
    order_by = "m.duplicates DESC, m.last_seen DESC" if order == "count" else "m.last_seen DESC"
    possible = consumer is None or storable(consumer)
    return frame(conn, f"""
        SELECT m.consumer, m.event_id::text AS event_id, m.duplicates, m.redeliveries AS redelivered,
               m.duplicates - m.redeliveries AS republished, m.last_seen, m.first_seen, m.status,
               e.event_type, e.aggregate_type, e.aggregate_id, m.topic, m.kafka_partition, m.kafka_offset
          FROM outbox.inbox_messages m
          LEFT JOIN outbox.events e ON e.event_id = m.event_id
         WHERE %(possible)s AND m.duplicates > 0 AND (%(consumer)s::text IS NULL OR m.consumer = %(consumer)s::text)
         ORDER BY {order_by}
         LIMIT %(limit)s""", {"possible": possible, "consumer": consumer if possible else None, "limit": limit})
