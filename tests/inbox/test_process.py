"""process(): the commit protocol against the real PostgreSQL, fed with record look-alikes (the Kafka
side is covered by test_inbox_runner). Every count is exact: the business tables have no unique
constraints, so a double apply would show."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import psycopg
import pytest

from inbox import InboxError, RetryPolicy, process, replay_requested
from inbox.replay import Selection, request_replay
from tests.support.inbox import Rec, apply_deposit, deposit, headers_for

FAST = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02, jitter=0)


def records(events, topic="orders", partition=0, start=0):
    """events: list of (event_id, account, amount)."""
    return [Rec(topic, partition, start + i, deposit(acc, amount), headers_for(eid, acc))
            for i, (eid, acc, amount) in enumerate(events)]


def applied(conn):
    return Counter(r[0] for r in conn.execute("SELECT event_id FROM applied"))


def balances(conn):
    return dict(conn.execute("SELECT account, balance FROM balances"))


def inbox_row(conn, event_id, consumer="c"):
    return conn.execute("SELECT status, duplicates, kafka_offset, processed_at IS NOT NULL FROM outbox.inbox_messages "
                        "WHERE event_id = %s AND consumer = %s", (event_id, consumer)).fetchone()


def offsets(conn, consumer="c"):
    return dict(((t, p), n) for t, p, n in conn.execute(
        "SELECT topic, kafka_partition, next_offset FROM outbox.inbox_offsets WHERE consumer = %s", (consumer,)))


def stats(conn, consumer="c"):
    return conn.execute("SELECT coalesce(sum(processed), 0), coalesce(sum(duplicates), 0), "
                        "coalesce(sum(dead_lettered), 0) FROM outbox.inbox_stats WHERE consumer = %s",
                        (consumer,)).fetchone()


@pytest.mark.parametrize("split", [[5], [1, 1, 1, 1, 1], [2, 3]], ids=["one-batch", "five-batches", "two-batches"])
def test_same_event_five_times_applies_once_and_counts_four_duplicates(conn, split):
    eid = uuid.uuid4()
    recs = records([(eid, "acc-1", 10)] * 5)
    results, pos = [], 0
    for size in split:
        results.append(process(conn, "c", recs[pos:pos + size], apply_deposit))
        pos += size
    assert applied(conn) == {eid: 1}
    assert balances(conn) == {"acc-1": 10}
    assert inbox_row(conn, eid) == ("processed", 4, 0, True)
    assert sum(r.processed for r in results) == 1 and sum(r.duplicates for r in results) == 4
    assert offsets(conn) == {("orders", 0): 5}
    assert stats(conn) == (1, 4, 0)


def test_duplicates_are_counted_by_cause_the_same_kafka_record_or_another_record_of_the_event(conn):
    e, f = uuid.uuid4(), uuid.uuid4()
    first = records([(e, "acc-1", 10)])[0]
    republished = records([(e, "acc-1", 10)], start=1)[0]
    process(conn, "c", [first], apply_deposit)
    process(conn, "c", [first], apply_deposit)  # Kafka delivered the same record again
    process(conn, "c", [republished], apply_deposit)  # another record carries the event id
    process(conn, "c", [first, *records([(e, "acc-1", 10)], start=2)], apply_deposit)  # one of each
    process(conn, "c", records([(f, "acc-2", 5)] * 2, start=3), apply_deposit)  # new, then a repeat in the batch

    def causes(event_id):
        return conn.execute("SELECT duplicates, redeliveries FROM outbox.inbox_messages WHERE event_id = %s "
                            "AND consumer = 'c'", (event_id,)).fetchone()

    assert causes(e) == (4, 2)
    assert causes(f) == (1, 0)
    assert conn.execute("SELECT sum(duplicates), sum(redelivered) FROM outbox.inbox_stats "
                        "WHERE consumer = 'c'").fetchone() == (5, 2)
    assert applied(conn) == {e: 1, f: 1}


def test_consumers_dedupe_independently(conn):
    eid = uuid.uuid4()
    for consumer in ("billing", "shipping", "billing"):
        process(conn, consumer, records([(eid, "acc-1", 10)]), apply_deposit)
    assert applied(conn) == {eid: 2}  # once per consumer
    assert inbox_row(conn, eid, "billing")[1] == 1 and inbox_row(conn, eid, "shipping")[1] == 0


def test_handler_writes_inbox_rows_and_offsets_roll_back_together(conn):
    """A batch whose handler fails is rolled back whole, then the records before the failing one
    commit on their own: the earlier records' writes exist exactly once although their handler ran twice."""
    ids = [uuid.uuid4() for _ in range(5)]
    calls = Counter()

    def handler(c, msg):
        calls[msg.event_id] += 1
        apply_deposit(c, msg)
        if msg.event_id == ids[2] and msg.attempt == 1:
            raise RuntimeError("transient")

    result = process(conn, "c", records([(i, "acc-1", 1) for i in ids]), handler, policy=FAST)
    assert applied(conn) == {i: 1 for i in ids}
    assert balances(conn) == {"acc-1": 5}
    assert calls == {ids[0]: 2, ids[1]: 2, ids[2]: 2, ids[3]: 1, ids[4]: 1}
    assert (result.processed, result.duplicates, result.dead_lettered) == (5, 0, 0)
    assert result.committed == {("orders", 0): 5} and result.unprocessed == {}
    # prefix [0, 2) + record 2 alone + rest [3, 5)
    assert result.transactions == 3
    assert conn.execute("SELECT attempt FROM applied WHERE event_id = %s", (ids[2],)).fetchone() == (2,)


def test_record_failing_every_attempt_is_dead_lettered_and_its_partition_moves_on(conn):
    ids = [uuid.uuid4() for _ in range(4)]
    other = uuid.uuid4()
    attempts = Counter()

    def handler(c, msg):
        if msg.event_id == ids[1]:
            attempts[msg.attempt] += 1
            raise ValueError(f"cannot apply {msg.event_id}")
        apply_deposit(c, msg)

    batch = records([(i, "acc-1", 1) for i in ids]) + records([(other, "acc-2", 7)], partition=1)
    result = process(conn, "c", batch, handler, policy=FAST)
    assert attempts == {1: 1, 2: 1, 3: 1}
    assert (result.processed, result.dead_lettered) == (4, 1)
    assert applied(conn) == {ids[0]: 1, ids[2]: 1, ids[3]: 1, other: 1}
    # Partition 0 was applied in offset order around the dead letter.
    assert [r[0] for r in conn.execute("SELECT event_id FROM applied WHERE account = 'acc-1' ORDER BY at")] == [
        ids[0], ids[2], ids[3]]
    assert offsets(conn) == {("orders", 0): 4, ("orders", 1): 1}
    dl = conn.execute("SELECT reason, attempts, error, event_id, kafka_offset, payload, headers->0->>'name', status "
                      "FROM outbox.inbox_dead_letters").fetchall()
    assert dl == [("handler_failed", 3, f"ValueError: cannot apply {ids[1]}", ids[1], 1,
                   {"account": "acc-1", "amount": 1}, "event_id", "dead")]
    assert inbox_row(conn, ids[1]) == ("dead_lettered", 0, 1, False)
    assert stats(conn) == (4, 0, 1)

    # A redelivery of the dead-lettered event is suppressed, not dead-lettered a second time.
    again = process(conn, "c", records([(ids[1], "acc-1", 1)], start=4), handler, policy=FAST)
    assert (again.processed, again.duplicates, again.dead_lettered) == (0, 1, 0)
    assert conn.execute("SELECT count(*) FROM outbox.inbox_dead_letters").fetchone() == (1,)
    assert inbox_row(conn, ids[1]) == ("dead_lettered", 1, 1, False)


def test_records_without_a_valid_event_id_are_dead_lettered_not_handled(conn):
    good = uuid.uuid4()
    batch = [
        Rec("orders", 0, 0, deposit("acc-1", 1), [("traceparent", b"00-abc")]),
        Rec("orders", 0, 1, deposit("acc-1", 2), [("event_id", b"42")]),
        Rec("orders", 0, 2, deposit("acc-1", 3), headers_for(good)),
        Rec("orders", 0, 3, None, [("event_id", str(good).encode()), ("event_id", str(uuid.uuid4()).encode())]),
    ]
    seen = []
    result = process(conn, "c", batch, lambda c, m: (seen.append(m.offset), apply_deposit(c, m)))
    assert seen == [2]
    assert (result.processed, result.dead_lettered) == (1, 3)
    assert offsets(conn) == {("orders", 0): 4}
    rows = conn.execute("SELECT kafka_offset, reason, error, event_id, attempts, status FROM outbox.inbox_dead_letters "
                        "ORDER BY kafka_offset").fetchall()
    assert [(o, r, e is not None, x, a, s) for o, r, e, x, a, s in rows] == [
        (0, "invalid_envelope", True, None, 0, "dead"), (1, "invalid_envelope", True, None, 0, "dead"),
        (3, "invalid_envelope", True, None, 0, "dead")]
    assert "no event_id header" in rows[0][2] and "'42' is not a UUID" in rows[1][2]
    assert "more than one event_id header" in rows[2][2]
    # Such a dead letter cannot be replayed through the inbox, and the refusal says what to do.
    requested, refused = request_replay(conn, Selection("c", ids=[1]))
    assert requested == [] and "fix the producer" in refused[1]


def test_dead_letter_replay_runs_the_handler_once_and_is_not_taken_for_a_duplicate(conn):
    eid, other = uuid.uuid4(), uuid.uuid4()
    broken = {"on": True}

    def handler(c, msg):
        if broken["on"] and msg.event_id == eid:
            raise RuntimeError("downstream table missing")
        apply_deposit(c, msg)

    process(conn, "c", records([(eid, "acc-1", 5), (other, "acc-1", 1)]), handler, policy=FAST)
    dl_id = conn.execute("SELECT id FROM outbox.inbox_dead_letters").fetchone()[0]

    # Not requested yet: nothing happens.
    assert replay_requested(conn, "c", handler).replayed == []

    # Replay while still broken: the dead letter comes back with the new error.
    assert request_replay(conn, Selection("c", ids=[dl_id])) == ([dl_id], {})
    report = replay_requested(conn, "c", handler)
    assert report.replayed == [] and "downstream table missing" in report.failed[dl_id]
    assert conn.execute("SELECT status, replay_attempts FROM outbox.inbox_dead_letters").fetchone() == ("dead", 1)
    assert applied(conn) == {other: 1}

    broken["on"] = False
    assert request_replay(conn, Selection("c", event_ids=[eid])) == ([dl_id], {})
    assert replay_requested(conn, "c", handler).replayed == [dl_id]
    assert applied(conn) == {eid: 1, other: 1}
    assert conn.execute("SELECT attempt FROM applied WHERE event_id = %s", (eid,)).fetchone() == (5,)  # 3 + 1 + 1
    assert inbox_row(conn, eid) == ("processed", 0, 0, True)
    assert conn.execute("SELECT status, replayed_at IS NOT NULL FROM outbox.inbox_dead_letters").fetchone() == (
        "replayed", True)

    # Applied at most once: a second request is refused, and a redelivery is now a plain duplicate.
    assert request_replay(conn, Selection("c", ids=[dl_id])) == ([], {dl_id: "is replayed"})
    assert replay_requested(conn, "c", handler).replayed == []
    assert process(conn, "c", records([(eid, "acc-1", 5)], start=2), handler).duplicates == 1
    assert applied(conn) == {eid: 1, other: 1}


def test_interrupt_during_retries_leaves_the_rest_unprocessed_for_a_later_poll(conn):
    ids = [uuid.uuid4() for _ in range(4)]
    interrupt = threading.Event()

    def handler(c, msg):
        if msg.event_id == ids[1]:
            interrupt.set()  # SIGTERM arrives while this record is failing
            raise RuntimeError("boom")
        apply_deposit(c, msg)

    recs = records([(i, "acc-1", 1) for i in ids])
    result = process(conn, "c", recs, handler, policy=FAST, interrupt=interrupt)
    assert result.unprocessed == {("orders", 0): 1}
    assert result.committed == {("orders", 0): 1}
    assert applied(conn) == {ids[0]: 1}
    assert offsets(conn) == {("orders", 0): 1}

    # The next poll starts at the stored offset and finishes the job.
    later = process(conn, "c", recs[1:], apply_deposit)
    assert later.processed == 3 and applied(conn) == {i: 1 for i in ids}


def test_out_of_time_retries_stop_after_progress_but_the_first_record_always_finishes(conn):
    slow = RetryPolicy(max_attempts=3, backoff_initial_s=0.3, backoff_max_s=0.3, jitter=0)
    ids = [uuid.uuid4() for _ in range(3)]

    def failing(c, msg):
        if msg.event_id != ids[0]:
            raise RuntimeError("boom")
        apply_deposit(c, msg)

    started = time.monotonic()
    result = process(conn, "c", records([(i, "acc-1", 1) for i in ids]), failing, policy=slow,
                     deadline=time.monotonic() + 0.1)
    assert result.unprocessed == {("orders", 0): 1} and result.processed == 1
    assert time.monotonic() - started < 0.3  # did not sleep past the deadline

    # With nothing committed yet, the first record runs its full cycle despite the deadline.
    result = process(conn, "c", records([(i, "acc-1", 1) for i in ids[1:]], start=1), failing, policy=slow,
                     deadline=time.monotonic() + 0.1)
    assert result.dead_lettered == 1 and result.unprocessed == {("orders", 0): 2}


def test_two_instances_racing_on_the_same_records_apply_each_event_once(conn, db):
    """A zombie after a rebalance: both process the same batch at once. The inbox insert of the
    second waits for the first to commit and then sees duplicates."""
    ids = [uuid.uuid4() for _ in range(50)]
    recs = records([(i, f"acc-{n % 3}", 1) for n, i in enumerate(ids)])
    start = threading.Barrier(2)
    results = []

    def slow_handler(c, msg):
        apply_deposit(c, msg)
        time.sleep(0.001)

    def instance():
        with psycopg.connect(db.secret(), autocommit=True) as own:
            start.wait()
            results.append(process(own, "c", recs, slow_handler))

    threads = [threading.Thread(target=instance) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert applied(conn) == {i: 1 for i in ids}
    assert sum(r.processed for r in results) == 50 and sum(r.duplicates for r in results) == 50
    assert sum(balances(conn).values()) == 50


def test_process_refuses_a_connection_with_an_open_transaction(db):
    with psycopg.connect(db.secret()) as c:
        c.execute("SELECT 1")
        with pytest.raises(InboxError, match="connection has one open"):
            process(c, "c", [], apply_deposit)
    with psycopg.connect(db.secret(), autocommit=True) as c:
        with pytest.raises(InboxError, match="consumer name"):
            process(c, "", [], apply_deposit)


def test_a_handler_cannot_commit_the_inbox_transaction(conn):
    """psycopg refuses commit() inside the inbox's transaction block, so a handler that tries is
    a failing handler: nothing half-committed, and the record ends up dead-lettered."""
    eid = uuid.uuid4()

    def committing(c, msg):
        apply_deposit(c, msg)
        c.commit()

    result = process(conn, "c", records([(eid, "acc-1", 1)]), committing, policy=FAST)
    assert (result.processed, result.dead_lettered) == (0, 1)
    assert applied(conn) == {}
    assert "Explicit commit() forbidden" in conn.execute("SELECT error FROM outbox.inbox_dead_letters").fetchone()[0]


class Blocker:
    """A third transaction holding inbox rows (as an instance mid-batch would), so two instances
    started behind it stop at known places: their lock order is then the only variable."""

    def __init__(self, db, consumer, recs):
        self.conn = psycopg.connect(db.secret())
        for r in recs:
            self.conn.execute("INSERT INTO outbox.inbox_messages (event_id, consumer, topic, kafka_partition, "
                              "kafka_offset) VALUES (%s, %s, %s, %s, %s)",
                              (dict(r.headers)["event_id"].decode(), consumer, r.topic, r.partition, r.offset))

    def release_when_waiting(self, waiting: int, timeout: float = 20):
        """Roll back once `waiting` other transactions wait for a row lock (ours or each other's)."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.conn.info.dsn, password=self.conn.info.password, autocommit=True) as watch:
            while time.monotonic() < deadline:
                if watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                 "AND datname = current_database()").fetchone()[0] >= waiting:
                    break
                time.sleep(0.02)
            else:
                raise AssertionError(f"fewer than {waiting} transactions ever waited behind the blocker")
        self.conn.rollback()
        self.conn.close()


def run_instances(db, batches, handler=apply_deposit, consumer="c", before=None):
    """process() each batch on its own connection at the same time; (results, errors)."""
    start = threading.Barrier(len(batches) + 1)
    results, errors = [], []

    def instance(batch):
        with psycopg.connect(db.secret(), autocommit=True) as own:
            start.wait()
            try:
                results.append(process(own, consumer, batch, handler, policy=FAST))
            except Exception as exc:  # noqa: BLE001 - asserted by the caller
                errors.append(exc)

    threads = [threading.Thread(target=instance, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    start.wait()
    if before is not None:
        before()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "an instance hung"
    return results, errors


def test_two_instances_holding_the_same_partitions_in_opposite_order_do_not_deadlock(conn, db, caplog):
    """A rebalance overlap: both instances polled partitions 0 and 1, in opposite order. A blocker
    holding the second record of each partition makes each instance stop after its first record;
    in poll order they would then each hold one partition and wait for the other's (a deadlock)."""
    events = {p: [(uuid.uuid4(), f"acc-{p}-{n % 3}", 1) for n in range(20)] for p in (0, 1)}
    recs = {p: records(events[p], partition=p) for p in (0, 1)}
    blocker = Blocker(db, "c", [recs[0][1], recs[1][1]])
    with caplog.at_level("WARNING", logger="inbox"):
        results, errors = run_instances(db, [recs[0] + recs[1], recs[1] + recs[0]],
                                        before=lambda: blocker.release_when_waiting(2))
    assert errors == []
    assert "rolled back by PostgreSQL" not in caplog.text  # avoided by the lock order, not retried
    ids = [e[0] for p in (0, 1) for e in events[p]]
    assert applied(conn) == {i: 1 for i in ids}
    assert sum(r.processed for r in results) == 40 and sum(r.duplicates for r in results) == 40
    assert offsets(conn) == {("orders", 0): 20, ("orders", 1): 20}
    assert stats(conn) == (40, 40, 0)


def test_deadlock_between_two_instances_is_rolled_back_and_retried_not_raised(conn, db, caplog):
    """Lock order cannot cover everything: here the same two events were redelivered at other
    offsets of the partition, in the other order. PostgreSQL aborts one instance's transaction;
    it must run again (not count as a handler failure, not escape process())."""
    e1, e2, x, y = (uuid.uuid4() for _ in range(4))
    first = records([(e1, "acc-1", 1), (x, "acc-2", 1), (e2, "acc-3", 1)])
    later = records([(e2, "acc-3", 1), (y, "acc-4", 1), (e1, "acc-1", 1)], start=100)
    blocker = Blocker(db, "c", [first[1], later[1]])
    with caplog.at_level("WARNING", logger="inbox"):
        results, errors = run_instances(db, [first, later], before=lambda: blocker.release_when_waiting(2))
    assert errors == []
    assert applied(conn) == {e1: 1, e2: 1, x: 1, y: 1}
    assert sum(r.processed for r in results) == 4 and sum(r.duplicates for r in results) == 2
    assert sum(r.dead_lettered for r in results) == 0
    assert offsets(conn) == {("orders", 0): 103}
    assert stats(conn) == (4, 2, 0)
    retried = [r.getMessage() for r in caplog.records if "rolled back by PostgreSQL" in r.getMessage()]
    assert len(retried) == 1 and "deadlock detected" in retried[0], caplog.text
    assert not any("handler of consumer" in r.getMessage() for r in caplog.records)
