"""Retention: forget inbox rows (and old stats, resolved dead letters, settled effect keys) past a window.

Deletes run in bounded batches, each its own short transaction, oldest first through an index,
skipping rows locked by a consumer at that moment: no long locks, no lock queue behind a big
DELETE (the deadlocks NServiceBus users hit), and autovacuum keeps up. The cutoff is fixed once
per purge so a long purge does not chase rows that age while it runs.

The trade-off (docs/inbox.md): a duplicate that arrives after its inbox row was purged is
accepted and handled again. Size the window above the longest redelivery horizon.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg

from outbox.core.redact import Dsn

log = logging.getLogger("inbox")

# Each statement deletes at most %(batch)s rows older than %(cutoff)s and returns how many.
_BATCHES = {
    "inbox_messages": """
        WITH victims AS (
            SELECT event_id, consumer FROM outbox.inbox_messages
             WHERE status = 'processed' AND last_seen < %(cutoff)s
             ORDER BY last_seen LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
        DELETE FROM outbox.inbox_messages m USING victims v
         WHERE m.event_id = v.event_id AND m.consumer = v.consumer""",
    "inbox_stats": """
        WITH victims AS (
            SELECT minute, consumer, topic, kafka_partition FROM outbox.inbox_stats
             WHERE minute < %(cutoff)s ORDER BY minute LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
        DELETE FROM outbox.inbox_stats s USING victims v
         WHERE (s.minute, s.consumer, s.topic, s.kafka_partition)
             = (v.minute, v.consumer, v.topic, v.kafka_partition)""",
    "inbox_dead_letters": """
        WITH victims AS (
            SELECT id FROM outbox.inbox_dead_letters
             WHERE status IN ('replayed', 'discarded') AND updated_at < %(cutoff)s
             ORDER BY updated_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
        DELETE FROM outbox.inbox_dead_letters d USING victims v WHERE d.id = v.id""",
    "effects": """
        WITH victims AS (
            SELECT key FROM outbox.effects
             WHERE status IN ('succeeded', 'failed') AND completed_at < %(cutoff)s
             ORDER BY completed_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
        DELETE FROM outbox.effects e USING victims v WHERE e.key = v.key""",
}


@dataclass
class PurgeReport:
    cutoff: datetime
    effect_cutoff: datetime
    deleted: dict[str, int] = field(default_factory=dict)  # table -> rows
    batches: int = 0


def purge(dsn: Dsn | str, *, inbox_window: timedelta, effect_window: timedelta, batch: int = 5_000,
          pause_s: float = 0.0) -> PurgeReport:
    """Delete what is past its window. `pause_s` between batches leaves room for the consumers'
    own writes on a busy primary (and for replicas to keep up)."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    dsn = dsn if isinstance(dsn, Dsn) else Dsn(dsn)
    with psycopg.connect(dsn.secret(), autocommit=True, connect_timeout=15, application_name="inbox-purge") as conn:
        # Waiting on a lock would hold a snapshot for nothing; fail fast and let the next run retry.
        conn.execute("SET lock_timeout = '5s'")
        cutoff, effect_cutoff = conn.execute("SELECT now() - %s::interval, now() - %s::interval",
                                             (inbox_window, effect_window)).fetchone()
        report = PurgeReport(cutoff, effect_cutoff)
        for table, sql in _BATCHES.items():
            params = {"cutoff": effect_cutoff if table == "effects" else cutoff, "batch": batch}
            total = 0
            while True:
                deleted = conn.execute(sql, params).rowcount
                report.batches += 1
                total += deleted
                if deleted < batch:
                    break
                if pause_s:
                    time.sleep(pause_s)
            report.deleted[table] = total
            if total:
                log.info("purged %d rows from outbox.%s older than %s", total, table, params["cutoff"])
    return report
