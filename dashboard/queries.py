"""What the dashboard shows, as SQL -> pandas DataFrames. No Streamlit here: every function takes a
psycopg connection, passes every value as a bound parameter, and is tested on its own.

Ids, timestamps and JSON are returned display-ready (uuids and LSNs as text, durations in seconds)
so that the layout never has to convert types.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import pandas as pd
import psycopg

from outbox.core import commands

# A relay that has not written its heartbeat for this long is gone (killed, host down, network):
# active relays heartbeat every OUTBOX_STATUS_INTERVAL_S (5 s), standbys every second.
STALE_RELAY_S = 30
# Most rows a table on a page shows; counts are always exact.
ROW_LIMIT = 500


def frame(conn: psycopg.Connection, query: str, params: dict | tuple = ()) -> pd.DataFrame:
    cur = conn.execute(query, params)
    columns = [c.name for c in cur.description]
    return pd.DataFrame(cur.fetchall(), columns=columns)


def _json_text(value) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, default=str)


# ----- overview


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


# ----- in flight


def in_flight(conn: psycopg.Connection, limit: int = ROW_LIMIT) -> pd.DataFrame:
    """The oldest committed events not yet acknowledged by Kafka (outbox.in_flight, exact). Sorted
    on the raw columns and formatted after the LIMIT: with half a million events stuck behind a
    stopped relay, formatting every row before sorting cost 0.2 s of the page's second."""
    return frame(conn, """
        SELECT f.event_id::text AS event_id, f.aggregate_type, f.aggregate_id, f.event_type, f.created_at,
               extract(epoch FROM now() - f.created_at)::float8 AS age_s, f.txid::text AS txid
          FROM (SELECT event_id, aggregate_type, aggregate_id, event_type, created_at, txid
                  FROM outbox.in_flight
                 ORDER BY created_at, event_id
                 LIMIT %(limit)s) f
         ORDER BY f.created_at, f.event_id""", {"limit": limit})


# ----- duplicates


def consumers(conn: psycopg.Connection) -> list[str]:
    """Every consumer the inbox knows (has a position), for filters."""
    return [r[0] for r in conn.execute("SELECT DISTINCT consumer FROM outbox.inbox_offsets ORDER BY 1")]


def duplicate_totals(conn: psycopg.Connection, hours: int = 24) -> pd.DataFrame:
    """Per consumer over the last `hours`: records processed, suppressed as duplicates, dead-lettered."""
    return frame(conn, """
        SELECT consumer, sum(processed)::bigint AS processed, sum(duplicates)::bigint AS suppressed,
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
    possible = consumer is None or _storable(consumer)
    return frame(conn, f"""
        SELECT m.consumer, m.event_id::text AS event_id, m.duplicates, m.last_seen, m.first_seen, m.status,
               e.event_type, e.aggregate_type, e.aggregate_id, m.topic, m.kafka_partition, m.kafka_offset
          FROM outbox.inbox_messages m
          LEFT JOIN outbox.events e ON e.event_id = m.event_id
         WHERE %(possible)s AND m.duplicates > 0 AND (%(consumer)s::text IS NULL OR m.consumer = %(consumer)s::text)
         ORDER BY {order_by}
         LIMIT %(limit)s""", {"possible": possible, "consumer": consumer if possible else None, "limit": limit})


# ----- unknown outcome


def unresolved_effects(conn: psycopg.Connection) -> pd.DataFrame:
    """Effects whose outcome is unknown (incl. expired leases) or that are in progress, unknown first.
    An attempt past half its lease is at risk of becoming unknown."""
    df = frame(conn, """
        SELECT key, effective_status, status, lease_expired, lease_owner, lease_expires_at,
               extract(epoch FROM lease_expires_at - now())::float8 AS lease_left_s,
               status = 'in_progress' AND NOT lease_expired
                   AND now() > updated_at + (lease_expires_at - updated_at) / 2 AS at_risk,
               request, attempts, extract(epoch FROM age)::float8 AS age_s, last_error, evidence,
               reattempt_approved, consumer, event_id::text AS event_id, created_at, updated_at
          FROM outbox.effects_unresolved
         ORDER BY effective_status = 'unknown' DESC, created_at, key""")
    df["request"] = df["request"].map(_json_text)
    return df


def relay_batches_at_risk(conn: psycopg.Connection, limit: int = 100) -> pd.DataFrame:
    """Batches whose outcome was unknown at a relay crash (settled 'unknown'), and batches still in
    flight whose relay is gone (the next relay to start will settle them)."""
    return frame(conn, """
        SELECT b.batch_id, b.slot_name, b.relay_id, b.delivery,
               CASE b.status WHEN 'in_flight' THEN 'in flight, relay gone' ELSE b.status END AS status,
               b.events, b.first_lsn::text AS first_lsn, b.ack_lsn::text AS ack_lsn, b.started_at, b.finished_at,
               extract(epoch FROM now() - b.started_at)::float8 AS age_s, b.resolution
          FROM outbox.relay_batches b
         WHERE b.status = 'unknown'
            OR (b.status = 'in_flight' AND NOT EXISTS (
                   SELECT 1 FROM outbox.relay_instances i
                    WHERE i.relay_id = b.relay_id AND i.role = 'active'
                      AND i.heartbeat_at > now() - make_interval(secs => %(stale)s)))
         ORDER BY b.batch_id DESC
         LIMIT %(limit)s""", {"stale": STALE_RELAY_S, "limit": limit})


# ----- dead letters


def relay_dead_letters(conn: psycopg.Connection, *, search: str = "", include_replayed: bool = False,
                       limit: int = ROW_LIMIT) -> pd.DataFrame:
    """Events the relay could not publish, newest first, with the command that republishes each.
    `search` matches literally (no wildcards) in reason, error, event id, type and aggregate."""
    search = (search or "").strip()
    possible = _storable(search)
    df = frame(conn, """
        SELECT id, event_id::text AS event_id, slot_name, topic, reason, error, aggregate_type, aggregate_id,
               event_type, dead_lettered_at, replayed_at, replay_note
          FROM outbox.relay_dead_letters
         WHERE %(possible)s AND (%(all)s OR replayed_at IS NULL)
           AND (%(q)s = '' OR strpos(lower(concat_ws(' ', reason, error, event_id::text, event_type,
                                                     aggregate_type, aggregate_id, topic)), lower(%(q)s)) > 0)
         ORDER BY id DESC
         LIMIT %(limit)s""", {"possible": possible, "all": include_replayed, "q": search if possible else "",
                              "limit": limit})
    df.insert(1, "replay_command", [commands.dead_letter_replay(i) for i in df["id"]])
    return df


def inbox_dead_letters(conn: psycopg.Connection, *, consumer: str | None = None, search: str = "",
                       include_resolved: bool = False, limit: int = ROW_LIMIT) -> pd.DataFrame:
    """Records consumers could not process, newest first, with the documented command for each:
    replay (handler failures) or discard (no valid event id: nothing to deduplicate on)."""
    search = (search or "").strip()
    possible = _storable(search) and (consumer is None or _storable(consumer))
    df = frame(conn, """
        SELECT id, consumer, status, reason, error, attempts, replay_attempts, event_id::text AS event_id,
               event_type, aggregate_type, aggregate_id, topic, kafka_partition, kafka_offset, created_at,
               replay_requested_at, replayed_at
          FROM outbox.inbox_dead_letters
         WHERE %(possible)s AND (%(all)s OR status IN ('dead', 'replay_requested'))
           AND (%(consumer)s::text IS NULL OR consumer = %(consumer)s::text)
           AND (%(q)s = '' OR strpos(lower(concat_ws(' ', consumer, reason, error, event_id::text, event_type,
                                                     aggregate_type, aggregate_id, topic)), lower(%(q)s)) > 0)
         ORDER BY id DESC
         LIMIT %(limit)s""", {"possible": possible, "all": include_resolved, "consumer": consumer if possible else None,
                              "q": search if possible else "", "limit": limit})
    shown = []
    for dl_id, who, reason, status in zip(df["id"], df["consumer"], df["reason"], df["status"]):
        if reason == "invalid_envelope":
            shown.append(commands.inbox_discard(who, dl_id))
        elif status == "dead":
            shown.append(commands.inbox_replay(who, dl_id))
        else:
            shown.append(f"({status.replace('_', ' ')})")
    df.insert(2, "command", shown)
    return df


def dead_letter_reasons(conn: psycopg.Connection) -> pd.DataFrame:
    """Open dead letters by where and why."""
    return frame(conn, """
        SELECT 'relay' AS source, reason, count(*) AS open FROM outbox.relay_dead_letters
         WHERE replayed_at IS NULL GROUP BY reason
        UNION ALL
        SELECT 'inbox · ' || consumer, reason, count(*) FROM outbox.inbox_dead_letters
         WHERE status IN ('dead', 'replay_requested') GROUP BY consumer, reason
        ORDER BY 1, 2""")


def _storable(text: str) -> bool:
    """Whether PostgreSQL could hold this text at all: it cannot store NUL, and what is not UTF-8 was
    never stored. Text that fails this matches nothing, so the query is asked for no rows instead of
    failing on it."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ----- event trace


@dataclass
class Trace:
    """Everything recorded about one event, from the outbox row to each consumer's effects."""

    event_id: str
    event: pd.DataFrame  # 0 rows when pruned by retention (the rest may still exist)
    in_flight: bool
    deliveries: pd.DataFrame
    inbox: pd.DataFrame
    effects: pd.DataFrame
    relay_dead_letters: pd.DataFrame
    inbox_dead_letters: pd.DataFrame
    audit: pd.DataFrame
    found: bool = field(init=False)

    def __post_init__(self):
        self.found = any(len(df) for df in (self.event, self.deliveries, self.inbox, self.effects,
                                            self.relay_dead_letters, self.inbox_dead_letters))


def parse_event_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID((text or "").strip())
    except ValueError:
        return None


def find_events(conn: psycopg.Connection, term: str, limit: int = 100) -> pd.DataFrame:
    """Events matching a search box: the event with that id, or the events of aggregates with that id
    (any aggregate type), newest first. Matches are exact, never patterns."""
    event_id = parse_event_id(term)
    if event_id is not None:
        return frame(conn, f"{_EVENT_LIST} WHERE e.event_id = %(id)s", {"id": event_id})
    term = (term or "").strip()
    if not term or not _storable(term):
        return frame(conn, f"{_EVENT_LIST} WHERE false")
    # Per aggregate type through the (aggregate_type, aggregate_id) index: the aggregate id alone
    # is not indexed, and an extra index on the producers' insert path is not worth a search box.
    return frame(conn, f"""
        WITH RECURSIVE types AS (
            (SELECT aggregate_type FROM outbox.events ORDER BY aggregate_type LIMIT 1)
            UNION ALL
            SELECT (SELECT e.aggregate_type FROM outbox.events e WHERE e.aggregate_type > t.aggregate_type
                     ORDER BY e.aggregate_type LIMIT 1)
              FROM types t WHERE t.aggregate_type IS NOT NULL
        )
        SELECT s.* FROM types t CROSS JOIN LATERAL (
            {_EVENT_LIST} WHERE e.aggregate_type = t.aggregate_type AND e.aggregate_id = %(term)s
             ORDER BY e.created_at DESC LIMIT %(limit)s) s
         WHERE t.aggregate_type IS NOT NULL
         ORDER BY s.created_at DESC
         LIMIT %(limit)s""", {"term": term, "limit": limit})


_EVENT_LIST = """
    SELECT e.event_id::text AS event_id, e.aggregate_type, e.aggregate_id, e.event_type, e.created_at,
           EXISTS (SELECT 1 FROM outbox.in_flight f WHERE f.event_id = e.event_id) AS in_flight,
           (SELECT count(*) FROM outbox.deliveries d WHERE d.event_id = e.event_id) AS deliveries,
           (SELECT count(*) FROM outbox.inbox_messages m WHERE m.event_id = e.event_id) AS consumers
      FROM outbox.events e"""


def trace(conn: psycopg.Connection, event_id: uuid.UUID | str) -> Trace:
    eid = event_id if isinstance(event_id, uuid.UUID) else uuid.UUID(str(event_id))
    p = {"id": eid}
    event = frame(conn, """
        SELECT event_id::text AS event_id, aggregate_type, aggregate_id, event_type, created_at,
               txid::text AS txid, payload, headers
          FROM outbox.events WHERE event_id = %(id)s""", p)
    for col in ("payload", "headers"):
        event[col] = event[col].map(_json_text)
    in_flight_now = conn.execute("SELECT EXISTS (SELECT 1 FROM outbox.in_flight WHERE event_id = %(id)s)",
                                 p).fetchone()[0]
    deliveries = frame(conn, """
        SELECT topic, kafka_partition, kafka_offset, batch_id, delivered_at
          FROM outbox.deliveries WHERE event_id = %(id)s ORDER BY delivered_at, kafka_offset""", p)
    inbox = frame(conn, """
        SELECT consumer, status, duplicates AS suppressed_duplicates, first_seen, last_seen, processed_at,
               topic, kafka_partition, kafka_offset
          FROM outbox.inbox_messages WHERE event_id = %(id)s ORDER BY consumer""", p)
    effects = frame(conn, """
        SELECT key, status, resolved_via, attempts, replays, consumer, request, response, last_error,
               created_at, completed_at
          FROM outbox.effects WHERE event_id = %(id)s ORDER BY created_at, key""", p)
    for col in ("request", "response"):
        effects[col] = effects[col].map(_json_text)
    relay_dl = frame(conn, """
        SELECT id, reason, error, topic, dead_lettered_at, replayed_at, replay_note
          FROM outbox.relay_dead_letters WHERE event_id = %(id)s ORDER BY id""", p)
    inbox_dl = frame(conn, """
        SELECT id, consumer, status, reason, error, attempts, created_at, replayed_at
          FROM outbox.inbox_dead_letters WHERE event_id = %(id)s ORDER BY id""", p)
    audit = frame(conn, """
        SELECT a.id, a.at, a.operator, a.db_user, a.action, a.effect_key, a.reason, a.provider_reference,
               a.previous_status
          FROM outbox.operator_audit a
         WHERE a.event_id = %(id)s
            OR a.effect_key IN (SELECT key FROM outbox.effects WHERE event_id = %(id)s)
         ORDER BY a.id""", p)
    return Trace(str(eid), event, bool(in_flight_now), deliveries, inbox, effects, relay_dl, inbox_dl, audit)


def audit_log(conn: psycopg.Connection, limit: int = 50) -> pd.DataFrame:
    """The latest operator decisions."""
    return frame(conn, """
        SELECT id, at, operator, db_user, action, effect_key, event_id::text AS event_id, reason,
               provider_reference, previous_status, previous_attempts
          FROM outbox.operator_audit ORDER BY id DESC LIMIT %(limit)s""", {"limit": limit})
