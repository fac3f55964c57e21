"""Prometheus metrics and a health endpoint for the relay, on 127.0.0.1:OUTBOX_METRICS_PORT.

    GET /metrics   Prometheus text format
    GET /healthz   200 {"status": "ok", ...} while the daemon loop is alive (active or standby),
                   503 when it stopped with an error, its loop is stuck, or events have waited with
                   nothing acknowledged for OUTBOX_STALL_TIMEOUT_S (publishing_stalled)
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay.redact import redact


class RelayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.published = Counter("outbox_relay_events_published", "Events acknowledged by Kafka", registry=r)
        self.dead_lettered = Counter("outbox_relay_events_dead_lettered", "Events sent to the dead-letter table",
                                     ["reason"], registry=r)
        self.batches = Counter("outbox_relay_batches", "Batches completed", ["status"], registry=r)
        self.restarts = Counter("outbox_relay_pipeline_restarts", "Pipeline restarts after transient errors",
                                registry=r)
        self.inflight_events = Gauge("outbox_relay_inflight_events", "Events sent, not yet acknowledged", registry=r)
        self.inflight_bytes = Gauge("outbox_relay_inflight_bytes", "Bytes sent, not yet acknowledged", registry=r)
        self.slot_lag_bytes = Gauge("outbox_relay_slot_lag_bytes",
                                    "WAL retained for the slot: current LSN - confirmed_flush_lsn", registry=r)
        self.slot_lag_seconds = Gauge("outbox_relay_slot_lag_seconds",
                                      "Age of the oldest committed transaction not yet acknowledged", registry=r)
        self.active = Gauge("outbox_relay_active", "1 while this process streams the slot, 0 on standby", registry=r)
        self.confirmed_lsn = Gauge("outbox_relay_confirmed_lsn", "Slot position confirmed to PostgreSQL", registry=r)
        self.latency = Histogram(
            "outbox_relay_publish_latency_seconds", "Source commit to Kafka acknowledgement",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.last_tick = time.monotonic()
        self.role = "starting"
        self.last_error: str | None = None
        self.healthy = True
        self.stalled = False  # events wait and nothing was acknowledged for OUTBOX_STALL_TIMEOUT_S

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def health(self) -> tuple[int, dict]:
        loop_stuck = time.monotonic() - self.last_tick > 60
        ok = self.healthy and not loop_stuck and not self.stalled
        body = {"status": "ok" if ok else "unhealthy", "role": self.role,
                "last_error": redact(self.last_error) if self.last_error else None,
                "seconds_since_loop": round(time.monotonic() - self.last_tick, 1),
                "publishing_stalled": self.stalled}
        return (200 if ok else 503), body


def serve(metrics: RelayMetrics, port: int) -> ThreadingHTTPServer | None:
    if not port:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.startswith("/metrics"):
                code, body, ctype = 200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST
            elif self.path.startswith("/healthz"):
                code, doc = metrics.health()
                body, ctype = json.dumps(doc).encode(), "application/json"
            else:
                code, body, ctype = 404, b"try /metrics or /healthz\n", "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="outbox-metrics", daemon=True).start()
    return server
