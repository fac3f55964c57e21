"""Our relay against the real Debezium embedded engine, same run, same rows, same broker.

    python -m bench.debezium_bench [--events 30000] [--latency-seconds 10] [--clients kafka-python,confluent-kafka]
                                   [--deliveries at-least-once,exactly-once]

One embedded PostgreSQL 18 + Apache Kafka 4.x dev stack (.outbox/bench-dbz). Both sides read the same
publication (`outbox_events`) through their own pgoutput slot, created before the rows are written,
and write to Kafka with acks=all, idempotence, the relay's compression, linger 5 ms and 256 KiB
batches. Debezium 3.6 runs as a small Java program (bench/debezium/DbzBench.java, compiled here with
javac against jars pinned by SHA-256 in outbox/devstack/debezium-<version>.lock): the embedded engine
with the PostgreSQL connector (pgoutput, snapshot.mode=no_data) and the Outbox Event Router
configured for `outbox.events` (topic by aggregate_type, key aggregate_id, payload, event id in the
`id` header), each batch acknowledged after Kafka acked all of it.

1. backlog, pass 1  N rows written, then our relay starts and runs to the last ack (once per producer
                    client, OUTBOX_KAFKA_CLIENT, and delivery mode, OUTBOX_DELIVERY, each with its own
                    slot); then Debezium's first engine in a fresh JVM (cold) does the same. Debezium
                    has one mode here: at-least-once (the embedded engine has no Kafka transactions)
2. backlog, pass 2  N more rows, our relay again (new Relay), then a second engine in the same JVM (warm)
3. latency          commit -> Kafka ack at ~1,000 events/s, p50/p99, Debezium (warm JVM) then our relay

Ratios are ours / Debezium's. It is a benchmark, not a test: without Java 17+ and javac it says so
and exits 0. Results are printed and saved as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from bench.relay_bench import (
    _confluent_version,
    _has,
    bench_latency,
    create_slot,
    emit_steadily,
    insert_rows,
    log,
    published,
    run_relay_for,
)
from outbox.core.migrate import migrate
from outbox.core.settings import load_settings
from outbox.devstack.jars import ensure_debezium_jars
from outbox.devstack.kafka import find_java
from outbox.devstack.stack import DevStack
from relay.publisher import compression, ensure_topic

DEBEZIUM_VERSION = "3.6.1.Final"
RESULTS = Path(__file__).parent / "results"
SOURCE = Path(__file__).parent / "debezium" / "DbzBench.java"
ROOT = Path(".outbox/bench-dbz")
DBZ_SLOT = "dbz_bench"


def ratio(ours: float, theirs: float) -> float | None:
    """ours / theirs, 2 decimals; None when Debezium's figure is missing or zero."""
    return round(ours / theirs, 2) if theirs else None


def rate(events: int, seconds: float) -> float:
    return events / seconds if seconds > 0 else 0.0


def format_row(name: str, ours: float, theirs: float) -> str:
    r = ratio(ours, theirs)
    return f"{name:<58} relay {ours:>9,.0f}/s   Debezium {theirs:>9,.0f}/s   ratio {r if r is not None else '-'}x"


def find_javac(java: str) -> str | None:
    sibling = Path(java).resolve().parent / "javac"
    return str(sibling) if sibling.exists() else shutil.which("javac")


def engine_properties(dsn, bootstrap: str, offsets: Path, codec: str | None, linger_ms: int) -> dict[str, str]:
    info = conninfo_to_dict(dsn.secret())
    return {
        "name": "dbz-bench",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": str(offsets),
        "offset.flush.interval.ms": "1000",
        "database.hostname": info.get("host", "127.0.0.1"),
        "database.port": str(info.get("port", 5432)),
        "database.user": info["user"],
        "database.password": info.get("password", ""),
        "database.dbname": info["dbname"],
        "topic.prefix": "dbz",
        "plugin.name": "pgoutput",
        "slot.name": DBZ_SLOT,
        "publication.name": "outbox_events",
        "publication.autocreate.mode": "disabled",
        "table.include.list": "outbox.events",
        "snapshot.mode": "no_data",
        "tombstones.on.delete": "false",
        "poll.interval.ms": "10",  # default 500 ms: latency p50 of ~0.5 s; tuned as a fair user would
        "transforms": "outbox",
        "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
        "transforms.outbox.table.field.event.id": "event_id",
        "transforms.outbox.table.field.event.key": "aggregate_id",
        "transforms.outbox.table.field.event.payload": "payload",
        "transforms.outbox.route.by.field": "aggregate_type",
        "transforms.outbox.route.topic.replacement": "dbz.${routedByValue}",
        "transforms.outbox.table.fields.additional.placement": "event_type:header,created_at:header",
        "producer.bootstrap.servers": bootstrap,
        "producer.acks": "all",
        "producer.enable.idempotence": "true",
        "producer.max.in.flight.requests.per.connection": "5",
        "producer.linger.ms": str(linger_ms),
        "producer.batch.size": str(256 * 1024),
        "producer.compression.type": codec or "none",
    }


class Jvm:
    """The Java side: one process, commands on stdin, RESULT lines on stdout."""

    def __init__(self, java: str, classes: Path, libs: Path, props: Path, log_file: Path):
        self.started = time.perf_counter()
        self.log = open(log_file, "w")
        self.proc = subprocess.Popen([java, "-cp", f"{classes}:{libs}/*", "DbzBench", str(props)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("JVM_UP", 120)
        self.up_s = time.perf_counter() - self.started

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("EOF")

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"Debezium JVM: no {prefix} within {timeout} s (see {self.log.name})") from None
            if line == "EOF":
                raise RuntimeError(f"Debezium JVM exited (see {self.log.name})")
            if line.startswith(prefix):
                return line

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 600) -> dict:
        doc = json.loads(self.expect("RESULT ", timeout).removeprefix("RESULT "))
        if "error" in doc:
            raise RuntimeError(f"Debezium failed: {doc['error']} (see {self.log.name})")
        return doc

    def rss_peak_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return 0.0

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def relay_pass(settings, n: int) -> tuple[float, float]:
    """(events/s while streaming, events/s from Relay start) for the next n events of the slot."""
    streaming_s, total_s = run_relay_for(settings, n)
    return rate(n, streaming_s), rate(n, total_s)


def client_tag(client: str, delivery: str = "at-least-once") -> str:
    """'' for the default client and delivery (its result keys keep their names); otherwise e.g.
    '_confluent_kafka', '_exactly_once', '_confluent_kafka_exactly_once'."""
    tag = "" if client == "kafka-python" else "_" + client.replace("-", "_")
    return tag + ("" if delivery == "at-least-once" else "_" + delivery.replace("-", "_"))


def check_records(bootstrap: str, n: int, relay_topics: list[str]) -> dict:
    """Both sides wrote 2n records (exactly-once topics also hold a commit marker per Kafka
    transaction, so their end offsets are higher); Debezium's carry the event id header and the
    aggregate key."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=5000)
    counts = {}
    for topic in relay_topics + ["dbz.bench"]:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        counts[topic] = sum(consumer.end_offsets(parts).values())
    consumer.assign([TopicPartition("dbz.bench", 0)])
    consumer.seek_to_beginning()
    record = next(iter(consumer))
    consumer.close()
    headers = {k: v.decode() for k, v in record.headers}
    exact = [c for t, c in counts.items() if "exactly_once" not in t]
    if set(exact) != {2 * n} or min(counts.values()) < 2 * n or "id" not in headers or not record.key:
        raise RuntimeError(f"unexpected records: counts {counts}, a Debezium record {record}")
    return {"records_per_topic": counts, "debezium_sample": {"key": record.key.decode(), "headers": headers,
                                                             "value": record.value.decode()[:60]}}


def debezium_latency(jvm: Jvm, dsn, per_s: int, seconds: float) -> dict:
    n = int(per_s * seconds)
    jvm.send(f"latency {n} latency")
    with psycopg.connect(dsn.secret(), autocommit=True) as conn:
        deadline = time.monotonic() + 120
        while True:  # warm events until the engine streams and acked one
            conn.execute("SELECT outbox.emit('dbzlat', 'warm', 'Warm', '{}')")
            try:
                line = jvm.lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line == "FIRST":
                break
            if line == "EOF" or time.monotonic() > deadline:
                raise RuntimeError(f"Debezium latency pass never started (see {jvm.log.name})")
        time.sleep(1)
        emit_steadily(conn, "dbzlat", per_s, n)
    doc = jvm.result(120)
    return {"events": doc["latency_events"], "rate_per_s": per_s, "p50_ms": doc["p50_ms"], "p90_ms": doc["p90_ms"],
            "p99_ms": doc["p99_ms"], "max_ms": doc["max_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=30_000, help="rows per backlog pass")
    parser.add_argument("--latency-seconds", type=float, default=10)
    parser.add_argument("--clients", default=None,
                        help="OUTBOX_KAFKA_CLIENT values for our relay (default: both when confluent-kafka "
                             "is installed, else kafka-python)")
    parser.add_argument("--deliveries", default="at-least-once,exactly-once",
                        help="OUTBOX_DELIVERY modes for our relay's backlog passes (comma-separated)")
    args = parser.parse_args()
    n = args.events
    clients = ([c.strip() for c in args.clients.split(",") if c.strip()] if args.clients
               else ["kafka-python"] + (["confluent-kafka"] if _has("confluent_kafka") else []))
    deliveries = [d.strip() for d in args.deliveries.split(",") if d.strip()]
    variants = [(c, d) for d in deliveries for c in clients]

    java = find_java()
    javac = find_javac(java) if java else None
    if not java or not javac:
        print("debezium_bench: skipped, needs Java 17+ with javac (JAVA_HOME or PATH) to run Debezium.")
        return

    base = load_settings(_env_file=None, dev_kafka="apache")
    libs = ensure_debezium_jars(DEBEZIUM_VERSION, base.dev_cache_dir)
    stack = DevStack(base, root=ROOT)
    stack.down()
    shutil.rmtree(ROOT, ignore_errors=True)
    classes = ROOT.absolute() / "classes"
    classes.mkdir(parents=True)
    subprocess.run([javac, "-d", str(classes), "-cp", f"{libs}/*", str(SOURCE)], check=True)
    urls = stack.up()
    jvm = None
    try:
        dsn, bootstrap = urls.database_url, urls.kafka_bootstrap
        migrate(dsn, log=lambda _: None)
        codec = compression(base.compression)
        for slot in [f"b_relay{client_tag(*v)}" for v in variants] + [DBZ_SLOT]:
            create_slot(dsn, slot)
        for topic in [f"rel{client_tag(*v)}.bench" for v in variants] + [
                f"lat{client_tag(c)}.latency" for c in clients] + ["dbz.bench", "dbz.dbzlat"]:
            ensure_topic({"bootstrap_servers": bootstrap}, topic, 3)

        def settings_for(slot: str, template: str, client: str, delivery: str = "at-least-once"):
            return load_settings(_env_file=None, database_url=dsn.secret(), kafka_bootstrap=bootstrap, slot_name=slot,
                                 topic_template=template, metrics_port=0, relay_id=f"bench-{slot}", kafka_client=client,
                                 delivery=delivery)

        settings = settings_for("b_relay", "rel.{aggregate_type}", "kafka-python")
        props = ROOT.absolute() / "debezium.properties"
        props.write_text("".join(f"{k}={v}\n" for k, v in engine_properties(
            dsn, bootstrap, ROOT.absolute() / "offsets.dat", codec, settings.linger_ms).items()))

        results: dict = {}
        for pass_no, label in ((1, "cold"), (2, "warm")):
            log(f"pass {pass_no}: inserting {n} events of ~200 B ...")
            insert_rows(dsn, "bench", n)
            ours_by_variant = {}
            for client, delivery in variants:
                tag = client_tag(client, delivery)
                ours = ours_by_variant[(client, delivery)] = relay_pass(
                    settings_for(f"b_relay{tag}", f"rel{tag}.{{aggregate_type}}", client, delivery), n)
                if published(dsn, f"b_relay{tag}") != pass_no * n:
                    raise RuntimeError(f"relay ({client}, {delivery}) recorded {published(dsn, f'b_relay{tag}')} "
                                       f"published events, expected {pass_no * n}")
                log(f"  relay ({client}, {delivery}): {ours[0]:,.0f} events/s streaming, "
                    f"{ours[1]:,.0f}/s incl. session start")
            if jvm is None:
                jvm = Jvm(java, classes, libs, props, ROOT.absolute() / "debezium.log")
                log(f"  Debezium JVM up in {jvm.up_s:.2f} s")
            jvm.send(f"backlog {n} {label}")
            doc = jvm.result()
            theirs = rate(n, doc["seconds"])
            theirs_streaming = rate(n, doc["seconds"] - doc["engine_start_to_first_record_s"])
            log(f"  Debezium ({label} JVM): {theirs:,.0f} events/s engine start -> last ack "
                f"(first record after {doc['engine_start_to_first_record_s']} s)")
            r = results[f"backlog_{label}"] = {
                "debezium_events_per_s": round(theirs), "debezium_seconds": doc["seconds"],
                "debezium_engine_start_to_first_record_s": doc["engine_start_to_first_record_s"],
                "debezium_streaming_events_per_s": round(theirs_streaming)}
            for (client, delivery), (ours, ours_with_start) in ours_by_variant.items():
                tag = client_tag(client, delivery)
                r[f"relay{tag}_events_per_s"] = round(ours)
                r[f"relay{tag}_incl_session_start_events_per_s"] = round(ours_with_start)
                # like for like: both including their session start, and both only while streaming
                r[f"ratio_relay{tag}_to_debezium"] = ratio(ours_with_start, theirs)
                r[f"ratio_relay{tag}_to_debezium_streaming_only"] = ratio(ours, theirs_streaming)
            if pass_no == 1:
                results["backlog_cold"]["debezium_incl_jvm_start_events_per_s"] = round(
                    rate(n, doc["seconds"] + jvm.up_s))
                results["debezium_engine"] = doc["engine"]

        results["kafka_records"] = check_records(bootstrap, n, [f"rel{client_tag(*v)}.bench" for v in variants])
        log(f"latency at 1k/s for {args.latency_seconds} s: Debezium (warm JVM) ...")
        dbz_lat = debezium_latency(jvm, dsn, 1000, args.latency_seconds)
        results["debezium_jvm_rss_peak_mib"] = jvm.rss_peak_mib()
        jvm.close()
        jvm = None
        log(f"  Debezium: {dbz_lat}")
        results["latency_at_1k_per_s"] = lat = {"debezium": dbz_lat}
        for client in clients:
            tag = client_tag(client)
            create_slot(dsn, f"b_latency{tag}")
            ours_lat = bench_latency(settings_for(f"b_latency{tag}", f"lat{tag}.{{aggregate_type}}", client), dsn,
                                     1000, args.latency_seconds)
            log(f"  relay ({client}): {ours_lat}")
            lat[f"relay{tag}"] = ours_lat
            lat[f"ratio_debezium_to_relay{tag}_p99"] = ratio(dbz_lat["p99_ms"], ours_lat["p99_ms"])

        import kafka

        doc = {
            "benchmark": "debezium",
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "java": subprocess.run([java, "-version"], capture_output=True, text=True).stderr.splitlines()[0]},
            "versions": {"debezium": DEBEZIUM_VERSION, "kafka_python": kafka.__version__,
                         "postgres": stack.postgres().version(), "kafka_broker": base.dev_kafka_version,
                         "confluent_kafka": _confluent_version() if "confluent-kafka" in clients else None},
            "config": {"events_per_pass": n, "clients": clients, "deliveries": deliveries, "payload_bytes": "~200",
                       "compression": codec,
                       "linger_ms": settings.linger_ms, "debezium_poll_interval_ms": 10,
                       "latency_seconds": args.latency_seconds},
            "results": results,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"debezium-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        for label in ("cold", "warm"):
            r = results[f"backlog_{label}"]
            for client, delivery in variants:
                tag = client_tag(client, delivery)
                print(format_row(f"backlog, {client}, {delivery}, Debezium {label}",
                                 r[f"relay{tag}_incl_session_start_events_per_s"], r["debezium_events_per_s"]))
                print(format_row("  streaming only", r[f"relay{tag}_events_per_s"],
                                 r["debezium_streaming_events_per_s"]))
        for client in clients:
            ours_lat = lat[f"relay{client_tag(client)}"]
            print(f"latency at 1k/s p50/p99: relay ({client}) {ours_lat['p50_ms']}/{ours_lat['p99_ms']} ms, "
                  f"Debezium {dbz_lat['p50_ms']}/{dbz_lat['p99_ms']} ms")
        log(f"saved {out}")
    finally:
        if jvm is not None:
            jvm.close()
        stack.down()


if __name__ == "__main__":
    main()
