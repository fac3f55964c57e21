"""Event trace: everything recorded about one event."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pandas as pd
import psycopg

from dashboard.queries.common import frame, json_text, storable


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


_EVENT_LIST = """
    SELECT e.event_id::text AS event_id, e.aggregate_type, e.aggregate_id, e.event_type, e.created_at,
           EXISTS (SELECT 1 FROM outbox.in_flight f WHERE f.event_id = e.event_id) AS in_flight,
           (SELECT count(*) FROM outbox.deliveries d WHERE d.event_id = e.event_id) AS deliveries,
           (SELECT count(*) FROM outbox.inbox_messages m WHERE m.event_id = e.event_id) AS consumers
      FROM outbox.events e"""


def find_events(conn: psycopg.Connection, term: str, limit: int = 100) -> pd.DataFrame:
    """Events matching a search box: the event with that id, or the events of aggregates with that id
    (any aggregate type), newest first. Matches are exact, never patterns."""
    event_id = parse_event_id(term)
    if event_id is not None:
        return frame(conn, f"{_EVENT_LIST} WHERE e.event_id = %(id)s", {"id": event_id})
    term = (term or "").strip()
    if not term or not storable(term):
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


def trace(conn: psycopg.Connection, event_id: uuid.UUID | str) -> Trace:
    eid = event_id if isinstance(event_id, uuid.UUID) else uuid.UUID(str(event_id))
    p = {"id": eid}
    event = frame(conn, """
        SELECT event_id::text AS event_id, aggregate_type, aggregate_id, event_type, created_at,
               txid::text AS txid, payload, headers
          FROM outbox.events WHERE event_id = %(id)s""", p)
    for col in ("payload", "headers"):
        event[col] = event[col].map(json_text)
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
        effects[col] = effects[col].map(json_text)
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
