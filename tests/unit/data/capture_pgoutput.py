"""Regenerate pgoutput_v{1..4}.json: real pgoutput bytes captured from PostgreSQL for decoder tests.

    python tests/unit/data/capture_pgoutput.py "$OUTBOX_DATABASE_URL"

Needs a migrated database (outbox schema) on a server with wal_level=logical; uses a throwaway
publication, slot and tables, and drops them afterwards.
"""

from __future__ import annotations

import json
import select
import sys
from pathlib import Path

import psycopg

SETUP = """
DROP TABLE IF EXISTS capture_misc; DROP TYPE IF EXISTS capture_mood;
CREATE TYPE capture_mood AS ENUM ('ok', 'sad');
CREATE TABLE capture_misc (id int PRIMARY KEY, mood capture_mood, note text, big text);
ALTER TABLE capture_misc REPLICA IDENTITY FULL;
CREATE PUBLICATION capture_pub FOR TABLE outbox.events, capture_misc;
"""

WORKLOAD = [
    "SELECT outbox.emit('order', '42', 'OrderPlaced', '{\"total\": 10, \"text\": \"caf\u00e9\"}', "
    "'{\"traceparent\": \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\"}')",
    "BEGIN; SELECT outbox.emit('order', '42', 'OrderPaid', NULL); "
    "SELECT pg_logical_emit_message(true, 'test.prefix', 'in-tx'); COMMIT",
    "SELECT pg_logical_emit_message(false, 'test.prefix', 'non-tx')",
    "INSERT INTO capture_misc VALUES (1, 'ok', NULL, repeat('x', 5000))",
    "UPDATE capture_misc SET note = 'n' WHERE id = 1",
    "DELETE FROM capture_misc WHERE id = 1",
    "TRUNCATE capture_misc",
    "SELECT pg_replication_origin_create('capture_origin')",
    "BEGIN; SELECT pg_replication_origin_session_setup('capture_origin'); "
    "SELECT pg_replication_origin_xact_setup('0/AB', now()); "
    "INSERT INTO capture_misc VALUES (2, 'sad', 'from origin', NULL); COMMIT",
    "SELECT pg_replication_origin_session_reset()",
]


def capture(dsn: str, proto: int) -> list[str]:
    slot = f"capture_v{proto}"
    with psycopg.connect(dsn, autocommit=True) as sql:
        sql.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        for statement in WORKLOAD:
            sql.execute(statement)
        sql.execute("SELECT pg_replication_origin_drop('capture_origin')")
        end = sql.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    messages = []
    repl = psycopg.connect(dsn, replication="database", autocommit=True)
    repl.execute(f"START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '{proto}', "
                 f"publication_names 'capture_pub', messages 'true')")
    pg = repl.pgconn
    done = False
    while not done:
        n, data = pg.get_copy_data(1)
        if n == 0:
            select.select([pg.socket], [], [], 1.0)
            pg.consume_input()
            continue
        data = bytes(data)
        if data[:1] == b"w":
            messages.append(data[25:].hex())
            wal_end = int.from_bytes(data[9:17], "big")
            if wal_end >= int(end.split("/")[0], 16) << 32 | int(end.split("/")[1], 16):
                done = True
        elif data[:1] == b"k" and int.from_bytes(data[1:9], "big") >= (
                int(end.split("/")[0], 16) << 32 | int(end.split("/")[1], 16)):
            done = True
    repl.close()
    with psycopg.connect(dsn, autocommit=True) as sql:
        sql.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    return messages


def main(dsn: str) -> None:
    out = Path(__file__).parent
    with psycopg.connect(dsn, autocommit=True) as sql:
        sql.execute("DROP PUBLICATION IF EXISTS capture_pub")
        sql.execute(SETUP)
    try:
        for proto in (1, 2, 3, 4):
            msgs = capture(dsn, proto)
            (out / f"pgoutput_v{proto}.json").write_text(json.dumps(msgs, indent=1) + "\n")
            print(f"proto {proto}: {len(msgs)} messages")
    finally:
        with psycopg.connect(dsn, autocommit=True) as sql:
            sql.execute("DROP PUBLICATION IF EXISTS capture_pub; DROP TABLE IF EXISTS capture_misc; "
                        "DROP TYPE IF EXISTS capture_mood")


if __name__ == "__main__":
    main(sys.argv[1])
