"""The librdkafka producer (OUTBOX_KAFKA_CLIENT=confluent-kafka) against kafka-python's: same partitions,
same failure classes. The relay-level behaviour is proven by the tests parametrized over `kafka_client`
(delivery, exactly-once, dead letters, kill -9)."""

from __future__ import annotations

import os
import uuid

import pytest
from confluent_kafka import KafkaError
from kafka import KafkaProducer

from outbox.core.settings import load_settings
from relay import publisher, publisher_confluent
from relay.publisher import Publisher, classify, ensure_topic, make_publisher
from relay.publisher_confluent import ConfluentPublisher, as_kafka_python, security_config
from tests.support.helpers import read_topic, wait_for


@pytest.mark.parametrize("code,permanent,reason", [
    (KafkaError.MSG_SIZE_TOO_LARGE, True, "oversize"),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, True, "authorization"),
    (KafkaError.TOPIC_EXCEPTION, True, "invalid_topic"),
    (KafkaError.RECORD_LIST_TOO_LARGE, True, "oversize"),
    (KafkaError.NOT_LEADER_FOR_PARTITION, False, "transient"),
    (KafkaError.REQUEST_TIMED_OUT, False, "transient"),
    (KafkaError._MSG_TIMED_OUT, False, "transient"),
    (KafkaError._TRANSPORT, False, "transient"),
    (KafkaError._PURGE_QUEUE, False, "transient"),
])
def test_librdkafka_errors_are_classified_as_kafka_pythons(code, permanent, reason):
    failure = classify(as_kafka_python(KafkaError(code)))
    assert (failure.permanent, failure.reason) == (permanent, reason)
    if permanent:
        assert "Fix:" in failure.message


def test_security_settings_map_to_librdkafka_names(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    s = load_settings(_env_file=None, kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                      kafka_sasl_username="relay", kafka_sasl_password="s3cret-value", kafka_ssl_cafile=str(ca))
    assert security_config(s) == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                                  "sasl.username": "relay", "sasl.password": "s3cret-value",
                                  "ssl.ca.location": str(ca)}


@pytest.mark.parametrize("age_ms", [200, 30_000, 60_000])
def test_a_batch_as_old_as_its_setting_allows_is_never_outlived_by_its_kafka_transaction(age_ms):
    s = load_settings(_env_file=None, batch_max_age_ms=age_ms)
    python_config = publisher.producer_config(s, "tx")
    rdkafka_config = publisher_confluent.producer_config(s, "tx")
    assert python_config["transaction_timeout_ms"] == rdkafka_config["transaction.timeout.ms"] == 60_000 + age_ms
    # librdkafka refuses a record that could outlive its transaction.
    assert rdkafka_config["delivery.timeout.ms"] <= rdkafka_config["transaction.timeout.ms"]
    assert "transaction_timeout_ms" not in publisher.producer_config(s)


def test_kafka_python_stays_the_default(kafka):
    s = load_settings(_env_file=None, kafka_bootstrap=kafka)
    assert s.kafka_client == "kafka-python"
    publisher = make_publisher(s)
    try:
        assert type(publisher) is Publisher
    finally:
        publisher.close()


def test_every_key_lands_on_the_same_partition_with_either_client(kafka):
    """Switching OUTBOX_KAFKA_CLIENT must not move an aggregate to another partition: its events'
    order is per partition. librdkafka's default (CRC32) would move most of them."""
    topic = f"part-{uuid.uuid4().hex[:8]}"
    ensure_topic({"bootstrap_servers": kafka}, topic, 6)
    keys = [f"order-{i}".encode() for i in range(100)] + [str(uuid.uuid4()).encode() for _ in range(100)]
    s = load_settings(_env_file=None, kafka_bootstrap=kafka, kafka_client="confluent-kafka")
    confluent = make_publisher(s)
    assert type(confluent) is ConfluentPublisher
    handles = [confluent.send(topic, b"c", key, [("client", b"confluent")]) for key in keys]
    confluent.producer.flush(30)
    confluent.close()
    assert all(h.is_done and h.exception is None for h in handles)
    by_confluent = {key: h.value.partition for key, h in zip(keys, handles)}

    producer = KafkaProducer(bootstrap_servers=kafka)
    futures = [producer.send(topic, value=b"k", key=key) for key in keys]
    producer.flush()
    producer.close()
    by_kafka_python = {key: f.get().partition for key, f in zip(keys, futures)}

    assert len(set(by_kafka_python.values())) == 6  # the keys do spread, so agreement means something
    assert by_confluent == by_kafka_python
    # And what the handles reported is where the records are.
    records = read_topic(kafka, topic, expect=400, settle=0.5)
    assert {(r.key, r.partition) for r in records} == set(by_kafka_python.items())


def test_oversize_is_refused_on_the_spot_or_dead_lettered_when_the_broker_rejects_it(kafka):
    topic = f"big-{uuid.uuid4().hex[:8]}"
    # The topic takes less than the relay would send: only the broker can tell.
    ensure_topic({"bootstrap_servers": kafka}, topic, 1, {"max.message.bytes": "3000"})
    s = load_settings(_env_file=None, kafka_bootstrap=kafka, kafka_client="confluent-kafka", max_record_bytes=8192)
    publisher = make_publisher(s)
    try:
        from kafka import errors as kerr

        with pytest.raises(kerr.MessageSizeTooLargeError):  # the pipeline dead-letters it as refused
            publisher.send(topic, b"x" * 10_000, b"k", [])
        handle = publisher.send(topic, os.urandom(5_000), b"k", [])  # random: compression cannot shrink it
        publisher.producer.flush(30)
        # Alone in its batch: librdkafka, unlike kafka-python, does not split a batch the broker finds
        # too large, so records sharing the batch would fail with it (docs/relay.md says so).
        ok = publisher.send(topic, b"small", b"k", [])
        wait_for(lambda: handle.is_done and ok.is_done, 30, "delivery reports")
        failure = classify(handle.exception)
        assert (failure.permanent, failure.reason, failure.refused) == (True, "oversize", False)
        assert "max.message.bytes" in failure.message
        assert ok.exception is None and ok.value.topic == topic and ok.value.offset >= 0
    finally:
        publisher.close()
