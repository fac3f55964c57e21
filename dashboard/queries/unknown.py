"""Unknown outcome: effects and relay batches whose outcome is not known, and the operators'
decisions about them."""

from __future__ import annotations

import pandas as pd
import psycopg

from dashboard.queries.common import STALE_RELAY_S, frame, json_text


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
    df["request"] = df["request"].map(json_text)
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


def audit_log(conn: psycopg.Connection, limit: int = 50) -> pd.DataFrame:
    """The latest operator decisions."""
    return frame(conn, """
        SELECT id, at, operator, db_user, action, effect_key, event_id::text AS event_id, reason,
               provider_reference, previous_status, previous_attempts
          FROM outbox.operator_audit ORDER BY id DESC LIMIT %(limit)s""", {"limit": limit})
