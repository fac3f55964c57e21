"""The Runner against the real Apache Kafka broker and PostgreSQL: duplicates delivered through
Kafka, positions owned by PostgreSQL, dead letters and their replay through the CLI."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import psycopg
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from pydantic import BaseModel

from inbox import Handlers, RetryPolicy, Runner
from outbox.cli import main as outbox_main
from tests.support.helpers import wait_for
from tests.support.inbox import (
    CLIENTS,
    Background,
    add_partitions,
    apply_deposit,
    caught_up,
    create_business_schema,
    create_topic,
    deposit,
    end_offsets,
    headers_for,
    produce,
)

FAST = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02, jitter=0)


class Deposited(BaseModel):
    account: str
    amount: int


def runner(db, kafka, consumer, topic, handler, **kw):
    kw.setdefault("policy", FAST)
    kw.setdefault("poll_timeout_s", 0.2)
    return Runner(consumer, handler, dsn=db, bootstrap=kafka, topics=[topic], **kw)


def counts(db, sql, *args):
    with psycopg.connect(db.secret()) as conn:
        return conn.execute(sql, args).fetchall()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("max_poll_records", [500, 1], ids=["one-poll", "poll-per-record"])
def test_event_delivered_five_times_through_kafka_applies_once(db, kafka, topic_prefix, max_poll_records, client):
    create_business_schema(db)
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, partitions=2)
    dup, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    # The same event five times (relay redeliveries keep key and event id), interleaved with others.
    sends = [(b"acc-1", deposit("acc-1", 10), headers_for(dup))] * 3 + [
        (b"acc-1", deposit("acc-1", 1), headers_for(a))] + [(b"acc-1", deposit("acc-1", 10), headers_for(dup))] * 2 + [
        (b"acc-2", deposit("acc-2", 5), headers_for(b, "acc-2"))]
    produce(kafka, topic, sends)
    calls = Counter()

    def handler(conn, msg):
        calls[msg.event_id] += 1
        apply_deposit(conn, msg)

    bg = Background(runner(db, kafka, "billing", topic, handler, max_poll_records=max_poll_records,
                           kafka_client=client))
    caught_up(db, "billing", kafka, topic)
    totals = bg.stop()
    assert calls == {dup: 1, a: 1, b: 1}
    assert sorted(counts(db, "SELECT account, balance FROM balances")) == [("acc-1", 11), ("acc-2", 5)]
    assert counts(db, "SELECT duplicates FROM outbox.inbox_messages WHERE event_id = %s", dup) == [(4,)]
    assert counts(db, "SELECT sum(processed)::int, sum(duplicates)::int FROM outbox.inbox_stats") == [(3, 4)]
    assert (totals.processed, totals.duplicates, totals.dead_lettered) == (3, 4, 0)


@pytest.mark.parametrize("client", CLIENTS)
def test_redelivered_events_apply_once_and_each_partition_reaches_the_handler_in_order(db, kafka, topic_prefix, client):
    """300 events over 3 partitions, 30 of them delivered a second time further down their partition
    (a relay restart): each event reaches the handler once, each partition's records in offset order
    with no gap but the suppressed duplicates, and the counters are exact."""
    create_business_schema(db)
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, partitions=3)
    events = [(uuid.uuid4(), f"acc-{i % 6}") for i in range(300)]
    sends = [(a.encode(), deposit(a, 1), headers_for(e, a)) for e, a in events]
    sends += [(a.encode(), deposit(a, 1), headers_for(e, a)) for e, a in events[100:130]]
    produce(kafka, topic, sends)
    ends = end_offsets(kafka, topic)
    assert sum(ends.values()) == 330
    seen: dict[int, list[int]] = {}
    calls = Counter()

    def handler(conn, msg):
        seen.setdefault(msg.partition, []).append(msg.offset)
        calls[msg.event_id] += 1
        apply_deposit(conn, msg)

    bg = Background(runner(db, kafka, "ordered", topic, handler, max_poll_records=50, kafka_client=client))
    caught_up(db, "ordered", kafka, topic)
    totals = bg.stop()
    assert calls == {e: 1 for e, _ in events}
    assert (totals.processed, totals.duplicates, totals.dead_lettered) == (300, 30, 0)
    # The handler saw every partition in strictly increasing offsets: the originals come first in
    # each partition, so what it saw is offsets 0 .. (partition's originals - 1), in order.
    assert {p: offsets == list(range(len(offsets))) for p, offsets in seen.items()} == {0: True, 1: True, 2: True}
    assert sum(len(offsets) for offsets in seen.values()) == 300
    assert counts(db, "SELECT count(*), count(DISTINCT event_id), sum(amount)::int FROM applied") == [(300, 300, 300)]
    assert counts(db, "SELECT sum(duplicates)::int FROM outbox.inbox_messages") == [(30,)]
    assert dict(counts(db, "SELECT kafka_partition, next_offset FROM outbox.inbox_offsets WHERE consumer = 'ordered'")) \
        == {p: n for p, n in ends.items() if n}


@pytest.mark.parametrize("client", CLIENTS)
def test_positions_come_from_postgresql_and_are_copied_to_the_kafka_group(db, kafka, topic_prefix, client):
    """Rewind the Kafka group to 0 behind the consumer's back: a restart must resume from
    PostgreSQL's offsets (no record handed over again, none suppressed), not from Kafka's."""
    create_business_schema(db)
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, partitions=1)
    produce(kafka, topic, [(b"acc-1", deposit("acc-1", 1), headers_for(uuid.uuid4())) for _ in range(20)])
    calls = Counter()

    def handler(conn, msg):
        calls[msg.offset] += 1
        apply_deposit(conn, msg)

    bg = Background(runner(db, kafka, "ledger", topic, handler, kafka_client=client))
    caught_up(db, "ledger", kafka, topic)
    bg.stop()
    tp = TopicPartition(topic, 0)
    group = KafkaConsumer(bootstrap_servers=kafka, group_id="ledger", enable_auto_commit=False)
    assert group.committed(tp) == 20  # copied after the PostgreSQL commit, for lag tools
    group.assign([tp])
    group.commit({tp: OffsetAndMetadata(0, "", -1)})
    group.close()

    produce(kafka, topic, [(b"acc-1", deposit("acc-1", 1), headers_for(uuid.uuid4())) for _ in range(3)])
    bg = Background(runner(db, kafka, "ledger", topic, handler, kafka_client=client))
    caught_up(db, "ledger", kafka, topic)
    totals = bg.stop()
    assert (totals.processed, totals.duplicates) == (3, 0)
    assert calls == {offset: 1 for offset in range(23)}
    assert counts(db, "SELECT balance FROM balances") == [(23,)]


def test_poison_records_are_dead_lettered_the_partition_continues_and_replay_works(db, kafka, topic_prefix,
                                                                                   monkeypatch, capsys):
    create_business_schema(db)
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, partitions=1)
    ids = [uuid.uuid4() for _ in range(6)]
    poison = ids[2]
    sends = [(b"acc-1", deposit("acc-1", 1), headers_for(i)) for i in ids]
    sends.insert(4, (b"acc-1", deposit("acc-1", 100), [("traceparent", b"00-abc-01")]))  # no event_id
    sends.insert(5, (b"acc-1", deposit("acc-1", 100), [("event_id", b"order-17")]))  # not a UUID
    sends.append((b"acc-1", deposit("acc-1", 1), headers_for(poison)))  # a redelivery of the poison event
    produce(kafka, topic, sends)
    broken = {"on": True}
    seen = []

    def handler(conn, msg):
        seen.append(msg.offset)
        if broken["on"] and msg.event_id == poison:
            raise RuntimeError("ledger rejects this deposit")
        apply_deposit(conn, msg)

    bg = Background(runner(db, kafka, "ledger", topic, handler, replay_check_s=0.1))
    caught_up(db, "ledger", kafka, topic)
    applied = {r[0] for r in counts(db, "SELECT event_id FROM applied")}
    assert applied == set(ids) - {poison}
    assert seen.count(2) == 3  # the poison record: three attempts, then the partition moved on
    dead = counts(db, "SELECT id, reason, attempts, kafka_offset, status FROM outbox.inbox_dead_letters ORDER BY id")
    assert [row[1:] for row in dead] == [("handler_failed", 3, 2, "dead"), ("invalid_envelope", 0, 4, "dead"),
                                         ("invalid_envelope", 0, 5, "dead")]
    assert counts(db, "SELECT duplicates FROM outbox.inbox_messages WHERE event_id = %s", poison) == [(1,)]

    monkeypatch.setenv("OUTBOX_DATABASE_URL", db.secret())
    assert outbox_main(["inbox", "dead-letters", "--consumer", "ledger"]) == 0
    listing = capsys.readouterr().out
    assert f"replay: outbox inbox replay --consumer ledger --id {dead[0][0]}" in listing
    assert "ledger rejects this deposit" in listing and "fix the producer" in listing

    # The operator replays the invalid ones too: refused with the reason, exit 1.
    assert outbox_main(["inbox", "replay", "--consumer", "ledger", "--id", str(dead[1][0])]) == 1
    assert "cannot go through the inbox" in capsys.readouterr().err

    broken["on"] = False
    assert outbox_main(["inbox", "replay", "--consumer", "ledger", "--id", str(dead[0][0]), "--dry-run"]) == 0
    assert outbox_main(["inbox", "discard", "--consumer", "ledger", "--id", str(dead[0][0]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would replay #{dead[0][0]}: event {poison}" in out and f"would discard #{dead[0][0]}" in out
    time.sleep(0.5)  # two replay checks of the running consumer: a dry run must not have requested anything
    assert counts(db, "SELECT status FROM outbox.inbox_dead_letters WHERE id = %s", dead[0][0]) == [("dead",)]
    assert outbox_main(["inbox", "replay", "--consumer", "ledger", "--id", str(dead[0][0]), "--wait", "30"]) == 0
    assert f"dead letter {dead[0][0]}: replayed" in capsys.readouterr().out
    totals = bg.stop()
    assert sorted(r[0] for r in counts(db, "SELECT event_id FROM applied")) == sorted(ids)
    assert counts(db, "SELECT balance FROM balances") == [(6,)]
    assert counts(db, "SELECT status FROM outbox.inbox_messages WHERE event_id = %s", poison) == [("processed",)]
    assert totals.dead_lettered == 3 and totals.duplicates == 1
    assert outbox_main(["inbox", "discard", "--consumer", "ledger", "--id", str(dead[1][0]), str(dead[2][0])]) == 0
    assert outbox_main(["inbox", "dead-letters", "--consumer", "ledger"]) == 0
    assert "no dead letters for consumer ledger" in capsys.readouterr().out


def test_dead_letter_replay_is_served_while_idle_with_parallel_partitions(db, kafka, topic_prefix, monkeypatch,
                                                                          capsys):
    # With several workers an empty poll used to submit nothing at all, so a replay requested while
    # the topic was quiet waited for the next record to arrive.
    create_business_schema(db)
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, partitions=2)
    poison = uuid.uuid4()
    produce(kafka, topic, [(b"acc-1", deposit("acc-1", 1), headers_for(poison))])
    broken = {"on": True}

    def handler(conn, msg):
        if broken["on"]:
            raise RuntimeError("ledger rejects this deposit")
        apply_deposit(conn, msg)

    bg = Background(runner(db, kafka, "ledger", topic, handler, replay_check_s=0.1, parallel_partitions=2))
    caught_up(db, "ledger", kafka, topic)
    [(dead_id,)] = counts(db, "SELECT id FROM outbox.inbox_dead_letters WHERE status = 'dead'")
    broken["on"] = False
    monkeypatch.setenv("OUTBOX_DATABASE_URL", db.secret())
    assert outbox_main(["inbox", "replay", "--consumer", "ledger", "--id", str(dead_id), "--wait", "20"]) == 0
    assert f"dead letter {dead_id}: replayed" in capsys.readouterr().out
    bg.stop()
    assert counts(db, "SELECT event_id FROM applied") == [(poison,)]


@pytest.mark.parametrize("client", CLIENTS)
def test_manual_assignment_seeks_to_stored_offsets(db, kafka, topic_prefix, client):
    create_business_schema(db)
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, partitions=2)
    produce(kafka, topic, [(f"acc-{i}".encode(), deposit(f"acc-{i}", 1), headers_for(uuid.uuid4(), f"acc-{i}"))
                           for i in range(10)])
    ends = end_offsets(kafka, topic)
    bg = Background(Runner("pinned", apply_deposit, dsn=db, bootstrap=kafka, partitions=[(topic, 0), (topic, 1)],
                           group_id=None, poll_timeout_s=0.2, kafka_client=client))
    caught_up(db, "pinned", kafka, topic)
    assert bg.stop().processed == 10
    # No group, so no Kafka offsets: only PostgreSQL knows where this consumer is.
    produce(kafka, topic, [(b"acc-1", deposit("acc-1", 1), headers_for(uuid.uuid4()))] * 2)
    bg = Background(Runner("pinned", apply_deposit, dsn=db, bootstrap=kafka, partitions=[(topic, 0), (topic, 1)],
                           group_id=None, poll_timeout_s=0.2, kafka_client=client))
    caught_up(db, "pinned", kafka, topic)
    totals = bg.stop()
    assert (totals.processed, totals.duplicates) == (1, 1)  # the same event twice, nothing older re-read
    assert sum(ends.values()) == 10


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("parallel", [1, 2], ids=["one-worker", "parallel-partitions-typed-handlers"])
def test_rebalance_between_two_instances_hands_partitions_over_without_overlap(db, kafka, topic_prefix, parallel,
                                                                               client):
    """A second instance joins mid-load: the first finishes and commits its batch in flight before
    giving partitions up, the second resumes from PostgreSQL's offsets. Nothing is handed to a
    handler twice (not even a suppressed duplicate), nothing is skipped."""
    create_business_schema(db)
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, partitions=4)
    # ~15 s of work for one instance: comfortably longer than a group rebalance (a heartbeat interval
    # of 3 s plus the rejoin), so the second instance always joins mid-load, even on a busy machine.
    accounts = [f"acc-{i % 8}" for i in range(1500)]
    produce(kafka, topic, [(a.encode(), deposit(a, 1), headers_for(uuid.uuid4(), a)) for a in accounts])
    calls = Counter()

    def slow(conn, msg):
        calls[msg.event_id] += 1
        apply_deposit(conn, msg)
        time.sleep(0.01)

    handle = slow
    if parallel > 1:  # and dispatch by event type, the payload validated first
        handle = Handlers()
        handle.on("Deposited", Deposited)(lambda conn, msg, deposited: slow(conn, msg))
    first = Background(runner(db, kafka, "shared", topic, handle, max_poll_records=20, parallel_partitions=parallel,
                              kafka_client=client))
    wait_for(lambda: first.runner.totals.processed >= 60, 30, "the first instance to make progress")
    second = Background(runner(db, kafka, "shared", topic, handle, max_poll_records=20, parallel_partitions=parallel,
                               kafka_client=client))
    wait_for(lambda: second.runner.totals.processed > 0, 60, "the second instance to get partitions")
    caught_up(db, "shared", kafka, topic)
    a, b = first.stop(), second.stop()
    assert set(calls.values()) == {1} and len(calls) == 1500
    assert a.processed + b.processed == 1500 and a.duplicates + b.duplicates == 0
    assert counts(db, "SELECT count(*), count(DISTINCT event_id) FROM applied") == [(1500, 1500)]


@pytest.mark.parametrize("client", CLIENTS)
def test_partitions_added_to_a_subscribed_topic_are_consumed_from_their_first_record(db, kafka, topic_prefix,
                                                                                     client):
    """A producer writes to a partition added under a running Runner before the group has
    rebalanced onto it. The Runner must start that partition at its first record (no position is
    stored for it yet), not at its end, or those events would be skipped without a trace."""
    create_business_schema(db)
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, partitions=1)
    first = [uuid.uuid4() for _ in range(10)]
    added = [uuid.uuid4() for _ in range(10)]
    produce(kafka, topic, [(b"acc-0", deposit("acc-0", 1), headers_for(e, "acc-0")) for e in first], partition=0)
    bg = Background(runner(db, kafka, "grown", topic, apply_deposit, kafka_client=client,
                           kafka_config={"metadata_max_age_ms": 1000}))
    try:
        wait_for(lambda: bg.runner.totals.processed == 10, 60, "the first partition's 10 events")
        add_partitions(kafka, topic, 2)
        produce(kafka, topic, [(b"acc-1", deposit("acc-1", 1), headers_for(e, "acc-1")) for e in added], partition=1)
        caught_up(db, "grown", kafka, topic, timeout=60)
    finally:
        totals = bg.stop()
    assert totals.processed == 20 and totals.duplicates == 0
    assert counts(db, "SELECT account, count(*)::int FROM applied GROUP BY account ORDER BY account") == \
        [("acc-0", 10), ("acc-1", 10)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("client", CLIENTS)
def test_runner_survives_a_postgresql_restart_and_resumes_from_the_stored_offsets(kafka, topic_prefix, caplog, client):
    """PostgreSQL goes away under a running Runner (mid-batch, with records still arriving) and comes
    back on the same port. The Runner must not exit: it reconnects and resumes from the offsets
    stored in PostgreSQL, so every event is applied exactly once. A server of its own, so that
    restarting it disturbs no other test."""
    import shutil

    from outbox.core.migrate import migrate
    from outbox.devstack.postgres import EmbeddedPostgres
    from tests.support.paths import TEST_STACK_DIR

    root = TEST_STACK_DIR / f"pg-inbox-restart-{uuid.uuid4().hex[:8]}"
    pg = EmbeddedPostgres(root)
    try:
        db = pg.start()
        port = pg.status().port
        migrate(db, log=lambda _: None)
        create_business_schema(db)
        topic = f"{topic_prefix}.deposits"
        create_topic(kafka, topic, partitions=2)
        first = [(uuid.uuid4(), f"acc-{n % 5}") for n in range(300)]
        second = [(uuid.uuid4(), f"acc-{n % 5}") for n in range(300)]
        produce(kafka, topic, [(a.encode(), deposit(a, 1), headers_for(e, a)) for e, a in first])

        def handler(conn, msg):
            apply_deposit(conn, msg)
            time.sleep(0.002)  # batches take long enough for the stop to land inside one

        def applied_count():
            return counts(db, "SELECT count(*) FROM applied")[0][0]

        with caplog.at_level("INFO", logger="inbox"):
            bg = Background(runner(db, kafka, "restart", topic, handler, max_poll_records=50, kafka_client=client))
            wait_for(lambda: applied_count() >= 100, 60, "the runner to make progress")
            pg.stop()
            produce(kafka, topic, [(a.encode(), deposit(a, 1), headers_for(e, a)) for e, a in second])
            time.sleep(3)  # several reconnection attempts fail meanwhile
            assert bg.thread.is_alive() and bg.error == [], bg.error
            assert pg.start(port) == db
            caught_up(db, "restart", kafka, topic, timeout=90)
            totals = bg.stop()
        applied = Counter(r[0] for r in counts(db, "SELECT event_id FROM applied"))
        assert applied == {e: 1 for e, _ in first + second}  # no gap, no double apply across the restart
        assert counts(db, "SELECT sum(balance)::int FROM balances") == [(600,)]
        assert counts(db, "SELECT sum(processed)::int, sum(dead_lettered)::int FROM outbox.inbox_stats") == [(600, 0)]
        assert totals.dead_lettered == 0
        messages = [r.getMessage() for r in caplog.records]
        assert any("lost its PostgreSQL connection" in m for m in messages), caplog.text
        assert any("reconnected to PostgreSQL" in m for m in messages), caplog.text
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_parallel_partitions_run_partitions_at_once_each_in_order_and_each_event_once(db, kafka, topic_prefix):
    """parallel_partitions=3 over 3 partitions with a handler that waits (I/O): handlers of
    different partitions overlap, never two of one partition, each partition's records reach the
    handler in offset order, every event once, and the stored offsets reach the end."""
    create_business_schema(db)
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, partitions=3)
    accounts = [f"acc-{i % 9}" for i in range(300)]
    produce(kafka, topic, [(a.encode(), deposit(a, 1), headers_for(uuid.uuid4(), a)) for a in accounts])
    lock = threading.Lock()
    running: Counter = Counter()  # partition -> handlers running now
    seen: dict[int, list[int]] = {}
    most_at_once = 0
    overlaps = []  # partitions that had two handlers at once (an assert in a handler would be retried)

    def waits(conn, msg):
        nonlocal most_at_once
        with lock:
            running[msg.partition] += 1
            if running[msg.partition] > 1:
                overlaps.append(msg.partition)
            most_at_once = max(most_at_once, sum(running.values()))
            seen.setdefault(msg.partition, []).append(msg.offset)
        apply_deposit(conn, msg)
        time.sleep(0.005)
        with lock:
            running[msg.partition] -= 1

    bg = Background(runner(db, kafka, "parallel", topic, waits, max_poll_records=50, parallel_partitions=3))
    caught_up(db, "parallel", kafka, topic)
    totals = bg.stop()
    assert totals.processed == 300 and totals.duplicates == 0 and overlaps == []
    assert {p: offsets == sorted(offsets) and len(offsets) == len(set(offsets)) for p, offsets in seen.items()} \
        == {0: True, 1: True, 2: True}
    assert sum(len(o) for o in seen.values()) == 300
    assert most_at_once >= 2, "the partitions never ran at the same time"
    assert counts(db, "SELECT count(*), count(DISTINCT event_id), sum(amount) FROM applied") == [(300, 300, 300)]
