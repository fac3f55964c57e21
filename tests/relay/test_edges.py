"""The edges an outside review found (issue 9), each pinned by a test named after the failure:
databases replaced under the relay, crashes between the Kafka commit and the ledger, settings that
used to stall the loop, retention racing the in-flight view, schema drift, odd bytes, missing topics."""

from __future__ import annotations

import json

import psycopg
import pytest
from kafka import KafkaAdminClient
from psycopg.conninfo import conninfo_to_dict

from outbox.core.exits import EXIT_TOPIC_MISSING
from outbox.core.migrate import migrate
from tests.support.databases import drop_database
from tests.support.helpers import read_topic, wait_for
from tests.support.relay import RelayThread, emit_many, published, query, relay_settings, wait_streaming


def event_ids(records) -> list[str]:
    return [dict(r.headers)["event_id"].decode() for r in records]


def all_event_ids(db) -> set[str]:
    return {r[0] for r in query(db, "SELECT event_id::text FROM outbox.events")}


def test_checkpoint_from_another_database_is_never_used_to_skip(db, admin_dsn, kafka, topic_prefix, other_server):
    """Exactly-once relay on server A, then the same slot name and checkpoint topic on server B
    (replaced database, or a second deployment sharing Kafka). B's commit LSNs are all below A's
    checkpoint: a checkpoint keyed by slot name alone made B skip every one of them."""
    with psycopg.connect(admin_dsn.secret(), autocommit=True) as conn:
        for _ in range(3):
            conn.execute("SELECT pg_switch_wal()")  # A's WAL is far ahead of a fresh server's
    with RelayThread(relay_settings(db, kafka, topic_prefix, delivery="exactly-once")):
        wait_streaming(db)
        emit_many(db, "order", 200, per_txn=20)
        wait_for(lambda: published(db) == 200, 60, "200 events from server A")
    with RelayThread(relay_settings(other_server, kafka, topic_prefix, delivery="exactly-once")) as relay:
        wait_streaming(other_server)  # streamed, not backfilled: each commit LSN is compared with the checkpoint
        emit_many(other_server, "order", 50, per_txn=5)
        wait_for(lambda: published(other_server) == 50, 60, "server B's 50 events")
        assert relay.exit_code is None
    records = read_topic(kafka, f"{topic_prefix}.order", expect=250, isolation="read_committed", settle=2.0)
    assert sorted(event_ids(records)) == sorted(all_event_ids(db) | all_event_ids(other_server))
    checkpoints = read_topic(kafka, f"{topic_prefix}.checkpoints", expect=2, isolation="read_committed")
    keys = {r.key for r in checkpoints}
    assert len(keys) == 2  # one per server: never shared


def test_database_copied_to_another_server_stops_the_relay_until_reset_checkpoint(db, admin_dsn, kafka, topic_prefix,
                                                                                 stack):
    """A copy of the database (CREATE DATABASE ... TEMPLATE, like a dump restored elsewhere) carries
    relay_status, batches and watermark of the original. The relay refuses them with the fix;
    --reset-checkpoint then publishes exactly what the copy has not recorded as published."""
    settings = relay_settings(db, kafka, topic_prefix, delivery="exactly-once")
    with RelayThread(settings):
        wait_streaming(db)
        emit_many(db, "order", 100, per_txn=10)
        wait_for(lambda: published(db) == 100, 60, "100 events")
    emit_many(db, "order", 20, per_txn=20)  # committed while no relay ran: not published yet
    original = conninfo_to_dict(db.secret())["dbname"]
    copy = f"{original}_copy"
    with psycopg.connect(admin_dsn.secret(), autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (f"slot_{topic_prefix}",))  # the original is gone
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (original,))
        conn.execute(f"CREATE DATABASE {copy} TEMPLATE {original}")
    copied = stack.database_url.with_params(dbname=copy)
    try:
        emit_many(copied, "order", 30, per_txn=10)
        relay = RelayThread(relay_settings(copied, kafka, topic_prefix, delivery="exactly-once"))
        assert relay.start().join(60) == 1
        error = relay.relay.metrics.last_error
        assert "copied to another server" in error and "--reset-checkpoint" in error
        assert query(copied, "SELECT last_error FROM outbox.relay_status")[0][0] == error
        assert query(copied, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                     (f"slot_{topic_prefix}",)) == [(0,)]  # nothing was acknowledged anywhere

        reset = RelayThread(relay_settings(copied, kafka, topic_prefix, delivery="exactly-once"))
        reset.relay.reset_checkpoint = True
        with reset:
            records = read_topic(kafka, f"{topic_prefix}.order", expect=150, isolation="read_committed",
                                 settle=3.0)
            assert reset.exit_code is None
        ids = event_ids(records)
        assert len(ids) == 150 and set(ids) == all_event_ids(copied)  # the 100 published once, 50 added
    finally:
        drop_database(admin_dsn, copy)


@pytest.mark.parametrize("kafka_client", ["kafka-python", "confluent-kafka"])
def test_dead_letter_survives_a_ledger_failure_right_after_the_kafka_commit(db, kafka, topic_prefix, monkeypatch,
                                                                            kafka_client):
    """Exactly-once: a record the producer refused (too large) was dead-lettered only by the ledger,
    after the Kafka commit. The ledger write failing there (PostgreSQL restarting) made the restarted
    relay settle the batch as committed and skip its source transaction: the event was nowhere."""
    from relay import ledger

    real, failed = ledger.Ledger._write, []

    def fail_once(self, outcomes):
        if not failed and any(o.batch.dead for o in outcomes):
            failed.append(True)
            raise psycopg.OperationalError("server closed the connection unexpectedly (injected)")
        return real(self, outcomes)

    monkeypatch.setattr(ledger.Ledger, "_write", fail_once)
    settings = relay_settings(db, kafka, topic_prefix, delivery="exactly-once", max_record_bytes=2048,
                              kafka_client=kafka_client)
    with RelayThread(settings) as relay:
        wait_streaming(db)
        with psycopg.connect(db.secret()) as conn:
            for i in range(11):
                pad = "x" * (5000 if i == 5 else 10)
                conn.execute("SELECT outbox.emit('order', %s, 'Placed', jsonb_build_object('pad', %s::text))",
                             (str(i), pad))
        records = read_topic(kafka, f"{topic_prefix}.order", expect=10, isolation="read_committed", settle=2.0)
        wait_for(lambda: query(db, "SELECT count(*) FROM outbox.relay_dead_letters")[0][0] >= 1, 30, "dead letter")
        assert failed and relay.exit_code is None
    dead = query(db, "SELECT e.aggregate_id, d.reason FROM outbox.relay_dead_letters d "
                     "JOIN outbox.events e USING (event_id)")
    assert dead == [("5", "oversize")]
    assert sorted(int(r.key) for r in records) == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert query(db, "SELECT count(*) FROM outbox.in_flight") == [(0,)]


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_inflight_cap_below_batch_size_with_a_large_transaction_does_not_stall(db, kafka, topic_prefix, delivery):
    """max_inflight_events below batch_max_events and a transaction larger than the cap: the loop
    filled one open batch up to the cap and then waited forever for it to be acknowledged."""
    settings = relay_settings(db, kafka, topic_prefix, delivery=delivery, max_inflight_events=100,
                              batch_max_events=5000, batch_max_age_ms=60_000)
    with RelayThread(settings):
        wait_streaming(db)
        emit_many(db, "order", 1000, per_txn=1000)
        wait_for(lambda: published(db) == 1000, 60, "the 1000-event transaction")
    isolation = "read_committed" if delivery == "exactly-once" else "read_uncommitted"
    records = read_topic(kafka, f"{topic_prefix}.order", expect=1000, isolation=isolation, settle=1.0)
    assert len(set(event_ids(records))) == 1000


def test_prune_keeps_the_batches_the_in_flight_view_needs_while_an_old_transaction_holds_the_watermark(
        db, kafka, topic_prefix):
    with RelayThread(relay_settings(db, kafka, topic_prefix)), psycopg.connect(db.secret()) as old:
        wait_streaming(db)
        old.execute("SELECT pg_current_xact_id()")  # idle in transaction, holding the xid horizon back
        emit_many(db, "order", 100, per_txn=10)
        wait_for(lambda: published(db) == 100, 60, "100 events")
        wait_for(lambda: query(db, "SELECT watermark_txid IS NOT NULL FROM outbox.relay_status")[0][0], 30,
                 "a watermark")
        assert query(db, "SELECT count(*) FROM outbox.in_flight") == [(0,)]
        with psycopg.connect(db.secret(), autocommit=True) as conn:
            conn.execute("UPDATE outbox.relay_batches SET finished_at = now() - interval '10 days'")
            conn.execute("CALL outbox.prune('7 days')")
        assert query(db, "SELECT count(*) FROM outbox.in_flight") == [(0,)]
        old.rollback()


def test_prune_deletes_nothing_while_a_slot_has_no_watermark(db, kafka, topic_prefix):
    with RelayThread(relay_settings(db, kafka, topic_prefix)):
        wait_streaming(db)
        emit_many(db, "order", 50, per_txn=10)
        wait_for(lambda: published(db) == 50, 60, "50 events")
        wait_for(lambda: query(db, "SELECT watermark_txid IS NOT NULL FROM outbox.relay_status")[0][0], 30,
                 "a watermark")
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        # A second relay (another Kafka cluster) that has not published anything yet.
        conn.execute("INSERT INTO outbox.relay_status (slot_name, delivery) VALUES ('second_slot', 'at-least-once')")
        conn.execute("UPDATE outbox.events SET created_at = now() - interval '10 days'")
        conn.execute("CALL outbox.prune('7 days')")
    assert query(db, "SELECT count(*) FROM outbox.events") == [(50,)]
    assert query(db, "SELECT count(*) FROM outbox.in_flight") == [(50,)]  # not published by second_slot


def test_dropped_outbox_column_dead_letters_the_rows_and_the_relay_keeps_running(db, kafka, topic_prefix):
    with RelayThread(relay_settings(db, kafka, topic_prefix)) as relay:
        wait_streaming(db)
        emit_many(db, "order", 5, per_txn=5)
        with psycopg.connect(db.secret(), autocommit=True) as conn:
            conn.execute("ALTER TABLE outbox.events RENAME COLUMN event_type TO kind")
            conn.execute("INSERT INTO outbox.events (aggregate_type, aggregate_id, kind, payload) "
                         "SELECT 'order', i::text, 'Placed', '{}' FROM generate_series(1, 3) i")
            conn.execute("ALTER TABLE outbox.events RENAME COLUMN kind TO event_type")
        emit_many(db, "order", 5, per_txn=5)
        records = read_topic(kafka, f"{topic_prefix}.order", expect=10, settle=2.0)
        wait_for(lambda: query(db, "SELECT count(*) FROM outbox.relay_dead_letters")[0][0] == 3, 30,
                 "3 dead letters")
        assert relay.exit_code is None
    assert len(records) == 10
    reasons = query(db, "SELECT reason, error FROM outbox.relay_dead_letters")
    assert {r for r, _ in reasons} == {"schema"} and all("event_type" in e for _, e in reasons)


def test_text_that_is_not_utf8_is_dead_lettered_not_a_crash_loop(stack, admin_dsn, kafka, topic_prefix):
    name = f"a_{topic_prefix}"
    with psycopg.connect(admin_dsn.secret(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    ascii_db = stack.database_url.with_params(dbname=name)
    try:
        migrate(ascii_db, log=lambda _: None)
        with RelayThread(relay_settings(ascii_db, kafka, topic_prefix)) as relay:
            wait_streaming(ascii_db)
            with psycopg.connect(ascii_db.secret(), autocommit=True) as conn:
                conn.execute("SELECT outbox.emit('order', E'acc-\\xff\\xfe', 'Placed', '{}')")
                conn.execute("SELECT outbox.emit('order', 'acc-1', 'Placed', '{}')")
            records = read_topic(kafka, f"{topic_prefix}.order", expect=1, settle=2.0)
            wait_for(lambda: query(ascii_db, "SELECT count(*) FROM outbox.relay_dead_letters")[0][0] == 1, 30,
                     "the dead letter")
            assert relay.exit_code is None
        assert [r.key for r in records] == [b"acc-1"]
        # The original bytes are kept, backslash-escaped (a SQL_ASCII database returns text as bytes).
        assert query(ascii_db, "SELECT reason = 'invalid_encoding', aggregate_id = 'acc-\\xff\\xfe' "
                               "FROM outbox.relay_dead_letters") == [(True, True)]
    finally:
        drop_database(admin_dsn, name)


def test_missing_topic_with_autocreate_off_stops_with_exit_6_the_topic_and_the_fix(db, kafka, topic_prefix):
    relay = RelayThread(relay_settings(db, kafka, topic_prefix, topic_create="false"))
    relay.start()
    wait_streaming(db)
    emit_many(db, "order", 3, per_txn=3)
    assert relay.join(60) == EXIT_TOPIC_MISSING
    error = relay.relay.metrics.last_error
    assert f"topic '{topic_prefix}.order' does not exist" in error and "OUTBOX_TOPIC_CREATE" in error
    assert query(db, "SELECT count(*) FROM outbox.in_flight") == [(3,)]  # waiting, not lost


def test_topics_are_provisioned_with_the_configured_partitions_not_left_to_auto_create(db, kafka, topic_prefix):
    with RelayThread(relay_settings(db, kafka, topic_prefix, topic_partitions=5, delivery="exactly-once")):
        wait_streaming(db)
        emit_many(db, "order", 20, per_txn=20)
        wait_for(lambda: published(db) == 20, 60, "20 events")
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    try:
        topics = {t["name"]: t for t in admin.describe_topics([f"{topic_prefix}.order", f"{topic_prefix}.checkpoints"])}
    finally:
        admin.close()
    assert len(topics[f"{topic_prefix}.order"]["partitions"]) == 5
    assert len(topics[f"{topic_prefix}.checkpoints"]["partitions"]) == 1


def test_last_error_and_healthz_never_show_a_password(db, kafka, topic_prefix):
    password = conninfo_to_dict(db.secret())["password"]
    relay = RelayThread(relay_settings(db, kafka, topic_prefix))
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        conn.execute("INSERT INTO outbox.relay_status (slot_name, delivery) VALUES (%s, 'at-least-once')",
                     (f"slot_{topic_prefix}",))
    relay.relay._fail(f"could not connect to {db.secret()} (injected)")
    code, body = relay.relay.metrics.health()
    assert code == 503 and password not in json.dumps(body) and "***" in body["last_error"]
    stored = query(db, "SELECT last_error FROM outbox.relay_status")[0][0]
    assert password not in stored and "***" in stored
