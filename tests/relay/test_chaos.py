"""kill -9 of the relay at random points during a load, then restart: the guarantees of each mode.

at-least-once: every committed event is in Kafka (duplicates allowed, each with its event_id).
exactly-once:  a read_committed consumer sees every committed event exactly once.
Bounded: ~4,000 events, 4 kills, about 30 s per mode. The seed is printed to replay a failure.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time

import psycopg
import pytest

from tests.support.helpers import read_topic
from tests.support.relay import query, relay_env, relay_process, sigterm

TOTAL_EVENTS = 4000
KILLS = 4


def produce(db, rnd: random.Random, total: int, done: threading.Event) -> None:
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        emitted = 0
        while emitted < total:
            n = min(rnd.randint(1, 40), total - emitted)
            conn.execute(
                "SELECT outbox.emit('order', (i %% 31)::text, 'Placed', jsonb_build_object('seq', i)) "
                "FROM generate_series(%s::int, %s::int) i", (emitted, emitted + n - 1))
            emitted += n
            time.sleep(rnd.uniform(0, 0.006))
    done.set()


def diagnose(db, lost: set[str], log) -> str:
    rows = query(db, "SELECT event_id, txid::text, created_at::text FROM outbox.events WHERE event_id = ANY(%s::uuid[])",
                 (list(lost),))
    batches = query(db, "SELECT batch_id, relay_id, status, first_lsn::text, ack_lsn::text, events, xids::text, "
                        "resolution FROM outbox.relay_batches ORDER BY batch_id")
    return (f"lost {len(lost)}: {rows}\nbatches:\n" + "\n".join(map(str, batches)) +
            f"\nstatus: {query(db, 'SELECT * FROM outbox.relay_status')}\nlog:\n{log.read_text()[-6000:]}")


@pytest.mark.slow
# librdkafka's producer only where its difference matters most: Kafka transactions under kill -9.
@pytest.mark.parametrize("delivery,kafka_client", [("at-least-once", "kafka-python"), ("exactly-once", "kafka-python"),
                                                   ("exactly-once", "confluent-kafka")])
def test_kill_9_at_random_points_loses_nothing(db, kafka, topic_prefix, tmp_path, delivery, kafka_client):
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 30))
    print(f"chaos seed {seed} (CHAOS_SEED={seed} to replay)")
    rnd = random.Random(seed)
    env = relay_env(db, kafka, topic_prefix, delivery=delivery, batch_max_events=300, batch_max_age_ms=50,
                    kafka_client=kafka_client)
    log = tmp_path / "relay.log"
    done = threading.Event()
    producer = threading.Thread(target=produce, args=(db, random.Random(seed + 1), TOTAL_EVENTS, done))

    proc = relay_process(env, log)
    producer.start()
    for _ in range(KILLS):
        time.sleep(rnd.uniform(0.3, 2.5))
        proc.kill()  # SIGKILL: no cleanup of any kind
        proc.wait()
        time.sleep(rnd.uniform(0, 0.5))
        proc = relay_process(env, log)
    producer.join()
    assert done.is_set()

    emitted = {r[0] for r in query(db, "SELECT event_id::text FROM outbox.events")}
    assert len(emitted) == TOTAL_EVENTS
    isolation = "read_committed" if delivery == "exactly-once" else "read_uncommitted"
    records = read_topic(kafka, f"{topic_prefix}.order", expect=TOTAL_EVENTS, isolation=isolation, timeout=120,
                         settle=3.0)
    assert sigterm(proc) == 0, log.read_text()[-3000:]

    ids = [dict(r.headers)["event_id"].decode() for r in records]
    lost = emitted - set(ids)
    assert not lost, diagnose(db, lost, log)
    duplicates = sum(c - 1 for c in collections.Counter(ids).values())
    print(f"{delivery}: {len(ids)} records for {TOTAL_EVENTS} events, {duplicates} duplicates")
    if delivery == "exactly-once":
        assert duplicates == 0
        assert len(records) == TOTAL_EVENTS
    # The crashes left evidence, settled by the next relay, never an open in_flight batch.
    statuses = dict(query(db, "SELECT status, count(*) FROM outbox.relay_batches GROUP BY 1"))
    assert statuses.get("in_flight", 0) == 0, statuses
    assert "Traceback" not in log.read_text()
