"""confluent-kafka (librdkafka) producer for the relay, behind the same interface as
relay.publisher.Publisher (OUTBOX_KAFKA_CLIENT=confluent-kafka).

Why: kafka-python's send() is most of the relay's CPU and shares one GIL with everything else
(docs/relay.md, Performance). librdkafka batches, compresses and talks to the brokers in C threads.

What must not differ from kafka-python, and how it is kept the same:
- key -> partition: librdkafka's default partitioner is CRC32 (consistent_random); Java's and
  kafka-python's is murmur2. `murmur2_random` is the Java-compatible one, so switching client never
  moves an aggregate to another partition (which would break per-aggregate order across the switch).
- failures: librdkafka's error codes are Kafka's protocol codes (plus negative local ones), so a
  delivery error is turned into the kafka-python exception of the same code and classified by
  relay.publisher.classify() exactly as before: permanent -> dead letter, anything else transient.
- the pipeline's thread serves the delivery callbacks (poll), so handles change state only on the
  thread that reads them, as with kafka-python's futures read after the fact; no thread of our own.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import NamedTuple

from confluent_kafka import KafkaError, KafkaException, Producer
from kafka import errors as kerr

from outbox.core import librdkafka
from outbox.core.settings import Settings
from relay.publisher import Fenced, compression, transaction_timeout_ms, unreachable_hint

log = logging.getLogger("outbox.relay")
librdkafka_log = logging.getLogger("outbox.relay.librdkafka")

POLL_EVERY = 512  # records sent between two polls: bounds the queue of pending delivery reports
MAX_BLOCK_S = 30.0  # as kafka-python's max_block_ms: how long send() waits for room in a full queue

_FENCED_CODES = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
# Local (negative) librdkafka codes that have a kafka-python counterpart the relay already handles.
_LOCAL = {
    KafkaError._MSG_TIMED_OUT: kerr.KafkaTimeoutError,
    KafkaError._TIMED_OUT: kerr.KafkaTimeoutError,
    KafkaError._QUEUE_FULL: kerr.KafkaTimeoutError,
    KafkaError._STATE: kerr.IllegalStateError,
    KafkaError._FENCED: kerr.ProducerFencedError,
    KafkaError._UNKNOWN_TOPIC: kerr.UnknownTopicOrPartitionError,
    KafkaError._UNKNOWN_PARTITION: kerr.UnknownTopicOrPartitionError,
    KafkaError._TRANSPORT: kerr.KafkaConnectionError,
    KafkaError._ALL_BROKERS_DOWN: kerr.KafkaConnectionError,
}


def as_kafka_python(err: KafkaError) -> kerr.KafkaError:
    """The kafka-python exception for a librdkafka error, so that classify() and every `except
    kerr.KafkaError` in the pipeline and the daemon treat both clients alike."""
    code = err.code()
    if code >= 0:
        cls = kerr.for_code(code)
        if cls is kerr.UnknownError:
            cls = kerr.KafkaError
    else:
        cls = _LOCAL.get(code, kerr.KafkaError)
    return cls(f"{err.name()}: {err.str()} (librdkafka)")


def _kafka_error(exc: KafkaException) -> KafkaError | None:
    arg = exc.args[0] if exc.args else None
    return arg if isinstance(arg, KafkaError) else None


def _raise(exc: KafkaException, fenced_is_special: bool = True):
    err = _kafka_error(exc)
    if err is None:
        raise kerr.KafkaError(str(exc)) from None
    if fenced_is_special and err.code() in _FENCED_CODES:
        raise Fenced(f"{err.name()}: {err.str()}") from None
    raise as_kafka_python(err) from None


def producer_config(settings: Settings, transactional_id: str | None = None) -> dict:
    s = settings
    config = {
        "bootstrap.servers": s.kafka_bootstrap,
        "client.id": f"outbox-relay-{s.relay_id}",
        "acks": "all",
        "enable.idempotence": True,
        # As with kafka-python: idempotence keeps per-partition order with up to 5 requests in flight.
        "max.in.flight.requests.per.connection": 5,
        "partitioner": "murmur2_random",
        # The same codec kafka-python would use, so consumers on this install can read what we write.
        "compression.type": compression(s.compression) or "none",
        "linger.ms": s.linger_ms,
        "message.max.bytes": s.max_record_bytes,
        "delivery.timeout.ms": 120_000,
        # The relay bounds what is in flight itself (OUTBOX_MAX_INFLIGHT_*); the queue must never be
        # the tighter limit, or send() would block where kafka-python would not.
        "queue.buffering.max.messages": max(100_000, 2 * s.max_inflight_events),
        "queue.buffering.max.kbytes": max(1_048_576, 2 * s.max_inflight_bytes // 1024),
        "socket.connection.setup.timeout.ms": 10_000,
        "socket.nagle.disable": True,  # the default since librdkafka 2.10; batching is linger.ms's job
        # librdkafka logs to stderr by default; through logging they get the relay's format and redaction.
        "logger": librdkafka_log,
        "error_cb": _on_error,
    }
    config.update(security_config(s))
    if transactional_id:
        # librdkafka insists that a record cannot outlive its transaction (kafka-python lets it try
        # for 120 s); either way the transaction is aborted and the batch replayed from the slot.
        config.update({"transactional.id": transactional_id, "transaction.timeout.ms": transaction_timeout_ms(s),
                       "delivery.timeout.ms": 60_000})
    return config


def security_config(settings: Settings) -> dict:
    """Settings.kafka_security() (kafka-python names) in librdkafka's names (shared with the inbox's
    consumer: outbox.core.librdkafka)."""
    return librdkafka.security_config(settings.kafka_security())


def _on_error(err: KafkaError) -> None:
    # Broker connections come and go; librdkafka retries them itself. Records that fail reach their
    # handles, so this is for the operator only.
    log.log(logging.ERROR if err.fatal() else logging.WARNING, "Kafka producer (librdkafka): %s: %s",
            err.name(), err.str())


class RecordMetadata(NamedTuple):
    topic: str
    partition: int
    offset: int


class Delivery:
    """kafka-python's FutureRecordMetadata, as far as the relay reads it."""

    __slots__ = ("done", "exception", "_msg", "_poll", "_callbacks")

    def __init__(self, poll):
        self.done = False
        self.exception: kerr.KafkaError | None = None
        self._msg = None
        self._poll = poll
        self._callbacks = None

    @property
    def is_done(self) -> bool:
        if not self.done:
            # The reader is the pipeline's thread: serving delivery reports here means a quiet stream
            # still sees its last records acknowledged without a poll loop of its own.
            self._poll(0)
        return self.done

    @property
    def value(self) -> RecordMetadata | None:
        msg = self._msg
        return None if msg is None else RecordMetadata(msg.topic(), msg.partition(), msg.offset())

    def add_callback(self, fn, *args) -> "Delivery":
        """fn(*args, metadata) on success (the benchmark's latency probe)."""
        if self.done:
            if self.exception is None:
                fn(*args, self.value)
            return self
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append((fn, args))
        return self

    def __call__(self, err: KafkaError | None, msg) -> None:  # librdkafka's delivery report
        if err is not None:
            exc = self.exception = as_kafka_python(err)
            if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                # The broker's verdict on the whole batch: librdkafka does not split it and retry as
                # kafka-python does, so records of ours that merely shared the batch fail as well.
                exc.args = (f"{exc.args[0]}; the broker rejected the batch this record was in: the topic's "
                            f"max.message.bytes is below OUTBOX_MAX_RECORD_BYTES, and with librdkafka every record "
                            f"of that batch is dead-lettered",)
        else:
            self._msg = msg
        self.done = True
        if self._callbacks and err is None:
            for fn, args in self._callbacks:
                fn(*args, self.value)


class ConfluentPublisher:
    def __init__(self, settings: Settings, transactional_id: str | None = None):
        self._p = Producer(producer_config(settings, transactional_id))
        # kafka-python's constructor fails when no broker answers; the daemon reports Kafka as reachable
        # right after constructing the publisher, so find out here too.
        try:
            self._p.list_topics(timeout=10)
        except KafkaException as exc:
            self._p.purge()
            hint = unreachable_hint(settings).replace("logged by kafka-python as SaslAuthenticationFailedError",
                                                      "logged by librdkafka as SASL authentication failed")
            raise kerr.KafkaConnectionError(f"cannot reach Kafka: {exc}. {hint}") from None
        self.in_transaction = False
        self._sent = 0
        self._poll = self._p.poll

    @property
    def producer(self) -> "ConfluentPublisher":
        # The pipeline flushes through publisher.producer (kafka-python's object); this one is its own.
        return self

    def poll(self) -> None:
        """Serve the delivery reports that arrived. The pipeline calls it once per loop and whenever it
        is about to wait for the stream; without it an acknowledgement would wait for the next send
        or batch close (the relay would still be correct, only its slot would move later)."""
        self._poll(0)

    def send(self, topic: str, value: bytes | None, key: bytes, headers: list) -> Delivery:
        handle = Delivery(self._poll)
        try:
            self._p.produce(topic, value, key, on_delivery=handle, headers=headers)
        except BufferError:
            self._wait_for_room(topic, value, key, headers, handle)
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                # Refused before sending, as kafka-python refuses it: dead-lettered as 'oversize'.
                raise kerr.MessageSizeTooLargeError(f"{err.str()} (over OUTBOX_MAX_RECORD_BYTES)") from None
            if err is not None and err.code() == KafkaError._INVALID_ARG:
                raise ValueError(err.str()) from None
            _raise(exc)
        self._sent += 1
        if self._sent % POLL_EVERY == 0:
            self._poll(0)
        return handle

    def _wait_for_room(self, topic, value, key, headers, handle) -> None:
        deadline = time.monotonic() + MAX_BLOCK_S
        while True:
            self._poll(0.05)
            try:
                self._p.produce(topic, value, key, on_delivery=handle, headers=headers)
                return
            except BufferError:
                if time.monotonic() > deadline:
                    raise kerr.KafkaTimeoutError(f"the producer's queue stayed full for {MAX_BLOCK_S:.0f} s") from None

    def flush(self, timeout: float | None = None) -> None:
        """As kafka-python's: every record has an outcome, or KafkaTimeoutError."""
        left = self._p.flush(-1 if timeout is None else timeout)
        if left:
            raise kerr.KafkaTimeoutError(f"{left} record(s) still unacknowledged after {timeout} s")

    # ----- exactly-once

    def init_transactions(self) -> None:
        try:
            self._p.init_transactions(60)
        except KafkaException as exc:
            _raise(exc)

    def begin(self) -> None:
        try:
            self._p.begin_transaction()
        except KafkaException as exc:
            _raise(exc)
        self.in_transaction = True

    def commit(self, checkpoint_topic: str, checkpoint_key: bytes, checkpoint: dict) -> None:
        try:
            self._p.produce(checkpoint_topic, json.dumps(checkpoint).encode(), checkpoint_key)
            self._p.commit_transaction(60)
        except KafkaException as exc:
            _raise(exc)
        finally:
            self.in_transaction = False

    def abort(self) -> None:
        if self.in_transaction:
            try:
                self._p.abort_transaction(30)
            except KafkaException as exc:
                log.warning("aborting the Kafka transaction failed (the broker aborts it on timeout): %s", exc)
            self.in_transaction = False

    def write_aborted_probe(self, topic: str) -> bytes:
        """See relay.publisher.Publisher.write_aborted_probe."""
        probe = f"__probe__:{uuid.uuid4()}".encode()
        try:
            self._p.begin_transaction()
            self._p.produce(topic, b"aborted on purpose", probe)
            self.flush(30)
            self._p.abort_transaction(30)
        except KafkaException as exc:
            _raise(exc)
        return probe

    def close(self, timeout: float = 10) -> None:
        try:
            if self._p.flush(timeout):
                # Not waiting (a failed session): what is left is replayed from the slot anyway.
                self._p.purge()
                self._p.poll(0)
            self._p.close()
        except (KafkaException, RuntimeError) as exc:  # closing is best effort; nothing depends on it
            log.warning("closing the Kafka producer: %s", exc)
