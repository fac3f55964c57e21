"""A database the dashboard can be tested against, filled by the real pipeline: a real relay
publishes to the real Kafka broker (one event too large: a relay dead letter), two real inbox
consumers process the records (redeliveries suppressed as duplicates, a poison event and a charge
whose answer the fake provider drops: inbox dead letters and an unknown effect), and a worker is
killed after charging (an expired lease). Hand-made rows are only added where the real thing
cannot be had on demand: a batch orphaned by a relay crash (the real relay settles it), a batch
of a relay that is gone, and two effects in progress."""

from __future__ import annotations

import signal
import uuid
from dataclasses import dataclass, field

import psycopg
import streamlit as st
from kafka import KafkaProducer
from streamlit.testing.v1 import AppTest

from inbox import Effects, RetryPolicy, Runner
from outbox.core.redact import Dsn
from outbox.demo.fake_provider import FakeProvider, ProviderClient
from tests.support.databases import drop_database
from tests.support.helpers import read_topic, wait_for
from tests.support.inbox import Background, caught_up, create_business_schema, end_offsets
from tests.support.paths import REPO, TEMPLATE_DB
from tests.support.relay import RelayThread, emit, query, relay_settings, wait_streaming
from tests.workers.process import WorkerProcess

FAST = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02, jitter=0)
HOSTILE_AGGREGATE = "O'Brien\"; DROP TABLE outbox.events; -- %_ ünï ✓ 注文"
UNICODE_AGGREGATE = "ünï-✓-注文"
CHARGE_KEY = "charge:o-pay"
KILLED_KEY = "charge:o-killed"
LIVE_KEY = "email:o-1"
AT_RISK_KEY = "email:o-2"
CRASHED_RELAY = "crashed-relay"
GONE_RELAY = "gone-relay"


@dataclass
class Scenario:
    db: Dsn
    kafka: str
    prefix: str
    relay: RelayThread
    events: dict[str, str] = field(default_factory=dict)  # name -> event id
    duplicated: dict[str, int] = field(default_factory=dict)  # event id -> extra deliveries (per consumer)
    provider_url: str = ""

    @property
    def topic(self) -> str:
        return f"{self.prefix}.order"

    @property
    def slot(self) -> str:
        return f"slot_{self.prefix}"


def build(stack, admin_dsn: Dsn, prefix: str) -> Scenario:
    name = f"dash_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn.secret(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    db = stack.database_url.with_params(dbname=name)
    kafka = stack.kafka_bootstrap
    create_business_schema(db)
    settings = relay_settings(db, kafka, prefix, max_record_bytes=2048)
    # A relay that crashed with a batch in flight: the real relay settles it as 'unknown' on start.
    query(db, "INSERT INTO outbox.relay_batches (slot_name, relay_id, delivery, status, first_lsn) "
              "VALUES (%s, %s, 'at-least-once', 'in_flight', '0/1000000') RETURNING 1", (settings.slot_name,
                                                                                         CRASHED_RELAY))
    relay = RelayThread(settings).start()
    s = Scenario(db, kafka, prefix, relay)
    try:
        wait_streaming(db)
        _emit(s)
        wait_for(lambda: query(db, "SELECT count(*) FROM outbox.in_flight")[0][0] == 0, 60,
                 "every event to be published or dead-lettered")
        _redeliver(s)
        with FakeProvider() as provider:
            s.provider_url = provider.url
            provider.script("drop")  # charged, answer lost: the outcome is unknown to the consumer
            _consume(s, ProviderClient(provider.url, timeout_s=0.5))
            _killed_worker(s, provider.url)
        _hand_made(s)
    except BaseException:
        relay.stop()
        drop_database(admin_dsn, name)
        raise
    return s


def teardown(s: Scenario, admin_dsn: Dsn) -> None:
    s.relay.stop()
    drop_database(admin_dsn, s.db.params()["dbname"])


def _emit(s: Scenario) -> None:
    orders = [("order", f"o-{n}", kind, {"order": n, "total": 10 * n}, {}) for n in (1, 2, 3)
              for kind in ("OrderPlaced", "OrderPaid")]
    ids = emit(s.db, orders)
    for (_, aggregate, kind, _, _), event_id in zip(orders, ids):
        s.events[f"{aggregate}/{kind}"] = event_id
    for key, aggregate, kind, payload in [
        ("hostile", HOSTILE_AGGREGATE, "OrderPlaced", {"note": "quotes ' \" and ; -- survive"}),
        ("unicode", UNICODE_AGGREGATE, "OrderPlaced", {"note": "café"}),
        ("charge", "o-pay", "PaymentRequested", {"amount": 2500}),
        ("poison", "o-poison", "OrderPlaced", {"order": "poison"}),
        ("too_big", "o-big", "OrderPlaced", {"pad": "x" * 5000}),
    ]:
        s.events[key] = emit(s.db, [("order", aggregate, kind, payload, {})])[0]


def _redeliver(s: Scenario) -> None:
    """What the relay does after a crash (at-least-once): the same records again, same event ids."""
    records = read_topic(s.kafka, s.topic, expect=len(s.events) - 1)  # all but the one too large
    by_id = {dict(r.headers)["event_id"].decode(): r for r in records}
    again = [s.events["o-1/OrderPlaced"]] * 2 + [s.events["o-2/OrderPaid"]]
    producer = KafkaProducer(bootstrap_servers=s.kafka, acks="all")
    for event_id in again:
        r = by_id[event_id]
        producer.send(s.topic, key=r.key, value=r.value, headers=r.headers, partition=r.partition)
        s.duplicated[event_id] = s.duplicated.get(event_id, 0) + 1
    producer.flush()
    producer.close()


def _consume(s: Scenario, client: ProviderClient) -> None:
    with Effects(s.db, lease_s=5, owner="billing-worker") as effects:
        def billing(conn, msg):
            body = msg.json()
            aggregate = msg.envelope.aggregate_id
            if aggregate == "o-poison":
                raise RuntimeError("ledger rejects order o-poison")
            if msg.envelope.event_type == "PaymentRequested":
                effects.run(CHARGE_KEY, body, call=lambda key: client.charge(key, body["amount"], "EUR"), message=msg)
            record(conn, msg, body.get("total", 0))

        def shipping(conn, msg):
            record(conn, msg, 0)

        def record(conn, msg, amount):
            conn.execute("INSERT INTO applied (event_id, account, amount, attempt) VALUES (%s, %s, %s, %s)",
                         (msg.event_id, msg.envelope.aggregate_id, amount, msg.attempt))

        # Fixed partitions, positions in PostgreSQL alone (group_id=None): the dashboard reads what the
        # inbox records, and group joins (seconds each, now and then far more on this shared broker)
        # made the build flaky without adding anything the dashboard shows.
        partitions = [(s.topic, p) for p in sorted(end_offsets(s.kafka, s.topic))]
        runners = [Background(Runner(name, handler, dsn=s.db, bootstrap=s.kafka, partitions=partitions,
                                     group_id=None, policy=FAST, poll_timeout_s=0.2))
                   for name, handler in (("billing", billing), ("shipping", shipping))]
        try:
            for name in ("billing", "shipping"):
                caught_up(s.db, name, s.kafka, s.topic)
        finally:
            for bg in runners:
                bg.stop()


def _killed_worker(s: Scenario, provider_url: str) -> None:
    with WorkerProcess("tests.workers.effect_worker", "--provider", provider_url, "--key", KILLED_KEY, "--amount", "700",
                       "--lease-s", "1", env={"OUTBOX_DATABASE_URL": s.db.secret()}) as worker:
        assert worker.wait(60) == -signal.SIGKILL
    wait_for(lambda: query(s.db, "SELECT effective_status FROM outbox.effects_unresolved WHERE key = %s",
                           (KILLED_KEY,)) == [("unknown",)], 10, "the killed worker's lease to expire")


def _hand_made(s: Scenario) -> None:
    query(s.db, """
        INSERT INTO outbox.effects (key, fingerprint, request, status, attempts, lease_owner, lease_token,
                                    lease_expires_at, updated_at, evidence)
        VALUES (%s, 'f1', '{"to": "a@example.com"}', 'in_progress', 1, 'mailer-1', gen_random_uuid(),
                now() + interval '1 hour', now(), '[]'),
               (%s, 'f2', '{"to": "b@example.com"}', 'in_progress', 1, 'mailer-2', gen_random_uuid(),
                now() + interval '10 minutes', now() - interval '50 minutes', '[]')
        RETURNING 1""", (LIVE_KEY, AT_RISK_KEY))
    # A batch of a relay on another slot that died and has not been replaced: nobody settled it yet.
    query(s.db, "INSERT INTO outbox.relay_batches (slot_name, relay_id, delivery, status, first_lsn) "
                "VALUES ('other_slot', %s, 'at-least-once', 'in_flight', '0/2000000') RETURNING 1", (GONE_RELAY,))


APP = str(REPO / "dashboard" / "app.py")


def app(monkeypatch, db, kafka) -> AppTest:
    monkeypatch.setenv("OUTBOX_DATABASE_URL", db.secret())
    monkeypatch.setenv("OUTBOX_KAFKA_BOOTSTRAP", kafka)
    monkeypatch.setenv("OUTBOX_DASHBOARD_REFRESH_S", "3600")
    st.cache_resource.clear()  # releases the previous test's connection and Kafka client
    return AppTest.from_file(APP, default_timeout=30)
