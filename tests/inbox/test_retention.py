"""Retention removes exactly what is past its window, in bounded batches, without waiting on
rows that consumers hold locked; and a duplicate older than the window is accepted again."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import psycopg

from inbox import process, purge
from inbox.effects import Effects
from outbox.cli import main as outbox_main
from tests.support.inbox import Rec, apply_deposit, deposit, headers_for


def inbox(conn, event_ids, consumer="c", start=0):
    recs = [Rec("orders", 0, start + n, deposit("acc-1", 1), headers_for(e)) for n, e in enumerate(event_ids)]
    return process(conn, consumer, recs, apply_deposit)


def age(conn, event_id, interval, column="last_seen"):
    conn.execute(f"UPDATE outbox.inbox_messages SET {column} = now() - %s::interval WHERE event_id = %s",
                 (interval, event_id))


def test_purge_removes_only_rows_past_the_window(conn, db, monkeypatch, capsys):
    old = [uuid.uuid4() for _ in range(25)]
    just_out, just_in, fresh, dead, seen_again = (uuid.uuid4() for _ in range(5))
    inbox(conn, old + [just_out, just_in, fresh, seen_again])
    for e in old:
        age(conn, e, "8 days")
    age(conn, just_out, "7 days 1 minute")
    age(conn, just_in, "6 days 23 hours 59 minutes")
    age(conn, fresh, "1 hour")
    # First seen long ago, but a duplicate arrived yesterday: the window counts from the last sighting.
    age(conn, seen_again, "30 days", column="first_seen")
    age(conn, seen_again, "1 day")
    # Dead-lettered long ago and still unresolved: kept, or a redelivery would slip past it.
    conn.execute("INSERT INTO outbox.inbox_messages (event_id, consumer, status, topic, kafka_partition, kafka_offset, "
                 "processed_at, first_seen, last_seen) VALUES (%s, 'c', 'dead_lettered', 'orders', 0, 99, NULL, "
                 "now() - interval '30 days', now() - interval '30 days')", (dead,))
    conn.execute("INSERT INTO outbox.inbox_stats (minute, consumer, topic, kafka_partition, processed) VALUES "
                 "(date_trunc('minute', now() - interval '8 days'), 'c', 'orders', 0, 5), "
                 "(date_trunc('minute', now() - interval '1 hour'), 'c', 'orders', 0, 7)")
    for status, days in [("replayed", 8), ("discarded", 9), ("replayed", 1), ("dead", 30)]:
        conn.execute("INSERT INTO outbox.inbox_dead_letters (consumer, status, reason, error, attempts, event_id, "
                     "topic, kafka_partition, kafka_offset, headers, first_failed_at, updated_at) VALUES ('c', %s, "
                     "'handler_failed', 'x', 3, %s, 'orders', 0, 1, '[]', now(), now() - make_interval(days => %s))",
                     (status, uuid.uuid4(), days))
    for key, status, days in [("old", "succeeded", 40), ("recent", "succeeded", 1), ("lost", "unknown", 100)]:
        conn.execute("INSERT INTO outbox.effects (key, fingerprint, request, status, completed_at, created_at) "
                     "VALUES (%s, 'fp', '{}', %s, "
                     "CASE WHEN %s = 'succeeded' THEN now() - make_interval(days => %s) END, "
                     "now() - make_interval(days => %s))", (key, status, status, days, days))

    monkeypatch.setenv("OUTBOX_DATABASE_URL", db.secret())
    counts = "26 from inbox_messages, 1 from inbox_stats, 2 from inbox_dead_letters, 1 from effects"
    before = conn.execute("SELECT (SELECT count(*) FROM outbox.inbox_messages), (SELECT count(*) FROM "
                          "outbox.effects), (SELECT count(*) FROM outbox.inbox_dead_letters)").fetchone()
    flags = ["--older-than", "7 days", "--effects-older-than", "30 days", "--batch-size", "10"]
    assert outbox_main(["inbox", "purge", *flags, "--dry-run"]) == 0
    assert f"dry run: would purge {counts}" in capsys.readouterr().out
    assert conn.execute("SELECT (SELECT count(*) FROM outbox.inbox_messages), (SELECT count(*) FROM "
                        "outbox.effects), (SELECT count(*) FROM outbox.inbox_dead_letters)").fetchone() == before
    assert outbox_main(["inbox", "purge", *flags]) == 0
    assert f"purged {counts}" in capsys.readouterr().out

    left = {r[0] for r in conn.execute("SELECT event_id FROM outbox.inbox_messages")}
    assert left == {just_in, fresh, dead, seen_again}
    assert conn.execute("SELECT processed FROM outbox.inbox_stats ORDER BY minute").fetchall() == [(7,), (29,)]
    assert sorted(conn.execute("SELECT status FROM outbox.inbox_dead_letters").fetchall()) == [("dead",), ("replayed",)]
    assert sorted(r[0] for r in conn.execute("SELECT key FROM outbox.effects")) == ["lost", "recent"]

    # The trade-off: a duplicate of a forgotten event is accepted again; a remembered one is not.
    again = inbox(conn, [old[0], just_in], start=100)
    assert (again.processed, again.duplicates) == (1, 1)


def test_purge_works_in_bounded_batches_and_skips_rows_a_consumer_holds(conn, db):
    ids = [uuid.uuid4() for _ in range(23)]
    inbox(conn, ids)
    conn.execute("UPDATE outbox.inbox_messages SET last_seen = now() - interval '2 days'")
    with psycopg.connect(db.secret()) as holder:  # a consumer's open transaction on one of the rows
        holder.execute("SELECT 1 FROM outbox.inbox_messages WHERE event_id = %s FOR UPDATE", (ids[0],))
        started = time.monotonic()
        report = purge(db, inbox_window=timedelta(days=1), effect_window=timedelta(days=30), batch=5)
        assert time.monotonic() - started < 3  # it did not queue behind the lock (lock_timeout is 5 s)
        holder.rollback()
    assert report.deleted["inbox_messages"] == 22
    # 5+5+5+5+2 for the inbox rows, then one batch per other table
    assert report.batches == 5 + 3
    assert [r[0] for r in conn.execute("SELECT event_id FROM outbox.inbox_messages")] == [ids[0]]
    assert purge(db, inbox_window=timedelta(days=1), effect_window=timedelta(days=30)).deleted["inbox_messages"] == 1


def test_purge_keeps_effects_that_are_not_settled(conn, db):
    with Effects(db) as effects:
        effects.run("k-ok", {"a": 1}, lambda key: {"ok": True})
    conn.execute("INSERT INTO outbox.effects (key, fingerprint, request, status, lease_token, lease_expires_at, "
                 "created_at) VALUES ('k-busy', 'fp', '{}', 'in_progress', gen_random_uuid(), "
                 "now() - interval '1 day', now() - interval '90 days')")
    conn.execute("UPDATE outbox.effects SET completed_at = now() - interval '31 days' WHERE key = 'k-ok'")
    report = purge(db, inbox_window=timedelta(days=7), effect_window=timedelta(days=30))
    assert report.deleted["effects"] == 1
    assert [r[0] for r in conn.execute("SELECT key FROM outbox.effects")] == ["k-busy"]


def test_purge_keeps_the_old_day_flags_and_refuses_a_bad_interval_with_the_fix(conn, db, monkeypatch, capsys):
    monkeypatch.setenv("OUTBOX_DATABASE_URL", db.secret())
    assert outbox_main(["inbox", "purge", "--days", "7", "--effect-days", "30", "--batch", "10"]) == 0
    assert "purged 0 from inbox_messages" in capsys.readouterr().out
    assert outbox_main(["inbox", "purge", "--older-than", "a fortnight"]) == 2
    assert "'a fortnight' is not a PostgreSQL interval (e.g. '30 days')" in capsys.readouterr().err
    assert outbox_main(["inbox", "purge", "--older-than", "-1 day"]) == 2
    assert "must be positive" in capsys.readouterr().err
