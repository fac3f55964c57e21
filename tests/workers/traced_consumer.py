"""A consumer process with OpenTelemetry's SDK configured, as an application sets it up; prints
the spans its handler ran in as JSON lines. A process of its own because a tracer provider can be
set once per process.

    python -m tests.workers.traced_consumer --topic T --consumer C --expect N [--fail-first]

OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP come from the environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from inbox import RetryPolicy, Runner
from outbox.core.settings import load_settings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", required=True)
    parser.add_argument("--consumer", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--fail-first", action="store_true", help="the handler fails its first attempt")
    args = parser.parse_args()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    settings = load_settings()
    handled = threading.Event()
    count = {"n": 0, "failed": False}

    def handler(conn, msg):
        if args.fail_first and not count["failed"]:
            count["failed"] = True
            raise RuntimeError("first attempt fails on purpose")
        count["n"] += 1
        if count["n"] >= args.expect:
            handled.set()

    runner = Runner(args.consumer, handler, dsn=settings.require_database_url(), bootstrap=settings.kafka_bootstrap,
                    topics=[args.topic],
                    policy=RetryPolicy(max_attempts=3, backoff_initial_s=0.05, backoff_max_s=0.1, jitter=0.0))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    ok = handled.wait(90)
    runner.stop()
    thread.join(30)
    for span in exporter.get_finished_spans():
        ctx, parent = span.get_span_context(), span.parent
        print(json.dumps({"name": span.name, "kind": span.kind.name, "trace_id": f"{ctx.trace_id:032x}",
                          "span_id": f"{ctx.span_id:016x}",
                          "parent_span_id": f"{parent.span_id:016x}" if parent else None,
                          "status": span.status.status_code.name, "attributes": dict(span.attributes)}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
