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

from inbox import effect_sql
from outbox.core.redact import Dsn

log = logging.getLogger("inbox")

# What is past its window, per table: (key columns, the rows past %(cutoff)s, the column they age by).
# A purge deletes them in batches; a dry run counts them with the same predicate.
_PAST = {
    "inbox_messages": (("event_id", "consumer"), "status = 'processed' AND last_seen < %(cutoff)s", "last_seen"),
    "inbox_stats": (("minute", "consumer", "topic", "kafka_partition"), "minute < %(cutoff)s", "minute"),
    "inbox_dead_letters": (("id",), "status IN ('replayed', 'discarded') AND updated_at < %(cutoff)s", "updated_at"),
    "effects": (("key",), effect_sql.PURGEABLE, "completed_at"),
}


def _delete_batch(table: str) -> str:
    """At most %(batch)s rows, oldest first, skipping rows a consumer holds at that moment."""
    keys, past, age = _PAST[table]
    cols = ", ".join(keys)
    return (f"WITH victims AS (SELECT {cols} FROM outbox.{table} WHERE {past} ORDER BY {age} LIMIT %(batch)s "
            f"FOR UPDATE SKIP LOCKED) DELETE FROM outbox.{table} t USING victims v "
            f"WHERE ({', '.join('t.' + k for k in keys)}) = ({', '.join('v.' + k for k in keys)})")


def _count(table: str) -> str:
    return f"SELECT count(*) FROM outbox.{table} WHERE {_PAST[table][1]}"


@dataclass
class PurgeReport:
    cutoff: datetime
    effect_cutoff: datetime
    deleted: dict[str, int] = field(default_factory=dict)  # table -> rows
    batches: int = 0


def purge(dsn: Dsn | str, *, inbox_window: timedelta, effect_window: timedelta, batch: int = 5_000,
          pause_s: float = 0.0, dry_run: bool = False) -> PurgeReport:
    """Delete what is past its window. `pause_s` between batches leaves room for the consumers'
    own writes on a busy primary (and for replicas to keep up). `dry_run`: count it, delete nothing
    (report.deleted then holds what would go)."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    dsn = dsn if isinstance(dsn, Dsn) else Dsn(dsn)
    with psycopg.connect(dsn.secret(), autocommit=True, connect_timeout=15, application_name="inbox-purge") as conn:
        # Waiting on a lock would hold a snapshot for nothing; fail fast and let the next run retry.
        conn.execute("SET lock_timeout = '5s'")
        cutoff, effect_cutoff = conn.execute("SELECT now() - %s::interval, now() - %s::interval",
                                             (inbox_window, effect_window)).fetchone()
        report = PurgeReport(cutoff, effect_cutoff)
        for table in _PAST:
            params = {"cutoff": effect_cutoff if table == "effects" else cutoff, "batch": batch}
            if dry_run:
                report.deleted[table] = conn.execute(_count(table), params).fetchone()[0]
                continue
            sql = _delete_batch(table)
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
