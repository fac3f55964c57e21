"""inbox/metrics.py without servers: tallies per topic, the lag series, liveness and readiness."""

from __future__ import annotations

from inbox.metrics import InboxMetrics
from inbox.process import BatchResult


def value(m: InboxMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_a_batch_result_is_counted_per_topic():
    m = InboxMetrics("billing")
    m.count(BatchResult(processed=5, duplicates=2, dead_lettered=1, transactions=2,
                        tallies={("a", 0): (3, 2, 0), ("a", 1): (1, 0, 1), ("b", 0): (1, 0, 0)},
                        retries={("a", 1): 2}))
    assert value(m, "outbox_inbox_events_processed_total", consumer="billing", topic="a") == 4
    assert value(m, "outbox_inbox_events_processed_total", consumer="billing", topic="b") == 1
    assert value(m, "outbox_inbox_duplicates_suppressed_total", consumer="billing", topic="a") == 2
    assert value(m, "outbox_inbox_events_dead_lettered_total", consumer="billing", topic="a") == 1
    assert value(m, "outbox_inbox_handler_retries_total", consumer="billing", topic="a") == 2
    assert value(m, "outbox_inbox_transactions_total", consumer="billing") == 2


def test_handler_calls_are_timed_failures_included():
    m = InboxMetrics("billing")

    class Msg:
        topic = "orders"

    def fails(conn, msg):
        raise RuntimeError("no")

    m.timed(lambda conn, msg: None)(None, Msg())
    try:
        m.timed(fails)(None, Msg())
    except RuntimeError:
        pass
    assert value(m, "outbox_inbox_handler_duration_seconds_count", consumer="billing", topic="orders") == 2


def test_lag_series_follow_the_assignment():
    m = InboxMetrics("billing")
    m.set_lag({("a", 0): 7, ("a", 1): -1})  # a position past a stale end offset reads 0
    assert value(m, "outbox_inbox_consumer_lag", consumer="billing", topic="a", partition="0") == 7
    assert value(m, "outbox_inbox_consumer_lag", consumer="billing", topic="a", partition="1") == 0
    m.forget_partitions([("a", 0)])
    assert value(m, "outbox_inbox_consumer_lag", consumer="billing", topic="a", partition="0") is None
    m.set_lag({("b", 0): 1})
    assert value(m, "outbox_inbox_consumer_lag", consumer="billing", topic="a", partition="1") is None


def test_ready_only_while_running_assigned_and_connected_live_until_stuck_or_failed():
    m = InboxMetrics("billing", stale_after_s=60)
    status, body = m.readiness()
    assert status == 503 and body["reasons"] == ["not running", "no partitions assigned",
                                                 "PostgreSQL unreachable or not connected yet"]
    m.running, m.assigned_partitions, m.database_ok = True, 2, True
    assert m.readiness()[0] == 200 and m.health()[0] == 200
    assert value(m, "outbox_inbox_ready", consumer="billing") == 1
    m.database_ok = False  # the worker lost PostgreSQL: still alive, not ready
    assert m.health()[0] == 200 and m.readiness()[1]["reasons"] == ["PostgreSQL unreachable or not connected yet"]
    assert value(m, "outbox_inbox_database_up", consumer="billing") == 0
    m.database_ok = True
    m.last_tick -= 61
    assert m.health()[0] == 503 and m.readiness()[0] == 503
    m.tick()
    m.last_error = "InboxError: password=hunter2 rejected"
    status, body = m.health()
    assert status == 503 and "the poll loop stopped" in body["reasons"][0]
