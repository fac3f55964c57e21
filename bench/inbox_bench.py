"""Inbox throughput versus a bare kafka-python consume loop, on the same topic, in one run.

    python -m bench.inbox_bench [--records 200000] [--rounds 3] [--poll-records N] [--keep]
    python -m bench.inbox_bench --io-ms 2 --parallel 1,3 --records 6000   # parallel partitions
    python -m bench.inbox_bench --client kafka-python,confluent-kafka     # the Runner on each Kafka client

Starts the embedded stack under .outbox/bench (PostgreSQL 18 + Apache Kafka), fills one topic
with relay-shaped records (envelope headers, time-ordered v7 event ids, ~200 B JSON values,
zstd like the relay's `compression=auto`), then alternates: a bare consume loop with an empty
body, and the inbox Runner with an empty handler (every record deduplicated in PostgreSQL, one
transaction per poll). Each inbox round is a new consumer, so every record is new to it. Rates are
measured from the first record to the last one consumed (bare) or committed in PostgreSQL
(inbox). A third kind, "pg floor", runs only the inbox's own transaction per batch (BEGIN, the
batch statement, COMMIT) on one connection over the same records, fetched and planned beforehand:
the rate PostgreSQL allows, which the Runner approaches but cannot pass. Prints the medians and
their ratios and saves JSON under bench/results/.

With --client kafka-python,confluent-kafka the Runner runs on each Kafka client in turn (same
topic, same records, empty handler), next to the bare loops of both clients; it prints each
client's events/s and its ratio to kafka-python's Runner (inbox-clients-*.json).

With --io-ms the handler waits that long per record (a call to another service) and the Runner
runs with each --parallel value in turn, same topic, same records: the ratio is the gain of
parallel_partitions over one worker (inbox-parallel-*.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
import uuid
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import psycopg
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from inbox import Runner, store
from inbox.consumer import PARALLEL_FETCH_BYTES
from inbox.plan import plan_batch
from outbox.core.envelope import build_headers
from outbox.core.migrate import migrate
from outbox.core.settings import load_settings
from outbox.devstack.stack import DevStack

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / ".outbox" / "bench"
RESULTS = REPO / "bench" / "results"
DATABASE = "inbox_bench"
PARTITIONS = 3
GOAL = 0.7


def uuid7() -> uuid.UUID:
    """RFC 9562 v7, like outbox.uuid_v7(): what the relay's event ids look like."""
    ms = time.time_ns() // 1_000_000
    raw = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    raw[6] = (raw[6] & 0x0F) | 0x70
    raw[8] = (raw[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(raw))


def fill(bootstrap: str, topic: str, records: int) -> tuple[float, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=256 * 1024,
                             compression_type="zstd")
    started = time.monotonic()
    size = 0
    for i in range(records):
        aggregate = f"order-{i % 1000}".encode()
        value = json.dumps({"order_id": f"order-{i % 1000}", "line": i, "sku": "SKU-" + "x" * 96,
                            "amount": 1234, "currency": "EUR"}).encode()
        size = len(value)
        headers = build_headers(str(uuid7()).encode(), b"OrderPlaced", b"order", aggregate, b"0/16B3748",
                                str(1000 + i).encode(), b"2026-11-26T23:00:00.000000Z")
        producer.send(topic, value=value, key=aggregate, headers=headers)
    producer.flush()
    producer.close()
    return records / (time.monotonic() - started), size


def _kafka_python(bootstrap: str, topic: str, poll_records: int, group_prefix: str) -> KafkaConsumer:
    """A new group reading the topic from the start, with the Runner's consumer settings."""
    return KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"{group_prefix}-{uuid.uuid4().hex[:8]}",
                         enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=poll_records,
                         isolation_level="read_committed")


def bare(bootstrap: str, topic: str, records: int, poll_records: int) -> float:
    consumer = _kafka_python(bootstrap, topic, poll_records, "bare")
    got, first = 0, None
    try:
        while got < records:
            for batch in consumer.poll(timeout_ms=1000).values():
                if first is None:
                    first = time.monotonic()
                for _ in batch:  # the loop body a real consumer would have, empty
                    got += 1
        return records / (time.monotonic() - first)
    finally:
        consumer.close()


def bare_confluent(bootstrap: str, topic: str, records: int, poll_records: int) -> float:
    """The librdkafka consume loop the Runner's confluent-kafka path is built on, empty body."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bare-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "isolation.level": "read_committed"})
    consumer.subscribe([topic])
    got, first = 0, None
    try:
        while got < records:
            for msg in consumer.consume(poll_records, 1.0):
                if msg.error() is None:
                    if first is None:
                        first = time.monotonic()
                    msg.value()
                    got += 1
        return records / (time.monotonic() - first)
    finally:
        consumer.close()


def fetch_batches(bootstrap: str, topic: str, records: int, poll_records: int) -> list[list]:
    """All records, in the batches one kafka-python consumer polls them in (for pg_floor)."""
    consumer = _kafka_python(bootstrap, topic, poll_records, "fetch")
    batches, got = [], 0
    try:
        while got < records:
            batch = [r for part in consumer.poll(timeout_ms=1000).values() for r in part]
            if batch:
                batches.append(batch)
                got += len(batch)
        return batches
    finally:
        consumer.close()


def pg_floor(dsn, batches: list[list]) -> float:
    """What PostgreSQL allows the Runner on one connection: per batch, the inbox's own transaction
    (BEGIN, the batch statement that inserts the dedupe rows and moves offsets and counts, COMMIT),
    with the records already in memory and planned. No Kafka, no handler loop, no second thread:
    the Runner can only approach this rate, never pass it."""
    consumer = f"floor-{uuid.uuid4().hex[:8]}"
    plans = [plan_batch(b) for b in batches]
    total = sum(len(b) for b in batches)
    with psycopg.connect(dsn.secret()) as conn:
        started = time.monotonic()
        for batch, plan in zip(batches, plans):
            with conn.transaction():
                store.record_batch(conn, consumer, batch, plan)
        return total / (time.monotonic() - started)


def inbox(dsn, bootstrap: str, topic: str, records: int, poll_records: int, *, io_s: float = 0.0,
          parallel: int = 1, client: str = "kafka-python") -> float:
    handled = 0
    first: list[float] = []
    all_handled = threading.Event()
    lock = threading.Lock()  # the handler runs on several threads with parallel > 1

    def handler(conn, msg):
        nonlocal handled
        if io_s:
            time.sleep(io_s)
        with lock:
            if not first:
                first.append(time.monotonic())
            handled += 1
            if handled == records:
                all_handled.set()

    consumer = f"bench-{uuid.uuid4().hex[:8]}"
    runner = Runner(consumer, handler, dsn=dsn, bootstrap=bootstrap, topics=[topic], max_poll_records=poll_records,
                    parallel_partitions=parallel, kafka_client=client)
    thread = threading.Thread(target=runner.run, name="runner")
    thread.start()
    try:
        if not all_handled.wait(600):
            raise RuntimeError(f"the inbox handled only {handled} of {records} records in 10 minutes")
        # Done when the last batch is committed, not merely handled.
        with psycopg.connect(dsn.secret(), autocommit=True) as conn:
            while conn.execute("SELECT coalesce(sum(next_offset), 0) FROM outbox.inbox_offsets WHERE consumer = %s",
                               (consumer,)).fetchone()[0] < records:
                time.sleep(0.005)
        return records / (time.monotonic() - first[0])
    finally:
        runner.stop()
        thread.join(60)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "mem_mib": mem, "loadavg_before": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inbox_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3, help="bare/inbox pairs; medians are reported")
    parser.add_argument("--poll-records", type=int, default=None,
                        help="max_poll_records for both loops (default: OUTBOX_INBOX_POLL_RECORDS)")
    parser.add_argument("--keep", action="store_true", help="leave the bench stack running afterwards")
    parser.add_argument("--io-ms", type=float, default=0.0,
                        help="the handler waits this long per record; compares the --parallel values instead")
    parser.add_argument("--parallel", default="1,3", help="parallel_partitions values to compare with --io-ms")
    parser.add_argument("--client", default=None,
                        help="compare the Runner on these Kafka clients, e.g. kafka-python,confluent-kafka")
    args = parser.parse_args(argv)
    settings = load_settings(dev_kafka="apache")
    poll_records = args.poll_records or settings.inbox_poll_records
    info = {"machine": machine()}
    stack = DevStack(settings, root=BENCH_DIR)
    urls = stack.up()
    try:
        with psycopg.connect(urls.database_url.secret(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {DATABASE}")
            pg_version = conn.execute("SHOW server_version").fetchone()[0]
        dsn = urls.database_url.with_params(dbname=DATABASE)
        migrate(dsn, log=lambda _: None)
        topic = f"bench.inbox.{uuid.uuid4().hex[:8]}"
        produce_rate, value_size = fill(urls.kafka_bootstrap, topic, args.records)
        print(f"filled {topic}: {args.records} records of {value_size} B ({produce_rate:,.0f}/s); "
              f"max_poll_records {poll_records}", flush=True)
        if args.io_ms:
            return _parallel(args, dsn, urls.kafka_bootstrap, topic, poll_records, info, pg_version, settings)
        batches = fetch_batches(urls.kafka_bootstrap, topic, args.records, poll_records)
        if args.client:
            return _clients(args, dsn, urls.kafka_bootstrap, topic, poll_records, info, pg_version, settings,
                            value_size, batches)
        runs = []
        for n in range(args.rounds):
            for kind in ("bare", "inbox", "pg floor"):
                rate = (bare(urls.kafka_bootstrap, topic, args.records, poll_records) if kind == "bare"
                        else pg_floor(dsn, batches) if kind == "pg floor"
                        else inbox(dsn, urls.kafka_bootstrap, topic, args.records, poll_records))
                runs.append({"round": n + 1, "kind": kind, "events_per_s": round(rate)})
                print(f"round {n + 1} {kind:5} {rate:10,.0f} events/s", flush=True)
    finally:
        if not args.keep:
            stack.down()
    bare_rate = statistics.median(r["events_per_s"] for r in runs if r["kind"] == "bare")
    inbox_rate = statistics.median(r["events_per_s"] for r in runs if r["kind"] == "inbox")
    floor_rate = statistics.median(r["events_per_s"] for r in runs if r["kind"] == "pg floor")
    ratio = inbox_rate / bare_rate
    info["machine"]["loadavg_after"] = os.getloadavg()
    result = {
        "benchmark": "inbox_vs_bare_kafka_python",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **info,
        "versions": {"kafka-python": version("kafka-python"), "psycopg": version("psycopg"), "postgresql": pg_version,
                     "kafka_broker": f"Apache Kafka {settings.dev_kafka_version}",
                     "crc32c": _installed("crc32c"), "zstandard": _installed("zstandard")},
        "settings": {"records": args.records, "value_bytes": value_size, "partitions": PARTITIONS,
                     "compression": "zstd", "max_poll_records": poll_records, "isolation_level": "read_committed",
                     "handler": "empty", "inbox_commit": "one PostgreSQL transaction per poll",
                     "event_ids": "uuid v7"},
        "runs": runs,
        "bare_events_per_s": round(bare_rate),
        "inbox_events_per_s": round(inbox_rate),
        "ratio": round(ratio, 3),
        "goal": GOAL,
        "pg_floor_events_per_s": round(floor_rate),
        "inbox_share_of_pg_floor": round(inbox_rate / floor_rate, 3),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"inbox-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nbare kafka-python {bare_rate:,.0f} events/s, inbox {inbox_rate:,.0f} events/s: "
          f"ratio {ratio:.2f} (goal >= {GOAL}); the inbox's SQL alone {floor_rate:,.0f} events/s, "
          f"the Runner at {inbox_rate / floor_rate:.2f} of it\nsaved {path.relative_to(REPO)}")
    return 0


def _parallel(args, dsn, bootstrap, topic, poll_records, info, pg_version, settings) -> int:
    values = [int(v) for v in args.parallel.split(",")]
    runs = []
    for n in range(args.rounds):
        for parallel in values:
            rate = inbox(dsn, bootstrap, topic, args.records, poll_records, io_s=args.io_ms / 1000, parallel=parallel)
            runs.append({"round": n + 1, "parallel_partitions": parallel, "events_per_s": round(rate)})
            print(f"round {n + 1} parallel_partitions={parallel} {rate:10,.0f} events/s", flush=True)
    medians = {v: statistics.median(r["events_per_s"] for r in runs if r["parallel_partitions"] == v) for v in values}
    base = medians[values[0]]
    result = {
        "benchmark": "inbox_parallel_partitions",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **info,
        "versions": {"kafka-python": version("kafka-python"), "psycopg": version("psycopg"), "postgresql": pg_version,
                     "kafka_broker": f"Apache Kafka {settings.dev_kafka_version}"},
        "settings": {"records": args.records, "partitions": PARTITIONS, "handler_io_ms": args.io_ms,
                     "max_poll_records": poll_records, "parallel_partitions": values,
                     "max_partition_fetch_bytes_when_parallel": PARALLEL_FETCH_BYTES},
        "runs": runs,
        "events_per_s": {str(v): round(m) for v, m in medians.items()},
        "ratio_to_first": {str(v): round(m / base, 2) for v, m in medians.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"inbox-parallel-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + ", ".join(f"parallel_partitions={v}: {m:,.0f} events/s ({m / base:.2f}x)" for v, m in medians.items())
          + f" with a handler waiting {args.io_ms:g} ms per record\nsaved {path.relative_to(REPO)}")
    return 0


def _clients(args, dsn, bootstrap, topic, poll_records, info, pg_version, settings, value_size, batches) -> int:
    clients = args.client.split(",")
    unknown = set(clients) - {"kafka-python", "confluent-kafka"}
    if unknown:
        raise SystemExit(f"--client: unknown {', '.join(sorted(unknown))}; use kafka-python and/or confluent-kafka")
    if "kafka-python" not in clients:
        clients.insert(0, "kafka-python")  # the baseline of the ratio
    runs = []
    for n in range(args.rounds):
        for kind in ("bare kafka-python", "bare confluent-kafka", "pg floor", *(f"inbox {c}" for c in clients)):
            if kind == "bare kafka-python":
                rate = bare(bootstrap, topic, args.records, poll_records)
            elif kind == "bare confluent-kafka":
                rate = bare_confluent(bootstrap, topic, args.records, poll_records)
            elif kind == "pg floor":
                rate = pg_floor(dsn, batches)
            else:
                rate = inbox(dsn, bootstrap, topic, args.records, poll_records, client=kind.split()[1])
            runs.append({"round": n + 1, "kind": kind, "events_per_s": round(rate)})
            print(f"round {n + 1} {kind:22} {rate:10,.0f} events/s", flush=True)
    kinds = list(dict.fromkeys(r["kind"] for r in runs))
    medians = {k: statistics.median(r["events_per_s"] for r in runs if r["kind"] == k) for k in kinds}
    base = medians["inbox kafka-python"]
    info["machine"]["loadavg_after"] = os.getloadavg()
    result = {
        "benchmark": "inbox_kafka_clients",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **info,
        "versions": {"kafka-python": version("kafka-python"), "confluent-kafka": _installed("confluent-kafka"),
                     "librdkafka": _librdkafka(), "psycopg": version("psycopg"), "postgresql": pg_version,
                     "kafka_broker": f"Apache Kafka {settings.dev_kafka_version}", "crc32c": _installed("crc32c"),
                     "zstandard": _installed("zstandard")},
        "settings": {"records": args.records, "value_bytes": value_size, "partitions": PARTITIONS,
                     "compression": "zstd", "max_poll_records": poll_records, "isolation_level": "read_committed",
                     "handler": "empty", "inbox_commit": "one PostgreSQL transaction per poll",
                     "event_ids": "uuid v7"},
        "runs": runs,
        "events_per_s": {k: round(m) for k, m in medians.items()},
        "inbox_ratio_to_kafka_python": {c: round(medians[f"inbox {c}"] / base, 2) for c in clients},
        "inbox_share_of_pg_floor": {c: round(medians[f"inbox {c}"] / medians["pg floor"], 2) for c in clients},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"inbox-clients-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + "\n".join(f"{k:22} {m:10,.0f} events/s" for k, m in medians.items()))
    print("inbox Runner, empty handler: " + ", ".join(f"{c} {medians[f'inbox {c}']:,.0f} events/s "
                                                      f"({medians[f'inbox {c}'] / base:.2f}x kafka-python)"
                                                      for c in clients)
          + f"; PostgreSQL alone (the inbox's transaction per batch, one connection) {medians['pg floor']:,.0f} "
          f"events/s\nsaved {path.relative_to(REPO)}")
    return 0


def _librdkafka() -> str | None:
    try:
        import confluent_kafka
    except ImportError:
        return None
    return confluent_kafka.libversion()[0]


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except Exception:  # noqa: BLE001 - optional packages
        return None


if __name__ == "__main__":
    raise SystemExit(main())
