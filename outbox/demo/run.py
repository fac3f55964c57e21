"""`outbox demo`: the whole pipeline on the embedded stack, with a little weather.

    shop (producer) --emit--> outbox --relay--> Kafka --inbox--> "payments": charge via the
                                                                  effects ledger + fake provider
                                                          \\--inbox--> "receipts": one row per order

Every few seconds something goes wrong on purpose, the way it does in production: a record is
delivered twice (suppressed by the inbox), the provider drops its response after charging
(reconciled, no second charge), declines a card (a definite failure, stored), or times out while
its lookup API is also unavailable (an unknown outcome: the record is dead-lettered and waits for
an operator in the dashboard). The consumer code below is meant to be read: it is what an
application writes.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import threading
import time

import psycopg
from kafka import KafkaConsumer, KafkaProducer
from psycopg.types.json import Jsonb

from inbox import Effects, Message, RetryPolicy, Runner
from outbox.core.migrate import migrate
from outbox.core.redact import Dsn
from outbox.core.settings import Settings
from outbox.demo.fake_provider import FakeProvider, ProviderClient
from relay.daemon import Relay
from relay.publisher import ensure_topic

log = logging.getLogger("outbox.demo")

TOPIC = "outbox.event.shop_order"
DEMO_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS demo;
CREATE TABLE IF NOT EXISTS demo.orders (
    id          bigserial PRIMARY KEY,
    customer    text NOT NULL,
    amount      integer NOT NULL,
    status      text NOT NULL DEFAULT 'placed',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS demo.payments (order_id bigint NOT NULL, charge_id text NOT NULL, amount integer NOT NULL,
                                          paid_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS demo.receipts (order_id bigint NOT NULL, sent_at timestamptz NOT NULL DEFAULT now());
"""


# ----- what an application writes


def place_order(conn: psycopg.Connection, customer: str, amount: int) -> int:
    """The producer: the business row and its event commit together, or not at all."""
    with conn.transaction():
        order_id = conn.execute("INSERT INTO demo.orders (customer, amount) VALUES (%s, %s) RETURNING id",
                                (customer, amount)).fetchone()[0]
        conn.execute("SELECT outbox.emit('shop_order', %s, 'OrderPlaced', %s)",
                     (str(order_id), Jsonb({"order_id": order_id, "customer": customer, "amount": amount})))
    return order_id


def payments_handler(effects: Effects, provider: ProviderClient, lookup_available: threading.Event):
    """Charge each order once, whatever Kafka, the consumer or the provider does."""

    def reconcile(key: str, request: object):
        # Ask the provider what happened under this key; None when its lookup API is down too.
        return provider.lookup(key) if lookup_available.is_set() else None

    def handle(conn: psycopg.Connection, msg: Message) -> None:
        order = msg.json()
        result = effects.run(
            f"charge:order-{order['order_id']}",           # stable across every redelivery and retry
            {"amount": order["amount"], "currency": "EUR"},  # a different request under the key is refused
            call=lambda key: provider.charge(key, order["amount"], "EUR"),
            reconcile=reconcile, message=msg)
        if result.ok:
            conn.execute("INSERT INTO demo.payments (order_id, charge_id, amount) VALUES (%s, %s, %s)",
                         (order["order_id"], result.response["id"], order["amount"]))
            conn.execute("UPDATE demo.orders SET status = 'paid' WHERE id = %s", (order["order_id"],))
        else:
            conn.execute("UPDATE demo.orders SET status = 'declined' WHERE id = %s", (order["order_id"],))

    return handle


def receipts_handler(conn: psycopg.Connection, msg: Message) -> None:
    conn.execute("INSERT INTO demo.receipts (order_id) VALUES (%s)", (msg.json()["order_id"],))


# ----- the demo harness


class Demo:
    def __init__(self, settings: Settings, rate: float, duration: float | None, dashboard: bool,
                 external: bool = False, with_relay: bool = True):
        self.settings, self.rate, self.duration, self.with_dashboard = settings, rate, duration, dashboard
        self.external, self.with_relay = external, with_relay
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.lookup_available = threading.Event()
        self.lookup_available.set()

    def run(self) -> int:
        # Retries and reconciliations are the point of the demo, but one line each would drown the
        # summary; dead letters (ERROR) still show, and the dashboard has the details.
        logging.getLogger("inbox").setLevel(logging.ERROR)
        urls = self._servers()
        dsn = urls.database_url
        migrate(dsn, log=lambda line: print(line, file=sys.stderr))
        with psycopg.connect(dsn.secret(), autocommit=True) as conn:
            conn.execute(DEMO_SCHEMA)
        # On servers of its own choosing the demo knows the broker; on the operator's it keeps OUTBOX_DELIVERY.
        delivery = self.settings.delivery if self.external else \
            "exactly-once" if urls.broker == "apache" else "at-least-once"
        settings = self.settings.model_copy(update={
            "database_url": dsn, "kafka_bootstrap": urls.kafka_bootstrap, "delivery": delivery})

        ensure_topic(settings.kafka_client_options(), TOPIC, 3)  # consumers start before the first order creates it
        provider = FakeProvider(hang_s=2.5).start()
        client = ProviderClient(provider.url, timeout_s=1.5)
        effects = Effects(dsn, lease_s=10)
        relay = Relay(settings)
        # Short retries so that an unknown outcome reaches the dead letters in seconds, not minutes.
        policy = RetryPolicy(max_attempts=3, backoff_initial_s=0.2, backoff_max_s=1.0)
        runners = [
            Runner.from_settings(settings, "payments", payments_handler(effects, client, self.lookup_available),
                                 topics=[TOPIC], policy=policy),
            Runner.from_settings(settings, "receipts", receipts_handler, topics=[TOPIC], policy=policy),
        ]
        if self.with_relay:
            self._spawn(relay.run, "relay")
        for runner in runners:
            self._spawn(runner.run, runner.consumer)
        self._spawn(lambda: self._shop(dsn), "shop")
        self._spawn(lambda: self._weather(urls.kafka_bootstrap, client), "weather")
        dashboard = self._dashboard(urls) if self.with_dashboard else None

        print(f"\nDemo running: relay ({settings.delivery}{'' if self.with_relay else ', run separately'}) -> "
              f"Kafka ({urls.broker}) -> consumers payments, "
              f"receipts; fake provider at {provider.url}.", file=sys.stderr)
        if dashboard:
            print(f"Dashboard: http://127.0.0.1:{self.settings.dashboard_port}", file=sys.stderr)
        print("Ctrl-C to stop" + ("." if self.external else " (the dev stack keeps running: `outbox dev down`).")
              + "\n", file=sys.stderr)
        started = time.monotonic()
        try:
            while not self.stop.wait(10 if self.duration is None else min(10, self.duration)):
                self._report(dsn)
                if self.duration is not None and time.monotonic() - started >= self.duration:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            self.stop.set()
            for runner in runners:
                runner.stop()
            relay.request_stop()
            for thread in self.threads:
                thread.join(30)
            if dashboard is not None:
                dashboard.terminate()
                dashboard.wait(10)
            provider.stop()
            effects.close()
        self._report(dsn)
        return 0

    def _servers(self):
        if self.external:
            from types import SimpleNamespace

            return SimpleNamespace(database_url=self.settings.require_database_url(),
                                   kafka_bootstrap=self.settings.kafka_bootstrap, broker="as configured")
        # Imported here: the embedded stack is an extra, and --external runs without it.
        from outbox.devstack.stack import DevStack

        return DevStack(self.settings).up()

    def _spawn(self, target, name: str) -> None:
        def guarded():
            try:
                target()
            except Exception:  # noqa: BLE001 - a demo thread dying must be visible, not silent
                log.exception("demo component %s failed", name)

        thread = threading.Thread(target=guarded, name=f"demo-{name}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def _shop(self, dsn: Dsn) -> None:
        rnd = random.Random(7)
        customers = ["ada", "grace", "edsger", "barbara", "ken", "margaret"]
        with psycopg.connect(dsn.secret(), autocommit=True) as conn:
            while not self.stop.wait(1 / self.rate):
                place_order(conn, rnd.choice(customers), rnd.randint(5, 300) * 100)

    def _weather(self, bootstrap: str, provider: ProviderClient) -> None:
        """Now and then, something production would do to us."""
        rnd = random.Random(11)
        resender = KafkaProducer(bootstrap_servers=bootstrap)
        recent: list = []
        tail = KafkaConsumer(TOPIC, bootstrap_servers=bootstrap, group_id=None,
                             auto_offset_reset="latest", isolation_level="read_committed")
        try:
            while not self.stop.wait(rnd.uniform(4, 8)):
                for records in tail.poll(timeout_ms=100).values():
                    recent = (recent + records)[-50:]
                weather = rnd.choices(["duplicate", "drop", "decline", "unknown"], weights=[10, 4, 3, 2])[0]
                if weather == "duplicate" and recent:
                    r = rnd.choice(recent)  # redelivery of an old record: same event_id
                    resender.send(r.topic, value=r.value, key=r.key, headers=r.headers)
                elif weather == "drop":
                    provider.script("drop")  # charged, answer lost: reconciled, not charged twice
                elif weather == "decline":
                    provider.script("decline")
                elif weather == "unknown":
                    # Times out and the provider's lookup is down too: nobody can tell; an operator must.
                    self.lookup_available.clear()
                    provider.script("timeout", "timeout", "timeout")
                    self.stop.wait(6)
                    self.lookup_available.set()
        finally:
            tail.close()
            resender.close()

    def _dashboard(self, urls) -> subprocess.Popen | None:
        env = {"OUTBOX_DATABASE_URL": urls.database_url.secret(), "OUTBOX_KAFKA_BOOTSTRAP": urls.kafka_bootstrap}
        return subprocess.Popen([sys.executable, "-m", "outbox.cli", "dashboard"], env={**os.environ, **env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _report(self, dsn: Dsn) -> None:
        with psycopg.connect(dsn.secret(), autocommit=True) as conn:
            orders, paid, declined = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'paid'), count(*) FILTER (WHERE status = 'declined') "
                "FROM demo.orders").fetchone()
            in_flight = conn.execute("SELECT count(*) FROM outbox.in_flight").fetchone()[0]
            dups = conn.execute("SELECT coalesce(sum(duplicates), 0) FROM outbox.inbox_messages").fetchone()[0]
            unknown = conn.execute("SELECT count(*) FROM outbox.effects_unresolved WHERE effective_status = 'unknown'"
                                   ).fetchone()[0]
            double = conn.execute("SELECT count(*) FROM (SELECT order_id FROM demo.payments GROUP BY 1 "
                                  "HAVING count(*) > 1) d").fetchone()[0]
        print(f"orders {orders}: paid {paid}, declined {declined}; in flight {in_flight}; duplicates suppressed "
              f"{dups}; unknown outcomes {unknown}; orders charged twice {double}", file=sys.stderr, flush=True)


def run_demo(settings: Settings, rate: float = 3.0, duration: float | None = None, dashboard: bool = True,
             external: bool = False, with_relay: bool = True) -> int:
    return Demo(settings, rate, duration, dashboard, external, with_relay).run()
