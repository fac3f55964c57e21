"""Dead letters of the relay and of the consumers, with the command that replays or discards each."""

from __future__ import annotations

import pandas as pd
import psycopg

from dashboard.queries.common import ROW_LIMIT, frame, storable
from outbox.core import commands


def relay_dead_letters(conn: psycopg.Connection, *, search: str = "", include_replayed: bool = False,
                       limit: int = ROW_LIMIT) -> pd.DataFrame:
    """Events the relay could not publish, newest first, with the command that republishes each.
    `search` matches literally (no wildcards) in reason, error, event id, type and aggregate."""
    search = (search or "").strip()
    possible = storable(search)
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
    possible = storable(search) and (consumer is None or storable(consumer))
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
