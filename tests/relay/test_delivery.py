"""What the relay promises about every record: the contract's shape, committed-only, per-aggregate
order, resume without gaps, and the bookkeeping the dashboard reads."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.support.helpers import read_topic, wait_for
from tests.support.relay import RelayThread, emit, emit_many, published, query, relay_settings, wait_streaming

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def headers_of(record) -> dict[str, bytes]:
    return dict(record.headers)


@pytest.mark.parametrize("kafka_client", ["kafka-python", "confluent-kafka"])
def test_every_committed_event_arrives_in_the_contract_shape(db, kafka, topic_prefix, kafka_client):
    settings = relay_settings(db, kafka, topic_prefix, kafka_client=kafka_client)
    with RelayThread(settings):
        ids = emit(db, [
            ("order", "42", "OrderPlaced", {"total": 12.5, "note": "café"}, {"traceparent": TRACEPARENT}),
            ("order", "42", "OrderDeleted", None, {}),
            ("payment", "p-1", "PaymentCaptured", {"amount": 25}, {"tenant": "acme"}),
        ])
        records = read_topic(kafka, f"{topic_prefix}.order", f"{topic_prefix}.payment", expect=3)

    assert len(records) == 3
    by_id = {headers_of(r)["event_id"].decode(): r for r in records}
    assert set(by_id) == set(ids)

    placed = by_id[ids[0]]
    assert placed.topic == f"{topic_prefix}.order"
    assert placed.key == b"42"
    assert json.loads(placed.value) == {"total": 12.5, "note": "café"}
    h = headers_of(placed)
    assert [k for k, _ in placed.headers] == ["event_id", "event_type", "aggregate_type", "aggregate_id",
                                              "outbox_commit_lsn", "outbox_xid", "outbox_commit_ts", "traceparent"]
    assert h["event_type"] == b"OrderPlaced" and h["aggregate_type"] == b"order" and h["aggregate_id"] == b"42"
    assert h["traceparent"] == TRACEPARENT.encode()  # passed through untouched
    xid, lsn = query(db, "SELECT txid::text, NULL FROM outbox.events WHERE event_id = %s", (ids[0],))[0]
    assert h["outbox_xid"].decode() == xid
    assert b"/" in h["outbox_commit_lsn"] and h["outbox_commit_ts"].endswith(b"Z")

    tombstone = by_id[ids[1]]
    assert tombstone.value is None and tombstone.key == b"42"
    assert tombstone.offset == placed.offset + 1  # same key, same partition, commit order

    payment = by_id[ids[2]]
    assert payment.topic == f"{topic_prefix}.payment" and headers_of(payment)["tenant"] == b"acme"
    # Events of one transaction carry the same transaction headers.
    assert headers_of(payment)["outbox_commit_lsn"] == h["outbox_commit_lsn"]


def test_rolled_back_events_are_never_published(db, kafka, topic_prefix):
    with RelayThread(relay_settings(db, kafka, topic_prefix)):
        with psycopg.connect(db.secret()) as conn:
            conn.execute("SELECT outbox.emit('order', '1', 'Ghost', '{}')")
            conn.rollback()
            with conn.transaction():
                conn.execute("SELECT outbox.emit('order', '1', 'Kept', '{}')")
            with conn.transaction():
                conn.execute("SAVEPOINT s")
                conn.execute("SELECT outbox.emit('order', '1', 'GhostInSavepoint', '{}')")
                conn.execute("ROLLBACK TO SAVEPOINT s")
                conn.execute("SELECT outbox.emit('order', '1', 'AlsoKept', '{}')")
        records = read_topic(kafka, f"{topic_prefix}.order", expect=2, settle=2.0)
    assert [headers_of(r)["event_type"] for r in records] == [b"Kept", b"AlsoKept"]


def test_per_aggregate_order_holds_with_concurrent_producers(db, kafka, topic_prefix):
    """8 producers race on 5 aggregates; a row lock per aggregate numbers its events in commit order.
    Kafka must show each aggregate's numbers strictly increasing with no gap or repeat."""
    aggregates = [f"acct-{i}" for i in range(5)]
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        conn.execute("CREATE TABLE seq (agg text PRIMARY KEY, n int NOT NULL)")
        conn.execute("INSERT INTO seq SELECT unnest(%s::text[]), 0", (aggregates,))
    per_producer, producers = 60, 8

    def produce(seed: int) -> None:
        rnd = random.Random(seed)
        with psycopg.connect(db.secret()) as conn:
            for _ in range(per_producer):
                with conn.transaction():
                    for agg in sorted(rnd.sample(aggregates, rnd.randint(1, 2))):  # one lock order: no deadlock
                        n = conn.execute("UPDATE seq SET n = n + 1 WHERE agg = %s RETURNING n", (agg,)).fetchone()[0]
                        conn.execute("SELECT outbox.emit('account', %s, 'Moved', %s)", (agg, Jsonb({"n": n})))

    with RelayThread(relay_settings(db, kafka, topic_prefix)):
        # Streamed events keep commit order; events from before the slot existed are published from
        # the table in creation order (commit order is not recorded there), so start after that.
        wait_streaming(db)
        threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        totals = dict(query(db, "SELECT agg, n FROM seq"))
        records = read_topic(kafka, f"{topic_prefix}.account", expect=sum(totals.values()))

    seen: dict[str, list[int]] = {}
    for r in records:
        seen.setdefault(r.key.decode(), []).append(json.loads(r.value)["n"])
    assert {agg: ns for agg, ns in seen.items()} == {agg: list(range(1, totals[agg] + 1)) for agg in aggregates}


def test_restart_resumes_where_it_stopped_without_gaps_or_repeats(db, kafka, topic_prefix):
    settings = relay_settings(db, kafka, topic_prefix)
    emit_many(db, "order", 300, per_txn=50)
    with RelayThread(settings) as first:
        wait_for(lambda: published(db) == 300, 60, "the first 300 events")
        assert first.stop() == 0
    emit_many(db, "order", 200, per_txn=20)  # committed while no relay runs
    with RelayThread(relay_settings(db, kafka, topic_prefix)):
        records = read_topic(kafka, f"{topic_prefix}.order", expect=500)
    seqs = sorted(json.loads(r.value)["seq"] for r in records)
    assert len(records) == 500
    assert seqs == sorted(list(range(300)) + list(range(200)))
    assert len({headers_of(r)["event_id"] for r in records}) == 500  # graceful stop: no duplicates


def test_events_emitted_before_the_relay_ever_ran_are_published(db, kafka, topic_prefix):
    """Backfilled events stay out of the commit -> ack latency histogram: their commit time is
    unknown (created_at stands in), so they would read as minutes of latency."""
    ids = emit(db, [("order", str(i), "Early", {"i": i}, {}) for i in range(25)])
    with RelayThread(relay_settings(db, kafka, topic_prefix)) as relay:
        wait_streaming(db)  # so that the late one is streamed, not read by the backfill
        later = emit(db, [("order", "x", "Late", {}, {})])
        records = read_topic(kafka, f"{topic_prefix}.order", expect=26)
        registry = relay.relay.metrics.registry
        wait_for(lambda: registry.get_sample_value("outbox_relay_events_published_total") == 26, 30,
                 "the ledger to record all 26")
        assert registry.get_sample_value("outbox_relay_publish_latency_seconds_count") == 1
        assert registry.get_sample_value("outbox_relay_publish_latency_seconds_sum") < 30
    got = [headers_of(r)["event_id"].decode() for r in records]
    assert sorted(got) == sorted(ids + later)
    assert query(db, "SELECT backfill_snapshot FROM outbox.relay_status") == [(None,)]


def test_bookkeeping_matches_kafka(db, kafka, topic_prefix):
    """Delivery rows name the exact partition/offset; batches record the producing transactions."""
    with RelayThread(relay_settings(db, kafka, topic_prefix)):
        emit_many(db, "order", 120, per_txn=40)
        records = read_topic(kafka, f"{topic_prefix}.order", expect=120)
        wait_for(lambda: query(db, "SELECT count(*) FROM outbox.deliveries")[0][0] == 120, 30, "delivery rows")
    in_kafka = {(headers_of(r)["event_id"].decode(), r.topic, r.partition, r.offset) for r in records}
    rows = set(query(db, "SELECT event_id::text, topic, kafka_partition, kafka_offset FROM outbox.deliveries"))
    assert rows == in_kafka
    xids = query(db, "SELECT DISTINCT txid::text FROM outbox.events")
    recorded = query(db, "SELECT DISTINCT unnest(xids)::text FROM outbox.relay_batches WHERE status = 'acked'")
    assert sorted(recorded) == sorted(xids)
    status = query(db, "SELECT events_published, events_dead_lettered, last_event_id IS NOT NULL FROM "
                       "outbox.relay_status")
    assert status == [(120, 0, True)]


def test_deliveries_can_be_switched_off(db, kafka, topic_prefix):
    with RelayThread(relay_settings(db, kafka, topic_prefix, track_deliveries=False)):
        emit_many(db, "order", 50, per_txn=50)
        read_topic(kafka, f"{topic_prefix}.order", expect=50)
        wait_for(lambda: published(db) == 50, 30, "status")
    assert query(db, "SELECT count(*) FROM outbox.deliveries") == [(0,)]
    assert query(db, "SELECT count(*) FROM outbox.relay_batches WHERE status = 'acked' AND xids <> '{}'") != [(0,)]


def test_unique_event_ids_survive_as_uuid(db, kafka, topic_prefix):
    with RelayThread(relay_settings(db, kafka, topic_prefix)):
        ids = emit(db, [("order", "1", "A", {}, {})])
        (record,) = read_topic(kafka, f"{topic_prefix}.order", expect=1)
    assert uuid.UUID(headers_of(record)["event_id"].decode()) == uuid.UUID(ids[0])


def in_flight(db) -> set[str]:
    return {r[0] for r in query(db, "SELECT event_id::text FROM outbox.in_flight")}


def test_in_flight_view_is_exact(db, kafka, topic_prefix):
    """Never an acknowledged event in the view, never a pending one missing, at any instant."""
    pending = set(emit(db, [("order", str(i), "BeforeRelay", {}, {}) for i in range(30)]))
    assert in_flight(db) == pending  # nothing published yet: all of them, no more

    blocker = psycopg.connect(db.secret())
    try:
        with RelayThread(relay_settings(db, kafka, topic_prefix)) as relay:
            wait_streaming(db)  # creating a slot waits for open transactions, so open one after
            blocker.execute("SELECT pg_current_xact_id()")  # an old open transaction holds the watermark back
            loader = threading.Thread(target=emit_many, args=(db, "order", 3000), kwargs={"per_txn": 25})
            loader.start()
            checks = 0
            while loader.is_alive() or checks < 3:
                with psycopg.connect(db.secret()) as conn:
                    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                    with conn.transaction():  # one snapshot for all three sets
                        flying = {r[0] for r in conn.execute("SELECT event_id::text FROM outbox.in_flight")}
                        delivered = {r[0] for r in conn.execute("SELECT event_id::text FROM outbox.deliveries")}
                        every = {r[0] for r in conn.execute("SELECT event_id::text FROM outbox.events")}
                assert not flying & delivered
                assert flying | delivered == every
                checks += 1
                time.sleep(0.05)
            loader.join()
            wait_for(lambda: not in_flight(db), 60, "nothing in flight")
            assert published(db) == 3030
            relay.stop()
        later = set(emit(db, [("order", "x", "AfterStop", {}, {}) for _ in range(5)]))
        assert in_flight(db) == later  # acknowledged events do not come back, new ones show at once
    finally:
        blocker.close()
    print(f"{checks} consistent snapshots")
