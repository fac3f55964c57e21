"""Kafka's end offsets, for consumer lag. Bounded: an unreachable broker costs a few seconds and
yields None (the page says lag is unknown) instead of hanging the dashboard."""

from __future__ import annotations

import logging
import threading
import time

from kafka import KafkaConsumer, TopicPartition

from outbox.core.redact import redact

log = logging.getLogger("outbox.dashboard")

TIMEOUT_MS = 3_000
# After a failure, say "unknown" at once for this long instead of waiting for the timeout again on
# every refresh of every page while the broker is down.
RETRY_AFTER_S = 30.0


class EndOffsets:
    """One metadata-only Kafka client, reused across refreshes (creating one costs a round trip
    per broker) and recreated after a failure."""

    def __init__(self, bootstrap: str, security: dict | None = None):
        self.bootstrap = bootstrap
        self.security = security or {}  # Settings.kafka_security()
        self.error: str | None = None  # why the last lookup failed, for the page
        self._consumer: KafkaConsumer | None = None
        self._lock = threading.Lock()
        self._failed_at: float | None = None

    def fetch(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int] | None:
        """{(topic, partition): end offset}, or None when Kafka could not be asked (see .error)."""
        if not partitions:
            self.error = None
            return {}
        with self._lock:
            if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER_S:
                return None  # self.error still says why
            try:
                if self._consumer is None:
                    # read_committed like the inbox: the end it can reach is the last stable offset.
                    self._consumer = KafkaConsumer(
                        bootstrap_servers=self.bootstrap.split(","), group_id=None, enable_auto_commit=False,
                        client_id="outbox-dashboard", request_timeout_ms=TIMEOUT_MS,
                        bootstrap_timeout_ms=TIMEOUT_MS, isolation_level="read_committed", **self.security)
                ends = self._consumer.end_offsets([TopicPartition(t, p) for t, p in partitions],
                                                  timeout_ms=TIMEOUT_MS)
            except Exception as exc:  # noqa: BLE001 - any client failure means "lag unknown", said on the page
                why = redact(str(exc)).strip() or type(exc).__name__
                self.error = f"Kafka at {self.bootstrap} did not answer ({why})"
                log.warning("consumer lag unavailable: %s", self.error)
                self._close()
                self._failed_at = time.monotonic()
                return None
            self._failed_at = None
        self.error = None
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}

    def _close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception:  # noqa: BLE001, S110 - a broken client is dropped either way
                pass
            self._consumer = None

    def close(self) -> None:
        with self._lock:
            self._close()
