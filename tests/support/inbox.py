"""Helpers for the inbox tests: relay-shaped records, a business schema where a double apply shows,
and running a Runner until PostgreSQL says it caught up."""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field

import psycopg
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from outbox.core.envelope import build_headers
from tests.support.helpers import wait_for

# The Runner's Kafka clients (Runner(kafka_client=...)); tests that run on both parametrize with these.
CLIENTS = ["kafka-python", "confluent-kafka"]

# Balances are incremented and every application is logged; neither has a unique constraint, so an
# event applied twice shows up as a wrong balance and a repeated ledger row.
BUSINESS_SCHEMA = """
CREATE TABLE IF NOT EXISTS balances (account text NOT NULL, balance bigint NOT NULL);
CREATE TABLE IF NOT EXISTS applied (event_id uuid NOT NULL, account text NOT NULL, amount bigint NOT NULL,
                                    attempt int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
"""


def headers_for(event_id: uuid.UUID | str, aggregate_id: str = "acc-1", event_type: str = "Deposited",
                own: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]]:
    return build_headers(str(event_id).encode(), event_type.encode(), b"account", aggregate_id.encode(),
                         b"0/16B3748", b"4242", b"2026-11-26T23:00:00.000000Z", own)


@dataclass
class Rec:
    """A ConsumerRecord look-alike for process() tests that need no broker."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    key: bytes | None = b"acc-1"
    timestamp: int | None = 1_764_198_000_000


def deposit(account: str, amount: int) -> bytes:
    return json.dumps({"account": account, "amount": amount}).encode()


def apply_deposit(conn: psycopg.Connection, msg) -> None:
    """The business handler used throughout: a non-idempotent increment plus a ledger row."""
    body = msg.json()
    cur = conn.execute("UPDATE balances SET balance = balance + %s WHERE account = %s",
                       (body["amount"], body["account"]))
    if cur.rowcount == 0:
        conn.execute("INSERT INTO balances (account, balance) VALUES (%s, %s)", (body["account"], body["amount"]))
    conn.execute("INSERT INTO applied (event_id, account, amount, attempt) VALUES (%s, %s, %s, %s)",
                 (msg.event_id, body["account"], body["amount"], msg.attempt))


def create_business_schema(dsn) -> None:
    with psycopg.connect(dsn.secret(), autocommit=True) as conn:
        conn.execute(BUSINESS_SCHEMA)


def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None, list]],
            partition: int | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for key, value, headers in records:
        producer.send(topic, value=value, key=key, headers=headers, partition=partition)
    producer.flush()
    producer.close()


def create_topic(bootstrap: str, topic: str, partitions: int = 1, configs: dict[str, str] | None = None) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=configs or {})])
    finally:
        admin.close()


def add_partitions(bootstrap: str, topic: str, total: int) -> None:
    """Grow a topic to `total` partitions under whoever is using it."""
    from kafka.admin import KafkaAdminClient, NewPartitions

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_partitions({topic: NewPartitions(total)})
    finally:
        admin.close()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: n for tp, n in ends.items()}
    finally:
        consumer.close()


def stored_offsets(dsn, consumer: str, topic: str) -> dict[int, int]:
    with psycopg.connect(dsn.secret()) as conn:
        return dict(conn.execute("SELECT kafka_partition, next_offset FROM outbox.inbox_offsets "
                                 "WHERE consumer = %s AND topic = %s", (consumer, topic)).fetchall())


_started: list["Background"] = []  # stopped after each test (tests/conftest.py), even one that failed midway


def stop_leftover_runners() -> None:
    """A test that fails before its stop() would leave its Runner polling, and logging into the
    next tests' output, for the rest of the session."""
    while _started:
        bg = _started.pop()
        if bg.thread.is_alive():
            bg.runner.stop()
            bg.thread.join(30)


@dataclass
class Background:
    """A Runner on a thread, so a test can watch the database while it works."""

    runner: object
    thread: threading.Thread = field(init=False)
    error: list = field(default_factory=list)

    def __post_init__(self):
        def target():
            try:
                self.runner.run()
            except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
                self.error.append(exc)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        _started.append(self)

    def stop(self, timeout: float = 30):
        self.runner.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "runner did not stop"
        if self.error:
            raise self.error[0]
        return self.runner.totals


def caught_up(dsn, consumer: str, bootstrap: str, topic: str, timeout: float = 60) -> None:
    ends = {p: n for p, n in end_offsets(bootstrap, topic).items() if n}  # empty partitions have no row
    wait_for(lambda: stored_offsets(dsn, consumer, topic) == ends, timeout,
               f"consumer {consumer} to reach {ends} on {topic}")
