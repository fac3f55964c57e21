"""kill -9 of a consumer process at random points over a load: every event's effect happens
exactly once in PostgreSQL, with no gaps; SIGTERM finishes the batch in flight and exits 0.

The business tables have no unique constraints: an event applied twice would show as a second
ledger row and a wrong balance. Seeded for reproducibility (OUTBOX_TEST_SEED)."""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections import Counter

import psycopg
import pytest

from tests.support.helpers import wait_for
from tests.support.inbox import (
    CLIENTS,
    create_business_schema,
    create_topic,
    deposit,
    end_offsets,
    headers_for,
    produce,
    stored_offsets,
)
from tests.workers.process import WorkerProcess

EVENTS = 1500
REDELIVERIES = 150


def worker(db, kafka, topic, *extra, parallel: int = 1, client: str = "kafka-python") -> WorkerProcess:
    env = {"OUTBOX_DATABASE_URL": db.secret(), "OUTBOX_KAFKA_BOOTSTRAP": kafka}
    extra = (*extra, "--parallel", str(parallel), "--typed") if parallel > 1 else extra
    extra = (*extra, "--client", client) if client != "kafka-python" else extra
    return WorkerProcess("tests.workers.inbox_worker", "--topic", topic, "--consumer", "bank", "--handler-sleep-ms", "1",
                         *extra, env=env, name=f"inbox worker {' '.join(extra)}".strip())


def wait_ready(w: WorkerProcess) -> None:
    """Until the runner started (its SIGTERM handler is installed from then on)."""
    wait_for(lambda: any("starting" in line for line in w.lines) or w.proc.poll() is not None,
               60, "the worker to start")


def progress(db) -> int:
    with psycopg.connect(db.secret()) as conn:
        return conn.execute("SELECT count(*) FROM applied").fetchone()[0]


def assert_consistent(db):
    """What a crash may never leave behind: a double apply, or an applied event the inbox forgot."""
    with psycopg.connect(db.secret()) as conn:
        doubles = conn.execute("SELECT event_id, count(*) FROM applied GROUP BY 1 HAVING count(*) > 1").fetchall()
        orphans = conn.execute("SELECT count(*) FROM applied a LEFT JOIN outbox.inbox_messages m "
                               "ON m.event_id = a.event_id AND m.consumer = 'bank' WHERE m.event_id IS NULL").fetchone()
        balance = conn.execute("SELECT coalesce(sum(balance), 0) FROM balances").fetchone()[0]
        ledger = conn.execute("SELECT coalesce(sum(amount), 0) FROM applied").fetchone()[0]
    assert doubles == [] and orphans == (0,) and balance == ledger


@pytest.mark.timeout(240)
@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("parallel", [1, 3], ids=["one-worker", "parallel-partitions-typed-handlers"])
def test_kill_9_at_random_points_never_applies_an_event_twice_or_skips_one(db, kafka, topic_prefix, parallel, client):
    """With parallel_partitions=3 the worker also dispatches through Handlers (a pydantic model per
    event type): neither may change what a crash can leave behind. Both Kafka clients: with
    confluent-kafka the positions PostgreSQL holds reach librdkafka as the assignment's start offsets."""
    seed = int(os.environ.get("OUTBOX_TEST_SEED", random.randrange(1 << 30)))
    print(f"OUTBOX_TEST_SEED={seed}")
    rng = random.Random(seed)
    create_business_schema(db)
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, partitions=3)
    events = [(uuid.uuid4(), f"acc-{i % 12}", rng.randint(1, 100)) for i in range(EVENTS)]
    sends = [(acc.encode(), deposit(acc, amount), headers_for(eid, acc)) for eid, acc, amount in events]
    # Redeliveries of earlier events, as a relay restart would produce, spread through the load.
    for _ in range(REDELIVERIES):
        sends.insert(rng.randrange(len(sends) // 2, len(sends)), sends[rng.randrange(len(sends) // 2)])
    produce(kafka, topic, sends)
    ends = {p: n for p, n in end_offsets(kafka, topic).items() if n}
    assert sum(ends.values()) == EVENTS + REDELIVERIES

    kills = 0
    for round_no in range(8):
        if progress(db) == EVENTS:
            break
        before = progress(db)
        if round_no % 2 == 0:  # die between a handler's writes and the commit
            # Duplicates never reach the handler, so a count past the events still unapplied would
            # never come and the worker would idle until the wait gives up.
            kill_after = rng.randint(1, min(250, EVENTS - before))
            with worker(db, kafka, topic, "--kill-after", str(kill_after), parallel=parallel, client=client) as w:
                assert w.wait(60) == -signal.SIGKILL
        else:  # die wherever the process happens to be (polling, committing, copying offsets...)
            with worker(db, kafka, topic, parallel=parallel, client=client) as w:
                w.wait_for(lambda before=before: progress(db) > before, 60, "the worker to make progress")
                time.sleep(rng.uniform(0, 0.5))
                w.signal(signal.SIGKILL)
                assert w.wait(30) == -signal.SIGKILL
        kills += 1
        assert_consistent(db)
        print(f"round {round_no}: killed at {progress(db)} of {EVENTS} applied")

    # Graceful stop mid-load: the batch in flight commits, the process exits 0.
    with worker(db, kafka, topic, parallel=parallel, client=client) as w:
        wait_ready(w)
        if progress(db) < EVENTS:
            before = progress(db)
            w.wait_for(lambda: progress(db) > before, 60, "the worker to make progress")
        w.signal(signal.SIGTERM)
        assert w.wait(30) == 0
        assert "stopped:" in w.log()
    assert_consistent(db)

    with worker(db, kafka, topic, parallel=parallel, client=client) as w:
        wait_ready(w)
        try:
            w.wait_for(lambda: stored_offsets(db, "bank", topic) == ends, 90, "the last worker to catch up")
        finally:
            w.signal(signal.SIGTERM)
        assert w.wait(30) == 0
    assert kills >= 3

    with psycopg.connect(db.secret()) as conn:
        applied = Counter(r[0] for r in conn.execute("SELECT event_id FROM applied"))
        balances = dict(conn.execute("SELECT account, balance FROM balances"))
        dupes = conn.execute("SELECT sum(duplicates) FROM outbox.inbox_messages WHERE consumer = 'bank'").fetchone()[0]
        stats = conn.execute("SELECT sum(processed), sum(duplicates), sum(dead_lettered) FROM outbox.inbox_stats "
                             "WHERE consumer = 'bank'").fetchone()
    assert applied == {eid: 1 for eid, _, _ in events}  # every event once: no double, no gap
    expected = Counter()
    for _, acc, amount in events:
        expected[acc] += amount
    assert balances == dict(expected)
    # Every delivery was counted exactly once too: committed work is never counted twice.
    assert dupes == REDELIVERIES
    assert stats == (EVENTS, REDELIVERIES, 0)
