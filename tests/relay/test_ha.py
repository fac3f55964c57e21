"""The engines users run: a three-broker Kafka cluster (RF 3, min ISR 2) and a PostgreSQL primary with
a streaming standby that gets promoted. Under a steady load: kill -9 of the broker that leads the
busiest partitions, a broker frozen past the request time-out, and a PostgreSQL failover."""

from __future__ import annotations

import collections
import json
import threading
import time

import psycopg
import pytest

from tests.support.helpers import read_topic, wait_for
from tests.support.relay import published, query, relay_env, relay_process, sigterm, wait_streaming

pytestmark = pytest.mark.slow


class Load:
    """Transactions of several events over 20 aggregates, each event numbered per aggregate; rides
    out outages (the database afterwards is the truth of what committed)."""

    def __init__(self, dsn):
        self.dsn, self.stop, self.thread = dsn, threading.Event(), threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.dsn.secret(), autocommit=True, connect_timeout=3) as conn:
                    while not self.stop.is_set():
                        conn.execute("SELECT outbox.emit('order', ((%s + i) %% 20)::text, 'Placed', "
                                     "jsonb_build_object('n', %s + i)) FROM generate_series(0, 4) i", (n, n))
                        n += 5
                        time.sleep(0.02)
            except psycopg.OperationalError:
                time.sleep(0.3)

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def check(dsn, kafka: str, topic: str, delivery: str) -> dict:
    """Nothing lost, exactly-once without duplicates, per-aggregate order of first deliveries."""
    rows = query(dsn, "SELECT event_id::text, aggregate_id, (payload->>'n')::bigint FROM outbox.events")
    isolation = "read_committed" if delivery == "exactly-once" else "read_uncommitted"
    records = read_topic(kafka, topic, expect=len(rows), isolation=isolation, timeout=120, settle=3.0)
    counts = collections.Counter(dict(r.headers)["event_id"].decode() for r in records)
    assert {r[0] for r in rows} - set(counts) == set(), "events lost"
    if delivery == "exactly-once":
        assert max(counts.values()) == 1, "duplicates for read_committed"
        assert set(counts) == {r[0] for r in rows}
    seen, order = set(), collections.defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        event_id = dict(r.headers)["event_id"].decode()
        if event_id not in seen:
            seen.add(event_id)
            order[r.key.decode()].append(int(json.loads(r.value)["n"]))
    for key, ns in order.items():
        assert ns == sorted(ns), f"aggregate {key} out of order"
    return {"events": len(rows), "duplicates": sum(counts.values()) - len(counts)}


def alter_system(dsn, change: str) -> None:
    with psycopg.connect(dsn.secret(), autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM {change}")
        conn.execute("SELECT pg_reload_conf()")


def busiest_leader(dev, topic: str) -> int:
    leaders = collections.Counter(dev.leaders(topic).values())
    return leaders.most_common(1)[0][0]


@pytest.mark.parametrize("fault", ["kill", "freeze"])
@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_broker_leading_the_busiest_partitions_fails_under_load_and_nothing_is_lost(ha, ha_db, topic_prefix,
                                                                                    tmp_path, delivery, fault):
    dev, urls = ha
    env = relay_env(ha_db, urls.kafka_bootstrap, topic_prefix, delivery=delivery, topic_partitions=6)
    proc = relay_process(env, tmp_path / "relay.log")
    try:
        wait_streaming(ha_db, timeout=60)
        topic = f"{topic_prefix}.order"
        with Load(ha_db):
            wait_for(lambda: published(ha_db) > 200, 60, "the relay to publish under load")
            node = busiest_leader(dev, topic)
            if fault == "kill":
                dev.kill_broker(node)
                time.sleep(8)
                dev.restart_broker(node)
            else:
                dev.pause_broker(node)
                time.sleep(35)  # longer than kafka-python's 30 s request time-out
                dev.resume_broker(node)
            time.sleep(5)
        wait_for(lambda: not query(ha_db, "SELECT 1 FROM outbox.in_flight LIMIT 1"), 180,
                 "every event to be published after the broker came back")
        result = check(ha_db, urls.kafka_bootstrap, topic, delivery)
        print(f"{fault} of broker {node}, {delivery}: {result}")
        assert sigterm(proc) == 0, (tmp_path / "relay.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_restarted_primary_still_holds_the_relay_behind_its_standby(ha, ha_db, topic_prefix, tmp_path):
    """A chaos run once restarted the primary without synchronized_standby_slots: the relay then
    published transactions the standby never received and, after the promotion, its checkpoint
    described WAL the new primary did not have. A primary that stops waiting for its standby is
    reported not failover-ready with the fix, and a restart keeps the setting."""
    dev, urls = ha
    pair = dev.pg_pair(dev._read_state())
    primary = pair.node_dsn("primary", database="postgres")
    standby_slot = f"outbox_dev_standby_{pair.standby_name}"
    env = relay_env(ha_db, urls.kafka_bootstrap, topic_prefix, delivery="exactly-once")
    proc = relay_process(env, tmp_path / "relay.log")

    def readiness():
        return query(ha_db, "SELECT failover_ready, failover_detail FROM outbox.relay_status")[0]

    try:
        wait_streaming(ha_db, timeout=60)
        dev.wait_slot_synced(f"slot_{topic_prefix}", timeout=120)
        wait_for(lambda: readiness()[0] is True, 30, "the relay to report failover readiness")

        alter_system(primary, "SET synchronized_standby_slots = ''")
        wait_for(lambda: readiness()[0] is False, 30, "the relay to report the primary not waiting for its standby")
        detail = readiness()[1]
        assert "synchronized_standby_slots is empty" in detail, detail
        assert f"ALTER SYSTEM SET synchronized_standby_slots = '{standby_slot}'" in detail, detail
        wait_for(lambda: "would not keep the relay's position" in (tmp_path / "relay.log").read_text(), 10,
                 "the relay to log the lost readiness")

        alter_system(primary, "RESET synchronized_standby_slots")
        assert dev.restart_primary(pause=0.5) == pair.primary_name
        assert query(primary, "SHOW synchronized_standby_slots") == [(standby_slot,)]
        wait_for(lambda: readiness()[0] is True, 60, "failover readiness after the primary's restart")
        assert sigterm(proc) == 0, (tmp_path / "relay.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_postgres_failover_to_the_standby_resumes_from_the_synchronized_slot(ha, ha_db, topic_prefix, tmp_path):
    """Runs last in this module: it promotes the standby. The failover slot was synchronized to the
    standby, the relay reconnects through the multi-host URL and goes on from it: nothing lost and,
    exactly-once, no duplicates (the checkpoint's timeline is an ancestor of the new one)."""
    dev, urls = ha
    env = relay_env(ha_db, urls.kafka_bootstrap, topic_prefix, delivery="exactly-once")
    log = tmp_path / "relay.log"
    proc = relay_process(env, log)
    try:
        wait_streaming(ha_db, timeout=60)
        slot = f"slot_{topic_prefix}"
        assert query(ha_db, "SELECT failover FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == [(True,)]
        with Load(ha_db):
            wait_for(lambda: published(ha_db) > 300, 60, "the relay to publish under load")
            dev.wait_slot_synced(slot, timeout=120)  # its copy on the standby persisted
            wait_for(lambda: query(ha_db, "SELECT failover_ready FROM outbox.relay_status")[0][0] is True, 30,
                     "the relay to report failover readiness")
            report = dev.promote()
            time.sleep(5)
        wait_for(lambda: not query(ha_db, "SELECT 1 FROM outbox.in_flight LIMIT 1")
                 and query(ha_db, "SELECT count(*) FROM outbox.relay_instances WHERE role = 'active'")[0][0], 180,
                 "the relay to publish everything from the promoted standby")
        result = check(ha_db, urls.kafka_bootstrap, f"{topic_prefix}.order", "exactly-once")
        print(f"failover {report}: {result}")
        assert "Traceback" not in log.read_text()
        assert sigterm(proc) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
