"""outbox.emit(): the only SQL producers call. It validates, inserts in the caller's transaction."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb


def emit(conn, *args):
    return conn.execute("SELECT outbox.emit(%s, %s, %s, %s, %s)", args).fetchone()[0]


def test_emit_inserts_and_returns_the_event_id(db):
    with psycopg.connect(db.secret()) as conn:
        event_id = emit(conn, "order", "42", "OrderPlaced", Jsonb({"total": 10}), Jsonb({"traceparent": "00-abc"}))
        row = conn.execute("SELECT aggregate_type, aggregate_id, event_type, payload, headers, txid::text::bigint "
                           "= pg_current_xact_id()::text::bigint FROM outbox.events WHERE event_id = %s",
                           (event_id,)).fetchone()
    assert isinstance(event_id, uuid.UUID)
    assert row == ("order", "42", "OrderPlaced", {"total": 10}, {"traceparent": "00-abc"}, True)


def test_emit_defaults_headers_and_allows_null_payload_for_tombstones(db):
    with psycopg.connect(db.secret()) as conn:
        event_id = conn.execute("SELECT outbox.emit('order', '42', 'OrderDeleted', NULL)").fetchone()[0]
        assert conn.execute("SELECT payload, headers FROM outbox.events WHERE event_id = %s",
                            (event_id,)).fetchone() == (None, {})


def test_emit_is_part_of_the_callers_transaction(db):
    with psycopg.connect(db.secret()) as conn:
        with conn.transaction(force_rollback=True):
            emit(conn, "order", "1", "OrderPlaced", Jsonb({}), Jsonb({}))
        assert conn.execute("SELECT count(*) FROM outbox.events").fetchone()[0] == 0


def test_event_ids_are_time_ordered(db):
    with psycopg.connect(db.secret()) as conn:
        ids = [emit(conn, "order", str(i), "OrderPlaced", Jsonb({}), Jsonb({})) for i in range(50)]
    assert all(i.version == 7 for i in ids)
    assert ids == sorted(ids)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((None, "1", "E", {}, {}), "aggregate_type must be a non-empty string"),
        (("  ", "1", "E", {}, {}), "aggregate_type must be a non-empty string"),
        (("order", None, "E", {}, {}), "aggregate_id must be a non-empty string"),
        (("order", "", "E", {}, {}), "aggregate_id must be a non-empty string"),
        (("order", "1", "", {}, {}), "event_type must be a non-empty string"),
        (("order", "1", "E", {}, [1, 2]), "headers must be a JSON object, got a JSON array"),
        (("order", "1", "E", {}, "x"), "headers must be a JSON object, got a JSON string"),
        (("order", "1", "E", {}, {"n": 1}), 'header "n" must have a string value'),
        (("order", "1", "E", {}, {"event_id": "spoof"}), 'header "event_id" is reserved'),
        (("order", "1", "E", {}, {"outbox_commit_lsn": "0/0"}), 'header "outbox_commit_lsn" is reserved'),
    ],
)
def test_emit_rejects_bad_arguments_with_a_clear_error(db, args, message):
    *head, payload, headers = args
    with psycopg.connect(db.secret()) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
            emit(conn, *head, Jsonb(payload), Jsonb(headers))
        assert message in str(err.value)
        assert err.value.diag.message_hint  # every rejection says how to fix it
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM outbox.events").fetchone()[0] == 0


def test_publication_publishes_inserts_only(db):
    with psycopg.connect(db.secret()) as conn:
        row = conn.execute("SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication "
                           "WHERE pubname = 'outbox_events'").fetchone()
        tables = conn.execute("SELECT schemaname, tablename FROM pg_publication_tables "
                              "WHERE pubname = 'outbox_events'").fetchall()
    assert row == (True, False, False, False)
    assert tables == [("outbox", "events")]
