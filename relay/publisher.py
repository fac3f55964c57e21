"""kafka-python producer for the relay: idempotent, order-preserving, optionally transactional.

Failures of single records are classified here: a record the broker will never accept (too
large, illegal topic, not authorised) is dead-lettered; anything else (broker down, leader moving,
timeouts) is transient and makes the daemon restart its pipeline from the slot's confirmed
position without acknowledging anything.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kerr
from kafka.codec import has_lz4, has_zstd

from outbox.core.exits import EXIT_TOPIC_MISSING
from outbox.core.settings import Settings
from relay.bookkeeper import Failure
from relay.slot import FatalError

log = logging.getLogger("outbox.relay")

# Records the broker rejects for what they are, not for the state of the cluster.
_PERMANENT = {
    kerr.MessageSizeTooLargeError: "oversize",
    kerr.RecordListTooLargeError: "oversize",
    kerr.InvalidTopicError: "invalid_topic",
    kerr.TopicAuthorizationFailedError: "authorization",
    kerr.CorruptRecordError: "invalid_record",
    kerr.InvalidTimestampError: "invalid_record",
}
_FIX = {
    "oversize": "keep large documents out of events (store them, send a reference), or raise the topic's "
                "max.message.bytes and OUTBOX_MAX_RECORD_BYTES together, then replay",
    "invalid_topic": "fix the aggregate type or OUTBOX_TOPIC_TEMPLATE, then replay",
    "authorization": "grant the relay's principal WRITE on the topic, then replay",
    "invalid_record": "inspect the event, then replay",
}


TRANSACTION_WAIT_MS = 30_000


class Fenced(Exception):
    """Another relay with the same transactional id took over (exactly-once zombie fencing)."""


def classify(exc: BaseException) -> Failure:
    for cls, reason in _PERMANENT.items():
        if isinstance(exc, cls):
            return Failure(True, reason, f"{type(exc).__name__}: {exc}. Fix: {_FIX[reason]}.")
    return Failure(False, "transient", f"{type(exc).__name__}: {exc}")


def compression(setting: str) -> str | None:
    if setting == "auto":
        return "zstd" if has_zstd() else "lz4" if has_lz4() else None
    return None if setting == "none" else setting


def producer_config(settings: Settings, transactional_id: str | None = None) -> dict:
    config = dict(
        **settings.kafka_client_options(),
        client_id=f"outbox-relay-{settings.relay_id}",
        acks="all",
        enable_idempotence=True,
        # With idempotence, up to 5 in-flight requests per connection still keep per-partition order.
        max_in_flight_requests_per_connection=5,
        compression_type=compression(settings.compression),
        linger_ms=settings.linger_ms,
        batch_size=256 * 1024,
        max_request_size=settings.max_record_bytes,
        # A broker outage is ridden out by kafka-python's own retries for this long; beyond it the
        # daemon restarts from the slot (nothing acknowledged, nothing lost).
        delivery_timeout_ms=120_000,
        max_block_ms=30_000,
        # kafka-python's internal sensors cost ~5% of send(); the relay exports its own metrics.
        metrics_enabled=False,
        # Not reaching the brokers is retried by the daemon with backoff; no need to wait 30 s each time.
        bootstrap_timeout_ms=10_000,
    )
    if transactional_id:
        config.update(transactional_id=transactional_id, transaction_timeout_ms=transaction_timeout_ms(settings))
    return config


def transaction_timeout_ms(settings: Settings) -> int:
    """A Kafka transaction spans one relay batch, which stays open up to OUTBOX_BATCH_MAX_AGE_MS: the
    coordinator must not abort it while it is still open or committing (a batch age near a fixed 60 s
    timeout would lose the race now and then and replay the batch). 60 s on top of the age leaves the
    commit the time it had with the default age."""
    return 60_000 + settings.batch_max_age_ms


class Publisher:
    def __init__(self, settings: Settings, transactional_id: str | None = None):
        try:
            self.producer = KafkaProducer(**producer_config(settings, transactional_id))
        except kerr.KafkaTimeoutError as exc:
            raise kerr.KafkaConnectionError(f"cannot reach Kafka: {exc}. {unreachable_hint(settings)}") from None
        self.in_transaction = False

    def send(self, topic: str, value: bytes | None, key: bytes, headers: list):
        return self.producer.send(topic, value=value, key=key, headers=headers)

    def poll(self) -> None:
        """Nothing to do: kafka-python's sender thread completes the futures (librdkafka's need a poll)."""

    # ----- exactly-once

    def init_transactions(self) -> None:
        """Fences any older producer with our transactional id and settles its open transaction."""
        self.producer.init_transactions()

    def begin(self) -> None:
        self.producer.begin_transaction()
        self.in_transaction = True

    def commit(self, checkpoint_topic: str, checkpoint_key: bytes, checkpoint: dict) -> None:
        self.producer.send(checkpoint_topic, key=checkpoint_key, value=json.dumps(checkpoint).encode())
        try:
            self._finish(self.producer._transaction_manager.begin_commit, "committing")
        except (kerr.ProducerFencedError, kerr.InvalidProducerEpochError) as exc:
            raise Fenced(str(exc)) from exc
        finally:
            self.in_transaction = False

    def abort(self) -> None:
        if self.in_transaction:
            try:
                self._finish(self.producer._transaction_manager.begin_abort, "aborting")
            except kerr.KafkaError as exc:
                log.warning("aborting the Kafka transaction failed (the broker aborts it on timeout): %s", exc)
            self.in_transaction = False

    def _finish(self, begin, what: str) -> None:
        """commit_transaction()/abort_transaction() with a time limit: kafka-python waits forever when
        the transaction coordinator dies at the wrong moment (found by the chaos run: a broker killed
        mid-commit froze the relay). Past the limit the session restarts; the next producer's
        init_transactions() settles the transaction either way and the checkpoint says which."""
        result = begin()
        self.producer._sender.wakeup()
        if not result.wait(timeout_ms=TRANSACTION_WAIT_MS):
            raise kerr.KafkaTimeoutError(f"{what} the Kafka transaction took longer than "
                                         f"{TRANSACTION_WAIT_MS // 1000} s (transaction coordinator unavailable?)")

    def write_aborted_probe(self, topic: str) -> bytes:
        """Write a record in a transaction and abort it. A broker with correct transactions never
        shows it to read_committed readers; read_checkpoint() refuses to go on if it sees it."""
        probe = f"__probe__:{uuid.uuid4()}".encode()
        self.producer.begin_transaction()
        self.producer.send(topic, key=probe, value=b"aborted on purpose")
        self.producer.flush()
        self.producer.abort_transaction()
        return probe

    def close(self, timeout: float = 10) -> None:
        try:
            self.producer.close(timeout=timeout)
        except kerr.KafkaError as exc:  # closing is best effort; nothing depends on it
            log.warning("closing the Kafka producer: %s", exc)


def make_publisher(settings: Settings, transactional_id: str | None = None):
    """The relay's producer for OUTBOX_KAFKA_CLIENT: this module's Publisher or the librdkafka one."""
    if settings.kafka_client == "confluent-kafka":
        from relay.publisher_confluent import ConfluentPublisher  # optional dependency: imported only when chosen

        return ConfluentPublisher(settings, transactional_id)
    return Publisher(settings, transactional_id)


def unreachable_hint(settings: Settings) -> str:
    s = settings
    hint = f"Fix: check that a broker listens at {s.kafka_bootstrap} and speaks {s.kafka_security_protocol}"
    if s.kafka_security_protocol.startswith("SASL"):
        hint += (f", and that it accepts SASL {s.kafka_sasl_mechanism} for user {s.kafka_sasl_username!r} "
                 f"(OUTBOX_KAFKA_SASL_USERNAME, OUTBOX_KAFKA_SASL_PASSWORD, OUTBOX_KAFKA_SASL_MECHANISM); "
                 f"a rejected login is logged by kafka-python as SaslAuthenticationFailedError")
    return hint + " (OUTBOX_KAFKA_BOOTSTRAP, OUTBOX_KAFKA_SECURITY_PROTOCOL)."


def ensure_checkpoint_topic(settings: Settings) -> None:
    """The exactly-once checkpoint topic: one partition, compacted (latest checkpoint per relay)."""
    with TopicProvisioner(settings) as topics:
        topics.ensure(settings.checkpoint_topic, partitions=1,
                      configs={"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"})


def ensure_topic(client: dict, topic: str, partitions: int, configs: dict[str, str] | None = None) -> None:
    """Create `topic` unless it exists. `client`: KafkaAdminClient options (Settings.kafka_client_options())."""
    admin = KafkaAdminClient(**client, client_id="outbox-relay-admin")
    try:
        admin.create_topics({topic: {"num_partitions": partitions, "configs": configs or {}}}, raise_errors=False)
    finally:
        admin.close()


_CREATE_FORBIDDEN = (kerr.TopicAuthorizationFailedError, kerr.ClusterAuthorizationFailedError)


class TopicProvisioner:
    """Makes sure a topic exists before the first record is sent to it, instead of relying on the
    broker's auto-creation (which managed services turn off; the producer would then wait for
    metadata until it times out, over and over). Once per topic and session, off the per-event path."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.known: set[str] = set()
        self._admin: KafkaAdminClient | None = None

    def __enter__(self) -> "TopicProvisioner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def ensure(self, topic: str, partitions: int | None = None, configs: dict[str, str] | None = None) -> None:
        s = self.s
        if self._admin is None:
            self._admin = KafkaAdminClient(**s.kafka_client_options(),
                                           client_id=f"outbox-relay-admin-{s.relay_id}")
        admin = self._admin
        if s.topic_create:
            spec = {"num_partitions": partitions or s.topic_partitions or -1,
                    "replication_factor": s.topic_replication_factor or -1, "configs": configs or {}}
            result = admin.create_topics({topic: spec}, raise_errors=False)
            error = kerr.for_code(result["topics"][0]["error_code"])
            if error is kerr.NoError:
                admin.wait_for_topics([topic])
                log.info("created topic %s (%s partitions, replication factor %s)", topic,
                         spec["num_partitions"] if spec["num_partitions"] > 0 else "broker default",
                         spec["replication_factor"] if spec["replication_factor"] > 0 else "broker default")
            elif error is not kerr.TopicAlreadyExistsError and not issubclass(error, _CREATE_FORBIDDEN):
                message = result["topics"][0].get("error_message") or error.__name__
                raise FatalError(
                    f"creating topic {topic!r} was refused by the broker ({error.__name__}: {message}). Fix: create "
                    f"it yourself, or adjust OUTBOX_TOPIC_PARTITIONS / OUTBOX_TOPIC_REPLICATION_FACTOR "
                    f"(unset = the broker's num.partitions / default.replication.factor) to what the cluster allows.")
            elif error is not kerr.TopicAlreadyExistsError:
                self._require_existing(topic, f"it may not create it ({error.__name__}). Fix: create the topic, or "
                                              f"grant the relay's principal CREATE on it (or on the cluster)")
        else:
            self._require_existing(topic, "OUTBOX_TOPIC_CREATE=false. Fix: create the topic, or set "
                                          "OUTBOX_TOPIC_CREATE=true to let the relay create it")
        self.known.add(topic)

    def _require_existing(self, topic: str, why: str) -> None:
        info = self._admin.describe_topics([topic])[0]
        error = kerr.for_code(info["error_code"])
        if error is kerr.UnknownTopicOrPartitionError:
            raise FatalError(f"topic {topic!r} does not exist and the relay does not create it: {why}. Events for "
                             f"it stay unacknowledged in the slot until then; nothing is lost.", EXIT_TOPIC_MISSING)
        # Exists, or not even visible to us: the producer finds out, and a topic the relay may not
        # write is dead-lettered with reason 'authorization'.


EOS_UNSAFE = (
    "the Kafka broker shows records of an aborted transaction to read_committed consumers (Tansu does), so "
    "exactly-once delivery cannot be guaranteed on it. Fix: use Apache Kafka or another broker with correct "
    "transactions, or set OUTBOX_DELIVERY=at-least-once and deduplicate on event_id in consumers."
)


def read_checkpoint(settings: Settings, key: bytes, probe: bytes | None = None, timeout: float = 30) -> dict | None:
    """The last committed checkpoint for `key`, read with read_committed up to the end of the topic.
    Meeting the aborted `probe` record proves the broker unfit for exactly-once (FatalError)."""
    consumer = KafkaConsumer(**settings.kafka_client_options(), group_id=None, enable_auto_commit=False,
                             isolation_level="read_committed", auto_offset_reset="earliest",
                             client_id="outbox-relay-checkpoint")
    try:
        partitions = consumer.partitions_for_topic(settings.checkpoint_topic) or {0}
        tps = [TopicPartition(settings.checkpoint_topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        latest = None
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading checkpoint topic {settings.checkpoint_topic} timed out")
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    if probe is not None and record.key == probe:
                        raise FatalError(EOS_UNSAFE)
                    if record.key == key and record.value is not None:
                        latest = json.loads(record.value)
        return latest
    finally:
        consumer.close()
