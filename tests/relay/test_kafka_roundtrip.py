"""The Apache Kafka broker of the test stack: records, keys and headers survive a round trip,
and transactions behave as the exactly-once mode relies on."""

from __future__ import annotations

from kafka import KafkaProducer

from tests.support.helpers import read_topic


def test_produce_consume_round_trip_with_headers(kafka, topic_prefix):
    topic = f"{topic_prefix}.roundtrip"
    producer = KafkaProducer(bootstrap_servers=kafka, acks="all", enable_idempotence=True)
    sent = [(f"agg-{i % 3}".encode(), f'{{"n": {i}}}'.encode(), [("event_id", f"id-{i}".encode()),
                                                               ("traceparent", b"00-abc-01")]) for i in range(30)]
    for key, value, headers in sent:
        producer.send(topic, value=value, key=key, headers=headers)
    producer.flush()
    producer.close()

    got = [(m.key, m.value, m.headers) for m in read_topic(kafka, topic, expect=len(sent))]
    assert sorted(got) == sorted(sent)
    by_key = {}
    for key, value, _ in got:
        by_key.setdefault(key, []).append(value)
    for key, values in by_key.items():  # per-key order is preserved
        assert values == [v for k, v, _ in sent if k == key]


def test_read_committed_hides_aborted_transactions(kafka, topic_prefix):
    topic = f"{topic_prefix}.tx"
    producer = KafkaProducer(bootstrap_servers=kafka, transactional_id=f"{topic_prefix}-tx", acks="all")
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(topic, b"committed-1", key=b"k")
    producer.commit_transaction()
    producer.begin_transaction()
    producer.send(topic, b"aborted", key=b"k")
    producer.flush()
    producer.abort_transaction()
    producer.begin_transaction()
    producer.send(topic, b"committed-2", key=b"k")
    producer.commit_transaction()
    producer.close()

    def read(isolation, expect):
        return [m.value for m in read_topic(kafka, topic, expect=expect, isolation=isolation)]

    assert read("read_committed", 2) == [b"committed-1", b"committed-2"]
    assert read("read_uncommitted", 3) == [b"committed-1", b"aborted", b"committed-2"]
