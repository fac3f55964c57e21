"""Shared by the views' queries: SQL -> DataFrame, JSON for display, which text can match at all,
the consumers' names."""

from __future__ import annotations

import json

import pandas as pd
import psycopg

# A relay that has not written its heartbeat for this long is gone (killed, host down, network):
# active relays heartbeat every OUTBOX_STATUS_INTERVAL_S (5 s), standbys every second.
STALE_RELAY_S = 30


# Most rows a table on a page shows; counts are always exact.
ROW_LIMIT = 500


def frame(conn: psycopg.Connection, query: str, params: dict | tuple = ()) -> pd.DataFrame:
    cur = conn.execute(query, params)
    columns = [c.name for c in cur.description]
    return pd.DataFrame(cur.fetchall(), columns=columns)


def json_text(value) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, default=str)


def storable(text: str) -> bool:
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


def consumers(conn: psycopg.Connection) -> list[str]:
    """Every consumer the inbox knows (has a position), for filters."""
    return [r[0] for r in conn.execute("SELECT DISTINCT consumer FROM outbox.inbox_offsets ORDER BY 1")]
