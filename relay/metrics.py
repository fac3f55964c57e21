"""Prometheus metrics and health endpoints for the relay, on OUTBOX_METRICS_HOST:OUTBOX_METRICS_PORT
(127.0.0.1:9464 by default; 0.0.0.0 in a container).

    GET /metrics   Prometheus text format
    GET /healthz   liveness: 200 {"status": "ok", ...} while the daemon loop is alive (active or
                   standby); 503 when it stopped with an error, its loop is stuck, or events have waited
                   with nothing acknowledged for OUTBOX_STALL_TIMEOUT_S (publishing_stalled). Restart
                   on failure.
    GET /readyz    readiness: 200 {"status": "ready", ...} only while this relay holds the slot, streams
                   it and its last contact with Kafka succeeded; 503 {"status": "not ready", "role":
                   "standby", "reasons": [...]} otherwise. A standby is healthy but never ready, so a
                   load balancer or a Kubernetes Service routes to (and an operator sees) the active one.
"""

from __future__ import annotations

import platform
import time
from bisect import bisect_left
from http.server import ThreadingHTTPServer
from itertools import groupby

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)

from outbox import __version__
from outbox.core import probes
from outbox.core.redact import redact

# pg_replication_slots.wal_status, plus 'missing' when the slot is gone.
WAL_STATES = ["reserved", "extended", "unreserved", "lost", "missing"]


class RelayMetrics:
    def __init__(self, kafka_client: str = "kafka-python") -> None:
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
        self.failover_ready = Gauge(
            "outbox_relay_failover_ready", "1: promoting the standby now keeps the slot; 0: it would lose it; "
            "-1: no standby configured", registry=r)
        self.standby_lag_bytes = Gauge("outbox_relay_standby_lag_bytes",
                                       "WAL the standby named in synchronized_standby_slots has not confirmed",
                                       registry=r)
        self.slot_wal_status = Gauge(
            "outbox_relay_slot_wal_status", "1 for the slot's wal_status, 0 for the others: reserved/extended are "
            "fine, unreserved is about to be invalidated (past max_slot_wal_keep_size), lost needs "
            "`outbox relay --recreate-slot`", ["state"], registry=r)
        self.slot_safe_wal_size = Gauge(
            "outbox_relay_slot_safe_wal_size_bytes", "WAL that can still be written before the slot is invalidated "
            "(pg_replication_slots.safe_wal_size); NaN when max_slot_wal_keep_size is unlimited", registry=r)
        self.slot_safe_wal_size.set(float("nan"))
        self.active = Gauge("outbox_relay_active", "1 while this process streams the slot, 0 on standby", registry=r)
        self.confirmed_lsn = Gauge("outbox_relay_confirmed_lsn", "Slot position confirmed to PostgreSQL", registry=r)
        self.latency = Histogram(
            "outbox_relay_publish_latency_seconds", "Source commit to Kafka acknowledgement",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        # The standard process_* and python_* series (CPU, RSS, open fds, GC), and what is running.
        r.register(PROCESS_COLLECTOR)
        r.register(PLATFORM_COLLECTOR)
        self.build = Info("outbox_relay_build", "Version of the relay and its runtime", registry=r)
        self.build.info({"version": __version__, "python": platform.python_version(), "kafka_client": kafka_client})
        self.last_tick = time.monotonic()
        self.role = "starting"
        self.last_error: str | None = None
        self.healthy = True
        self.stalled = False  # events wait and nothing was acknowledged for OUTBOX_STALL_TIMEOUT_S
        self.bind_host = "127.0.0.1"  # where serve() listens unless told otherwise (OUTBOX_METRICS_HOST)
        self._init_readiness()

    def observe_latencies(self, base_s: float, commit_ts_us) -> None:
        """One latency per event: base_s minus each event's commit time (µs). Events of one source
        transaction share it, so each run of equal times costs one bucket increment, not one per
        event (per-event observe() was ~3% of the relay's CPU on large transactions)."""
        h = self.latency
        buckets, bounds, total = getattr(h, "_buckets", None), getattr(h, "_upper_bounds", None), getattr(h, "_sum", None)
        if buckets is None or bounds is None or total is None:  # a prometheus_client without these internals
            for ts in commit_ts_us:
                h.observe(base_s - ts / 1e6)
            return
        for ts, run in groupby(commit_ts_us):
            n = sum(1 for _ in run)
            latency = base_s - ts / 1e6
            total.inc(latency * n)
            buckets[bisect_left(bounds, latency)].inc(n)

    def set_wal_status(self, state: str) -> None:
        for s in WAL_STATES:
            self.slot_wal_status.labels(s).set(1 if s == state else 0)

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

    # ----- readiness (issue 11): what /readyz answers.
    #
    # The daemon reports two facts besides .role and .healthy:
    #   streaming  True once START_REPLICATION succeeded (after any backfill), False when the session ends
    #   kafka_ok   True after each successful Kafka round trip (a batch acknowledged, a metadata fetch),
    #              False as soon as one failed, until the next success
    # Until the daemon sets either one, readiness is inferred from what it already reports (role
    # "active" and outbox_relay_active = 1, which today's daemon sets only after its Publisher
    # connected and the stream opened, and clears when the session fails). That inference sees a
    # Kafka outage only once the pipeline gives up and restarts; the explicit flags see it at once.

    def _init_readiness(self) -> None:
        self._streaming = False
        self._kafka_ok = False
        self._reported = False  # the daemon set streaming or kafka_ok at least once
        self.ready_gauge = Gauge("outbox_relay_ready", "1 while /readyz answers 200 (active, streaming, Kafka ok)",
                                 registry=self.registry)
        self.ready_gauge.set_function(lambda: 1.0 if self.readiness()[0] == 200 else 0.0)

    @property
    def streaming(self) -> bool:
        return self._streaming

    @streaming.setter
    def streaming(self, value: bool) -> None:
        self._streaming, self._reported = bool(value), True

    @property
    def kafka_ok(self) -> bool:
        return self._kafka_ok

    @kafka_ok.setter
    def kafka_ok(self, value: bool) -> None:
        self._kafka_ok, self._reported = bool(value), True

    def readiness(self) -> tuple[int, dict]:
        live, _ = self.health()
        if self._reported:
            streaming, kafka_ok = self._streaming, self._kafka_ok
        else:
            # The gauge's own collect(), not the registry's: that would call the ready gauge, i.e. us, again.
            active = self.active.collect()[0].samples[0].value == 1
            streaming = kafka_ok = self.role == "active" and active
        reasons = []
        if live != 200:
            reasons.append("the relay loop is not healthy (see /healthz)")
        if self.role != "active":
            reasons.append(f"role is {self.role}: another relay holds the slot" if self.role == "standby"
                           else f"role is {self.role}")
        if not streaming:
            reasons.append("not streaming the slot")
        if not kafka_ok:
            reasons.append("last contact with Kafka failed or none yet")
        body = {"status": "not ready" if reasons else "ready", "role": self.role, "streaming": streaming,
                "kafka_ok": kafka_ok, "reasons": reasons,
                "last_error": redact(self.last_error) if self.last_error else None}
        return (503 if reasons else 200), body


def serve(metrics: RelayMetrics, port: int, host: str | None = None) -> ThreadingHTTPServer | None:
    """Start the HTTP server (outbox/core/probes.py) in a daemon thread. `host` defaults to
    metrics.bind_host (127.0.0.1) so that callers that only pass the port keep today's
    loopback-only behaviour."""
    if not port:
        return None
    host = host or getattr(metrics, "bind_host", None) or probes.DEFAULT_HOST
    return probes.serve(metrics.registry, metrics.health, metrics.readiness, port, host, name="outbox-metrics")
