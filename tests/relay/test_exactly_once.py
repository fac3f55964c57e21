"""Exactly-once mode on the Apache Kafka broker: transactions, checkpoints, zombie fencing."""

from __future__ import annotations

import json
import signal
import time

import psycopg
import pytest
from kafka import KafkaProducer

from outbox.core.lsn import str_to_lsn
from tests.support.helpers import read_topic, wait_for
from tests.support.relay import (
    RelayThread,
    active_and_standby,
    emit_many,
    published,
    query,
    relay_env,
    relay_settings,
    sigterm,
    wait_streaming,
)


@pytest.mark.parametrize("kafka_client", ["kafka-python", "confluent-kafka"])
def test_read_committed_consumer_sees_each_event_once_across_restarts(db, kafka, topic_prefix, kafka_client):
    with RelayThread(relay_settings(db, kafka, topic_prefix, delivery="exactly-once",
                                    kafka_client=kafka_client)) as relay:
        wait_streaming(db)
        emit_many(db, "order", 400, per_txn=50)
        wait_for(lambda: published(db) == 400, 60, "400 events")
        assert relay.stop() == 0
    emit_many(db, "order", 100, per_txn=10)
    with RelayThread(relay_settings(db, kafka, topic_prefix, delivery="exactly-once", kafka_client=kafka_client)):
        records = read_topic(kafka, f"{topic_prefix}.order", expect=500, isolation="read_committed", settle=2.0)
    ids = [dict(r.headers)["event_id"] for r in records]
    assert len(ids) == 500 and len(set(ids)) == 500
    assert query(db, "SELECT DISTINCT status FROM outbox.relay_batches") == [("committed",)]


def test_checkpoint_counts_only_events_of_committed_batches_when_a_transaction_spans_batches(db, kafka, topic_prefix):
    """Regression: a batch rotated mid-transaction recorded one event too many as committed, so a
    crash right after made the restarted relay skip (lose) that event."""
    settings = relay_settings(db, kafka, topic_prefix, delivery="exactly-once", batch_max_events=4)
    with RelayThread(settings):
        wait_streaming(db)
        emit_many(db, "order", 10, per_txn=10)  # one source transaction, three Kafka transactions
        read_topic(kafka, f"{topic_prefix}.order", expect=10, isolation="read_committed")
    checkpoints = [json.loads(r.value) for r in read_topic(kafka, f"{topic_prefix}.checkpoints", expect=3,
                                                           isolation="read_committed")]
    commit_lsn = str_to_lsn(query(db, "SELECT ack_lsn::text FROM outbox.relay_batches WHERE events = 2")[0][0])
    assert [(c["partial_events"], c["commit_lsn"] == 0 or c["commit_lsn"] < commit_lsn) for c in checkpoints[:2]] \
        == [(4, True), (8, True)]
    assert checkpoints[2]["partial_events"] == 0 and checkpoints[2]["commit_lsn"] > 0


def test_a_second_relay_fences_a_zombie(db, kafka, topic_prefix, tmp_path, admin_dsn):
    """Relay A stalls (SIGSTOP) and loses its database sessions, as in a network partition. Standby B
    takes over and fences A's Kafka transactions; when A wakes up its commit is refused and no
    event appears twice for read_committed consumers."""
    env = relay_env(db, kafka, topic_prefix, delivery="exactly-once", batch_max_age_ms=1000)
    a, b = active_and_standby(db, env, tmp_path)

    emit_many(db, "order", 200, per_txn=20)
    time.sleep(0.3)  # A has an open Kafka transaction now (batches close after 1 s)
    a.send_signal(signal.SIGSTOP)
    with psycopg.connect(admin_dsn.secret(), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s "
                     "OR (backend_type = 'walsender' AND application_name = 'outbox-relay' AND pid IN "
                     "(SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s))",
                     ("outbox-relay relay-a%", f"slot_{topic_prefix}"))
    wait_streaming(db, "relay-b", timeout=30)
    emit_many(db, "order", 100, per_txn=10)
    records = read_topic(kafka, f"{topic_prefix}.order", expect=300, isolation="read_committed", timeout=60)
    a.send_signal(signal.SIGCONT)  # the zombie wakes up and tries to carry on
    time.sleep(3)
    records = read_topic(kafka, f"{topic_prefix}.order", expect=300, isolation="read_committed", settle=2.0)
    ids = [dict(r.headers)["event_id"] for r in records]
    assert len(ids) == 300 and len(set(ids)) == 300

    # The zombie can no longer commit anything under the relay's transactional id.
    zombie = KafkaProducer(bootstrap_servers=kafka, transactional_id=f"outbox-relay-slot_{topic_prefix}")
    zombie.init_transactions()  # fences B in turn; B must notice and recover without duplicates
    zombie.close()
    emit_many(db, "order", 50, per_txn=5)
    records = read_topic(kafka, f"{topic_prefix}.order", expect=350, isolation="read_committed", timeout=90,
                         settle=2.0)
    ids = [dict(r.headers)["event_id"] for r in records]
    assert len(ids) == 350 and len(set(ids)) == 350
    for proc in (a, b):
        assert sigterm(proc) == 0


def test_exactly_once_is_refused_on_a_broker_that_shows_aborted_records(db, topic_prefix, tmp_path):
    """Tansu returns aborted transactional records to read_committed consumers: the relay proves it
    with an aborted probe record and stops with the fix instead of promising exactly-once."""
    from outbox.devstack.kafka import Tansu

    tansu = Tansu(tmp_path / "tansu")
    pid, port = tansu.start(None, None)
    try:
        relay = RelayThread(relay_settings(db, f"127.0.0.1:{port}", topic_prefix, delivery="exactly-once"))
        assert relay.start().join(90) == 1
        assert "shows records of an aborted transaction to read_committed consumers" in \
            relay.relay.metrics.last_error
        assert "OUTBOX_DELIVERY=at-least-once" in relay.relay.metrics.last_error
    finally:
        tansu.stop(pid, port)
