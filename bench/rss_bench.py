"""The relay's memory on one very large source transaction: is it bounded, and by what?

    python -m bench.rss_bench [--events 1000000] [--clients kafka-python,confluent-kafka]

Starts the embedded stack under .outbox/bench-rss, then per producer client: runs `outbox relay`
as a process (the CLI users run), waits until it streams, commits ONE transaction of --events
outbox rows of ~200 B, and samples the relay process's RSS (psutil, every 0.1 s) until the last
event is published. Prints the idle RSS (streaming, nothing to do), the peak, and how long the
transaction took from its commit to the last Kafka acknowledgement; saves JSON in bench/results/.
The in-flight budget (OUTBOX_MAX_INFLIGHT_EVENTS / _BYTES) is what should bound the peak, not
the transaction's size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import psycopg

from bench.relay_bench import PAYLOAD, _has, log
from outbox.core.migrate import migrate
from outbox.core.settings import load_settings
from outbox.devstack.stack import DevStack

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
ROOT = REPO / ".outbox" / "bench-rss"


def published(dsn, slot: str) -> int:
    with psycopg.connect(dsn.secret(), autocommit=True) as conn:
        row = conn.execute("SELECT events_published FROM outbox.relay_status WHERE slot_name = %s", (slot,)).fetchone()
        return row[0] if row else 0


def streaming(dsn, slot: str) -> bool:
    with psycopg.connect(dsn.secret(), autocommit=True) as conn:
        return bool(conn.execute("SELECT count(*) FROM outbox.relay_status s JOIN outbox.relay_instances i "
                                 "USING (slot_name) WHERE slot_name = %s AND i.role = 'active'", (slot,)).fetchone()[0])


def one_transaction(dsn, n: int) -> float:
    """n rows in one INSERT, one transaction; returns the commit time (monotonic)."""
    with psycopg.connect(dsn.secret()) as conn:
        conn.execute("INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) "
                     "SELECT 'big', (i %% 1000)::text, 'Placed', jsonb_build_object('i', i, 'pad', repeat('x', %s)) "
                     "FROM generate_series(1, %s) i", (PAYLOAD, n))
        conn.commit()
    return time.monotonic()


def run(dsn, bootstrap: str, client: str, n: int, log_dir: Path) -> dict:
    tag = "kp" if client == "kafka-python" else "cf"
    slot = f"rss_{tag}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update({"OUTBOX_DATABASE_URL": dsn.secret(), "OUTBOX_KAFKA_BOOTSTRAP": bootstrap, "OUTBOX_SLOT_NAME": slot,
                "OUTBOX_TOPIC_TEMPLATE": f"rss{tag}.{{aggregate_type}}", "OUTBOX_KAFKA_CLIENT": client,
                "OUTBOX_METRICS_PORT": "0", "OUTBOX_RELAY_ID": f"rss-{tag}", "OUTBOX_LOG_LEVEL": "WARNING"})
    settings = load_settings(_env_file=None)
    with open(log_dir / f"relay-{tag}.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "outbox.cli", "relay"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ps = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while not streaming(dsn, slot):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the relay did not start streaming; see {log_dir / f'relay-{tag}.log'}")
            time.sleep(0.2)
        time.sleep(2)
        idle = ps.memory_info().rss
        peak = idle
        samples = []
        committed = one_transaction(dsn, n)
        log(f"{client}: {n:,} rows committed in one transaction; relay idle RSS {idle / 2**20:.0f} MiB")
        started = time.monotonic()
        next_check = started
        while True:
            rss = ps.memory_info().rss
            peak = max(peak, rss)
            now = time.monotonic()
            samples.append((round(now - committed, 1), round(rss / 2**20, 1)))
            if now >= next_check:
                done = published(dsn, slot)
                if done >= n:
                    break
                next_check = now + 1
                if now - started > 1800:
                    raise RuntimeError(f"only {done:,} of {n:,} published after 30 min")
            if proc.poll() is not None:
                raise RuntimeError(f"the relay exited with {proc.returncode}; see {log_dir / f'relay-{tag}.log'}")
            time.sleep(0.1)
        seconds = time.monotonic() - committed
        log(f"{client}: all published {seconds:.1f} s after the commit; peak RSS {peak / 2**20:.0f} MiB")
        return {"client": client, "events": n, "rss_idle_mib": round(idle / 2**20, 1),
                "rss_peak_mib": round(peak / 2**20, 1), "commit_to_last_ack_s": round(seconds, 1),
                "events_per_s": round(n / seconds), "max_inflight_events": settings.max_inflight_events,
                "max_inflight_bytes": settings.max_inflight_bytes,
                "rss_mib_every_10th_sample": samples[::10]}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--clients", default="kafka-python,confluent-kafka")
    args = parser.parse_args()
    clients = [c for c in args.clients.split(",") if c and (c != "confluent-kafka" or _has("confluent_kafka"))]
    base = load_settings(_env_file=None, dev_kafka="apache")
    shutil.rmtree(ROOT, ignore_errors=True)
    stack = DevStack(base, root=ROOT)
    urls = stack.up()
    try:
        results = []
        for client in clients:
            # A database of its own: in a shared one the second relay's new slot would first backfill
            # the first run's million events from the table, which is another benchmark.
            name = "rss_" + client.replace("-", "_")
            with psycopg.connect(urls.database_url.secret(), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")
            dsn = urls.database_url.with_params(dbname=name)
            migrate(dsn, log=lambda _: None)
            results.append(run(dsn, urls.kafka_bootstrap, client, args.events, ROOT))
    finally:
        stack.down()
    doc = {"benchmark": "relay_rss_one_big_transaction", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "payload_bytes": "~200", "results": results}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"rss-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    for r in results:
        print(f"{r['client']:16} {r['events']:,} events in one transaction: idle {r['rss_idle_mib']:.0f} MiB, "
              f"peak {r['rss_peak_mib']:.0f} MiB, {r['commit_to_last_ack_s']:.0f} s from commit to last ack")
    print(f"saved {path.relative_to(REPO)}")
    shutil.rmtree(ROOT, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
