"""What consumer authors write: NonRetryable, and Handlers dispatching by event type with typed
(pydantic) payloads, run by the Runner against the real Kafka broker and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import psycopg
from pydantic import BaseModel, PositiveInt

from inbox import Handlers, NonRetryable, RetryPolicy, Runner
from tests.support.inbox import Background, caught_up, create_topic, deposit, headers_for, produce

FAST = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02, jitter=0)


class OrderPlaced(BaseModel):
    order_id: str
    total: PositiveInt


def pinned(db, kafka, consumer, topic, handler):
    # Fixed partitions, no group: no rebalance to wait for, PostgreSQL holds the positions.
    return Runner(consumer, handler, dsn=db, bootstrap=kafka, partitions=[(topic, 0)], group_id=None,
                  policy=FAST, poll_timeout_s=0.2)


def rows(db, sql, *args):
    with psycopg.connect(db.secret()) as conn:
        return conn.execute(sql, args).fetchall()


def order(order_id: str, total) -> bytes:
    return json.dumps({"order_id": order_id, "total": total}).encode()


def test_non_retryable_error_dead_letters_at_once_while_other_errors_keep_the_retry_policy(db, kafka, topic_prefix):
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic)
    never, flaky, fine = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    produce(kafka, topic, [(b"acc-1", deposit("acc-1", 1), headers_for(e)) for e in (never, flaky, fine)])
    calls = Counter()

    def handler(conn, msg):
        calls[msg.event_id] += 1
        if msg.event_id == never:
            raise NonRetryable("account acc-1 is closed for good")
        if msg.event_id == flaky:
            raise RuntimeError("ledger service unavailable")

    bg = Background(pinned(db, kafka, "strict", topic, handler))
    caught_up(db, "strict", kafka, topic)
    totals = bg.stop()
    assert calls == {never: 1, flaky: 3, fine: 1}
    dead = {r[0]: r[1:] for r in rows(db, "SELECT event_id, reason, attempts, error FROM outbox.inbox_dead_letters")}
    assert dead == {never: ("handler_failed", 1, "NonRetryable: account acc-1 is closed for good"),
                    flaky: ("handler_failed", 3, "RuntimeError: ledger service unavailable")}
    assert (totals.processed, totals.dead_lettered) == (1, 2)


def test_handlers_dispatch_by_event_type_and_dead_letter_invalid_payloads_and_unknown_types_at_once(
        db, kafka, topic_prefix):
    topic = f"{topic_prefix}.orders"
    create_topic(kafka, topic)
    good, bad, cancelled, strange = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    produce(kafka, topic, [
        (b"o-1", order("o-1", 2500), headers_for(good, "o-1", "OrderPlaced")),
        (b"o-2", order("o-2", -5), headers_for(bad, "o-2", "OrderPlaced")),  # total must be positive
        (b"o-1", b'{"order_id": "o-1"}', headers_for(cancelled, "o-1", "OrderCancelled")),
        (b"o-3", order("o-3", 1), headers_for(strange, "o-3", "OrderTeleported")),  # nobody handles it
    ])
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        conn.execute("CREATE TABLE handled (event_id uuid, what text, payload text)")
    typed = []
    handlers = Handlers()  # unknown="dead-letter" by default

    @handlers.on("OrderPlaced", OrderPlaced)
    def on_placed(conn, msg, payload: OrderPlaced):
        typed.append((type(payload), payload.order_id))
        conn.execute("INSERT INTO handled VALUES (%s, 'placed', %s)", (msg.event_id, payload.model_dump_json()))

    @handlers.on("OrderCancelled")
    def on_cancelled(conn, msg):
        conn.execute("INSERT INTO handled VALUES (%s, 'cancelled', %s)", (msg.event_id, msg.json()["order_id"]))

    bg = Background(pinned(db, kafka, "orders", topic, handlers))
    caught_up(db, "orders", kafka, topic)
    totals = bg.stop()
    assert sorted(rows(db, "SELECT event_id, what, payload FROM handled")) == sorted([
        (good, "placed", '{"order_id":"o-1","total":2500}'), (cancelled, "cancelled", "o-1")])
    assert set(typed) == {(OrderPlaced, "o-1")}  # the invalid payload never reached the function
    dead = {r[0]: r[1:] for r in rows(db, "SELECT event_id, reason, attempts, error, event_type "
                                          "FROM outbox.inbox_dead_letters")}
    assert set(dead) == {bad, strange}
    reason, tries, error, event_type = dead[bad]
    assert (reason, tries, event_type) == ("handler_failed", 1, "OrderPlaced")
    assert error.startswith("PayloadInvalid: payload of event type 'OrderPlaced' does not validate as OrderPlaced")
    assert "total: Input should be greater than 0" in error
    reason, tries, error, event_type = dead[strange]
    assert (reason, tries, event_type) == ("handler_failed", 1, "OrderTeleported")
    assert "no handler for event type 'OrderTeleported' (handled: OrderCancelled, OrderPlaced)" in error
    assert (totals.processed, totals.dead_lettered) == (2, 2)


def test_handlers_with_unknown_ignore_mark_unknown_event_types_seen_and_processed(db, kafka, topic_prefix):
    topic = f"{topic_prefix}.orders"
    create_topic(kafka, topic)
    placed_id, other_id, muted_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    produce(kafka, topic, [
        (b"o-1", order("o-1", 10), headers_for(placed_id, "o-1", "OrderPlaced")),
        (b"o-1", b"{}", headers_for(other_id, "o-1", "OrderShipped")),
        (b"o-1", b"{}", headers_for(muted_id, "o-1", "OrderAudited")),
    ])
    seen = []
    handlers = Handlers(unknown="ignore")
    handlers.on("OrderPlaced", OrderPlaced)(lambda conn, msg, o: seen.append(o.order_id))
    # A strict consumer (the default rule) can still mute the types it knows it does not need.
    strict = Handlers().ignore("OrderShipped", "OrderAudited")
    strict.on("OrderPlaced", OrderPlaced)(lambda conn, msg, o: seen.append(o.order_id))

    for name, handler in (("lenient", handlers), ("strict", strict)):
        bg = Background(pinned(db, kafka, name, topic, handler))
        caught_up(db, name, kafka, topic)
        totals = bg.stop()
        assert (totals.processed, totals.dead_lettered) == (3, 0)
        assert sorted(rows(db, "SELECT event_id, status FROM outbox.inbox_messages WHERE consumer = %s", name)) == \
            sorted([(placed_id, "processed"), (other_id, "processed"), (muted_id, "processed")])
    assert seen == ["o-1", "o-1"]
    assert rows(db, "SELECT count(*) FROM outbox.inbox_dead_letters") == [(0,)]
