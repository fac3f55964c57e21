"""How long each dashboard page's queries take with 1,000,000 outbox rows and 1,000,000 inbox rows.

    python -m bench.dashboard_bench [--events 1000000] [--inbox 1000000] [--in-flight 10000] [--runs 5] [--keep]

Starts the embedded stack under .outbox/bench (PostgreSQL 18 + Apache Kafka), fills a fresh
database in a few statements (INSERT ... SELECT generate_series) with what a week of traffic
leaves behind: outbox events with their delivery rows and relay batches (one batch per 100
events), a backlog still in flight above the relay's watermark (half of it in acknowledged
batches, so the in-flight view has real work to do), inbox rows for two consumers (1 % of them
with duplicates), per-minute stats for the week, dead letters, 100,000 settled effect keys plus
unknown and in-progress ones, and operator decisions. Then runs every page's queries as the
dashboard does (the dashboard role, one REPEATABLE READ snapshot per page), `--runs` times, and
prints per-query and per-page medians. Saves JSON under bench/results/. The goal: every page
under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import psycopg
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from dashboard import health
from dashboard.db import Database
from dashboard.kafka_lag import EndOffsets
from dashboard.queries import common as q_common
from dashboard.queries import dead_letters as q_dead_letters
from dashboard.queries import duplicates as q_duplicates
from dashboard.queries import in_flight as q_in_flight
from dashboard.queries import overview as q_overview
from dashboard.queries import trace as q_trace
from dashboard.queries import unknown as q_unknown
from outbox.core.migrate import migrate
from outbox.core.settings import load_settings
from outbox.devstack.stack import DevStack

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / ".outbox" / "bench"
RESULTS = REPO / "bench" / "results"
DATABASE = "dashboard_bench"
SLOT = "bench_slot"
GOAL_S = 1.0
TYPES = ("order", "payment", "shipment", "customer", "invoice")
PARTITIONS = 3
PER_TXN = 100  # events per producing transaction and per relay batch
WATERMARK = 1_000_000  # xid8 of the relay's watermark: every transaction below it is published
COUNTED = ("events", "deliveries", "relay_batches", "inbox_messages", "inbox_stats", "in_flight")


def fill(conn: psycopg.Connection, events: int, inbox: int, in_flight: int) -> dict[str, float]:
    """Everything in one session; returns seconds per step."""
    steps: dict[str, float] = {}

    def step(name: str, *statements: str, params: dict | None = None) -> None:
        started = time.monotonic()
        for sql in statements:
            conn.execute(sql, params or {})
        steps[name] = round(time.monotonic() - started, 2)
        print(f"  {name:28} {steps[name]:6.1f} s", flush=True)

    p = {"events": events, "inbox": inbox, "in_flight": in_flight, "per_txn": PER_TXN, "mark": WATERMARK,
         "types": list(TYPES), "partitions": PARTITIONS}
    # Published history: a week of events, one producing transaction (xid) per PER_TXN events, all
    # below the watermark. Txids are synthetic: only their order relative to the watermark matters.
    step("outbox events (published)", """
        INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload, created_at, txid)
        SELECT (%(types)s::text[])[1 + i %% 5], 'agg-' || (i %% 100000), 'Happened' || (i %% 7),
               jsonb_build_object('seq', i, 'amount', i %% 1000, 'note', repeat('x', 100)),
               now() - make_interval(secs => (%(events)s - i) * 0.6),
               ((%(mark)s - %(events)s / %(per_txn)s - 1) + i / %(per_txn)s)::text::xid8
          FROM generate_series(0, %(events)s - 1) i""", params=p)
    step("relay batches (acked)", """
        INSERT INTO outbox.relay_batches (slot_name, relay_id, delivery, status, first_lsn, ack_lsn, events, xids,
                                          max_xid, started_at, finished_at)
        SELECT 'bench_slot', 'bench-relay', 'at-least-once', 'acked', '0/1', '0/2', %(per_txn)s,
               ARRAY[((%(mark)s - %(events)s / %(per_txn)s - 1) + b)::text::xid8],
               ((%(mark)s - %(events)s / %(per_txn)s - 1) + b)::text::xid8,
               now() - make_interval(secs => (%(events)s / %(per_txn)s - b) * 60),
               now() - make_interval(secs => (%(events)s / %(per_txn)s - b) * 60 - 0.05)
          FROM generate_series(0, %(events)s / %(per_txn)s - 1) b""", params=p)
    step("deliveries", """
        INSERT INTO outbox.deliveries (event_id, batch_id, topic, kafka_partition, kafka_offset, delivered_at)
        SELECT event_id, 1 + (row_number() OVER () - 1) / %(per_txn)s, 'outbox.event.' || aggregate_type,
               abs(hashtext(aggregate_id)) %% %(partitions)s, row_number() OVER (), created_at
          FROM outbox.events""", params=p)
    # The backlog above the watermark: half of its transactions are in acknowledged batches (done),
    # the rest are what the in-flight view must find.
    step("outbox events (backlog)", """
        INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload, created_at, txid)
        SELECT (%(types)s::text[])[1 + i %% 5], 'agg-' || (i %% 100000), 'Happened',
               jsonb_build_object('seq', i, 'note', repeat('x', 100)),
               now() - make_interval(secs => (2 * %(in_flight)s - i) * 0.01),
               (%(mark)s + i / %(per_txn)s)::text::xid8
          FROM generate_series(0, 2 * %(in_flight)s - 1) i""",
         """
        INSERT INTO outbox.relay_batches (slot_name, relay_id, delivery, status, events, xids, max_xid, started_at,
                                          finished_at)
        SELECT 'bench_slot', 'bench-relay', 'at-least-once', 'acked', %(per_txn)s,
               ARRAY[(%(mark)s + t)::text::xid8], (%(mark)s + t)::text::xid8, now(), now()
          FROM generate_series(0, 2 * %(in_flight)s / %(per_txn)s - 1, 2) t""", params=p)
    step("relay status, instances", """
        INSERT INTO outbox.relay_status (slot_name, delivery, active_relay_id, watermark_txid, events_published,
                                         last_published_at)
        VALUES ('bench_slot', 'at-least-once', 'bench-relay', %(mark)s::text::xid8, %(events)s, now())""",
         """
        INSERT INTO outbox.relay_instances (relay_id, slot_name, role, delivery, host, pid)
        VALUES ('bench-relay', 'bench_slot', 'active', 'at-least-once', 'bench', 1),
               ('bench-standby', 'bench_slot', 'standby', 'at-least-once', 'bench', 2)""",
         """
        INSERT INTO outbox.relay_batches (slot_name, relay_id, delivery, status, started_at, finished_at, resolution)
        SELECT 'bench_slot', 'crashed-' || b, 'at-least-once', 'unknown', now() - make_interval(days => b %% 7),
               now() - make_interval(days => b %% 7), 'relay stopped before Kafka acknowledged this batch'
          FROM generate_series(1, 50) b""",
         """
        INSERT INTO outbox.relay_dead_letters (event_id, slot_name, reason, error, aggregate_type, aggregate_id,
                                               event_type, payload, headers, replayed_at)
        SELECT event_id, 'bench_slot', 'oversize', 'MessageSizeTooLargeError: the message is too large', aggregate_type,
               aggregate_id, event_type, payload::text, '{}', CASE WHEN random() < 0.5 THEN now() END
          FROM outbox.events TABLESAMPLE SYSTEM (1) LIMIT 100""", params=p)
    # Inbox: two consumers took every published event (up to --inbox rows in all); 1 % were
    # suppressed as duplicates once or more.
    step("inbox messages", """
        INSERT INTO outbox.inbox_messages (event_id, consumer, topic, kafka_partition, kafka_offset, first_seen,
                                           last_seen, duplicates, processed_at)
        SELECT e.event_id, c.consumer, 'outbox.event.' || e.aggregate_type, abs(hashtext(e.aggregate_id)) %% 3,
               (e.txid::text::bigint), e.created_at,
               e.created_at + CASE WHEN hashtext(e.event_id::text || c.consumer) %% 100 = 0
                                   THEN interval '5 minutes' ELSE interval '0' END,
               CASE WHEN hashtext(e.event_id::text || c.consumer) %% 100 = 0
                    THEN 1 + abs(hashtext(e.event_id::text)) %% 5 ELSE 0 END,
               e.created_at
          FROM (SELECT * FROM outbox.events WHERE txid < %(mark)s::text::xid8 LIMIT %(inbox)s / 2) e
         CROSS JOIN (VALUES ('billing'), ('shipping')) c(consumer)""", params=p)
    step("inbox offsets, stats", """
        INSERT INTO outbox.inbox_offsets (consumer, topic, kafka_partition, next_offset)
        SELECT c, 'outbox.event.' || t, part, 100000
          FROM unnest(ARRAY['billing', 'shipping']) c, unnest(%(types)s::text[]) t, generate_series(0, 2) part""",
         """
        INSERT INTO outbox.inbox_stats (minute, consumer, topic, kafka_partition, processed, duplicates, dead_lettered)
        SELECT m, c, 'outbox.event.' || t, part, 10, (random() < 0.01)::int, 0
          FROM generate_series(date_trunc('minute', now()) - interval '7 days', date_trunc('minute', now()),
                               interval '1 minute') m,
               unnest(ARRAY['billing', 'shipping']) c, unnest(%(types)s::text[]) t, generate_series(0, 2) part""",
         params=p)
    step("inbox dead letters", """
        INSERT INTO outbox.inbox_dead_letters (consumer, status, reason, error, attempts, event_id, event_type,
                                               aggregate_type, aggregate_id, topic, kafka_partition, kafka_offset,
                                               value, headers, first_failed_at)
        SELECT m.consumer, CASE WHEN n %% 2 = 0 THEN 'dead' ELSE 'replayed' END, 'handler_failed',
               'RuntimeError: handler failed on record ' || n, 5, m.event_id, 'Happened', 'order', 'agg-' || n,
               m.topic, m.kafka_partition, m.kafka_offset, '{}'::bytea, '[]', now()
          FROM (SELECT *, row_number() OVER () AS n FROM outbox.inbox_messages LIMIT 200) m""", params=p)
    step("effects, audit", """
        INSERT INTO outbox.effects (key, fingerprint, request, status, response, resolved_via, attempts, consumer,
                                    event_id, completed_at, evidence)
        SELECT 'charge:' || i, md5(i::text), jsonb_build_object('amount', i), 'succeeded', '{"id": "ch"}', 'call',
               1, 'billing', NULL, now() - make_interval(secs => i), '[]'
          FROM generate_series(1, 100000) i""",
         """
        INSERT INTO outbox.effects (key, fingerprint, request, status, attempts, last_error, consumer, evidence,
                                    lease_owner, lease_token, lease_expires_at)
        SELECT 'unknown:' || i, md5(i::text), jsonb_build_object('amount', i),
               CASE WHEN i <= 20 THEN 'unknown' ELSE 'in_progress' END, 1, 'timed out', 'billing',
               jsonb_build_array(jsonb_build_object('at', now(), 'owner', 'w', 'what', 'lease', 'detail', 'attempt 1')),
               CASE WHEN i > 20 THEN 'w' END, CASE WHEN i > 20 THEN gen_random_uuid() END,
               CASE WHEN i > 20 THEN now() + interval '1 minute' END
          FROM generate_series(1, 30) i""",
         """
        INSERT INTO outbox.operator_audit (operator, action, effect_key, reason, previous_status, previous_attempts)
        SELECT 'alice', 'mark_failed', 'charge:' || i, 'checked', 'unknown', 1 FROM generate_series(1, 100) i""",
         params=p)
    step("analyze", "ANALYZE")
    return steps


def pages(end_offsets: EndOffsets, samples: dict) -> dict[str, list[tuple[str, Callable]]]:
    """Each page's queries, in the order the page runs them."""
    return {
        "Overview": [
            ("relays", q_overview.relays), ("slots", q_overview.slots), ("in_flight_summary", q_overview.in_flight_summary),
            ("unresolved_effects", q_unknown.unresolved_effects),
            ("relay_batches_at_risk", q_unknown.relay_batches_at_risk),
            ("dead_letter_reasons", q_dead_letters.dead_letter_reasons),
            ("consumer_positions", q_overview.consumer_positions),
            ("kafka end offsets (Kafka, not SQL)", lambda c: end_offsets.fetch(samples["partitions"])),
            ("duplicate_totals 1 h", lambda c: q_duplicates.duplicate_totals(c, 1)),
            ("throughput 60 min", lambda c: q_overview.throughput(c, 60)),
        ],
        "In flight": [
            ("in_flight_summary", q_overview.in_flight_summary), ("in_flight (oldest 500)", q_in_flight.in_flight),
            ("relays", q_overview.relays),
        ],
        "Duplicates (24 h)": [
            ("consumers", q_common.consumers), ("duplicate_totals 24 h", lambda c: q_duplicates.duplicate_totals(c, 24)),
            ("duplicates_over_time 24 h", lambda c: q_duplicates.duplicates_over_time(c, 24)),
            ("most_duplicated by count", lambda c: q_duplicates.most_duplicated(c, None, order="count")),
            ("most_duplicated recent", lambda c: q_duplicates.most_duplicated(c, None, order="recent")),
        ],
        "Duplicates (7 days, one consumer)": [
            ("consumers", q_common.consumers),
            ("duplicate_totals 7 d", lambda c: q_duplicates.duplicate_totals(c, 168)),
            ("duplicates_over_time 7 d", lambda c: q_duplicates.duplicates_over_time(c, 168)),
            ("most_duplicated by count", lambda c: q_duplicates.most_duplicated(c, "billing", order="count")),
            ("most_duplicated recent", lambda c: q_duplicates.most_duplicated(c, "billing", order="recent")),
        ],
        "Unknown outcome": [
            ("unresolved_effects", q_unknown.unresolved_effects),
            ("relay_batches_at_risk", q_unknown.relay_batches_at_risk),
            ("audit_log", lambda c: q_unknown.audit_log(c, 20)),
        ],
        "Dead letters": [
            ("consumers", q_common.consumers), ("dead_letter_reasons", q_dead_letters.dead_letter_reasons),
            ("relay_dead_letters", q_dead_letters.relay_dead_letters), ("inbox_dead_letters", q_dead_letters.inbox_dead_letters),
        ],
        "Dead letters (search, incl. resolved)": [
            ("relay_dead_letters search", lambda c: q_dead_letters.relay_dead_letters(c, search="too large",
                                                                              include_replayed=True)),
            ("inbox_dead_letters search", lambda c: q_dead_letters.inbox_dead_letters(c, search="record 42",
                                                                              include_resolved=True)),
        ],
        "Event trace (aggregate id)": [
            ("find_events aggregate", lambda c: q_trace.find_events(c, samples["aggregate_id"])),
            ("trace", lambda c: q_trace.trace(c, samples["event_id"])),
        ],
        "Event trace (event id)": [
            ("find_events event id", lambda c: q_trace.find_events(c, samples["event_id"])),
            ("trace", lambda c: q_trace.trace(c, samples["event_id"])),
        ],
    }


def measure(db: Database, page: list[tuple[str, Callable]], runs: int) -> dict:
    per_query: dict[str, list[float]] = {name: [] for name, _ in page}
    totals = []
    for _ in range(runs):
        started = time.perf_counter()
        with db.snapshot() as conn:
            for name, fn in page:
                t = time.perf_counter()
                fn(conn)
                per_query[name].append(time.perf_counter() - t)
        totals.append(time.perf_counter() - started)
    return {"page_median_s": round(statistics.median(totals), 4), "page_max_s": round(max(totals), 4),
            "queries": {n: {"median_s": round(statistics.median(v), 4), "max_s": round(max(v), 4)}
                        for n, v in per_query.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="published outbox events")
    parser.add_argument("--inbox", type=int, default=1_000_000, help="inbox rows (two consumers)")
    parser.add_argument("--in-flight", type=int, default=10_000, help="events committed but not yet in Kafka")
    parser.add_argument("--runs", type=int, default=5, help="runs per page; medians are reported")
    parser.add_argument("--keep", action="store_true", help="leave the bench stack running afterwards")
    args = parser.parse_args(argv)
    settings = load_settings(dev_kafka="apache")
    stack = DevStack(settings, root=BENCH_DIR)
    urls = stack.up()
    try:
        with psycopg.connect(urls.database_url.secret(), autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                         (SLOT,))
            conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {DATABASE}")
            pg_version = conn.execute("SHOW server_version").fetchone()[0]
        dsn = urls.database_url.with_params(dbname=DATABASE)
        migrate(dsn, log=lambda _: None)
        print(f"filling {args.events:,} outbox events + {2 * args.in_flight:,} backlog ({args.in_flight:,} in "
              f"flight), {args.inbox:,} inbox rows ...", flush=True)
        with psycopg.connect(dsn.secret(), autocommit=True) as conn:
            steps = fill(conn, args.events, args.inbox, args.in_flight)
            # A real slot, so that the lag and retained-WAL figures are computed as in production.
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT,))
            counts = conn.execute("SELECT " + ", ".join(f"(SELECT count(*) FROM outbox.{t})" for t in COUNTED)
                                  ).fetchone()
            samples = {"event_id": conn.execute("SELECT event_id::text FROM outbox.events ORDER BY event_id "
                                                "OFFSET %s LIMIT 1", (args.events // 2,)).fetchone()[0],
                       "aggregate_id": "agg-4242",
                       "partitions": [(f"outbox.event.{t}", p) for t in TYPES for p in range(3)]}
            size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]
        rows = dict(zip(COUNTED, counts))
        print(f"rows: {rows}; database {size}", flush=True)
        admin = KafkaAdminClient(bootstrap_servers=urls.kafka_bootstrap)
        try:
            admin.create_topics([NewTopic(f"outbox.event.{t}", PARTITIONS, 1) for t in TYPES])
        except TopicAlreadyExistsError:
            pass  # the bench broker keeps its data between runs
        finally:
            admin.close()
        db = Database(dsn, settings.dashboard_role)
        ends = EndOffsets(urls.kafka_bootstrap)
        results = {}
        try:
            for page, page_queries in pages(ends, samples).items():
                measure(db, page_queries, 1)  # warm the cache and the Kafka client, as a refresh would be
                results[page] = measure(db, page_queries, args.runs)
                r = results[page]
                print(f"\n{page}: median {r['page_median_s'] * 1000:.0f} ms, max {r['page_max_s'] * 1000:.0f} ms")
                for q, t in r["queries"].items():
                    print(f"    {q:40} {t['median_s'] * 1000:8.1f} ms  (max {t['max_s'] * 1000:.1f})")
            with db.snapshot() as conn:
                snapshot = q_overview.health_snapshot(conn)
            findings = [f.text for f in health.assess(q_overview.with_kafka_lag(snapshot, ends))]
        finally:
            ends.close()
            db.close()
        with psycopg.connect(urls.database_url.secret(), autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
    finally:
        if not args.keep:
            stack.down()
    slowest = max(r["page_max_s"] for r in results.values())
    result = {
        "benchmark": "dashboard_pages",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_after": os.getloadavg()},
        "versions": {"postgresql": pg_version, "psycopg": version("psycopg"), "pandas": version("pandas"),
                     "kafka-python": version("kafka-python")},
        "rows": rows, "database_size": size, "fill_s": steps, "runs": args.runs,
        "pages": results, "slowest_page_s": slowest, "goal_s": GOAL_S, "findings_on_this_data": findings,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"dashboard-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nslowest page (max of {args.runs} runs): {slowest * 1000:.0f} ms (goal < {GOAL_S * 1000:.0f} ms)\n"
          f"saved {path.relative_to(REPO)}")
    return 0 if slowest < GOAL_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
