"""Overview and `outbox status`: relays, slots, the in-flight summary, throughput, consumer
positions and lag."""

from __future__ import annotations

import pandas as pd
import psycopg

from dashboard.health import Snapshot
from dashboard.queries import dead_letters, duplicates, unknown
from dashboard.queries.common import STALE_RELAY_S, frame


def relays(conn: psycopg.Connection) -> pd.DataFrame:
    """Relay processes, live ones first; stopped ones only for an hour after they stopped."""
    return frame(conn, """
        SELECT relay_id, slot_name,
               CASE WHEN role <> 'stopped' AND heartbeat_at < now() - make_interval(secs => %(stale)s)
                    THEN 'gone' ELSE role END AS state,
               delivery, host, pid, started_at, heartbeat_at,
               extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_s, last_error
          FROM outbox.relay_instances
         WHERE role <> 'stopped' OR heartbeat_at > now() - interval '1 hour'
         ORDER BY slot_name, role = 'active' DESC, heartbeat_at DESC""", {"stale": STALE_RELAY_S})


def slots(conn: psycopg.Connection) -> pd.DataFrame:
    """Per replication slot of a relay: what the relay recorded and what PostgreSQL says about the slot.
    lag_bytes is WAL the relay has not confirmed; retained_wal_bytes is WAL the server keeps for it."""
    return frame(conn, """
        WITH here AS (
            SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END AS lsn
        )
        SELECT s.slot_name, s.delivery, s.active_relay_id, s.confirmed_lsn::text AS confirmed_lsn,
               s.events_published, s.events_dead_lettered, s.last_event_id::text AS last_event_id,
               s.last_published_at, s.last_error, s.last_error_at, s.updated_at,
               s.failover_ready, s.failover_detail, s.standby_lag_bytes,
               r.slot_name IS NULL AS slot_missing, r.active AS slot_active, r.wal_status,
               pg_wal_lsn_diff(here.lsn, r.confirmed_flush_lsn)::bigint AS lag_bytes,
               pg_wal_lsn_diff(here.lsn, r.restart_lsn)::bigint AS retained_wal_bytes,
               r.safe_wal_size::bigint AS safe_wal_size
          FROM here, outbox.relay_status s
          LEFT JOIN pg_replication_slots r ON r.slot_name = s.slot_name
         ORDER BY s.slot_name""")


def in_flight_summary(conn: psycopg.Connection) -> dict:
    """Exact count of committed events not yet in Kafka, and the age of the oldest one: the slot's
    lag in seconds (0 when nothing is in flight)."""
    count, oldest_s = conn.execute("""
        SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
          FROM outbox.in_flight""").fetchone()
    return {"count": count, "oldest_age_s": oldest_s}


def throughput(conn: psycopg.Connection, minutes: int = 60) -> pd.DataFrame:
    """Events per minute over the last `minutes`, long format (minute, series, events): published
    and dead-lettered by the relay; consumed, suppressed as duplicates and dead-lettered per consumer.
    Minutes without activity are 0, so a stall shows as a drop rather than a gap."""
    return frame(conn, """
        WITH span AS (
            SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1),
                                   date_trunc('minute', now()), interval '1 minute') AS minute
        ), relay AS (
            SELECT date_trunc('minute', finished_at) AS minute, sum(events)::bigint AS published,
                   sum(dead_lettered)::bigint AS dead_lettered
              FROM outbox.relay_batches
             WHERE status IN ('acked', 'committed') AND finished_at >= (SELECT min(minute) FROM span)
             GROUP BY 1
        ), inbox AS (
            SELECT minute, consumer, sum(processed)::bigint AS processed, sum(duplicates)::bigint AS duplicates,
                   sum(dead_lettered)::bigint AS dead_lettered
              FROM outbox.inbox_stats
             WHERE minute >= (SELECT min(minute) FROM span)
             GROUP BY 1, 2
        ), consumers AS (
            SELECT DISTINCT consumer FROM inbox
        )
        SELECT span.minute, 'published' AS series, coalesce(relay.published, 0) AS events
          FROM span LEFT JOIN relay USING (minute)
        UNION ALL
        SELECT span.minute, 'relay dead-lettered', coalesce(relay.dead_lettered, 0)
          FROM span LEFT JOIN relay USING (minute)
        UNION ALL
        SELECT span.minute, kind || ' · ' || c.consumer,
               coalesce(CASE kind WHEN 'consumed' THEN i.processed WHEN 'suppressed' THEN i.duplicates
                                  ELSE i.dead_lettered END, 0)
          FROM span CROSS JOIN consumers c
         CROSS JOIN unnest(ARRAY['consumed', 'suppressed', 'dead-lettered']) AS kind
          LEFT JOIN inbox i ON i.minute = span.minute AND i.consumer = c.consumer
         ORDER BY 1, 2""", {"minutes": minutes})


def consumer_positions(conn: psycopg.Connection) -> pd.DataFrame:
    """Where each consumer resumes, per partition (the PostgreSQL side of consumer lag)."""
    return frame(conn, """
        SELECT consumer, topic, kafka_partition, next_offset, updated_at,
               extract(epoch FROM now() - updated_at)::float8 AS idle_s
          FROM outbox.inbox_offsets
         ORDER BY consumer, topic, kafka_partition""")


def with_lag(positions: pd.DataFrame, end_offsets: dict[tuple[str, int], int] | None) -> pd.DataFrame:
    """Consumer lag = Kafka's end offset - the consumer's next offset (None when Kafka could not be asked)."""
    out = positions.copy()
    if end_offsets is None:
        out["end_offset"] = pd.Series([None] * len(out), dtype="Int64")
        out["lag"] = pd.Series([None] * len(out), dtype="Int64")
        return out
    ends = [end_offsets.get((t, p)) for t, p in zip(out["topic"], out["kafka_partition"])]
    out["end_offset"] = pd.array(ends, dtype="Int64")
    out["lag"] = (out["end_offset"] - out["next_offset"]).clip(lower=0)
    return out


def health_snapshot(conn: psycopg.Connection) -> Snapshot:
    """What the health rules read, from one database snapshot; consumer lag is added by
    with_kafka_lag(), outside it."""
    return Snapshot(
        relays=relays(conn), slots=slots(conn), in_flight=in_flight_summary(conn),
        effects=unknown.unresolved_effects(conn), batches=unknown.relay_batches_at_risk(conn),
        dead_letters=dead_letters.dead_letter_reasons(conn), consumers=with_lag(consumer_positions(conn), None),
        duplicates_last_hour=duplicates.duplicate_totals(conn, hours=1))


def with_kafka_lag(s: Snapshot, end_offsets) -> Snapshot:
    """Consumer lag from Kafka's end offsets. Asked after the database snapshot is released: an
    unreachable broker costs seconds, which must not hold the dashboard's shared connection.
    `end_offsets`: a dashboard.kafka_lag.EndOffsets (anything with .fetch and .error)."""
    ends = end_offsets.fetch(list(zip(s.consumers["topic"], s.consumers["kafka_partition"])))
    s.consumers = with_lag(s.consumers.drop(columns=["end_offset", "lag"]), ends)
    s.kafka_error = end_offsets.error if ends is None else None
    return s
