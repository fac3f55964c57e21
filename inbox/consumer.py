"""The ready-made consumer: a kafka-python poll loop around `process()`.

    Runner("billing", handle, dsn=..., bootstrap=..., topics=["outbox.event.order"]).run()

- Positions live in PostgreSQL (outbox.inbox_offsets). On partition assignment the runner seeks
  to them, so what the consumer has read and what its handler has written are one commit.
  Partitions PostgreSQL has never seen start from Kafka's committed group offset, else from
  `auto_offset_reset` (earliest by default: an inbox would rather see a duplicate than skip).
- After each PostgreSQL commit the same offsets are committed to the Kafka group, only so that
  lag tools (kafka-consumer-groups, the dashboard) show the truth.
- Polling overlaps processing: while a worker thread runs batch N through PostgreSQL, the main
  thread fetches and decodes batch N+1. At most one batch is in flight and batches run in order.
- stop() (or SIGTERM via `run_consumer`) lets the batch in flight finish and commit, then leaves
  the group and returns.
- Losing the database connection (a PostgreSQL restart, a failover, a network cut) does not stop
  it: the partitions are paused (the group membership stays alive), the connection is retried
  with backoff, and once it is back every assigned partition resumes from the offsets stored in
  PostgreSQL, so a batch whose commit was lost is redelivered and one that committed is not.
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

import psycopg
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from inbox import horizon, store
from inbox.errors import InboxError
from inbox.plan import plan_batch
from inbox.process import BatchResult, Handler, check_consumer_name, process
from inbox.replay import replay_requested
from inbox.retry import DEFAULT_POLICY, RetryPolicy
from outbox.core.redact import Dsn, redact
from outbox.core.settings import Settings

log = logging.getLogger("inbox")

DEFAULT_MAX_POLL_INTERVAL_MS = 300_000
KAFKA_COMMIT_INTERVAL_S = 1.0
RECONNECT_BACKOFF_S = (0.5, 10.0)  # first wait, cap; doubling while PostgreSQL stays unreachable
_by_partition = operator.itemgetter(0)


class DatabaseLost(Exception):
    """The worker's PostgreSQL connection is gone; the Runner reconnects and resumes."""
SAME_AS_CONSUMER = object()  # group_id default: the consumer name
DEFAULT_RETENTION_WINDOW_S = Settings.model_fields["inbox_retention_days"].default * horizon.DAY_S


class Runner:
    def __init__(self, consumer: str, handler: Handler, *, dsn: Dsn | str, bootstrap: str | Sequence[str],
                 topics: Sequence[str] = (), pattern: str | None = None,
                 partitions: Sequence[tuple[str, int]] | None = None, group_id: str | None | object = SAME_AS_CONSUMER,
                 policy: RetryPolicy = DEFAULT_POLICY, max_poll_records: int = 2000, poll_timeout_s: float = 1.0,
                 replay_check_s: float = 5.0, kafka_config: Mapping | None = None,
                 retention_window_s: float | None = None, allow_short_dedupe_window: bool = False):
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
                    duplicates older than the window"""
        check_consumer_name(consumer)
        if sum(bool(x) for x in (topics, pattern, partitions)) != 1:
            raise InboxError("give exactly one of topics=[...], pattern='...' or partitions=[(topic, partition)]")
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
        if config.get("enable_auto_commit"):
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
            **config,
            "enable_auto_commit": False,
        }
        # Retries of one record must end well before Kafka gives the partition to someone else.
        self.budget_s = self.kafka_config.get("max_poll_interval_ms", DEFAULT_MAX_POLL_INTERVAL_MS) / 1000 / 2
        policy.check_fits(self.budget_s, "half of max_poll_interval_ms")

        self.totals = BatchResult()
        self._stopping = threading.Event()
        self._interrupt = threading.Event()  # stops retries: on stop() and while partitions are revoked
        self._worker: ThreadPoolExecutor | None = None  # one per run(); owns the PostgreSQL connection
        self._conn: psycopg.Connection | None = None  # used only on the worker thread
        self._pending: Future | None = None
        self._to_commit: dict[TopicPartition, int] = {}
        self._rewound: set[tuple[str, int]] = set()
        self._listener_error: BaseException | None = None
        self._last_replay_check = 0.0
        self._last_kafka_commit = 0.0
        # Set while PostgreSQL is unreachable: partitions paused, nothing submitted to the worker.
        self._db_lost_since: float | None = None
        self._connected_once = False
        self._next_reconnect = 0.0
        self._reconnect_delay = RECONNECT_BACKOFF_S[0]
        # First offset per partition of the batch in flight and of records dropped while the database
        # was away: where a partition PostgreSQL has no position for resumes after reconnecting.
        self._pending_first: dict[TopicPartition, int] = {}
        self._resume_from: dict[TopicPartition, int] = {}

    @classmethod
    def from_settings(cls, settings, consumer: str, handler: Handler, **kwargs) -> "Runner":
        kwargs.setdefault("policy", RetryPolicy.from_settings(settings))
        kwargs.setdefault("max_poll_records", settings.inbox_poll_records)
        kwargs.setdefault("retention_window_s", settings.inbox_retention_days * horizon.DAY_S)
        kwargs["kafka_config"] = {**settings.kafka_security(), **(kwargs.get("kafka_config") or {})}
        return cls(consumer, handler, dsn=settings.require_database_url(), bootstrap=settings.kafka_servers, **kwargs)

    def stop(self) -> None:
        """Finish the batch in flight, commit it, and return from run(). Safe from signal handlers."""
        self._stopping.set()
        self._interrupt.set()

    # ----- the loop

    def run(self) -> BatchResult:
        """Consume until stop(); returns the totals. A lost database connection is waited out
        (reconnect with backoff, resume from the stored offsets); raises what stopped it otherwise
        (e.g. a database it never reached, a failing rebalance listener); a restart resumes from
        the offsets stored in PostgreSQL."""
        if self._worker is not None:
            raise InboxError("a Runner runs once; create a new one to run again")
        # Before joining the group: a consumer that would apply old redeliveries twice must not start.
        self._check_dedupe_window(self.topics or {tp.topic for tp in self.partitions})
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"inbox-{self.consumer}")
        kc = _no_topic_creation(KafkaConsumer(**self.kafka_config), self.kafka_config)
        log.info("inbox consumer %s starting: group %s, %s, PostgreSQL %s", self.consumer,
                 self.kafka_config["group_id"], self.pattern or self.topics or self.partitions, self.dsn)
        try:
            if self.partitions:
                kc.assign(self.partitions)
                self._position(kc, self.partitions)
            else:
                kc.subscribe(topics=self.topics or (), pattern=self.pattern, listener=_Listener(self, kc))
            while not self._stopping.is_set():
                if self._db_lost_since is not None:
                    self._reconnect(kc)
                polled = kc.poll(timeout_ms=self.poll_timeout_ms)
                self._settle(kc)
                # Partition order, not poll order: every instance locks rows in the same order (see
                # process.lock_order); sorting the few partitions keeps each one's records in order.
                batches = [(tp, batch) for tp, batch in sorted(polled.items(), key=_by_partition)
                           if batch and (tp.topic, tp.partition) not in self._rewound]
                self._rewound.clear()
                if self._db_lost_since is not None:
                    self._note_resume_points(batches)  # dropped: refetched once the database is back
                    continue
                records = [r for _, batch in batches for r in batch]
                check_replays = time.monotonic() - self._last_replay_check >= self.replay_check_s
                if records or check_replays:
                    # Planning (envelope parsing) runs here, not on the worker: the worker then holds
                    # the GIL only briefly, so this thread's many short hand-offs to kafka-python's IO
                    # thread are not kept waiting behind it.
                    plan = plan_batch(records) if records else None
                    self._pending_first = {tp: batch[0].offset for tp, batch in batches}
                    self._pending = self._worker.submit(self._work, records, plan, check_replays)
            self._settle(kc)
            self._commit_to_kafka(kc, wait=True)
        finally:
            try:
                kc.close(autocommit=False)
            finally:
                self._worker.submit(self._close_connection).result()
                self._worker.shutdown()
        log.info("inbox consumer %s stopped: %d processed, %d duplicates suppressed, %d dead-lettered",
                 self.consumer, self.totals.processed, self.totals.duplicates, self.totals.dead_lettered)
        return self.totals

    def _work(self, records, plan, check_replays: bool) -> BatchResult | None:
        """Runs on the worker thread, which owns the PostgreSQL connection."""
        with self._losing_connection():
            conn = self._connection()
            result = None
            if records:
                result = process(conn, self.consumer, records, self.handler, policy=self.policy,
                                 interrupt=self._interrupt, deadline=time.monotonic() + self.budget_s, plan=plan)
            if check_replays and not self._interrupt.is_set():
                self._last_replay_check = time.monotonic()
                replay_requested(conn, self.consumer, self.handler)
            return result

    def _settle(self, kc: KafkaConsumer) -> None:
        """Wait for the batch in flight; then rewind what it left and copy its offsets to Kafka."""
        if self._listener_error is not None:
            raise self._listener_error
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                result = pending.result()
            except DatabaseLost as exc:
                self._database_lost(kc, exc)
                return
            self._absorb(kc, result)
        self._commit_to_kafka(kc)

    # ----- losing PostgreSQL and getting it back (main thread, or the listener inside poll)

    def _database_lost(self, kc: KafkaConsumer, exc: BaseException) -> None:
        # Whatever the batch in flight did is decided by PostgreSQL (its commit may or may not have
        # happened): positions are re-read from there once it is back, never guessed here.
        for tp, offset in self._pending_first.items():
            self._resume_from[tp] = min(offset, self._resume_from.get(tp, offset))
        self._pending_first = {}
        if self._db_lost_since is None:
            self._db_lost_since = time.monotonic()
            self._reconnect_delay = RECONNECT_BACKOFF_S[0]
            self._next_reconnect = time.monotonic() + self._reconnect_delay
            log.warning("consumer %s lost its PostgreSQL connection (%s); pausing its partitions and "
                        "reconnecting with backoff", self.consumer, redact(str(exc.__cause__ or exc)).strip())
        assigned = kc.assignment()
        if assigned:
            kc.pause(*assigned)

    def _note_resume_points(self, batches) -> None:
        for tp, batch in batches:
            offset = batch[0].offset
            self._resume_from[tp] = min(offset, self._resume_from.get(tp, offset))

    def _reconnect(self, kc: KafkaConsumer) -> None:
        """One reconnection attempt when its time has come; on success, seek every assigned
        partition to its stored offset (else to the first record dropped) and resume."""
        now = time.monotonic()
        if now < self._next_reconnect:
            return
        assigned = kc.assignment()
        wanted = [(tp.topic, tp.partition) for tp in assigned]
        try:
            stored = self._worker.submit(self._load_positions, wanted).result()
        except DatabaseLost as exc:
            self._reconnect_delay = min(RECONNECT_BACKOFF_S[1], self._reconnect_delay * 2)
            self._next_reconnect = time.monotonic() + self._reconnect_delay
            log.warning("consumer %s: PostgreSQL still unreachable after %.0f s (%s); next attempt in %.1f s",
                        self.consumer, now - self._db_lost_since, redact(str(exc.__cause__ or exc)).strip(),
                        self._reconnect_delay)
            return
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition), self._resume_from.get(tp))
            if offset is not None:
                # Not added to _rewound: that drops the next poll's records, which come from here on
                # (kafka-python returns only records fetched at the current position).
                kc.seek(tp, offset)
        if assigned:
            kc.resume(*assigned)
        log.info("consumer %s reconnected to PostgreSQL after %.1f s; resuming %s from %s", self.consumer,
                 now - self._db_lost_since, sorted(wanted),
                 {f"{t}[{p}]": o for (t, p), o in sorted(stored.items())} or "Kafka's positions (none stored)")
        self._db_lost_since = None
        self._resume_from.clear()

    def _load_positions(self, wanted) -> dict[tuple[str, int], int]:
        with self._losing_connection():
            return store.load_positions(self._connection(), self.consumer, wanted)

    def _losing_connection(self):
        return _LosingConnection(self)

    def _absorb(self, kc: KafkaConsumer, result: BatchResult | None, revoked=frozenset()) -> None:
        if result is None:
            return
        t = self.totals
        t.processed += result.processed
        t.duplicates += result.duplicates
        t.dead_lettered += result.dead_lettered
        t.transactions += result.transactions
        assigned = kc.assignment()
        for (topic, part), offset in result.unprocessed.items():
            tp = TopicPartition(topic, part)
            if tp in assigned and tp not in revoked:
                kc.seek(tp, offset)  # records fetched past it are dropped by run(), refetched next poll
                self._rewound.add((topic, part))
        for (topic, part), nxt in result.committed.items():
            tp = TopicPartition(topic, part)
            self._to_commit[tp] = max(nxt, self._to_commit.get(tp, 0))

    def _commit_to_kafka(self, kc: KafkaConsumer, wait: bool = False) -> None:
        if not self._to_commit or self.kafka_config["group_id"] is None:
            return
        # A copy for lag tools only, so once a second is plenty: a commit per batch cost the
        # kafka-python IO thread ~10% of the consumer's throughput.
        now = time.monotonic()
        if not wait and now - self._last_kafka_commit < KAFKA_COMMIT_INTERVAL_S:
            return
        self._last_kafka_commit = now
        assigned = kc.assignment()
        offsets = {tp: OffsetAndMetadata(n, "", -1) for tp, n in self._to_commit.items() if tp in assigned}
        self._to_commit.clear()
        if not offsets:
            return
        try:
            if wait:
                kc.commit(offsets)
            else:
                kc.commit_async(offsets, callback=_log_commit_failure)
        except Exception as exc:  # noqa: BLE001 - Kafka's copy is for lag display; PostgreSQL has the truth
            log.warning("could not copy offsets to the Kafka group (lag display only): %s", redact(str(exc)))

    # ----- partition assignment (called by the listener on kafka-python's IO thread, run() blocked in poll)

    def _revoked(self, kc: KafkaConsumer, revoked) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self._interrupt.set()  # a record in its backoff stops now; the new owner resumes from PostgreSQL
        try:
            self._absorb(kc, pending.result(), frozenset(revoked))
        except DatabaseLost as exc:
            self._database_lost(kc, exc)
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() on the main thread
            self._listener_error = exc
        finally:
            if not self._stopping.is_set():
                self._interrupt.clear()

    def _check_dedupe_window(self, topics) -> None:
        """See inbox/horizon.py. Each topic once per run; a pattern's topics, and topics that did not
        exist yet at start, as they get assigned."""
        topics = set(topics) - self._checked_topics
        if not topics or math.isinf(self.retention_window_s):
            return
        admin_config = {k: v for k, v in self.kafka_config.items() if k in KafkaAdminClient.DEFAULT_CONFIG}
        admin_config["client_id"] = f"inbox-{self.consumer}-admin"
        try:
            horizons = horizon.topic_horizons(admin_config, topics)
        except Exception as exc:  # noqa: BLE001 - judged like a topic whose config is unreadable
            horizons = {t: f"its configuration could not be read ({redact(str(exc))})" for t in topics}
        self._checked_topics |= horizon.check_window(self.consumer, self.retention_window_s, horizons,
                                                     allow_short=self.allow_short_dedupe_window)

    def _position(self, kc: KafkaConsumer, assigned) -> None:
        wanted = [(tp.topic, tp.partition) for tp in assigned]
        if {tp.topic for tp in assigned} - self._checked_topics:  # a pattern's topics, or one created since
            try:
                self._check_dedupe_window({tp.topic for tp in assigned})
            except InboxError as exc:
                self._listener_error = exc  # raised by run(); the partitions stay paused meanwhile
                kc.pause(*assigned)
                return
        if self._db_lost_since is not None:
            kc.pause(*assigned)  # positioned by _reconnect once PostgreSQL is back
            return
        try:
            stored = self._worker.submit(self._load_positions, wanted).result()
        except DatabaseLost as exc:
            self._database_lost(kc, exc)
            kc.pause(*assigned)
            return
        except BaseException as exc:  # noqa: BLE001
            # Reading from Kafka's committed offset instead could skip records PostgreSQL never saw
            # (e.g. after restoring the database from a backup): stop instead.
            self._listener_error = exc
            kc.pause(*assigned)
            return
        for (topic, part), offset in stored.items():
            kc.seek(TopicPartition(topic, part), offset)
        log.info("consumer %s assigned %s; positions from PostgreSQL: %s", self.consumer,
                 sorted(wanted), {f"{t}[{p}]": o for (t, p), o in sorted(stored.items())} or "none yet")

    # ----- the worker's connection

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn.secret(), autocommit=True, connect_timeout=15,
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

    def __init__(self, runner: Runner):
        self.runner = runner

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        conn = self.runner._conn
        gone = conn is not None and (conn.closed or conn.broken)
        # A handler error whose rollback then met a dead connection surfaces as psycopg.Rollback (or
        # the handler's own error): judged by the connection, not the exception type.
        if not gone and not isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            return False
        if conn is not None and not gone:
            return False
        if conn is None and not self.runner._connected_once:
            return False  # never reached it at all: a wrong DSN or password is reported, not retried
        if conn is not None:
            conn.close()
        self.runner._conn = None
        raise DatabaseLost(str(exc)) from exc


class _Listener(ConsumerRebalanceListener):
    def __init__(self, runner: Runner, kc: KafkaConsumer):
        self.runner, self.kc = runner, kc

    def on_partitions_revoked(self, revoked):
        self.runner._revoked(self.kc, revoked)

    def on_partitions_lost(self, lost):
        self.runner._revoked(self.kc, lost)

    def on_partitions_assigned(self, assigned):
        self.runner._position(self.kc, assigned)


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


def _no_topic_creation(kc: KafkaConsumer, config: dict) -> KafkaConsumer:
    """kafka-python 3.0 accepts allow_auto_create_topics but builds its cluster metadata without
    it, so every metadata request still asks the broker to create missing subscribed topics
    (with one partition and the broker's replication factor). Hand the setting on ourselves;
    tests/inbox/test_dedupe_window.py fails if a Runner creates its topic."""
    cluster = getattr(getattr(kc, "_client", None), "cluster", None)
    if cluster is not None and "allow_auto_create_topics" in getattr(cluster, "config", {}):
        cluster.config["allow_auto_create_topics"] = config["allow_auto_create_topics"]
    return kc
