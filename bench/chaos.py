"""One chaos run with a ledger (`make chaos`): break everything under load, then count.

    python -m bench.chaos [--seed N] [--faults 30] [--delivery exactly-once] [--save]

A three-broker Apache Kafka cluster and a PostgreSQL primary with a streaming standby (the dev
stack under .outbox/chaos); producers call outbox.emit() at a fixed rate (some transactions rolled
back on purpose, many aggregates, several events per transaction and per aggregate); an active and
a standby relay; two consumer processes with inbox dedupe and the effects ledger charging the fake
payment provider. A seeded scheduler (the seed is printed; the same seed gives the same schedule)
injects: kill -9 of the active relay, kill -9 of a consumer mid-handler or mid-effect, kill -9 and
restart of a Kafka broker, SIGSTOP/SIGCONT of a broker, a PostgreSQL restart and one PostgreSQL
failover to the standby. At the end it checks the ledger and prints a table; it exits 1 when an
invariant breaks: events lost, duplicates to read_committed readers (exactly-once), duplicate
effects, double charges in the provider's own log, per-aggregate order violations.

Boundary: what the relay and inbox promise starts at a committed outbox row on the server the
relay reads. A transaction the producer saw committed on the old primary but that the (asynchronous)
standby never received is lost by PostgreSQL's failover, not by us; it is counted separately.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / ".outbox" / "chaos"
TOPIC_PREFIX = "chaos"
CONSUMER = "payments"
KINDS = ("relay_kill", "consumer_kill", "broker_kill", "broker_freeze", "pg_restart", "pg_failover")

SCHEMA = """
CREATE TABLE IF NOT EXISTS chaos_applied (seq bigserial PRIMARY KEY, event_id uuid NOT NULL, aggregate_id text NOT NULL,
                                          n bigint NOT NULL, charge_id text);
"""


# ----- the consumer process

def consumer_main(name: str, provider_url: str) -> int:
    import logging

    from inbox import Effects, RetryPolicy, Runner, run_consumer
    from outbox.core.settings import load_settings
    from outbox.demo.fake_provider import ProviderClient

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"%(asctime)s {name} %(name)s %(message)s")
    settings = load_settings()
    provider = ProviderClient(provider_url, timeout_s=2.0)
    effects = Effects(settings.require_database_url(), lease_s=4.0, owner=name)

    def handle(conn, msg):
        body = msg.json()
        amount = 100 + int(body["n"]) % 900
        result = effects.run(f"charge:order-{msg.envelope.aggregate_id}-{body['n']}", {"amount": amount},
                             call=lambda key: provider.charge(key, amount, "EUR"), reconcile=provider.lookup,
                             idempotent=True, message=msg)
        conn.execute("INSERT INTO chaos_applied (event_id, aggregate_id, n, charge_id) VALUES (%s, %s, %s, %s)",
                     (msg.event_id, msg.envelope.aggregate_id, body["n"], (result.response or {}).get("id")))

    runner = Runner.from_settings(settings, CONSUMER, handle, pattern=f"^{TOPIC_PREFIX}\\..*",
                                  policy=RetryPolicy(max_attempts=30, backoff_initial_s=0.2, backoff_max_s=2.0),
                                  kafka_config={"session_timeout_ms": 10_000, "metadata_max_age_ms": 5_000})
    return run_consumer(runner)


# ----- the harness

class CrashLoop(Exception):
    """A process keeps exiting: an invariant of availability, reported with its log."""


class Producer(threading.Thread):
    def __init__(self, dsn, rnd: random.Random, rate: float):
        super().__init__(daemon=True)
        self.dsn, self.rnd, self.rate = dsn, rnd, rate
        self.committed: set[str] = set()
        self.rolled_back: set[str] = set()
        self.ambiguous: set[str] = set()  # the connection died during COMMIT: maybe committed
        self.stop = threading.Event()
        self.n = collections.Counter()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.dsn.secret(), connect_timeout=3) as conn:
                    while not self.stop.is_set():
                        self._one(conn)
                        time.sleep(self.rnd.expovariate(self.rate))
            except psycopg.OperationalError:
                time.sleep(0.3)

    def _one(self, conn) -> None:
        ids = []
        try:
            for _ in range(self.rnd.randint(1, 4)):
                aggregate = f"c{self.rnd.randrange(40)}"
                self.n[aggregate] += 1
                ids.append(str(conn.execute("SELECT outbox.emit('charge', %s, 'ChargeCustomer', %s::jsonb)",
                                            (aggregate, json.dumps({"n": self.n[aggregate]}))).fetchone()[0]))
            if self.rnd.random() < 0.1:
                conn.rollback()
                self.rolled_back.update(ids)
                return
        except psycopg.OperationalError:
            self.rolled_back.update(ids)  # never reached COMMIT
            raise
        try:
            conn.commit()
            self.committed.update(ids)
        except psycopg.OperationalError:
            self.ambiguous.update(ids)
            raise


class Chaos:
    def __init__(self, args):
        self.args = args
        self.rnd = random.Random(args.seed)
        self.procs: dict[str, subprocess.Popen] = {}
        self.faults: list[dict] = []
        self.restarts: collections.Counter = collections.Counter()  # exits we did not cause
        self.log_dir = ROOT / "logs"

    def run(self) -> int:
        from outbox.core.migrate import migrate
        from outbox.core.settings import load_settings
        from outbox.demo.fake_provider import FakeProvider
        from outbox.devstack.stack import DevStack

        print(f"chaos seed {self.args.seed} (--seed {self.args.seed} to replay), {self.args.faults} faults, "
              f"delivery {self.args.delivery}", flush=True)
        self.dev = DevStack(load_settings(dev_kafka="apache"), root=ROOT, kafka_brokers=3, pg_standby=True)
        self.dev.down()
        shutil.rmtree(ROOT, ignore_errors=True)
        urls = self.dev.up()
        self.dsn, self.bootstrap = urls.database_url, urls.kafka_bootstrap
        self.log_dir.mkdir(parents=True, exist_ok=True)
        migrate(self.dsn, log=lambda _: None)
        with psycopg.connect(self.dsn.secret(), autocommit=True) as conn:
            conn.execute(SCHEMA)
        self.provider = FakeProvider(hang_s=1.0).start()
        try:
            for name in ("relay-a", "relay-b"):
                self._start(name)
            self._wait(lambda: self._q("SELECT count(*) FROM outbox.relay_instances WHERE role = 'active'")[0][0],
                       60, "a relay to stream")
            for name in ("consumer-1", "consumer-2"):
                self._start(name)
            producer = self.producer = Producer(self.dsn, random.Random(self.args.seed + 1), self.args.rate)
            producer.start()
            self._schedule()
            producer.stop.set()
            producer.join(30)
            self._settle_down()
            return self._verdict()
        finally:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
            self.provider.stop()
            self.dev.down()

    # ----- processes

    def _env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        env.update(OUTBOX_DATABASE_URL=self.dsn.secret(), OUTBOX_KAFKA_BOOTSTRAP=self.bootstrap,
                   OUTBOX_DELIVERY=self.args.delivery, OUTBOX_TOPIC_TEMPLATE=f"{TOPIC_PREFIX}.{{aggregate_type}}",
                   OUTBOX_TOPIC_PARTITIONS="6", OUTBOX_METRICS_PORT="0", OUTBOX_RELAY_ID=name,
                   OUTBOX_HEARTBEAT_INTERVAL_S="2", OUTBOX_STATUS_INTERVAL_S="1", OUTBOX_BATCH_MAX_AGE_MS="50")
        return env

    def _start(self, name: str) -> None:
        argv = ([sys.executable, "-m", "outbox.cli", "relay"] if name.startswith("relay") else
                [sys.executable, "-m", "bench.chaos", "--consumer", name, "--provider", self.provider.url])
        log = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, env=self._env(name), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def _q(self, sql: str, params=()) -> list:
        for _ in range(60):
            try:
                with psycopg.connect(self.dsn.secret(), autocommit=True, connect_timeout=3) as conn:
                    return conn.execute(sql, params).fetchall()
            except psycopg.OperationalError:
                time.sleep(0.5)
        raise RuntimeError("the database stayed unreachable for 30 s")

    def _wait(self, predicate, timeout: float, what: str) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if predicate():
                    return time.monotonic() - started
            except (psycopg.Error, RuntimeError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    # ----- faults

    def _schedule(self) -> None:
        kinds = list(KINDS)
        while len(kinds) < self.args.faults:
            kinds.append(self.rnd.choice([k for k in KINDS if k != "pg_failover"]))
        self.rnd.shuffle(kinds)
        # The failover is one-way (the old primary is gone): keep it in the last third of the run.
        kinds.remove("pg_failover")
        kinds.insert(max(len(kinds) * 2 // 3, len(kinds) - 2), "pg_failover")
        for i, kind in enumerate(kinds, 1):
            time.sleep(self.rnd.uniform(1.0, 3.0))
            started = time.monotonic()
            detail = getattr(self, f"_{kind}")()
            # Recovered: an event committed after the fault ended has gone all the way through.
            restored = self._q("SELECT now()")[0][0]
            recovery = self._wait(lambda: self._applied_since(restored), 180, f"recovery after {kind}")
            self.faults.append({"kind": kind, "detail": detail, "recovery_s": round(time.monotonic() - started, 1),
                                "after_restore_s": round(recovery, 1)})
            print(f"  fault {i:2}/{len(kinds)} {kind:14} {detail:40} recovered in {self.faults[-1]['recovery_s']} s",
                  flush=True)

    def _applied_since(self, at) -> bool:
        self._revive()
        return bool(self._q("SELECT 1 FROM chaos_applied a JOIN outbox.events e USING (event_id) "
                            "WHERE e.created_at > %s LIMIT 1", (at,)))

    def _revive(self) -> None:
        """What a supervisor (systemd, Kubernetes) does: start again a process that exited."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                print(f"  {name} exited with {proc.returncode}; restarting it (see {self.log_dir / name}.log)",
                      flush=True)
                self.restarts[name] += 1
                if self.restarts[name] > 8:
                    tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise CrashLoop(f"{name} keeps exiting; the last of its log:\n{tail}")
                self._start(name)

    def _relay_kill(self) -> str:
        active = self._q("SELECT relay_id FROM outbox.relay_instances WHERE role = 'active'")
        return self._kill(active[0][0] if active else "relay-a")

    def _consumer_kill(self) -> str:
        return self._kill(self.rnd.choice(["consumer-1", "consumer-2"]))

    def _kill(self, name: str) -> str:
        self.procs[name].kill()
        self.procs[name].wait()
        time.sleep(self.rnd.uniform(0.5, 2.0))
        self._start(name)
        return f"kill -9 {name}"

    def _broker_kill(self) -> str:
        node = self.rnd.randint(1, 3)
        self.dev.kill_broker(node)
        time.sleep(self.rnd.uniform(3, 8))
        self.dev.restart_broker(node)
        return f"kill -9 broker {node}, restarted"

    def _broker_freeze(self) -> str:
        node = self.rnd.randint(1, 3)
        pause = self.rnd.uniform(5, 15)
        self.dev.pause_broker(node)
        time.sleep(pause)
        self.dev.resume_broker(node)
        return f"SIGSTOP broker {node} for {pause:.0f} s"

    def _pg_restart(self) -> str:
        name = self.dev.restart_primary(pause=self.rnd.uniform(0.5, 2.0))
        return f"PostgreSQL {name} restarted (fast)"

    def _pg_failover(self) -> str:
        # An operator promotes a standby that is ready (the dashboard says whether it is): here, one
        # whose copy of the failover slot the slot-sync worker has caught up with.
        self.dev.wait_slot_synced("outbox_relay", timeout=120)
        report = self.dev.promote()
        return f"promoted {report.get('promoted', 'the standby')}"

    # ----- the end

    def _settle_down(self) -> None:
        self._revive()
        self._wait(lambda: not self._q("SELECT 1 FROM outbox.in_flight LIMIT 1"), 300, "the relay to catch up")
        total = self._q("SELECT count(*) FROM outbox.events")[0][0]
        self._wait(lambda: self._q("SELECT count(DISTINCT event_id) FROM chaos_applied")[0][0] >= total, 300,
                   "the consumers to catch up")

    def _verdict(self) -> int:
        from tests.support.helpers import read_topic  # the same independent reader the tests use

        p = self.producer
        present = {r[0] for r in self._q("SELECT event_id::text FROM outbox.events")}
        isolation = "read_committed" if self.args.delivery == "exactly-once" else "read_uncommitted"
        records = read_topic(self.bootstrap, expect=len(present), isolation=isolation, timeout=120, settle=3.0,
                             pattern=f"^{TOPIC_PREFIX}\\.charge$")
        in_kafka = collections.Counter(dict(r.headers)["event_id"].decode() for r in records)
        applied = collections.Counter(r[0] for r in self._q("SELECT event_id::text FROM chaos_applied"))
        order_violations = 0
        last: dict[str, int] = {}
        for aggregate, n in self._q("SELECT aggregate_id, n FROM chaos_applied ORDER BY seq"):
            if n < last.get(aggregate, 0):
                order_violations += 1
            last[aggregate] = max(n, last.get(aggregate, 0))
        charges = collections.Counter(c["idempotency_key"] for c in self.provider.charges())
        unknown = self._q("SELECT count(*) FROM outbox.effects WHERE status IN ('unknown', 'in_progress')")[0][0]
        by_kind = collections.defaultdict(list)
        for f in self.faults:
            by_kind[f["kind"]].append(f["recovery_s"])
        result = {
            "seed": self.args.seed, "delivery": self.args.delivery, "faults": len(self.faults),
            "events_committed": len(p.committed), "events_rolled_back": len(p.rolled_back),
            "events_commit_ambiguous": len(p.ambiguous),
            "lost_by_postgresql_failover": len(p.committed - present),
            "events_in_outbox": len(present), "delivered": len(set(in_kafka) & present),
            "lost": len(present - set(in_kafka)),
            "rolled_back_delivered": len(p.rolled_back & set(in_kafka)),
            "duplicates_in_kafka": sum(in_kafka.values()) - len(in_kafka),
            "not_applied": len(present - set(applied)),
            "duplicate_effects": sum(c - 1 for c in applied.values()),
            "double_charges": sum(c - 1 for c in charges.values()),
            "order_violations": order_violations, "unknown_outcomes_unresolved": unknown,
            "recovery_s": {k: {"median": statistics.median(v), "worst": max(v), "count": len(v)}
                           for k, v in sorted(by_kind.items())},
            "unexpected_exits": dict(self.restarts), "fault_log": self.faults,
        }
        broken = [k for k in ("lost", "rolled_back_delivered", "not_applied", "duplicate_effects", "double_charges",
                              "order_violations") if result[k]]
        if self.args.delivery == "exactly-once" and result["duplicates_in_kafka"]:
            broken.append("duplicates_in_kafka")
        result["invariants_broken"] = broken
        print("\n" + table(result), flush=True)
        if self.args.save:
            out = REPO / "bench" / "results" / f"chaos-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"saved {out.relative_to(REPO)}")
        if broken:
            print(f"INVARIANTS BROKEN: {broken} (logs in {self.log_dir})", flush=True)
            return 1
        return 0


def table(r: dict) -> str:
    rows = [("events committed (producer saw COMMIT)", r["events_committed"]),
            ("events rolled back on purpose or cut off", r["events_rolled_back"]),
            ("commits cut off (outcome unknown to the producer)", r["events_commit_ambiguous"]),
            ("lost by PostgreSQL's failover (async standby)", r["lost_by_postgresql_failover"]),
            ("events in the outbox at the end", r["events_in_outbox"]),
            ("delivered to Kafka", r["delivered"]),
            ("LOST (in the outbox, not in Kafka)", r["lost"]),
            ("rolled back yet delivered", r["rolled_back_delivered"]),
            (f"duplicates in Kafka ({'read_committed' if r['delivery'] == 'exactly-once' else 'all'})",
             r["duplicates_in_kafka"]),
            ("events never applied by the consumers", r["not_applied"]),
            ("DUPLICATE EFFECTS", r["duplicate_effects"]),
            ("DOUBLE CHARGES (provider's charge log)", r["double_charges"]),
            ("PER-AGGREGATE ORDER VIOLATIONS", r["order_violations"]),
            ("unknown outcomes left unresolved", r["unknown_outcomes_unresolved"])]
    lines = [f"{'':2}{name:52} {value:>8}" for name, value in rows]
    lines.append(f"{'':2}{'recovery after each kind of fault':52} {'median':>8} {'worst':>8}")
    for kind, v in r["recovery_s"].items():
        label = f"{kind} (x{v['count']})"
        lines.append(f"{'':4}{label:50} {v['median']:>7.1f}s {v['worst']:>7.1f}s")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 30)))
    parser.add_argument("--faults", type=int, default=30, help="faults to inject (at least one of each kind)")
    parser.add_argument("--rate", type=float, default=40.0, help="producer transactions per second")
    parser.add_argument("--delivery", choices=["at-least-once", "exactly-once"], default="exactly-once")
    parser.add_argument("--save", action="store_true", help="write the result to bench/results/")
    parser.add_argument("--consumer", help=argparse.SUPPRESS)
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consumer:
        return consumer_main(args.consumer, args.provider)
    args.faults = max(args.faults, len(KINDS))
    return Chaos(args).run()


if __name__ == "__main__":
    sys.exit(main())
