"""`outbox demo`: the seed's story, live. The services are the reference code in examples/
(shipped as `outbox.examples`); this module only orchestrates them and breaks things on purpose.

    order service --emit ChargeCustomer--> outbox --relay--> Kafka --inbox--> payment worker
        (examples/order_service.py)                                 (examples/payment_worker.py, a process
                                                                     of its own so it can be kill -9'd)
        fake provider <--charge:order-N-- payment worker --emit PaymentCaptured--> outbox --relay--> Kafka
                                                                      --inbox--> shipping (examples/shipping.py)

Faults, in a fixed rotation so that a short run sees every kind:
    redelivery  an already delivered record is sent to Kafka again (same event_id): the inbox suppresses it
    timeout     the provider hangs and charges nothing: outcome unknown, reconciled (absent), charged once
                with the same key
    drop        the provider charges and drops the answer: outcome unknown, reconciled (found), not charged again
    crash       the provider charges and stalls its answer; the worker is killed -9 meanwhile, before it
                records anything. Restarted, it gets the command again, the lease expires, the outcome is
                unknown and reconciled: not charged again
    decline     a definite "no" (402): stored under the key, never retried into a charge

The summary counts each fault from the evidence it leaves (the provider's request log, the ledger, the
inbox), and double charges from the provider's own charge log, per order. After --duration the shop
stops and the demo waits until every order is settled before the last summary.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg
from kafka import KafkaConsumer, KafkaProducer

from inbox import RetryPolicy, Runner
from outbox.core.migrate import migrate
from outbox.core.redact import Dsn
from outbox.core.settings import Settings
from outbox.demo.fake_provider import FakeProvider
from outbox.examples import order_service, payment_worker, shipping
from relay.daemon import Relay
from relay.publisher import ensure_topic

log = logging.getLogger("outbox.demo")

FAULTS = ("redelivery", "timeout", "drop", "crash", "redelivery", "decline")
PROVIDER_TIMEOUT_S = 1.5  # the worker's HTTP timeout: below the provider's hang, far below the lease
PROVIDER_HANG_S = 3.0  # how long `timeout` and `stall` hold a request
EFFECT_LEASE_S = 4.0  # short, so a killed worker's charge is reconciled within seconds
# Enough attempts for a killed worker's lease to run out: ~14 s of backoff > EFFECT_LEASE_S + a restart.
RETRY = {"OUTBOX_INBOX_MAX_ATTEMPTS": "10", "OUTBOX_INBOX_BACKOFF_INITIAL_S": "0.25",
         "OUTBOX_INBOX_BACKOFF_MAX_S": "2"}


@dataclass
class Injected:
    """What the demo did on purpose (the rest of the summary is read from the evidence)."""

    redeliveries: int = 0
    crashes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class PaymentWorker:
    """examples/payment_worker.py in a process of its own: a crash must be a real kill -9."""

    def __init__(self, settings: Settings, provider_url: str):
        self.log_path = os.path.join(tempfile.gettempdir(), f"outbox-demo-payment-worker-{os.getpid()}.log")
        self.env = {**os.environ, "OUTBOX_DATABASE_URL": settings.require_database_url().secret(),
                    "OUTBOX_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "OUTBOX_LOG_LEVEL": "WARNING",
                    "OUTBOX_EFFECT_LEASE_S": str(EFFECT_LEASE_S), **RETRY}
        self.argv = [sys.executable, "-m", "outbox.examples.payment_worker", "--provider-url", provider_url,
                     "--provider-timeout-s", str(PROVIDER_TIMEOUT_S), "--instance-id", "payment-worker-1"]
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock, open(self.log_path, "ab") as out:
            self.proc = self._spawn(out)

    def crash(self, while_dead) -> None:
        """kill -9, run `while_dead()`, start again: one step, so nobody restarts it in between."""
        with self.lock:
            self.proc.kill()
            self.proc.wait()
            try:
                while_dead()
            finally:
                with open(self.log_path, "ab") as out:
                    self.proc = self._spawn(out)

    def _spawn(self, out) -> subprocess.Popen:
        # Its own session: Ctrl-C in the terminal reaches the whole foreground process group, and
        # the worker must keep running while the demo settles the orders in flight, then get SIGTERM.
        return subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def exited(self) -> int | None:
        with self.lock:
            return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                return
            self.proc.send_signal(signal.SIGTERM)  # finishes the batch in flight and commits it
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Demo:
    def __init__(self, settings: Settings, rate: float, duration: float | None, dashboard: bool,
                 external: bool = False, with_relay: bool = True, fault_every_s: float = 4.0,
                 drain_s: float = 90.0):
        self.settings, self.rate, self.duration, self.with_dashboard = settings, rate, duration, dashboard
        self.external, self.with_relay = external, with_relay
        self.fault_every_s, self.drain_s = fault_every_s, drain_s
        self.stop = threading.Event()  # everything
        self.quiet = threading.Event()  # the shop and the faults: set when the run is over, before draining
        self.threads: list[threading.Thread] = []
        self.failed: list[str] = []  # components whose thread died: the demo stops and exits 1
        self.injected = Injected()

    def run(self) -> int:
        # Retries and reconciliations are the point of the demo, but one line each would drown the
        # summary; dead letters (ERROR) still show, and the dashboard has the details.
        logging.getLogger("inbox").setLevel(logging.ERROR)
        urls = self._servers()
        dsn = urls.database_url
        migrate(dsn, log=lambda line: print(line, file=sys.stderr))
        with psycopg.connect(dsn.secret(), autocommit=True) as conn:
            for service in (order_service, payment_worker, shipping):
                service.create_schema(conn)
            # Counts are about this run: orders from here on, effects and inbox rows from now on.
            self.first_order, self.started_at = conn.execute(
                "SELECT coalesce(max(id), 0) + 1, now() FROM shop.orders").fetchone()
        # On servers of its own choosing the demo knows the broker; on the operator's it keeps OUTBOX_DELIVERY.
        delivery = self.settings.delivery if self.external else \
            "exactly-once" if urls.broker == "apache" else "at-least-once"
        settings = self.settings.model_copy(update={
            "database_url": dsn, "kafka_bootstrap": urls.kafka_bootstrap, "delivery": delivery})
        for topic in (payment_worker.TOPIC, shipping.TOPIC):  # consumers subscribe before the first event
            ensure_topic(settings.kafka_client_options(), topic, 3)

        self.provider = FakeProvider(hang_s=PROVIDER_HANG_S).start()
        self.worker = PaymentWorker(settings, self.provider.url)
        relay = Relay(settings)
        shipper = Runner.from_settings(settings, shipping.CONSUMER, shipping.shipping_handlers(),
                                       topics=[shipping.TOPIC],
                                       policy=RetryPolicy(max_attempts=5, backoff_initial_s=0.2, backoff_max_s=1.0))
        if self.with_relay:
            self._spawn(relay.run, "relay")
        self.worker.start()
        self._spawn(shipper.run, "shipping")
        self._spawn(lambda: self._shop(dsn), "shop")
        self._spawn(lambda: self._faults(dsn, urls.kafka_bootstrap), "faults")
        dashboard = self._dashboard(urls) if self.with_dashboard else None

        print(f"\nDemo running: order service -> relay ({settings.delivery}"
              f"{'' if self.with_relay else ', run separately'}) -> Kafka ({urls.broker}) -> payment worker "
              f"(pid {self.worker.proc.pid}, log {self.worker.log_path}) -> fake provider at {self.provider.url}; "
              f"PaymentCaptured -> relay -> Kafka -> shipping.", file=sys.stderr)
        print(f"Faults every {self.fault_every_s:g} s, in turn: {', '.join(dict.fromkeys(FAULTS))}.",
              file=sys.stderr)
        if dashboard:
            print(f"Dashboard: http://127.0.0.1:{self.settings.dashboard_port}", file=sys.stderr)
        print("Ctrl-C to stop" + ("." if self.external else " (the dev stack keeps running: `outbox dev down`).")
              + "\n", file=sys.stderr)
        started = time.monotonic()
        try:
            try:
                while not self.stop.wait(10 if self.duration is None else min(10, self.duration)):
                    self._watch_worker()
                    self._report(dsn)
                    if self.duration is not None and time.monotonic() - started >= self.duration:
                        break
            except KeyboardInterrupt:
                print("\nStopping the shop and the faults; waiting for the orders in flight to settle "
                      "(Ctrl-C again to stop at once).", file=sys.stderr)
            self.quiet.set()
            try:
                settled = not self.failed and self._drain(dsn)
            except KeyboardInterrupt:
                settled = False
        finally:
            self.quiet.set()
            self.stop.set()
            self.worker.stop()
            shipper.stop()
            relay.request_stop()
            for thread in self.threads:
                thread.join(30)
            if dashboard is not None:
                dashboard.terminate()
                dashboard.wait(10)
            self.provider.stop()
        summary = self._report(dsn, final=True)
        if not settled:
            print(f"Not settled when the demo stopped: {summary.unsettled()}. Nothing is lost: the events wait "
                  f"in the outbox or Kafka, unknown outcomes in the ledger, and the next `outbox demo` (or the "
                  f"dashboard's Unknown outcome page) takes them from there.", file=sys.stderr)
        if self.failed:
            print(f"The demo stopped because {', '.join(self.failed)} failed (traceback above).", file=sys.stderr)
            return 1
        return 0

    # ----- the parts

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
                log.exception("demo component %s failed; stopping the demo", name)
                self.failed.append(name)
                self.stop.set()

        thread = threading.Thread(target=guarded, name=f"demo-{name}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def _shop(self, dsn: Dsn) -> None:
        rnd = random.Random(7)
        customers = ["ada", "grace", "edsger", "barbara", "ken", "margaret"]
        with psycopg.connect(dsn.secret(), autocommit=True) as conn:
            while not self.quiet.wait(1 / self.rate):
                order_service.place_order(conn, rnd.choice(customers), rnd.randint(5, 300) * 100)

    def _dashboard(self, urls) -> subprocess.Popen:
        env = {"OUTBOX_DATABASE_URL": urls.database_url.secret(), "OUTBOX_KAFKA_BOOTSTRAP": urls.kafka_bootstrap}
        return subprocess.Popen([sys.executable, "-m", "outbox.cli", "dashboard"], env={**os.environ, **env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def _watch_worker(self) -> None:
        code = self.worker.exited()
        if code is not None:  # not one of our kills (those restart at once): say so, then carry on
            print(f"payment worker exited on its own (exit code {code}); see {self.worker.log_path}. "
                  f"Restarting it.", file=sys.stderr)
            self.worker.start()

    # ----- faults

    def _faults(self, dsn: Dsn, bootstrap: str) -> None:
        resender = KafkaProducer(bootstrap_servers=bootstrap)
        tail = KafkaConsumer(payment_worker.TOPIC, shipping.TOPIC, bootstrap_servers=bootstrap, group_id=None,
                             auto_offset_reset="latest", isolation_level="read_committed")
        recent: list = []
        try:
            with psycopg.connect(dsn.secret(), autocommit=True) as conn:
                for fault in itertools.cycle(FAULTS):
                    if self.quiet.wait(self.fault_every_s):
                        return
                    for records in tail.poll(timeout_ms=500).values():
                        recent = (recent + records)[-100:]
                    if fault == "redelivery":
                        self._redeliver(resender, recent)
                    elif fault == "crash":
                        self._crash_after_charge(conn)
                    else:
                        self.provider.script(fault)
        finally:
            tail.close()
            resender.close()

    def _redeliver(self, resender: KafkaProducer, recent: list) -> None:
        """What a relay retry, a consumer restart or a replayed topic does: the same event (same
        event_id header) once more. One command and one PaymentCaptured, when there are some."""
        rnd = random.Random()
        for topic in (payment_worker.TOPIC, shipping.TOPIC):
            candidates = [r for r in recent if r.topic == topic]
            if candidates:
                r = rnd.choice(candidates)
                resender.send(r.topic, value=r.value, key=r.key, headers=r.headers, partition=r.partition)
                with self.injected.lock:
                    self.injected.redeliveries += 1
        resender.flush(10)

    def _crash_after_charge(self, conn: psycopg.Connection) -> None:
        """The seed's crash: the provider has charged, the worker has not recorded it, the worker dies."""
        seen = len(self.provider.requests())
        self.provider.script("stall")  # charges, then holds its answer PROVIDER_HANG_S
        deadline = time.monotonic() + 30
        key = None
        while key is None and not self.quiet.is_set() and time.monotonic() < deadline:
            stalled = [r["key"] for r in self.provider.requests()[seen:] if r["behaviour"] == "stall"]
            charged = {c["idempotency_key"] for c in self.provider.charges()}
            key = next((k for k in stalled if k in charged), None)
            if key is None:
                time.sleep(0.02)
        if key is None:
            return

        def count_if_unrecorded():
            status = conn.execute("SELECT status FROM outbox.effects WHERE key = %s", (key,)).fetchone()
            if status and status[0] not in ("succeeded", "failed"):  # charged, nothing recorded: the seed's case
                with self.injected.lock:
                    self.injected.crashes += 1

        self.worker.crash(count_if_unrecorded)

    # ----- what happened

    def _drain(self, dsn: Dsn) -> bool:
        """Wait until every order of the run is settled end to end (or drain_s passes)."""
        deadline = time.monotonic() + self.drain_s
        last_report = time.monotonic()
        while time.monotonic() < deadline:
            self._watch_worker()
            summary = self._measure(dsn)
            if summary.settled():
                return True
            if time.monotonic() - last_report >= 10:
                self._print(summary, "draining")
                last_report = time.monotonic()
            time.sleep(0.5)
        return False

    def _report(self, dsn: Dsn, final: bool = False) -> "Summary":
        summary = self._measure(dsn)
        self._print(summary, "final" if final else None)
        return summary

    def _print(self, summary: "Summary", label: str | None) -> None:
        print(("" if label is None else f"[{label}] ") + summary.line(), file=sys.stderr, flush=True)

    def _measure(self, dsn: Dsn) -> "Summary":
        s = Summary()
        requests = Counter(r["behaviour"] for r in self.provider.requests())
        s.timeouts, s.dropped = requests["timeout"], requests["drop"]
        per_order = Counter(c.get("metadata", {}).get("order_id") for c in self.provider.charges())
        s.double_charges = sum(1 for n in per_order.values() if n > 1)
        with self.injected.lock:
            s.crashes, s.redeliveries = self.injected.crashes, self.injected.redeliveries
        run = {"first": self.first_order, "since": self.started_at}
        with psycopg.connect(dsn.secret(), autocommit=True) as conn:
            s.orders, s.captured, s.declined, s.shipped, s.shipped_twice = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE p.status = 'captured'), "
                "count(*) FILTER (WHERE p.status = 'declined'), count(*) FILTER (WHERE sh.n >= 1), "
                "count(*) FILTER (WHERE sh.n > 1) "
                "FROM shop.orders o LEFT JOIN payments.payments p ON p.order_id = o.id "
                "LEFT JOIN (SELECT order_id, count(*) AS n FROM shipping.shipments GROUP BY 1) sh "
                "ON sh.order_id = o.id WHERE o.id >= %(first)s", run).fetchone()
            s.unknown, s.resolved = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE status IN ('succeeded', 'failed')) FROM outbox.effects "
                "WHERE created_at >= %(since)s AND (evidence @> '[{\"what\": \"indeterminate\"}]' "
                "OR evidence @> '[{\"what\": \"expired\"}]')", run).fetchone()
            s.suppressed = conn.execute(
                "SELECT coalesce(sum(duplicates), 0) FROM outbox.inbox_messages "
                "WHERE consumer IN (%(a)s, %(b)s) AND first_seen >= %(since)s",
                {**run, "a": payment_worker.CONSUMER, "b": shipping.CONSUMER}).fetchone()[0]
            s.dead_letters = conn.execute(
                "SELECT count(*) FROM outbox.inbox_dead_letters WHERE status = 'dead' AND created_at >= %(since)s",
                run).fetchone()[0]
            s.open_effects = conn.execute(
                "SELECT count(*) FROM outbox.effects WHERE status IN ('in_progress', 'unknown') "
                "AND created_at >= %(since)s", run).fetchone()[0]
            s.in_flight = conn.execute("SELECT count(*) FROM outbox.in_flight").fetchone()[0]
        return s


@dataclass
class Summary:
    orders: int = 0
    captured: int = 0
    declined: int = 0
    shipped: int = 0
    crashes: int = 0
    timeouts: int = 0
    dropped: int = 0
    redeliveries: int = 0
    suppressed: int = 0
    unknown: int = 0
    resolved: int = 0
    open_effects: int = 0
    dead_letters: int = 0
    double_charges: int = 0
    shipped_twice: int = 0
    in_flight: int = 0

    def line(self) -> str:
        # One stable "name N" vocabulary: people read it, tests/devstack/test_demo.py parses it.
        return (f"orders {self.orders}, captured {self.captured}, declined {self.declined}, shipped {self.shipped}"
                f" | faults: worker killed after charging {self.crashes}, provider timeouts {self.timeouts}, "
                f"responses dropped {self.dropped}, redeliveries {self.redeliveries}"
                f" | duplicates suppressed {self.suppressed}, unknown outcomes {self.unknown}, "
                f"resolved {self.resolved}, dead letters {self.dead_letters}"
                f" | double charges {self.double_charges}, shipped twice {self.shipped_twice}, "
                f"in flight {self.in_flight}")

    def settled(self) -> bool:
        return (self.captured + self.declined == self.orders and self.shipped == self.captured
                and self.open_effects == 0 and self.in_flight == 0)

    def unsettled(self) -> str:
        return (f"{self.orders - self.captured - self.declined} order(s) awaiting payment "
                f"({self.open_effects} charge(s) of unknown outcome or in progress, {self.dead_letters} dead "
                f"letter(s)), {self.captured - self.shipped} captured payment(s) awaiting shipment, "
                f"{self.in_flight} event(s) in flight to Kafka")


def run_demo(settings: Settings, rate: float = 3.0, duration: float | None = None, dashboard: bool = True,
             external: bool = False, with_relay: bool = True, fault_every_s: float = 4.0) -> int:
    return Demo(settings, rate, duration, dashboard, external, with_relay, fault_every_s).run()
