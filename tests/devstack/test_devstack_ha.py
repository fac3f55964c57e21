"""The failure-test dev stack: a 3-node KRaft cluster and a PostgreSQL primary + standby.

Kafka tests run first and leave all three nodes running; the PostgreSQL test promotes the standby
and then lets `up` rebuild the old primary, so the module's stack ends as healthy as it began.
"""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from kafka import KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, NotEnoughReplicasError

from outbox.core.redact import Dsn
from outbox.devstack.cluster import admin
from outbox.devstack.kafka import find_java
from outbox.devstack.procs import StackError
from tests.support.devstack import our_processes, outbox, parse_exports
from tests.support.helpers import read_topic, wait_for

pytestmark = pytest.mark.skipif(find_java() is None, reason="Apache Kafka needs Java 17+")


def create_topic(bootstrap: str, partitions: int = 1, **configs: str) -> str:
    topic = f"ha.{uuid.uuid4().hex[:10]}"
    with admin(bootstrap) as client:
        client.create_topics([NewTopic(topic, partitions, 3, topic_configs=configs)])
    return topic


def producer(bootstrap: str, **options) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", metadata_max_age_ms=1000, **options)


def wait_isr(cluster, topic: str, expected: list[int], timeout: float = 40) -> None:
    wait_for(lambda: all(p["isr"] == expected for p in cluster.partitions(topic).values()), timeout,
             f"ISR of {topic} to become {expected}")


def test_three_brokers_answer_and_replicate_everything_three_times(kafka_cluster):
    bootstrap = kafka_cluster.urls.kafka_bootstrap
    assert len(bootstrap.split(",")) == 3
    status = kafka_cluster.status()["kafka"]
    assert status["running"] and [n["node_id"] for n in status["nodes"]] == [1, 2, 3]
    with admin(bootstrap) as client:
        assert sorted(b["broker_id"] for b in client.describe_cluster()["brokers"]) == [1, 2, 3]
    topic = create_topic(bootstrap, partitions=3)
    wait_isr(kafka_cluster, topic, [1, 2, 3], timeout=10)
    assert all(p["replicas"] == [1, 2, 3] for p in kafka_cluster.partitions(topic).values())

    # A committed group offset creates __consumer_offsets: it must be replicated like user topics.
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=f"g{uuid.uuid4().hex[:6]}",
                             enable_auto_commit=False)
    consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(0, "", -1)})
    consumer.close()
    offsets = kafka_cluster.partitions("__consumer_offsets")
    assert offsets and all(p["replicas"] == [1, 2, 3] and p["isr"] == [1, 2, 3] for p in offsets.values())


@pytest.mark.slow
def test_acks_all_writes_survive_kill_9_of_the_leader(kafka_cluster):
    bootstrap = kafka_cluster.urls.kafka_bootstrap
    topic = create_topic(bootstrap)
    wait_isr(kafka_cluster, topic, [1, 2, 3], timeout=10)
    prod = producer(bootstrap, retries=1000, request_timeout_ms=5000, delivery_timeout_ms=60000)
    for i in range(100):
        prod.send(topic, f"before-{i}".encode())
    prod.flush(30)

    leader = kafka_cluster.leaders(topic)[0]
    kafka_cluster.kill_broker(leader)
    started = time.monotonic()
    futures = [prod.send(topic, f"after-{i}".encode()) for i in range(100)]
    for future in futures:
        future.get(timeout=60)  # acknowledged by the new leader and one more replica
    failover_s = time.monotonic() - started
    prod.close()
    new_leader = kafka_cluster.leaders(topic)[0]
    assert new_leader not in (leader, -1)
    assert kafka_cluster.status()["kafka"]["running"] is False

    values = [r.value for r in read_topic(bootstrap, topic, expect=200)]
    assert sorted(values) == sorted([f"before-{i}".encode() for i in range(100)]
                                    + [f"after-{i}".encode() for i in range(100)])
    print(f"acks=all writes resumed {failover_s:.1f} s after kill -9 of leader {leader}")

    kafka_cluster.restart_broker(leader)
    wait_isr(kafka_cluster, topic, [1, 2, 3])
    assert kafka_cluster.status()["kafka"]["running"] is True


@pytest.mark.slow
def test_min_isr_two_takes_writes_with_one_broker_down_and_refuses_them_with_two(kafka_cluster):
    bootstrap = kafka_cluster.urls.kafka_bootstrap
    topic = create_topic(bootstrap)
    strict = create_topic(bootstrap, **{"min.insync.replicas": "3"})  # shows the refusal without quorum loss
    wait_isr(kafka_cluster, topic, [1, 2, 3], timeout=10)
    leader = kafka_cluster.leaders(topic)[0]
    followers = [n for n in (1, 2, 3) if n != leader]
    assert kafka_cluster.leaders(strict)[0] != -1

    kafka_cluster.kill_broker(followers[0])
    wait_isr(kafka_cluster, topic, sorted([leader, followers[1]]))  # fenced after broker.session.timeout.ms
    prod = producer(bootstrap, retries=0, request_timeout_ms=4000, delivery_timeout_ms=8000, max_block_ms=8000)
    prod.send(topic, b"two in sync").get(timeout=15)  # min ISR 2 met
    wait_for(lambda: len(kafka_cluster.partitions(strict)[0]["isr"]) == 2, 40, "the strict topic's ISR to shrink")
    with pytest.raises(NotEnoughReplicasError):
        prod.send(strict, b"needs three").get(timeout=15)

    # A second node down also loses the controller quorum (2 of 3 voters), so the leader can no
    # longer shrink the ISR: the write is appended but never acknowledged, which is the refusal.
    kafka_cluster.pause_broker(followers[1])
    try:
        assert kafka_cluster.status()["kafka"]["nodes"][followers[1] - 1]["paused"] is True
        with pytest.raises(KafkaError):
            prod.send(topic, b"only one left").get(timeout=15)
    finally:
        kafka_cluster.resume_broker(followers[1])
        prod.close()
    kafka_cluster.restart_broker(followers[0])
    wait_isr(kafka_cluster, topic, [1, 2, 3])
    again = producer(bootstrap)
    again.send(topic, b"all back").get(timeout=30)
    again.close()


def consume_until_synced(pair, url: str, slot: str, publication: str, timeout: float = 30) -> int:
    """Consume the slot as a relay would until the standby holds it as a persistent synced slot;
    returns the number of inserts consumed.

    A new slot's catalog_xmin comes from the standby's own hot_standby_feedback xmin, which lags:
    the slot needs catalog rows the standby no longer guarantees, so the standby keeps it as a
    temporary slot ("Synchronization could lead to data loss"), lost on failover, until the
    consumer confirms positions past a newer running-xacts record. That takes a few rounds.
    """
    consumed = 0
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            conn.execute("SELECT pg_log_standby_snapshot()")
            conn.execute("SELECT pg_current_xact_id()")  # a commit after it, for the slot to confirm
            consumed += conn.execute(
                "SELECT count(*) FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
                "'publication_names', %s) WHERE substr(data, 1, 1) = 'I'", (slot, publication)).fetchone()[0]
            try:
                pair.wait_slot_synced(slot, timeout=1)
                return consumed
            except StackError:
                if time.monotonic() > deadline:
                    raise


@pytest.mark.slow
def test_promoted_standby_has_the_data_takes_writes_and_keeps_the_failover_slot(pg_pair):
    url = pg_pair.urls.database_url.secret()
    primary_port = int(pg_pair.pg_node_dsn("primary").params()["port"])
    standby_port = int(pg_pair.pg_node_dsn("standby").params()["port"])
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] == primary_port
        conn.execute("CREATE TABLE ha_orders (id int PRIMARY KEY, note text)")
        conn.execute("CREATE PUBLICATION ha_pub FOR TABLE ha_orders")
        conn.execute("SELECT pg_create_logical_replication_slot('ha_slot', 'pgoutput', false, false, true)")
        conn.execute("INSERT INTO ha_orders SELECT g, 'before' FROM generate_series(1, 100) g")
    consumed = consume_until_synced(pg_pair, url, "ha_slot", "ha_pub")
    assert consumed == 100
    with psycopg.connect(pg_pair.pg_node_dsn("standby").secret()) as conn:
        assert conn.execute("SELECT synced, failover FROM pg_replication_slots WHERE slot_name = 'ha_slot'"
                            ).fetchone() == (True, True)
    pg_pair.wait_standby_caught_up()

    report = pg_pair.promote()
    assert report["old_primary"] == "pg" and report["new_primary"] == "pg2"
    assert report["primary_lsn"] == report["standby_replay_lsn"]
    assert {"slot_name": "ha_slot", "slot_type": "logical", "failover": True, "synced": True} in report["slots"]
    assert pg_pair.status()["postgres"]["running"] is False  # the old primary is down until the next up

    # The same multi-host URL now reaches the promoted server, which has the data and takes writes.
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone() == (standby_port, False)
        assert conn.execute("SELECT count(*) FROM ha_orders WHERE note = 'before'").fetchone()[0] == 100
        conn.execute("INSERT INTO ha_orders VALUES (101, 'after')")
        # The synced slot works here and lost nothing: the rows consumed before the crash are
        # not replayed, the one written after is there.
        changes = conn.execute(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('ha_slot', NULL, NULL, "
            "'proto_version', '1', 'publication_names', 'ha_pub') WHERE substr(data, 1, 1) = 'I'"
        ).fetchone()[0]
        assert changes == 1

    # The next up rebuilds the old primary as a standby of the new one, never as a second primary.
    pg_pair.up()
    nodes = {n["node"]: n for n in pg_pair.status()["postgres"]["nodes"]}
    assert (nodes["pg"]["role"], nodes["pg2"]["role"]) == ("standby", "primary")
    assert all(n["running"] for n in nodes.values())
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] == standby_port
    pg_pair.wait_standby_caught_up()
    with psycopg.connect(pg_pair.pg_node_dsn("standby").secret()) as conn:
        assert conn.execute("SELECT count(*) FROM ha_orders").fetchone()[0] == 101


@pytest.mark.slow
def test_cli_ha_up_is_idempotent_and_down_leaves_no_process(dev_dir):  # noqa: F811 - the fixture
    started = time.monotonic()
    first = outbox(dev_dir, "dev", "up", "--kafka-brokers", "3", "--pg-standby")
    up_s = time.monotonic() - started
    env = parse_exports(first.stdout)
    assert len(env["OUTBOX_KAFKA_BOOTSTRAP"].split(",")) == 3
    assert env["OUTBOX_DATABASE_URL"].endswith("/app?target_session_attrs=read-write")
    assert env["OUTBOX_DATABASE_URL"].count("127.0.0.1:") == 2
    assert (dev_dir / "dev.env").read_text() == first.stdout
    password = Dsn(env["OUTBOX_DATABASE_URL"]).params()["password"]
    assert password not in first.stderr  # on stdout (for eval) and in the 0600 dev.env only

    pids = {p.pid for p in our_processes(dev_dir)}
    assert len(pids) >= 5  # 3 JVMs + 2 postmasters
    again = outbox(dev_dir, "dev", "up")  # the layout is remembered
    assert parse_exports(again.stdout) == env
    assert {p.pid for p in our_processes(dev_dir)} == pids

    status = outbox(dev_dir, "dev", "status").stdout
    assert "pg (primary): running" in status and "pg2 (standby): running" in status
    assert all(f"node {i}: running" in status for i in (1, 2, 3))
    refused = outbox(dev_dir, "dev", "up", "--kafka-brokers", "1", check=False)
    assert refused.returncode == 1 and "outbox dev down" in refused.stderr

    started = time.monotonic()
    down = outbox(dev_dir, "dev", "down")
    down_s = time.monotonic() - started
    assert "stopped: apache x3, postgres, postgres (pg2)" in down.stderr
    assert our_processes(dev_dir) == []
    assert "nothing was running" in outbox(dev_dir, "dev", "down").stderr
    print(f"CLI: up {up_s:.1f} s, down {down_s:.1f} s")
