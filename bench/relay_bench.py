"""Relay benchmark: ratios against ceilings measured in the same run on the same rows and broker.

    python -m bench.relay_bench [--events 200000] [--latency-seconds 15] [--clients kafka-python,confluent-kafka]

1. capture ceiling   pg_recvlogical (C) reading the slot to /dev/null
2. relay capture     our psycopg stream + pgoutput decoder + router, no Kafka   (goal >= 0.9x of 1)
3. produce ceiling   a bare kafka-python producer sending the relay's exact records, same config
4. relay end to end  commit -> Kafka ack, with and without per-event delivery rows (goal >= 0.8x of 3),
                     once per producer client (OUTBOX_KAFKA_CLIENT); every ratio is against the bare
                     kafka-python producer measured right before it (plus a bare librdkafka producer
                     for reference)
5. latency           commit -> Kafka ack at a steady 1,000 events/s, p50/p99

Results are printed and saved as JSON under bench/results/. Runs on the embedded dev stack in
.outbox/bench (PostgreSQL 18 + Apache Kafka), which it starts and stops itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from kafka import KafkaProducer

from outbox.core.lsn import str_to_lsn
from outbox.core.migrate import migrate
from outbox.core.settings import load_settings
from outbox.devstack.postgres import binaries
from outbox.devstack.stack import DevStack
from relay.daemon import Relay
from relay.pgoutput import Relation, decode, insert_at
from relay.publisher import Publisher, compression, ensure_topic, producer_config
from relay.replication import Keepalive, ReplicationStream, parse_frame
from relay.router import TABLE_LAYOUT, Layout, Router, Txn

RESULTS = Path(__file__).parent / "results"
PAYLOAD = 180  # bytes of padding: the JSON value is ~200 B


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def insert_rows(dsn, aggregate_type: str, n: int) -> str:
    with psycopg.connect(dsn.secret(), autocommit=True) as conn:
        for start in range(0, n, 5000):
            conn.execute(
                "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT %s, (i %% 1000)::text, 'Placed', jsonb_build_object('i', i, 'pad', repeat('x', %s)) "
                "FROM generate_series(%s::int, %s::int) i", (aggregate_type, PAYLOAD, start, min(start + 5000, n) - 1))
        return conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]


def create_slot(dsn, name: str) -> None:
    with psycopg.connect(dsn.secret(), autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))


def bench_recvlogical(dsn, slot: str, end_lsn: str, n: int) -> float:
    argv = [str(binaries() / "pg_recvlogical"), "-d", dsn.secret(), "-S", slot, "--start", "-E", end_lsn,
            "-f", "/dev/null", "-o", "proto_version=1", "-o", "publication_names=outbox_events", "--no-loop"]
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return n / (time.perf_counter() - started)


def bench_capture(dsn, slot: str, end_lsn: str, n: int, template: str | None) -> float:
    """The relay's own capture path, exactly as the pipeline reads (frames decoded in place), without
    Kafka: stream + decode, and with a template also the routing to Kafka records."""
    stream = ReplicationStream(dsn, slot, "outbox_events")
    router = Router(template) if template else None
    end = str_to_lsn(end_lsn)
    layouts: dict[int, Layout] = {}
    txn = Txn.of(0, 0)
    seen = 0
    stream.open()
    started = time.perf_counter()
    try:
        while seen < n:
            raw = stream.read_raw(1.0)
            if raw is None:
                continue
            if raw[0] == 0x77 and raw[25] == 0x49:
                oid, row = insert_at(bytes(raw), 25)
                if router is not None:
                    router.route(layouts[oid], row, txn)
                seen += 1
                continue
            frame = parse_frame(raw)
            if isinstance(frame, Keepalive):
                if frame.wal_end >= end:
                    break
                continue
            msg = decode(frame.payload)
            if type(msg) is Relation:
                layouts[msg.oid] = Layout.of(msg)
    finally:
        stream.close()
    return seen / (time.perf_counter() - started)


def relay_records(dsn, aggregate_type: str, template: str) -> list:
    """The exact records the relay would send for these rows."""
    router = Router(template)
    txn = Txn.of(0, 0)
    with psycopg.connect(dsn.secret()) as conn:
        rows = conn.execute(
            "SELECT event_id::text, aggregate_type, aggregate_id, event_type, payload::text, headers::text, "
            "created_at::text, txid::text FROM outbox.events WHERE aggregate_type = %s ORDER BY event_id",
            (aggregate_type,)).fetchall()
    return [router.route(TABLE_LAYOUT, tuple(v.encode() for v in r), txn) for r in rows]


def bench_producer(settings, records: list, topic: str) -> float:
    producer = KafkaProducer(**producer_config(settings))
    producer.send(topic, b"warm-up", key=b"w").get(30)
    started = time.perf_counter()
    for r in records:
        producer.send(topic, value=r.value, key=r.key, headers=r.headers)
    producer.flush()
    rate = len(records) / (time.perf_counter() - started)
    producer.close()
    return rate


def bench_confluent_producer(settings, records: list, topic: str) -> float:
    """The same records through a bare librdkafka producer with the relay's configuration."""
    from confluent_kafka import Producer

    from relay.publisher_confluent import producer_config as confluent_config

    producer = Producer(confluent_config(settings))
    producer.produce(topic, b"warm-up", b"w")
    producer.flush(30)
    started = time.perf_counter()
    for r in records:
        try:
            producer.produce(topic, r.value, r.key, headers=r.headers)
        except BufferError:
            producer.poll(0.01)
            producer.produce(topic, r.value, r.key, headers=r.headers)
        producer.poll(0)
    producer.flush()
    rate = len(records) / (time.perf_counter() - started)
    producer.close()
    return rate


def published(dsn, slot: str) -> int:
    with psycopg.connect(dsn.secret(), autocommit=True) as conn:
        row = conn.execute("SELECT events_published FROM outbox.relay_status WHERE slot_name = %s",
                           (slot,)).fetchone()
        return row[0] if row else 0


def run_relay_for(settings, n: int) -> tuple[float, float]:
    """Seconds until a Relay published the next n events of its slot: (while streaming, from its
    start: connections, producer, slot checks). Published = Kafka acknowledged them."""
    relay = Relay(settings)
    thread = threading.Thread(target=relay.run, daemon=True)
    started = time.perf_counter()
    thread.start()
    while relay.metrics.active._value.get() < 1:
        time.sleep(0.0005)
    streaming = time.perf_counter()
    while relay.metrics.published._value.get() < n:
        time.sleep(0.005)
    done = time.perf_counter()
    relay.request_stop()
    thread.join(60)
    return done - streaming, done - started


def bench_relay(settings, dsn, n: int) -> tuple[float, float]:
    """(events/s while streaming, events/s including the session start). Completion is counted when
    the ledger recorded the last batch, i.e. after Kafka acknowledged it."""
    streaming_s, total_s = run_relay_for(settings, n)
    assert published(dsn, settings.slot_name) == n
    return n / streaming_s, n / total_s


def emit_steadily(conn, aggregate_type: str, per_s: float, n: int) -> None:
    """n events of ~PAYLOAD bytes, one transaction each, at a steady per_s."""
    interval, next_at = 1.0 / per_s, time.perf_counter()
    for i in range(n):
        conn.execute("SELECT outbox.emit(%s, %s, 'Tick', jsonb_build_object('pad', repeat('x', %s)))",
                     (aggregate_type, str(i % 100), PAYLOAD))
        next_at += interval
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def bench_latency(settings, dsn, rate: int, seconds: float) -> dict:
    """Commit -> Kafka ack per event, the commit time being the server's commit timestamp."""
    latencies: list[float] = []
    cls = Publisher
    if settings.kafka_client == "confluent-kafka":
        from relay.publisher_confluent import ConfluentPublisher as cls
    original = cls.send

    def timed_send(self, topic, value, key, headers):
        future = original(self, topic, value, key, headers)
        committed = datetime.fromisoformat(dict(headers)["outbox_commit_ts"].decode().replace("Z", "+00:00"))
        # librdkafka's acknowledgements are seen when the pipeline polls (once per loop): included here.
        future.add_callback(lambda _md, c=committed.timestamp(): latencies.append(time.time() - c))
        return future

    cls.send = timed_send
    relay = Relay(settings)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        time.sleep(3)  # connected, streaming, topic created by a first event below
        with psycopg.connect(dsn.secret(), autocommit=True) as conn:
            conn.execute("SELECT outbox.emit('latency', 'warm', 'Warm', '{}')")
            time.sleep(1)
            latencies.clear()
            emit_steadily(conn, "latency", rate, int(rate * seconds))
        time.sleep(2)
    finally:
        relay.request_stop()
        thread.join(60)
        cls.send = original
    ordered = sorted(latencies)
    pct = lambda p: ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000  # noqa: E731
    return {"events": len(ordered), "rate_per_s": rate, "p50_ms": round(pct(0.50), 2), "p90_ms": round(pct(0.90), 2),
            "p99_ms": round(pct(0.99), 2), "max_ms": round(ordered[-1] * 1000, 2),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--latency-seconds", type=float, default=15)
    parser.add_argument("--clients", default="kafka-python,confluent-kafka",
                        help="OUTBOX_KAFKA_CLIENT values to run end to end (comma-separated)")
    args = parser.parse_args()
    n = args.events
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]

    base = load_settings(_env_file=None, dev_kafka="apache")
    stack = DevStack(base, root=Path(".outbox/bench"))
    stack.down()
    import shutil

    shutil.rmtree(".outbox/bench", ignore_errors=True)
    urls = stack.up()
    try:
        dsn = urls.database_url
        migrate(dsn, log=lambda _: None)
        bootstrap = urls.kafka_bootstrap
        results: dict = {}

        capture_slots = [f"b_{kind}{i}" for i in (1, 2) for kind in ("recv", "capture", "route")]
        runs = []  # (client, slot, template, track deliveries)
        for client in clients:
            tag = "" if client == "kafka-python" else "_cf"
            runs += [(client, f"b_relay{tag}", f"e2e{tag}.{{aggregate_type}}", True),
                     (client, f"b_relay{tag}_nodeliv", f"e2e2{tag}.{{aggregate_type}}", False)]
        for slot in capture_slots + [r[1] for r in runs]:
            create_slot(dsn, slot)
        log(f"inserting {n} events of ~200 B ...")
        end_lsn = insert_rows(dsn, "bench", n)

        # Each capture path reads the same WAL twice, alternating, and keeps its better run: the
        # first reader after the load pays for cold caches and a busy checkpointer.
        best: dict[str, float] = {}
        for slot in capture_slots:
            kind = slot[2:-1]
            if kind == "recv":
                rate = bench_recvlogical(dsn, slot, end_lsn, n)
            else:
                rate = bench_capture(dsn, slot, end_lsn, n, "bench.{aggregate_type}" if kind == "route" else None)
            best[kind] = max(best.get(kind, 0.0), rate)
        results["pg_recvlogical_events_per_s"] = round(best["recv"])
        results["relay_capture_events_per_s"] = round(best["capture"])
        results["relay_capture_and_route_events_per_s"] = round(best["route"])
        log(f"pg_recvlogical: {best['recv']:,.0f} events/s; relay capture (stream+decode): {best['capture']:,.0f}/s; "
            f"capture + route to records: {best['route']:,.0f}/s")

        def settings_for(slot: str, template: str, **extra):
            return load_settings(_env_file=None, database_url=dsn.secret(), kafka_bootstrap=bootstrap, slot_name=slot,
                                 topic_template=template, metrics_port=0, relay_id=f"bench-{slot}", **extra)

        records = relay_records(dsn, "bench", "bare.{aggregate_type}")
        for run, (client, slot, template, track) in enumerate(runs):
            ensure_topic({"bootstrap_servers": bootstrap}, f"bare{run}.bench", 3)
            ensure_topic({"bootstrap_servers": bootstrap}, template.format(aggregate_type="bench"), 3)
            s = settings_for(slot, template, track_deliveries=track, kafka_client=client)
            bare = bench_producer(s, records, f"bare{run}.bench")
            e2e, with_start = bench_relay(s, dsn, n)
            key = "with_delivery_rows" if track else "without_delivery_rows"
            if client != "kafka-python":  # the kafka-python keys keep their names: older results compare
                key += "_" + client.replace("-", "_")
            results[f"bare_producer_events_per_s_{run}"] = round(bare)
            results[f"relay_e2e_events_per_s_{key}"] = round(e2e)
            results[f"relay_e2e_incl_session_start_events_per_s_{key}"] = round(with_start)
            results[f"ratio_e2e_to_bare_{key}"] = round(e2e / bare, 3)
            log(f"bare kafka-python producer {bare:,.0f}/s; relay end to end with {client} "
                f"({key.replace('_', ' ')}) {e2e:,.0f}/s -> {e2e / bare:.2f}x")
        if "confluent-kafka" in clients:
            ensure_topic({"bootstrap_servers": bootstrap}, "bare_cf.bench", 3)
            bare_cf = bench_confluent_producer(settings_for("b_relay_cf", "x.{aggregate_type}"), records,
                                               "bare_cf.bench")
            results["bare_confluent_producer_events_per_s"] = round(bare_cf)
            log(f"bare confluent-kafka producer (reference) {bare_cf:,.0f}/s")
        results["ratio_capture_to_pg_recvlogical"] = round(best["capture"] / best["recv"], 3)
        results["ratio_capture_and_route_to_pg_recvlogical"] = round(best["route"] / best["recv"], 3)

        for client in clients:
            tag = "" if client == "kafka-python" else "_" + client.replace("-", "_")
            create_slot(dsn, f"b_latency{tag}")
            results[f"latency_at_1k_per_s{tag}"] = bench_latency(
                settings_for(f"b_latency{tag}", f"lat{tag}.{{aggregate_type}}", kafka_client=client), dsn, 1000,
                args.latency_seconds)
            log(f"latency at 1k/s with {client}: {results[f'latency_at_1k_per_s{tag}']}")

        import kafka

        doc = {
            "benchmark": "relay",
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "versions": {"kafka_python": kafka.__version__, "confluent_kafka": _confluent_version(),
                         "postgres": stack.postgres().version(),
                         "kafka_broker": "4.1.1"},
            "config": {"events": n, "clients": clients, "payload_bytes": "~200", "compression": compression("auto"), "linger_ms":
                       base.linger_ms, "batch_max_events": base.batch_max_events,
                       "crc32c": _has("crc32c")},
            "results": results,
            "goals": {"capture_vs_pg_recvlogical": 0.9, "e2e_vs_bare_producer": 0.8},
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"relay-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        log(f"saved {out}")
    finally:
        stack.down()


def _confluent_version() -> str | None:
    try:
        import confluent_kafka
    except ImportError:
        return None
    return f"{confluent_kafka.version()[0]} (librdkafka {confluent_kafka.libversion()[0]})"


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
