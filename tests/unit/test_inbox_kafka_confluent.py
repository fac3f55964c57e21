"""The inbox Runner's confluent-kafka path without a broker: the kafka-python -> librdkafka option
translation (outbox/core/librdkafka.py, inbox/kafka_confluent.py), the client choice and its
errors, and the adapter's handling of positions around librdkafka's assignment (a fake Consumer)."""

from __future__ import annotations

import sys

import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_STORED
from kafka import TopicPartition

from inbox import InboxError, Runner
from inbox import kafka_confluent as kc_mod
from outbox.core import librdkafka
from outbox.core.settings import Settings


def handler(conn, msg):
    pass


def runner(**kw):
    kw.setdefault("topics", ["orders"])
    return Runner("billing", handler, dsn="postgresql://u:p@127.0.0.1/db", bootstrap=["127.0.0.1:9092", "127.0.0.2:9092"],
                  kafka_client="confluent-kafka", **kw)


def test_the_runner_options_translate_to_librdkafka_names_exactly():
    r = runner(kafka_config={"group_instance_id": "billing-1", "session_timeout_ms": 10_000,
                             "max_poll_interval_ms": 120_000})
    rd = kc_mod.translate(r.kafka_config)
    assert rd == {
        "bootstrap.servers": "127.0.0.1:9092,127.0.0.2:9092",
        "group.id": "billing",
        "client.id": "inbox-billing",
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "allow.auto.create.topics": False,
        "topic.metadata.refresh.interval.ms": 10_000,
        "group.instance.id": "billing-1",
        "session.timeout.ms": 10_000,
        "max.poll.interval.ms": 120_000,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
    }
    assert r.budget_s == 60  # half of max_poll_interval_ms, as with kafka-python


def test_parallel_partitions_keep_the_small_partition_fetches():
    rd = kc_mod.translate(runner(parallel_partitions=3).kafka_config)
    assert rd["max.partition.fetch.bytes"] == 16 * 1024


def test_security_settings_translate_as_for_the_relay(tmp_path):
    from relay.publisher_confluent import security_config as relay_security

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                 kafka_sasl_username="inbox", kafka_sasl_password="s3cret-pw", kafka_ssl_cafile=ca,
                 database_url="postgresql://u@127.0.0.1/db", kafka_client="confluent-kafka")
    expected = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "inbox",
                "sasl.password": "s3cret-pw", "ssl.ca.location": str(ca)}
    assert librdkafka.security_config(s.kafka_security()) == expected
    assert relay_security(s) == expected
    r = Runner.from_settings(s, "billing", handler, topics=["orders"])
    assert r.kafka_client == "confluent-kafka"
    rd = kc_mod.translate(r.kafka_config)
    assert {k: rd[k] for k in expected} == expected
    assert Runner.from_settings(s.model_copy(update={"kafka_client": "kafka-python"}), "billing", handler,
                                topics=["orders"]).kafka_client == "kafka-python"


def test_dotted_librdkafka_names_pass_through_and_unknown_options_are_refused_with_the_fix():
    rd = kc_mod.translate(runner(kafka_config={"fetch.wait.max.ms": 50, "fetch_min_bytes": 1}).kafka_config)
    assert rd["fetch.wait.max.ms"] == 50 and rd["fetch.min.bytes"] == 1
    with pytest.raises(InboxError, match=r"'value_deserializer' has no librdkafka counterpart.*dotted"):
        runner(kafka_config={"value_deserializer": bytes})
    with pytest.raises(InboxError, match="enable.auto.commit must stay off"):
        runner(kafka_config={"enable.auto.commit": "true"})


def test_fixed_partitions_without_a_group_get_a_private_group_that_never_joins():
    r = runner(topics=(), partitions=[("orders", 0)], group_id=None)
    a, b = kc_mod.translate(r.kafka_config), kc_mod.translate(r.kafka_config)
    assert a["group.id"].startswith("inbox-billing-unmanaged-") and a["group.id"] != b["group.id"]


def test_unknown_client_and_missing_extra_are_refused_with_the_fix(monkeypatch):
    with pytest.raises(InboxError, match=r"kafka_client must be one of kafka-python, confluent-kafka, got 'rdkafka'"):
        Runner("billing", handler, dsn="postgresql://127.0.0.1/db", bootstrap="127.0.0.1:9092", topics=["t"],
               kafka_client="rdkafka")
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "inbox.kafka_confluent")
    monkeypatch.delattr("inbox.kafka_confluent")
    with pytest.raises(InboxError, match=r"needs confluent-kafka .*pip install 'pg-outbox-relay\[confluent\]'"):
        runner()
    Runner("billing", handler, dsn="postgresql://127.0.0.1/db", bootstrap="127.0.0.1:9092", topics=["t"])  # default


class FakeConsumer:
    """confluent_kafka.Consumer, recording what the adapter asks of it."""

    def __init__(self, config):
        self.config, self.calls, self.queue, self.positions = config, [], [], {}

    def subscribe(self, names, on_assign, on_revoke, on_lost):
        self.calls.append(("subscribe", names))
        self.on_assign, self.on_revoke, self.on_lost = on_assign, on_revoke, on_lost

    def assign(self, tps):
        self.calls.append(("assign", sorted((t.topic, t.partition, t.offset) for t in tps)))

    def unassign(self):
        self.calls.append(("unassign",))

    def pause(self, tps):
        self.calls.append(("pause", sorted((t.topic, t.partition) for t in tps)))

    def resume(self, tps):
        self.calls.append(("resume", sorted((t.topic, t.partition) for t in tps)))

    def seek(self, tp):
        self.calls.append(("seek", (tp.topic, tp.partition, tp.offset)))

    def consume(self, n, timeout):
        out, self.queue = self.queue[:n], self.queue[n:]
        return out

    def poll(self, timeout):
        return None

    def position(self, tps):
        return [kc_mod.RdTopicPartition(t.topic, t.partition, self.positions.get((t.topic, t.partition), -1001))
                for t in tps]

    def get_watermark_offsets(self, tp, timeout, cached):
        return (3, 10)


class Msg:
    def __init__(self, topic, partition, offset):
        self._t, self._p, self._o = topic, partition, offset

    def error(self):
        return None

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def key(self):
        return b"k"

    def value(self):
        return b"{}"

    def headers(self):
        return [("event_id", b"x")]

    def timestamp(self):
        return (1, 1_764_198_000_000)


class Listener:
    def __init__(self, kc, stored):
        self.kc, self.stored, self.seen = kc, stored, []

    def on_partitions_assigned(self, assigned):
        self.seen.append(("assigned", sorted(assigned), sorted(self.kc.assignment())))
        for tp in assigned:
            if tp in self.stored:
                self.kc.seek(tp, self.stored[tp])
        self.kc.pause(*[tp for tp in assigned if tp.partition == 2])

    def on_partitions_revoked(self, revoked):
        self.seen.append(("revoked", sorted(revoked), sorted(self.kc.assignment())))

    def on_partitions_lost(self, lost):
        self.seen.append(("lost", sorted(lost)))


def consumer(monkeypatch, **config):
    monkeypatch.setattr(kc_mod, "Consumer", FakeConsumer)
    return kc_mod.ConfluentConsumer({"group_id": "g", "auto_offset_reset": "earliest", **config})


def test_seeks_in_the_assignment_callback_become_start_offsets_and_pauses_apply_after_it(monkeypatch):
    kc = consumer(monkeypatch)
    tp0, tp1, tp2 = (TopicPartition("orders", p) for p in range(3))
    listener = Listener(kc, {tp0: 42})
    kc.subscribe(topics=["orders"], listener=listener)
    fake = kc._c
    fake.on_assign(fake, [kc_mod.RdTopicPartition("orders", p) for p in range(3)])
    # The listener saw the new partitions as assigned; PostgreSQL's offset is where partition 0
    # starts, the others start from the group's offset; the pause lands once they are assigned.
    assert listener.seen == [("assigned", [tp0, tp1, tp2], [tp0, tp1, tp2])]
    assert fake.calls == [("subscribe", ["orders"]),
                          ("assign", [("orders", 0, 42), ("orders", 1, OFFSET_STORED), ("orders", 2, OFFSET_STORED)]),
                          ("pause", [("orders", 2)])]
    assert kc.assignment() == {tp0, tp1, tp2} and kc.paused() == {tp2}
    fake.positions[("orders", 0)] = 43
    assert (kc.position(tp0), kc.position(tp1)) == (43, None)  # None: nothing consumed or sought yet
    assert kc.end_offsets([tp0], timeout_ms=100) == {tp0: 10} and kc.beginning_offsets([tp0]) == {tp0: 3}
    kc.seek(tp1, 7)  # an assigned partition: a real seek
    kc.pause(tp0)
    kc.resume(tp0)
    assert fake.calls[-3:] == [("seek", ("orders", 1, 7)), ("pause", [("orders", 0)]), ("resume", [("orders", 0)])]
    fake.on_revoke(fake, [kc_mod.RdTopicPartition("orders", p) for p in range(3)])
    assert listener.seen[-1] == ("revoked", [tp0, tp1, tp2], [tp0, tp1, tp2])  # still assigned while it settles
    assert fake.calls[-1] == ("unassign",) and kc.assignment() == set() and kc.paused() == set()
    fake.on_lost(fake, [kc_mod.RdTopicPartition("orders", 0)])
    assert listener.seen[-1] == ("lost", [tp0])


def test_manual_assignment_is_applied_at_the_next_poll_with_the_offsets_sought_meanwhile(monkeypatch):
    kc = consumer(monkeypatch, group_id=None)
    tp0, tp1 = TopicPartition("orders", 0), TopicPartition("orders", 1)
    kc.assign([tp0, tp1])
    assert kc.assignment() == {tp0, tp1}
    kc.seek(tp1, 5)
    assert kc._c.calls == []
    kc._c.queue = [Msg("orders", 1, 5), Msg("orders", 1, 6), Msg("orders", 0, 0), Msg("orders", 1, 7)]
    polled = kc.poll(timeout_ms=10, max_records=3)
    # No group: a partition PostgreSQL has no offset for starts at auto.offset.reset, not the group's.
    assert kc._c.calls == [("assign", [("orders", 0, OFFSET_BEGINNING), ("orders", 1, 5)])]
    assert {tp: [(r.offset, r.key, r.value, r.headers, r.timestamp) for r in batch] for tp, batch in polled.items()} \
        == {tp1: [(5, b"k", b"{}", [("event_id", b"x")], 1_764_198_000_000), (6, b"k", b"{}", [("event_id", b"x")],
                                                                               1_764_198_000_000)],
            tp0: [(0, b"k", b"{}", [("event_id", b"x")], 1_764_198_000_000)]}
    assert [r.offset for r in kc.poll(timeout_ms=10)[tp1]] == [7]
    assert kc.poll(timeout_ms=10) == {}


def test_a_pattern_is_anchored_like_kafka_pythons_match(monkeypatch):
    kc = consumer(monkeypatch)
    kc.subscribe(pattern=r"outbox\.event\..*")
    kc2 = consumer(monkeypatch)
    kc2.subscribe(pattern=r"^outbox\..*")
    assert kc._c.calls == [("subscribe", [r"^outbox\.event\..*"])]
    assert kc2._c.calls == [("subscribe", [r"^outbox\..*"])]


def test_partitions_of_topics_it_does_not_subscribe_to_are_refused_and_the_member_rejoins(monkeypatch, caplog):
    """A static member rejoining a stable group after its subscription changed gets its previous
    assignment back (another topic's partitions): kafka-python rejoins, and so must the adapter."""
    kc = consumer(monkeypatch)
    listener = Listener(kc, {})
    kc.subscribe(topics=["orders"], listener=listener)
    fake = kc._c
    fake.on_assign(fake, [kc_mod.RdTopicPartition("old-topic", 0), kc_mod.RdTopicPartition("orders", 0)])
    assert listener.seen == [("assigned", [TopicPartition("orders", 0)], [TopicPartition("orders", 0)])]
    assert fake.calls[-1] == ("assign", [("orders", 0, OFFSET_STORED)])
    assert "old-topic[0]" in caplog.text and "rejoining the group" in caplog.text
    kc.poll(timeout_ms=0)
    assert fake.calls[-1] == ("subscribe", ["orders"])  # the rejoin
    kc.poll(timeout_ms=0)
    assert [c for c in fake.calls if c[0] == "subscribe"] == [("subscribe", ["orders"])] * 2  # once
