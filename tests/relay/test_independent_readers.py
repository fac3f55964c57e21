"""What the relay writes, read back by Kafka clients that share no code with it: Kafka's own Java
consumer (kafka-clients, compiled here with javac) and librdkafka (confluent-kafka), both with
read_committed, as a user's JVM or Go/C service would read the topics."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka import KafkaProducer

from outbox.core.settings import load_settings
from outbox.devstack.jars import ensure_jars
from outbox.devstack.kafka import find_java
from tests.support.helpers import wait_for
from tests.support.inbox import create_topic
from tests.support.paths import REPO
from tests.support.relay import RelayThread, emit, published, relay_settings, wait_streaming

pytestmark = pytest.mark.skipif(find_java() is None, reason="Kafka's Java consumer needs Java 17+")

ABORTED_ID = "00000000-0000-7000-8000-000000000000"
_LINE = re.compile(r"^-?\d+\t-?\d+\t\d+\t")


@dataclass(frozen=True)
class Read:
    partition: int
    offset: int
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    java_partition: int | None = None  # where Java's default partitioner puts the key

    @property
    def event_id(self) -> str:
        return dict(self.headers)["event_id"].decode()


@pytest.fixture(scope="module")
def java_reader(tmp_path_factory):
    java = Path(find_java())
    javac = java.with_name("javac")
    if not javac.exists():
        pytest.skip(f"no javac next to {java} (a JDK is needed to compile the Java reader)")
    settings = load_settings(_env_file=None)
    libs = ensure_jars(settings.dev_kafka_version, settings.dev_cache_dir)
    classes = tmp_path_factory.mktemp("java-reader")
    subprocess.run([str(javac), "-cp", f"{libs}/*", "-d", str(classes), str(REPO / "tests/workers/JavaReader.java")],
                   check=True, capture_output=True, timeout=120)

    def read(bootstrap: str, topic: str, expect: int) -> list[Read]:
        proc = subprocess.run([str(java), "-cp", f"{classes}:{libs}/*", "JavaReader", bootstrap, topic, str(expect),
                               "30000"], capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = []
        for line in proc.stdout.splitlines():
            if not _LINE.match(line):
                continue  # the client's own logging
            partition, java_partition, offset, key, value, *headers = line.split("\t")
            out.append(Read(int(partition), int(offset), base64.b64decode(key), base64.b64decode(value),
                            tuple((h.split("=", 1)[0], base64.b64decode(h.split("=", 1)[1])) for h in headers),
                            int(java_partition)))
        return out

    return read


def librdkafka_read(bootstrap: str, topic: str, expect: int, timeout: float = 30) -> list[Read]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                         "isolation.level": "read_committed", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: list[Read] = []
        deadline = time.monotonic() + timeout
        while len(out) < expect and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            out.append(Read(msg.partition(), msg.offset(), msg.key(), msg.value(), tuple(msg.headers() or ())))
        return out
    finally:
        consumer.close()


@pytest.mark.parametrize("kafka_client", ["kafka-python", "confluent-kafka"])
def test_javas_consumer_and_librdkafka_read_each_event_once_in_order_where_java_would_put_its_key(
        db, kafka, topic_prefix, java_reader, kafka_client):
    topic = f"{topic_prefix}.order"
    create_topic(kafka, topic, partitions=3)
    # An aborted transaction in the topic first: a read_committed reader must never see it.
    aborter = KafkaProducer(bootstrap_servers=kafka, transactional_id=f"aborter-{topic_prefix}")
    aborter.init_transactions()
    aborter.begin_transaction()
    aborter.send(topic, key=b"o-1", value=b'{"aborted": true}', headers=[("event_id", ABORTED_ID.encode())])
    aborter.flush()
    aborter.abort_transaction()
    aborter.close()

    payload = {"note": "café ☕ \"quoted\" \\ back", "nested": {"list": [1, 2.5, None, True]}}
    sent: dict[str, tuple[str, int]] = {}  # event id -> (aggregate, step)
    with RelayThread(relay_settings(db, kafka, topic_prefix, delivery="exactly-once", kafka_client=kafka_client)):
        wait_streaming(db)
        for step in range(8):  # each transaction touches every aggregate
            ids = emit(db, [("order", f"o-{a}", "OrderStepped", {**payload, "step": step}, {"source": "test"})
                            for a in range(5)])
            sent.update({event_id: (f"o-{a}", step) for a, event_id in enumerate(ids)})
        wait_for(lambda: published(db) == 40, 60, "40 events published")

    java = java_reader(kafka, topic, expect=40)
    rdkafka = librdkafka_read(kafka, topic, expect=40)
    for reader, records in (("java", java), ("librdkafka", rdkafka)):
        assert sorted(r.event_id for r in records) == sorted(sent), reader  # each once, none aborted
        for r in records:
            aggregate, step = sent[r.event_id]
            headers = dict(r.headers)
            assert r.key == aggregate.encode(), reader
            assert json.loads(r.value) == {**payload, "step": step}, reader
            assert (headers["event_type"], headers["aggregate_type"], headers["aggregate_id"], headers["source"]) \
                == (b"OrderStepped", b"order", aggregate.encode(), b"test"), (reader, headers)
        for a in range(5):  # one aggregate's events in commit order, on one partition
            mine = sorted((r.partition, r.offset, sent[r.event_id][1]) for r in records if r.key == f"o-{a}".encode())
            assert len({p for p, _, _ in mine}) == 1 and [s for _, _, s in mine] == list(range(8)), (reader, mine)
    assert all(r.partition == r.java_partition for r in java), [(r.key, r.partition, r.java_partition) for r in java]
    assert sorted((r.partition, r.offset, r.event_id) for r in java) == \
        sorted((r.partition, r.offset, r.event_id) for r in rdkafka)
