"""Per-test databases: dropping one releases its replication slots first."""

from __future__ import annotations

import time

import psycopg

from outbox.core.redact import Dsn


def drop_database(admin_dsn: Dsn, name: str) -> None:
    with psycopg.connect(admin_dsn.secret(), autocommit=True) as conn:
        # Slots are per database and would pin WAL for the rest of the session.
        conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                     "WHERE database = %s AND active_pid IS NOT NULL", (name,))
        for _ in range(50):
            try:
                conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                             "WHERE database = %s", (name,))
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
