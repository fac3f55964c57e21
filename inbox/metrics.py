"""Prometheus metrics and health of one inbox Runner, served on /metrics, /healthz and /readyz
when the Runner is given a metrics port (OUTBOX_INBOX_METRICS_PORT, bound to OUTBOX_METRICS_HOST,
127.0.0.1 by default); see docs/inbox.md#metrics.

Every Runner has a registry of its own, not prometheus_client's global one: two Runners in one
process (two consumers, or tests) would otherwise collide on the same series names, and an
application's own metrics stay out of the Runner's endpoint.

    /healthz   liveness: 200 while the poll loop turns (it did within max_poll_interval_ms, the
               bound Kafka itself puts on a member); 503 once it stopped with an error or is stuck
    /readyz    readiness: 200 while partitions are assigned, the loop is alive and PostgreSQL is
               reachable; 503 {"status": "not ready", "reasons": [...]} otherwise
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from outbox.core.redact import redact

HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class InboxMetrics:
    def __init__(self, consumer: str, *, stale_after_s: float = 300.0):
        self.consumer = consumer
        r = self.registry = CollectorRegistry()
        labels = ["consumer", "topic"]
        self.processed = Counter("outbox_inbox_events_processed", "Events handed to the handler and committed",
                                 labels, registry=r)
        self.duplicates = Counter("outbox_inbox_duplicates_suppressed",
                                  "Deliveries suppressed as repeats of an event already in the inbox", labels, registry=r)
        self.dead_lettered = Counter("outbox_inbox_events_dead_lettered",
                                     "Records moved to outbox.inbox_dead_letters (handler failed, invalid envelope)",
                                     labels, registry=r)
        self.retries = Counter("outbox_inbox_handler_retries",
                               "Failed handler attempts that are retried after a backoff", labels, registry=r)
        self.fetch_restarts = Counter("outbox_inbox_fetch_restarts",
                                      "Partitions sought to their own position because they had records waiting while polls "
                                      "returned none for fetch_stall_s (a Kafka client fetch stall)",
                                      labels, registry=r)
        self.transactions = Counter("outbox_inbox_transactions", "PostgreSQL transactions committed",
                                    ["consumer"], registry=r)
        self.handler_seconds = Histogram("outbox_inbox_handler_duration_seconds",
                                         "Time the handler took per event (each attempt, replays included)",
                                         labels, buckets=HANDLER_BUCKETS, registry=r)
        self.lag = Gauge("outbox_inbox_consumer_lag",
                         "Records behind per assigned partition: the partition's end offset minus the next offset "
                         "committed in PostgreSQL (refreshed every few seconds)",
                         ["consumer", "topic", "partition"], registry=r)
        self.assigned = Gauge("outbox_inbox_assigned_partitions", "Partitions assigned to this Runner",
                              ["consumer"], registry=r)
        self.database_up = Gauge("outbox_inbox_database_up", "1 while the Runner's PostgreSQL connection works",
                                 ["consumer"], registry=r)
        self.ready = Gauge("outbox_inbox_ready", "1 while /readyz answers 200", ["consumer"], registry=r)
        self.transactions.labels(consumer)
        # Written by the poll loop only; read by the HTTP server's threads.
        self.stale_after_s = stale_after_s
        self.last_tick = time.monotonic()
        self.running = False
        self.last_error: str | None = None
        self.assigned_partitions = 0
        self.database_ok = False  # the worker reached PostgreSQL and has not lost it since
        self.assigned.labels(consumer).set_function(lambda: self.assigned_partitions)
        self.database_up.labels(consumer).set_function(lambda: 1.0 if self.database_ok else 0.0)
        self.ready.labels(consumer).set_function(lambda: 1.0 if self.readiness()[0] == 200 else 0.0)
        self._handler_children: dict[str, object] = {}
        self._lag_series: set[tuple[str, int]] = set()

    # ----- fed by the Runner

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def count(self, result) -> None:
        """A BatchResult's tallies, per topic."""
        c = self.consumer
        for (topic, _), (p, d, x) in result.tallies.items():
            if p:
                self.processed.labels(c, topic).inc(p)
            if d:
                self.duplicates.labels(c, topic).inc(d)
            if x:
                self.dead_lettered.labels(c, topic).inc(x)
        for (topic, _), n in result.retries.items():
            self.retries.labels(c, topic).inc(n)
        if result.transactions:
            self.transactions.labels(c).inc(result.transactions)

    def timed(self, handler: Callable) -> Callable:
        """The handler, observed into the duration histogram (each call, failed ones too)."""
        children, histogram, consumer = self._handler_children, self.handler_seconds, self.consumer
        clock = time.perf_counter

        def timed_handler(conn, msg):
            child = children.get(msg.topic)
            if child is None:
                child = children[msg.topic] = histogram.labels(consumer, msg.topic)
            start = clock()
            try:
                return handler(conn, msg)
            finally:
                child.observe(clock() - start)

        return timed_handler

    def set_lag(self, lags: dict[tuple[str, int], int]) -> None:
        """Replaces the lag series: partitions no longer assigned disappear."""
        for topic, part in self._lag_series - set(lags):
            self.lag.remove(self.consumer, topic, str(part))
        for (topic, part), n in lags.items():
            self.lag.labels(self.consumer, topic, str(part)).set(max(0, n))
        self._lag_series = set(lags)

    def forget_partitions(self, partitions: Iterable[tuple[str, int]]) -> None:
        gone = self._lag_series & set(partitions)
        for topic, part in gone:
            self.lag.remove(self.consumer, topic, str(part))
        self._lag_series -= gone

    # ----- probes

    def health(self) -> tuple[int, dict]:
        since = time.monotonic() - self.last_tick
        reasons = []
        if self.last_error is not None:
            reasons.append(f"the poll loop stopped: {redact(self.last_error)}")
        elif self.running and since > self.stale_after_s:
            reasons.append(f"the poll loop has not turned for {since:.0f} s")
        body = {"status": "unhealthy" if reasons else "ok", "consumer": self.consumer, "running": self.running,
                "seconds_since_loop": round(since, 1), "reasons": reasons}
        return (503 if reasons else 200), body

    def readiness(self) -> tuple[int, dict]:
        live, _ = self.health()
        assigned, database_up = self.assigned_partitions, self.database_ok
        reasons = []
        if live != 200:
            reasons.append("the poll loop is not healthy (see /healthz)")
        if not self.running:
            reasons.append("not running")
        if not assigned:
            reasons.append("no partitions assigned")
        if not database_up:
            reasons.append("PostgreSQL unreachable or not connected yet")
        body = {"status": "not ready" if reasons else "ready", "consumer": self.consumer,
                "assigned_partitions": assigned, "database_up": database_up, "reasons": reasons}
        return (503 if reasons else 200), body
