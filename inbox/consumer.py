"""The ready-made consumer: a Kafka poll loop around `process()`.

    Runner("billing", handle, dsn=..., bootstrap=..., topics=["outbox.event.order"]).run()

- The Kafka client is kafka-python (the default) or confluent-kafka (librdkafka, the `confluent`
  extra: kafka_client="confluent-kafka", OUTBOX_KAFKA_CLIENT). The loop below is written against
  kafka-python's KafkaConsumer; inbox/kafka_confluent.py gives librdkafka that interface.

- Positions live in PostgreSQL (outbox.inbox_offsets). On partition assignment the runner seeks
  to them, so what the consumer has read and what its handler has written are one commit.
  Partitions PostgreSQL has never seen start from Kafka's committed group offset, else from
  `auto_offset_reset` (earliest by default: an inbox would rather see a duplicate than skip).
- After each PostgreSQL commit the same offsets are committed to the Kafka group, only so that
  lag tools (kafka-consumer-groups, the dashboard) show the truth.
- Polling overlaps processing: while a worker thread runs batch N through PostgreSQL, the main
  thread fetches and decodes batch N+1. At most one poll's batches are in flight and they run in
  order; with parallel_partitions > 1 its partitions are split between that many workers.
- stop() (or SIGTERM via `run_consumer`) lets the batch in flight finish and commit, then leaves
  the group and returns.
- Losing the database connection (a PostgreSQL restart, a failover, a network cut) does not stop
  it: the partitions are paused (the group membership stays alive), the connection is retried
  with backoff, and once it is back every assigned partition resumes from the offsets stored in
  PostgreSQL, so a batch whose commit was lost is redelivered and one that committed is not.

Inside, a running Runner is three parts with one owner for each piece of state (see below the
Runner): the poll loop (_PollLoop: the KafkaConsumer, the batch in flight, positions), the worker
(_Worker: the PostgreSQL connection on its own thread) and the rebalance listener (_Rebalance:
no state, it asks the poll loop); what they signal each other is one small _Control.
"""

from __future__ import annotations

import logging
import math
import operator
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from inbox import horizon, kafka_python, store
from inbox.errors import InboxError
from inbox.metrics import InboxMetrics
from inbox.plan import Plan, plan_batch
from inbox.process import BatchResult, Handler, check_consumer_name, process
from inbox.replay import replay_requested
from inbox.retry import DEFAULT_POLICY, RetryPolicy
from outbox.core import probes
from outbox.core.redact import Dsn, redact
from outbox.core.settings import Settings

log = logging.getLogger("inbox")

DEFAULT_MAX_POLL_INTERVAL_MS = 300_000
KAFKA_COMMIT_INTERVAL_S = 1.0
# kafka-python 3.0 has had fetch stalls: an assigned partition with records waiting that poll()
# never returns (dpkp/kafka-python#3106, #3131; twice in our CI, both right after a fresh group's
# first assignment). When polls returned nothing at all for this long, a partition behind its end
# offset is sought to its own position, which restarts its fetch state; the seek skips nothing.
# Measured on idle polls, not per partition: a consumer busy with other partitions' records (a slow
# handler, a large poll) is not stalled, it has not come round to that partition yet.
FETCH_STALL_S = 10.0
LAG_TIMEOUT_MS = 2_000  # one end-offsets request for the lag gauge; skipped (logged at debug) past it
RECONNECT_BACKOFF_S = (0.5, 10.0)  # first wait, cap; doubling while PostgreSQL stays unreachable
_by_partition = operator.itemgetter(0)


class DatabaseLost(Exception):
    """The worker's PostgreSQL connection is gone; the Runner reconnects and resumes."""


KAFKA_CLIENTS = ("kafka-python", "confluent-kafka")
SAME_AS_CONSUMER = object()  # group_id default: the consumer name
PARALLEL_FETCH_BYTES = 16 * 1024  # per partition fetch with parallel_partitions > 1 (see Runner.__init__)
DEFAULT_RETENTION_WINDOW_S = Settings.model_fields["inbox_retention_days"].default * horizon.DAY_S
DEFAULT_CHECKPOINT_TOPIC = Settings.model_fields["checkpoint_topic"].default


def _refuse_checkpoint_topic(checkpoint_topic: str, topics: Sequence[str], pattern: str | None,
                             partitions: Sequence[tuple[str, int]]) -> None:
    """Its records are the relay's positions, not events: every one would be dead-lettered as having no
    event id, and the dedupe-window check's fix for a compacted topic (a finite retention) would let
    Kafka delete the checkpoints the relay's exactly-once mode stands on."""
    import re

    if pattern is not None:
        try:
            # re.match: kafka-python's semantics, and librdkafka's for the "^"-anchored pattern we give it.
            hit = re.match(pattern, checkpoint_topic) is not None
        except re.error as exc:
            raise InboxError(f"pattern {pattern!r} is not a regular expression: {exc}") from None
        what = f"pattern {pattern!r} matches"
    else:
        hit = checkpoint_topic in set(topics) | {t for t, _ in partitions}
        what = "topics include"
    if hit:
        raise InboxError(f"{what} the relay's checkpoint topic {checkpoint_topic!r}, which holds the relay's "
                         f"exactly-once positions, not events. Fix: read only the event topics (e.g. pattern "
                         r"r'outbox\.event\..*' for the default OUTBOX_TOPIC_TEMPLATE), or pass the right "
                         f"checkpoint_topic= if this is not the relay's (OUTBOX_CHECKPOINT_TOPIC)")


class Runner:
    def __init__(self, consumer: str, handler: Handler, *, dsn: Dsn | str, bootstrap: str | Sequence[str],
                 topics: Sequence[str] = (), pattern: str | None = None,
                 partitions: Sequence[tuple[str, int]] | None = None, group_id: str | None | object = SAME_AS_CONSUMER,
                 policy: RetryPolicy = DEFAULT_POLICY, max_poll_records: int = 2000, poll_timeout_s: float = 1.0,
                 replay_check_s: float = 5.0, kafka_config: Mapping | None = None,
                 retention_window_s: float | None = None, allow_short_dedupe_window: bool = False,
                 metrics_port: int | None = None, metrics_host: str | None = None, lag_interval_s: float = 10.0,
                 parallel_partitions: int = 1, fetch_stall_s: float = FETCH_STALL_S,
                 kafka_client: str = "kafka-python", checkpoint_topic: str = DEFAULT_CHECKPOINT_TOPIC):
        """consumer    the inbox's name for this logical consumer (also the Kafka group by default)
        topics / pattern / partitions   what to read: a subscription (group-managed) or fixed partitions
        group_id    Kafka consumer group; defaults to the consumer name. None (fixed partitions only):
                    no group at all, positions come from PostgreSQL alone
        max_poll_records  records per poll, hence per PostgreSQL transaction. Higher than kafka-python's
                    500 because each batch costs the worker thread a few round trips, and every round
                    trip waits for the GIL held by the polling thread (measured: 0.62 of the bare
                    consume rate at 500, 0.76 at 2000; bench/results/).
        kafka_config    extra KafkaConsumer settings, e.g. group_instance_id for static membership
        retention_window_s  how long `outbox inbox purge` keeps inbox rows (OUTBOX_INBOX_RETENTION_DAYS;
                    from_settings passes it; the settings' default otherwise). math.inf: never purged.
                    At start, refused if shorter than a subscribed topic's retention.ms
        allow_short_dedupe_window  start anyway (with a warning): for handlers that tolerate
                    duplicates older than the window
        metrics_port  serve /metrics, /healthz and /readyz on it while run() runs (0: any free port,
                    see metrics_address; None, the default: no server). The metrics themselves are
                    always kept, in runner.metrics.registry (one registry per Runner)
        metrics_host  address to listen on (OUTBOX_METRICS_HOST; 127.0.0.1 by default)
        lag_interval_s  how often the consumer-lag gauge asks Kafka for the partitions' end offsets
        parallel_partitions  worker threads, each with its own PostgreSQL connection, that process
                    different partitions of a poll at the same time (OUTBOX_INBOX_PARALLEL_PARTITIONS).
                    A partition's records always go to one worker in order, each worker's part of a
                    poll is one transaction, and the next poll waits for all of them: per-partition
                    order and the one-transaction guarantee hold as with 1 (the default). Pays off
                    when handlers wait on I/O; the handler must be thread-safe
        fetch_stall_s  when polls returned no records for this long (checked every lag_interval_s),
                    a partition with records waiting is sought to its position again, with a
                    warning: a guard against fetch stalls in kafka-python 3.0
        kafka_client  "kafka-python" (default) or "confluent-kafka" (librdkafka: records are fetched and
                    decoded in C; the `confluent` extra). kafka_config stays in kafka-python's option
                    names either way (translated; librdkafka's own dotted names pass through)
        checkpoint_topic  the relay's exactly-once checkpoint topic (OUTBOX_CHECKPOINT_TOPIC; from_settings
                    passes it): refused as a topic to read, it holds no events"""
        check_consumer_name(consumer)
        if kafka_client not in KAFKA_CLIENTS:
            raise InboxError(f"kafka_client must be one of {', '.join(KAFKA_CLIENTS)}, got {kafka_client!r} "
                             f"(OUTBOX_KAFKA_CLIENT)")
        self.kafka_client = kafka_client
        if sum(bool(x) for x in (topics, pattern, partitions)) != 1:
            raise InboxError("give exactly one of topics=[...], pattern='...' or partitions=[(topic, partition)]")
        _refuse_checkpoint_topic(checkpoint_topic, topics, pattern, partitions or ())
        if group_id is None and not partitions:
            raise InboxError("a subscription needs a consumer group; group_id=None works only with partitions=[...]")
        self.consumer, self.handler, self.policy = consumer, handler, policy
        self.dsn = dsn if isinstance(dsn, Dsn) else Dsn(dsn)
        self.topics, self.pattern = list(topics), pattern
        self.partitions = [TopicPartition(t, p) for t, p in partitions or ()]
        self.poll_timeout_ms = int(poll_timeout_s * 1000)
        self.replay_check_s = replay_check_s
        self.retention_window_s = DEFAULT_RETENTION_WINDOW_S if retention_window_s is None else retention_window_s
        if not self.retention_window_s > 0:
            raise InboxError(f"retention_window_s must be positive, got {retention_window_s}")
        self.allow_short_dedupe_window = allow_short_dedupe_window
        self._checked_topics: set[str] = set()
        config = dict(kafka_config or {})
        if config.get("enable_auto_commit") or str(config.get("enable.auto.commit", "")).lower() == "true":
            raise InboxError("enable_auto_commit must stay off: the inbox commits offsets in PostgreSQL itself")
        self.kafka_config = {
            "bootstrap_servers": bootstrap,
            "group_id": consumer if group_id is SAME_AS_CONSUMER else group_id,
            "client_id": f"inbox-{consumer}",
            "auto_offset_reset": "earliest",
            # The relay's exactly-once mode writes in Kafka transactions: never hand the handler a
            # record from an aborted one (harmless for topics written without transactions).
            "isolation_level": "read_committed",
            "max_poll_records": max_poll_records,
            # Subscribing to a topic the relay has not created yet must not create it with the
            # broker's defaults (one partition, its replication factor): the relay creates topics
            # with the partitions and replication they need; the Runner waits for them.
            "allow_auto_create_topics": False,
            # A topic created moments before the group forms can be missing from the first metadata
            # the group leader assigns from: kafka-python then assigns nothing and, with the default
            # 5 minutes, would not look again for that long. 10 s bounds it for one small request.
            "metadata_max_age_ms": 10_000,
            # kafka-python returns one partition's buffered records before the next one's, so with
            # 1 MiB per partition fetch a backlogged poll covers a single partition and leaves the
            # other workers idle. Small fetches make a poll span partitions: with a handler waiting
            # 2 ms a record, 3 workers on 3 partitions reached 1.64x one worker at 64 KiB and 2.75x
            # at 16 KiB (bench/results/inbox-parallel-*.json). Pausing the partitions a poll
            # returned and polling again, the other way to get there, stalls kafka-python 3.0's
            # fetcher after a rebalance.
            **({"max_partition_fetch_bytes": PARALLEL_FETCH_BYTES} if parallel_partitions > 1 else {}),
            **config,
            "enable_auto_commit": False,
        }
        # Retries of one record must end well before Kafka gives the partition to someone else.
        poll_interval_ms = self.kafka_config.get("max_poll_interval_ms",
                                                 self.kafka_config.get("max.poll.interval.ms", DEFAULT_MAX_POLL_INTERVAL_MS))
        self.budget_s = int(poll_interval_ms) / 1000 / 2
        policy.check_fits(self.budget_s, "half of max_poll_interval_ms")

        self.totals = BatchResult()  # written by the poll loop only; read it any time
        # Liveness: the poll loop turns at least once per max_poll_interval_ms (Kafka's own bound).
        self.metrics = InboxMetrics(consumer, stale_after_s=2 * self.budget_s + poll_timeout_s)
        self.metrics_port, self.metrics_host = metrics_port, metrics_host or probes.DEFAULT_HOST
        self.metrics_address: tuple[str, int] | None = None  # (host, port) while the server listens
        self.lag_interval_s = lag_interval_s
        if not fetch_stall_s > 0:
            raise InboxError(f"fetch_stall_s must be positive, got {fetch_stall_s}")
        self.fetch_stall_s = fetch_stall_s
        if not 1 <= parallel_partitions <= 64:
            raise InboxError(f"parallel_partitions must be between 1 and 64, got {parallel_partitions}")
        self.parallel_partitions = parallel_partitions
        self._control = _Control()
        self._started = False
        if kafka_client == "confluent-kafka":
            _confluent().translate(self.kafka_config)  # a bad option fails here, not in run()

    @classmethod
    def from_settings(cls, settings, consumer: str, handler: Handler, **kwargs) -> "Runner":
        kwargs.setdefault("policy", RetryPolicy.from_settings(settings))
        kwargs.setdefault("max_poll_records", settings.inbox_poll_records)
        kwargs.setdefault("retention_window_s", settings.inbox_retention_days * horizon.DAY_S)
        kwargs["kafka_config"] = {**settings.kafka_security(), **(kwargs.get("kafka_config") or {})}
        kwargs.setdefault("metrics_port", settings.inbox_metrics_port or None)  # 0: no server
        kwargs.setdefault("metrics_host", settings.metrics_host)
        kwargs.setdefault("parallel_partitions", settings.inbox_parallel_partitions)
        kwargs.setdefault("kafka_client", settings.kafka_client)
        kwargs.setdefault("checkpoint_topic", settings.checkpoint_topic)
        return cls(consumer, handler, dsn=settings.require_database_url(), bootstrap=settings.kafka_servers, **kwargs)

    def stop(self) -> None:
        """Finish the batch in flight, commit it, and return from run(). Safe from signal handlers."""
        self._control.stop()

    def run(self) -> BatchResult:
        """Consume until stop(); returns the totals. A lost database connection is waited out
        (reconnect with backoff, resume from the stored offsets); raises what stopped it otherwise
        (e.g. a database it never reached, a failing rebalance listener); a restart resumes from
        the offsets stored in PostgreSQL."""
        if self._started:
            raise InboxError("a Runner runs once; create a new one to run again")
        self._started = True
        # Before joining the group: a consumer that would apply old redeliveries twice must not start.
        self._check_dedupe_window(self.topics or {tp.topic for tp in self.partitions})
        server = self._serve_metrics()
        metrics = self.metrics
        metrics.running = True
        metrics.tick()
        try:
            workers = [_Worker(self, self._control, i) for i in range(self.parallel_partitions)]
            try:
                kc = self._kafka_consumer()
                log.info("inbox consumer %s starting: group %s, %s, PostgreSQL %s, %s", self.consumer,
                         self.kafka_config["group_id"], self.pattern or self.topics or self.partitions, self.dsn,
                         self.kafka_client)
                loop = _PollLoop(self, kc, workers, self._control)
                try:
                    if self.partitions:
                        kc.assign(self.partitions)
                        loop.position(self.partitions)
                    else:
                        for topic in self.topics:
                            # Known to this consumer's metadata before it joins: as the group leader
                            # it would otherwise assign a topic created moments ago to nobody, and
                            # kafka-python may take long to notice and rejoin.
                            try:
                                kc.partitions_for_topic(topic)
                            except Exception as exc:  # noqa: BLE001 - Kafka down: subscribe waits for it
                                log.debug("consumer %s: no metadata for %s yet: %s", self.consumer, topic, exc)
                        kc.subscribe(topics=self.topics or (), pattern=self.pattern, listener=_Rebalance(self, loop))
                    loop.run()
                finally:
                    kc.close(autocommit=False)
            finally:
                for worker in workers:
                    worker.close()
        except BaseException as exc:
            metrics.last_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            metrics.running = False
            metrics.assigned_partitions = 0
            if server is not None:
                server.shutdown()
                server.server_close()
                self.metrics_address = None
        log.info("inbox consumer %s stopped: %d processed, %d duplicates suppressed, %d dead-lettered",
                 self.consumer, self.totals.processed, self.totals.duplicates, self.totals.dead_lettered)
        return self.totals

    def _kafka_consumer(self):
        if self.kafka_client == "confluent-kafka":
            return _confluent().ConfluentConsumer(self.kafka_config)
        return kafka_python.consumer(self.kafka_config)

    def _serve_metrics(self):
        if self.metrics_port is None:
            return None
        m = self.metrics
        server = probes.serve(m.registry, m.health, m.readiness, self.metrics_port, self.metrics_host,
                              name=f"inbox-{self.consumer}-metrics",
                              setting="metrics_port (OUTBOX_INBOX_METRICS_PORT)")
        self.metrics_address = tuple(server.server_address[:2])
        log.info("consumer %s serves /metrics, /healthz and /readyz on %s:%d", self.consumer, *self.metrics_address)
        return server

    def _check_dedupe_window(self, topics, assigned: bool = False) -> None:
        """See inbox/horizon.py. Each topic once per run; a pattern's topics, and topics that did not
        exist yet at start, as they get assigned."""
        topics = set(topics) - self._checked_topics
        if not topics or math.isinf(self.retention_window_s):
            return
        admin_config = {k: v for k, v in self.kafka_config.items() if k in KafkaAdminClient.DEFAULT_CONFIG}
        admin_config["client_id"] = f"inbox-{self.consumer}-admin"
        for attempt in range(10 if assigned else 1):
            try:
                horizons = horizon.topic_horizons(admin_config, topics)
            except Exception as exc:  # noqa: BLE001 - judged like a topic whose config is unreadable
                horizons = {t: f"its configuration could not be read ({redact(str(exc))})" for t in topics}
            if not assigned or horizon.MISSING not in horizons.values():
                break
            time.sleep(0.5)  # assigned, so it exists: the broker's metadata has not caught up yet
        else:
            horizons = {t: "it is assigned but its configuration could not be read" if h is horizon.MISSING else h
                        for t, h in horizons.items()}
        self._checked_topics |= horizon.check_window(self.consumer, self.retention_window_s, horizons,
                                                     allow_short=self.allow_short_dedupe_window)


# ----- the parts of a running Runner
#
# Each piece of mutable state has one owner:
#   _PollLoop  the KafkaConsumer, the batch in flight, offsets to copy to Kafka, partitions to
#              refetch, the PostgreSQL outage, the totals
#   _Worker    the PostgreSQL connection and the executor thread it is used on
#   _Rebalance nothing: it asks the poll loop to settle the batch in flight or position partitions
#   _Control   what they signal each other: stop, interrupt retries, a failure for run() to raise
# kafka-python calls _Rebalance on its IO thread while the poll loop waits in poll(); the one
# hand-over between the two (the batch in flight) goes through _InFlight, which has a lock.


class _Control:
    """The signals shared by stop(), the poll loop, the worker and the rebalance listener."""

    def __init__(self) -> None:
        self.stopping = threading.Event()  # set once by stop(); the poll loop leaves at its next turn
        # Read by process() on the worker: a record in its retry backoff stops waiting. Set by stop()
        # and, for the time it waits for the batch in flight, by a revocation.
        self.interrupt = threading.Event()
        self._failure: BaseException | None = None  # what stopped a listener; run() raises it

    def stop(self) -> None:
        self.stopping.set()
        self.interrupt.set()

    @contextmanager
    def interrupting(self):
        """Interrupt retries for the duration (a revocation waiting for the batch in flight)."""
        self.interrupt.set()
        try:
            yield
        finally:
            if not self.stopping.is_set():
                self.interrupt.clear()

    def fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


@dataclass
class _Submitted:
    future: Future
    first: dict[TopicPartition, int]  # first offset per partition: where to resume if PostgreSQL was lost


class _InFlight:
    """The batches of one poll the workers may be processing (one per worker, on disjoint
    partitions); taken together by whoever settles them first (the poll loop's next turn, or a
    revocation inside poll)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: list[_Submitted] = []

    def put(self, batches: list[_Submitted]) -> None:
        with self._lock:
            assert not self._batches, "one poll in flight at most"
            self._batches = batches

    def take(self) -> list[_Submitted]:
        with self._lock:
            batches, self._batches = self._batches, []
            return batches


@dataclass
class _Outage:
    """PostgreSQL is unreachable: partitions paused, nothing submitted, reconnects with backoff."""

    since: float
    delay: float = RECONNECT_BACKOFF_S[0]
    next_attempt: float = 0.0
    # First offset per partition of the batch in flight and of records dropped meanwhile: where a
    # partition PostgreSQL has no position for resumes after reconnecting.
    resume_from: dict[TopicPartition, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.next_attempt = self.since + self.delay

    def note(self, tp: TopicPartition, offset: int) -> None:
        self.resume_from[tp] = min(offset, self.resume_from.get(tp, offset))

    def failed_again(self) -> None:
        self.delay = min(RECONNECT_BACKOFF_S[1], self.delay * 2)
        self.next_attempt = time.monotonic() + self.delay


class _PollLoop:
    """The main thread's loop: owns the KafkaConsumer and everything positions depend on."""

    def __init__(self, runner: Runner, kc: KafkaConsumer, workers: list["_Worker"], control: _Control):
        self.runner, self.kc, self.workers, self.control = runner, kc, workers, control
        self.worker = workers[0]  # also reads positions and runs the replay checks
        self.consumer = runner.consumer
        self.totals = runner.totals
        self.in_flight = _InFlight()
        self.outage: _Outage | None = None
        self.to_commit: dict[TopicPartition, int] = {}
        self.rewound: set[tuple[str, int]] = set()  # seeked back: drop what the current poll fetched past it
        self.last_kafka_commit = 0.0
        self.metrics = runner.metrics
        # Next offset per assigned partition as PostgreSQL has it (stored at assignment, committed
        # since): what the lag gauge subtracts from the end offsets.
        self.positions: dict[TopicPartition, int] = {}
        self.last_lag = 0.0
        self.last_records = time.monotonic()  # when a poll last returned records (or partitions were assigned)
        self.sought_at: float | None = None  # when the fetch-stall guard last sought (see _unstall)

    def run(self) -> None:
        kc, control = self.kc, self.control
        metrics = self.metrics
        while not control.stopping.is_set():
            metrics.tick()
            if self.outage is not None:
                self._reconnect()
            polled = kc.poll(timeout_ms=self.runner.poll_timeout_ms)
            if polled:
                self.last_records = time.monotonic()
            # Planned while the worker still runs the previous batch: planning after _settle() would
            # leave the worker idle for it (~1.5 us a record). Redone in the rare case _settle()
            # rewinds one of these partitions.
            planned = self._plan(polled)
            self._settle()
            metrics.assigned_partitions = len(kc.assignment())
            if time.monotonic() - self.last_lag >= self.runner.lag_interval_s:
                self._refresh_lag(pending={tp for tp, batch in polled.items() if batch})
            if self.rewound:  # rare: most turns skip the scan over the polled partitions
                if any((tp.topic, tp.partition) in self.rewound for tp in polled):
                    planned = self._plan(polled, skip=self.rewound)
                self.rewound.clear()
            if self.outage is not None:
                for group, _, _ in planned:  # dropped: refetched once the database is back
                    for tp, batch in group:
                        self.outage.note(tp, batch[0].offset)
                continue
            check_replays = self.worker.replay_due()
            submitted = []
            for worker, (group, records, plan) in zip(self.workers, planned):
                replays = check_replays and worker is self.worker
                if records or replays:
                    future = worker.submit(records, plan, replays)
                    submitted.append(_Submitted(future, {tp: batch[0].offset for tp, batch in group}))
            if submitted:
                self.in_flight.put(submitted)
        self._settle()
        self._commit_to_kafka(wait=True)

    def _plan(self, polled, skip=frozenset()) -> list[tuple[list, list, Plan | None]]:
        """(partitions, records, plan) per worker. Partition order, not poll order: every instance
        locks rows in the same order (see process.lock_order); sorting the few partitions keeps each
        one's records in order. Planning (envelope parsing) runs on this thread, not the worker's:
        the worker then holds the GIL only briefly, so this thread's many short hand-offs to the
        Kafka client's IO are not kept waiting behind it."""
        batches = [(tp, batch) for tp, batch in sorted(polled.items(), key=_by_partition)
                   if batch and (tp.topic, tp.partition) not in skip]
        out = []
        for group in _split(batches, len(self.workers)):
            records = [r for _, batch in group for r in batch]
            out.append((group, records, plan_batch(records) if records else None))
        return out

    def _settle(self) -> None:
        """Wait for the batches in flight; then rewind what they left and copy their offsets to Kafka."""
        self.control.raise_failure()
        lost = None
        for batch in self.in_flight.take():
            try:
                result = batch.future.result()
            except DatabaseLost as exc:
                self._database_lost(exc, batch)
                lost = exc
                continue
            self._absorb(result)
        if lost is None:
            self.metrics.database_ok = True
            self._commit_to_kafka()

    def _refresh_lag(self, pending: set[TopicPartition]) -> None:
        """Records waiting per assigned partition PostgreSQL has a position for: the end offset minus
        where this consumer reads next. One ListOffsets request, at most every lag_interval_s: never
        per message. `pending`: partitions whose polled records are not handed to a worker yet."""
        now = self.last_lag = time.monotonic()
        assigned = self.kc.assignment()
        quiet = list(assigned) if now - self.last_records >= self.runner.fetch_stall_s else []
        asked = [tp for tp in assigned if tp in self.positions or tp in quiet]
        if not asked:
            self.metrics.set_lag({})
            return
        try:
            ends = self.kc.end_offsets(asked, timeout_ms=LAG_TIMEOUT_MS)
        except Exception as exc:  # noqa: BLE001 - a gauge may be late; the loop must not stop for it
            log.debug("consumer %s: end offsets for the lag gauge failed: %s", self.consumer, redact(str(exc)))
            return
        lags = {}
        for tp, end in ends.items():
            if end is None or tp not in self.positions:
                continue
            # Nothing of this partition is in flight (the previous poll's work is settled): the
            # consumer's own position is then past transaction markers and aborted records too,
            # which PostgreSQL's next offset never passes; a caught-up partition of the relay's
            # exactly-once mode would otherwise show 1 forever.
            settled = tp not in pending and self.outage is None  # in an outage polled records are dropped
            reads_next = max(self.positions[tp], self._position(tp) or 0) if settled else self.positions[tp]
            lags[(tp.topic, tp.partition)] = max(end - reads_next, 0)
        self.metrics.set_lag(lags)
        if quiet and self.outage is None:
            self._unstall(quiet, ends, now)

    def _position(self, tp: TopicPartition) -> int | None:
        try:
            return self.kc.position(tp, timeout_ms=LAG_TIMEOUT_MS)
        except Exception as exc:  # noqa: BLE001 - no position known to Kafka
            log.debug("consumer %s: position of %s failed: %s", self.consumer, tp, redact(str(exc)))
            return None

    def _unstall(self, quiet, ends, now) -> None:
        """Seek partitions that have records waiting while polls returned none for fetch_stall_s."""
        paused = self.kc.paused()
        sought = False
        for tp in quiet:
            if tp in paused or ends.get(tp) is None:
                continue
            position = self._position(tp)
            target = position if position is not None else self.positions.get(tp)
            if target is None and self.runner.kafka_config.get("auto_offset_reset") == "earliest":
                try:  # no position at all: its reset to the beginning is what stalled
                    target = self.kc.beginning_offsets([tp], timeout_ms=LAG_TIMEOUT_MS).get(tp)
                except Exception as exc:  # noqa: BLE001 - tried again at the next check
                    log.debug("consumer %s: beginning offset of %s failed: %s", self.consumer, tp, redact(str(exc)))
            if target is None or ends[tp] <= target:
                continue  # caught up, or nothing known to seek to
            log.warning("consumer %s: %s[%d] returned no records for %.0f s although %d are waiting from offset %d; "
                        "seeking to %d again to restart its fetch", self.consumer, tp.topic, tp.partition,
                        now - self.last_records, ends[tp] - target, target, target)
            self.kc.seek(tp, target)
            self.metrics.fetch_restarts.labels(self.consumer, tp.topic).inc()
            sought = True
        if sought:
            if self.last_records == self.sought_at:  # no records (nor an assignment) since the last seek
                self._rejoin_group()
            self.last_records = self.sought_at = now  # a fresh period for the sought partitions

    def _rejoin_group(self) -> None:
        """The last seek restarted nothing: kafka-python may be stuck in a rebalance it never
        finished (its partitions then stay pending revocation, and no seek makes them fetchable).
        Asking for a rejoin makes the next poll run a fresh JoinGroup/SyncGroup round. librdkafka
        has no such state to leave, and fixed partitions have no group to rejoin."""
        request_rejoin = getattr(getattr(self.kc, "_coordinator", None), "request_rejoin", None)
        if request_rejoin is None or not (self.runner.topics or self.runner.pattern):
            return
        log.warning("consumer %s: seeking did not restart the fetch; rejoining group %s", self.consumer,
                    self.runner.kafka_config["group_id"])
        request_rejoin()

    def _absorb(self, result: BatchResult | None, revoked=frozenset()) -> None:
        if result is None:
            return
        t = self.totals
        t.processed += result.processed
        t.duplicates += result.duplicates
        t.dead_lettered += result.dead_lettered
        t.transactions += result.transactions
        self.metrics.count(result)
        assigned = self.kc.assignment()
        for (topic, part), offset in result.unprocessed.items():
            tp = TopicPartition(topic, part)
            if tp in assigned and tp not in revoked:
                self.kc.seek(tp, offset)  # records fetched past it are dropped by run(), refetched next poll
                self.rewound.add((topic, part))
        for (topic, part), nxt in result.committed.items():
            tp = TopicPartition(topic, part)
            self.to_commit[tp] = max(nxt, self.to_commit.get(tp, 0))
            if tp in assigned and tp not in revoked:
                self.positions[tp] = max(nxt, self.positions.get(tp, 0))

    def _commit_to_kafka(self, wait: bool = False) -> None:
        if not self.to_commit or self.runner.kafka_config["group_id"] is None:
            return
        # A copy for lag tools only, so once a second is plenty: a commit per batch cost the
        # kafka-python IO thread ~10% of the consumer's throughput.
        now = time.monotonic()
        if not wait and now - self.last_kafka_commit < KAFKA_COMMIT_INTERVAL_S:
            return
        self.last_kafka_commit = now
        assigned = self.kc.assignment()
        offsets = {tp: OffsetAndMetadata(n, "", -1) for tp, n in self.to_commit.items() if tp in assigned}
        self.to_commit.clear()
        if not offsets:
            return
        try:
            if wait:
                self.kc.commit(offsets)
            else:
                self.kc.commit_async(offsets, callback=_log_commit_failure)
        except Exception as exc:  # noqa: BLE001 - Kafka's copy is for lag display; PostgreSQL has the truth
            log.warning("could not copy offsets to the Kafka group (lag display only): %s", redact(str(exc)))

    # ----- losing PostgreSQL and getting it back

    def _database_lost(self, exc: BaseException, batch: _Submitted | None = None) -> None:
        # Whatever the batch in flight did is decided by PostgreSQL (its commit may or may not have
        # happened): positions are re-read from there once it is back, never guessed here.
        self.metrics.database_ok = False
        if self.outage is None:
            self.outage = _Outage(time.monotonic())
            log.warning("consumer %s lost its PostgreSQL connection (%s); pausing its partitions and "
                        "reconnecting with backoff", self.consumer, redact(str(exc.__cause__ or exc)).strip())
        if batch is not None:
            for tp, offset in batch.first.items():
                self.outage.note(tp, offset)
        assigned = self.kc.assignment()
        if assigned:
            self.kc.pause(*assigned)

    def _reconnect(self) -> None:
        """One reconnection attempt when its time has come; on success, seek every assigned
        partition to its stored offset (else to the first record dropped) and resume."""
        outage, kc = self.outage, self.kc
        now = time.monotonic()
        if now < outage.next_attempt:
            return
        assigned = kc.assignment()
        wanted = [(tp.topic, tp.partition) for tp in assigned]
        try:
            stored = self.worker.load_positions(wanted)
        except DatabaseLost as exc:
            outage.failed_again()
            log.warning("consumer %s: PostgreSQL still unreachable after %.0f s (%s); next attempt in %.1f s",
                        self.consumer, now - outage.since, redact(str(exc.__cause__ or exc)).strip(), outage.delay)
            return
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition), outage.resume_from.get(tp))
            if offset is not None:
                # Not added to rewound: that drops the next poll's records, which come from here on
                # (kafka-python returns only records fetched at the current position).
                kc.seek(tp, offset)
        for (topic, part), offset in stored.items():
            self.positions[TopicPartition(topic, part)] = offset
        if assigned:
            kc.resume(*assigned)
        self.metrics.database_ok = True
        log.info("consumer %s reconnected to PostgreSQL after %.1f s; resuming %s from %s", self.consumer,
                 now - outage.since, sorted(wanted),
                 {f"{t}[{p}]": o for (t, p), o in sorted(stored.items())} or "Kafka's positions (none stored)")
        self.outage = None
        self.last_records = time.monotonic()  # paused until now: not a stall

    # ----- partition assignment (from _Rebalance inside poll, or run() for fixed partitions)

    def revoked(self, revoked) -> None:
        """Let the batch in flight finish and commit before the partitions go to their new owner."""
        for tp in revoked:
            self.positions.pop(tp, None)
        self.metrics.forget_partitions((tp.topic, tp.partition) for tp in revoked)
        batches = self.in_flight.take()
        if not batches:
            return
        with self.control.interrupting():  # a record in its backoff stops now; the new owner resumes from PostgreSQL
            for batch in batches:
                try:
                    self._absorb(batch.future.result(), frozenset(revoked))
                except DatabaseLost as exc:
                    self._database_lost(exc, batch)
                except BaseException as exc:  # noqa: BLE001 - re-raised by run() on the main thread
                    self.control.fail(exc)

    def position(self, assigned) -> None:
        """Seek newly assigned partitions to the offsets stored in PostgreSQL."""
        kc = self.kc
        wanted = [(tp.topic, tp.partition) for tp in assigned]
        if self.outage is not None:
            kc.pause(*assigned)  # positioned by _reconnect once PostgreSQL is back
            return
        try:
            stored = self.worker.load_positions(wanted)
        except DatabaseLost as exc:
            self._database_lost(exc)
            kc.pause(*assigned)
            return
        except BaseException as exc:  # noqa: BLE001
            # Reading from Kafka's committed offset instead could skip records PostgreSQL never saw
            # (e.g. after restoring the database from a backup): stop instead.
            self.refuse(assigned, exc)
            return
        for (topic, part), offset in stored.items():
            kc.seek(TopicPartition(topic, part), offset)
            self.positions[TopicPartition(topic, part)] = offset
        self.last_records = time.monotonic()
        self.metrics.database_ok = True
        self.last_lag = 0.0  # refresh the lag gauge at the next turn
        log.info("consumer %s assigned %s; positions from PostgreSQL: %s", self.consumer,
                 sorted(wanted), {f"{t}[{p}]": o for (t, p), o in sorted(stored.items())} or "none yet")

    def refuse(self, assigned, exc: BaseException) -> None:
        """Keep these partitions paused and have run() raise `exc`."""
        self.control.fail(exc)
        self.kc.pause(*assigned)


class _Rebalance(ConsumerRebalanceListener):
    """kafka-python's rebalance callbacks, handed to the poll loop; a pattern's new topics are
    checked against the dedupe window first."""

    def __init__(self, runner: Runner, loop: _PollLoop):
        self.runner, self.loop = runner, loop

    def on_partitions_revoked(self, revoked):
        self.loop.revoked(revoked)

    def on_partitions_lost(self, lost):
        self.loop.revoked(lost)

    def on_partitions_assigned(self, assigned):
        if {tp.topic for tp in assigned} - self.runner._checked_topics:  # a pattern's, or created since start
            try:
                self.runner._check_dedupe_window({tp.topic for tp in assigned}, assigned=True)
            except InboxError as exc:
                self.loop.refuse(assigned, exc)  # raised by run(); the partitions stay paused meanwhile
                return
        self.loop.position(assigned)


class _Worker:
    """The worker thread and the PostgreSQL connection used only on it."""

    def __init__(self, runner: Runner, control: _Control, index: int = 0):
        self.runner, self.control = runner, control
        self.consumer = runner.consumer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"inbox-{runner.consumer}-{index}")
        self._conn: psycopg.Connection | None = None
        self._connected_once = False
        self._last_replay_check = 0.0  # written here, read by the poll loop through replay_due()
        self._handler = runner.metrics.timed(runner.handler)

    def replay_due(self) -> bool:
        return time.monotonic() - self._last_replay_check >= self.runner.replay_check_s

    def submit(self, records, plan, check_replays: bool) -> Future:
        return self._executor.submit(self._work, records, plan, check_replays)

    def load_positions(self, wanted) -> dict[tuple[str, int], int]:
        """Blocks until the worker read them; DatabaseLost if PostgreSQL is gone."""
        return self._executor.submit(self._load_positions, wanted).result()

    def close(self) -> None:
        try:
            self._executor.submit(self._close_connection).result()
        finally:
            self._executor.shutdown()

    # ----- on the worker thread

    def _work(self, records, plan, check_replays: bool) -> BatchResult | None:
        r, interrupt = self.runner, self.control.interrupt
        with _LosingConnection(self):
            conn = self._connection()
            result = None
            if records:
                result = process(conn, self.consumer, records, self._handler, policy=r.policy,
                                 interrupt=interrupt, deadline=time.monotonic() + r.budget_s, plan=plan)
            if check_replays and not interrupt.is_set():
                self._last_replay_check = time.monotonic()
                replay_requested(conn, self.consumer, self._handler)
            return result

    def _load_positions(self, wanted) -> dict[tuple[str, int], int]:
        with _LosingConnection(self):
            return store.load_positions(self._connection(), self.consumer, wanted)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.runner.dsn.secret(), autocommit=True, connect_timeout=15,
                                         application_name=f"inbox:{self.consumer}"[:63])
            self._connected_once = True
        return self._conn

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _LosingConnection:
    """On the worker thread: a connection error that left the connection unusable (or a failed
    connect) becomes DatabaseLost, with the connection dropped so the next use reconnects. Errors
    on a healthy connection (a statement timeout, a lock timeout) propagate as they are."""

    def __init__(self, worker: _Worker):
        self.worker = worker

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        conn = self.worker._conn
        gone = conn is not None and (conn.closed or conn.broken)
        # A handler error whose rollback then met a dead connection surfaces as psycopg.Rollback (or
        # the handler's own error): judged by the connection, not the exception type.
        if not gone and not isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            return False
        if conn is not None and not gone:
            return False
        if conn is None and not self.worker._connected_once:
            return False  # never reached it at all: a wrong DSN or password is reported, not retried
        if conn is not None:
            conn.close()
        self.worker._conn = None
        raise DatabaseLost(str(exc)) from exc


def _split(batches: list, n: int) -> list[list]:
    """Partitions of one poll into at most n groups of about equal record counts, each group in
    partition order (the lock order of process()); a partition is never split. An empty poll is one
    empty group, so the first worker still checks for replay requests while the topic is quiet."""
    if n == 1 or not batches:
        return [batches]
    groups: list[list] = [[] for _ in range(n)]
    loads = [0] * n
    for tp, batch in sorted(batches, key=lambda item: -len(item[1])):
        i = loads.index(min(loads))
        groups[i].append((tp, batch))
        loads[i] += len(batch)
    return [sorted(g, key=_by_partition) for g in groups if g]


def _log_commit_failure(offsets, response) -> None:
    if isinstance(response, Exception):
        log.debug("offset copy to Kafka failed (lag display only): %s", response)


def run_consumer(runner: Runner) -> int:
    """Run until SIGTERM/SIGINT, which finish the batch in flight and commit. Returns the exit code (0)."""
    previous = {sig: signal.signal(sig, lambda *_: runner.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        runner.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _confluent():
    """inbox.kafka_confluent, imported only when asked for: confluent-kafka is an optional extra."""
    try:
        from inbox import kafka_confluent
    except ImportError as exc:
        raise InboxError(f"kafka_client='confluent-kafka' needs confluent-kafka ({exc}): "
                         f"pip install 'pg-outbox-relay[confluent]', or use kafka_client='kafka-python'") from None
    return kafka_confluent
