"""confluent-kafka (librdkafka) behind the part of kafka-python's KafkaConsumer that the inbox
Runner uses (Runner(kafka_client="confluent-kafka"), OUTBOX_KAFKA_CLIENT=confluent-kafka).

Why: kafka-python decodes every record in Python (~14 µs a record, most of an empty handler's
cost, docs/inbox.md#throughput); librdkafka fetches and decodes in C threads.

The Runner's logic is the same for both clients; this module translates, and keeps kafka-python's
semantics where librdkafka's differ:
- Positions: librdkafka can only start or move a partition it has been assigned. kafka-python's
  listener seeks inside on_partitions_assigned; here the rebalance callback first hands the new
  partitions to the Runner's listener as *pending*: its seek() and pause() calls are recorded, and
  the partitions are then assigned with those offsets (TopicPartition(topic, partition, offset))
  and paused. A partition the listener did not seek starts from the group's committed offset,
  else from auto.offset.reset, as with kafka-python. Manual assign() is deferred to the next poll
  the same way, so the Runner's seeks to PostgreSQL's offsets right after it are start offsets.
- poll(timeout_ms): returns as soon as records are there (kafka-python's behaviour), not when a
  whole batch of max_poll_records has arrived (consume()'s): it takes what librdkafka has queued
  with consume(n, 0) and waits with poll(timeout) only when nothing is.
- Records carry the attributes process() reads (.topic .partition .offset .key .value .headers
  .timestamp), grouped per kafka.TopicPartition like KafkaConsumer.poll().
- Rebalance callbacks run inside consume()/poll() on the poll loop's thread, as the Runner's
  listener expects of kafka-python.
- librdkafka's logs and errors go to Python logging ("inbox.librdkafka") with credentials
  redacted; offsets are never committed automatically (enable.auto.commit=false,
  enable.auto.offset.store=false): the Runner copies PostgreSQL's offsets to the group itself.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, OFFSET_STORED, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as RdTopicPartition
from kafka import TopicPartition

from inbox.errors import InboxError
from outbox.core import librdkafka
from outbox.core.redact import redact

log = logging.getLogger("inbox")
librdkafka_log = logging.getLogger("inbox.librdkafka")

DEFAULT_MAX_POLL_RECORDS = 500  # kafka-python's default


class Record:
    """kafka-python's ConsumerRecord, as far as the inbox reads it."""

    __slots__ = ("topic", "partition", "offset", "key", "value", "headers", "timestamp")

    def __init__(self, topic, partition, offset, key, value, headers, timestamp):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.key, self.value, self.headers, self.timestamp = key, value, headers, timestamp

    def __repr__(self) -> str:
        return f"Record({self.topic}[{self.partition}]@{self.offset})"


class _RedactingLogger(logging.LoggerAdapter):
    """What librdkafka logs may quote its configuration (sasl.password): masked before any handler."""

    def log(self, level, msg, *args, **kwargs):
        if self.logger.isEnabledFor(level):
            text = msg % args if args else str(msg)
            self.logger.log(level, "%s", redact(text), **kwargs)


def translate(config: Mapping) -> dict:
    """The Runner's KafkaConsumer options (kafka-python names) as a librdkafka configuration, plus
    what the inbox always needs. InboxError (with the fix) for an option librdkafka has no name for."""
    try:
        rd = librdkafka.consumer_config(config)
    except librdkafka.UnknownOption as exc:
        raise InboxError(str(exc)) from None
    if str(rd.get("enable.auto.commit", False)).lower() == "true":
        raise InboxError("enable.auto.commit must stay off: the inbox commits offsets in PostgreSQL itself")
    if config.get("group_id") is None:
        # librdkafka wants a group even for assign() alone; this one never joins, fetches or commits
        # (the Runner never commits without a group, and start offsets are never OFFSET_STORED).
        rd["group.id"] = f"{config.get('client_id') or 'inbox'}-unmanaged-{uuid.uuid4().hex[:8]}"
    rd.update({
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
    })
    return rd


class ConfluentConsumer:
    """The KafkaConsumer methods consumer.py calls (grep `kc.`), on a confluent_kafka.Consumer."""

    def __init__(self, config: Mapping):
        self._group = config.get("group_id")
        self._grouped = self._group is not None
        self._batch = int(config.get("max_poll_records") or DEFAULT_MAX_POLL_RECORDS)
        reset = str(config.get("auto_offset_reset", config.get("auto.offset.reset", "latest")))
        # Where a partition nobody positioned starts: the group's offset (then auto.offset.reset), or
        # without a group, auto.offset.reset at once.
        self._default_start = (OFFSET_STORED if self._grouped else
                               OFFSET_BEGINNING if reset in ("earliest", "smallest", "beginning") else OFFSET_END)
        rd = translate(config)
        self._cooperative = "cooperative" in str(rd.get("partition.assignment.strategy", ""))
        rd.update({"logger": _RedactingLogger(librdkafka_log, {}), "error_cb": _on_error, "on_commit": _on_commit})
        self._c = Consumer(rd)
        self._listener = None
        self._subscription: tuple[list[str], object] | None = None  # names, and what matches a topic
        self._resubscribe = False
        self._assigned: set[TopicPartition] = set()
        # Partitions handed to the listener (or to assign()) and not yet given to librdkafka: offset
        # to start from (None: the default start) and whether to pause them.
        self._pending: dict[TopicPartition, int | None] | None = None
        self._pending_paused: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self._tps: dict[tuple[str, int], TopicPartition] = {}

    # ----- assignment

    def _tp(self, topic: str, partition: int) -> TopicPartition:
        tp = self._tps.get((topic, partition))
        if tp is None:
            tp = self._tps[(topic, partition)] = TopicPartition(topic, partition)
        return tp

    def assignment(self) -> set[TopicPartition]:
        if self._pending:
            return self._assigned | set(self._pending)
        return set(self._assigned)

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Manual assignment; applied at the next poll, with the offsets seek() gives meanwhile."""
        self._pending = {self._tp(tp.topic, tp.partition): None for tp in partitions}
        self._pending_paused = set()
        self._assigned = set()

    def _apply_pending(self, incremental: bool = False) -> None:
        pending, paused = self._pending or {}, self._pending_paused
        self._pending, self._pending_paused = None, set()
        start = [RdTopicPartition(tp.topic, tp.partition, self._default_start if off is None else off)
                 for tp, off in pending.items()]
        if incremental:
            self._c.incremental_assign(start)
            self._assigned |= set(pending)
        else:
            self._c.assign(start)
            self._assigned = set(pending)
        if incremental:
            self._paused -= set(pending)
        else:
            self._paused = set()
        if paused:
            self._c.pause([RdTopicPartition(tp.topic, tp.partition) for tp in paused])
            self._paused |= paused

    def subscribe(self, topics=(), pattern: str | None = None, listener=None) -> None:
        if pattern:
            # kafka-python matches from the start of the name (re.match); librdkafka takes a regex
            # when the name starts with ^, which also anchors it there.
            names = [pattern if pattern.startswith("^") else f"^{pattern}"]
        else:
            names = list(topics)
        self._listener = listener
        matches = re.compile(pattern).match if pattern else set(names).__contains__
        self._subscription = (names, matches)
        self._subscribe()

    def _subscribe(self) -> None:
        self._c.subscribe(self._subscription[0], on_assign=self._on_assign, on_revoke=self._on_revoke,
                          on_lost=self._on_lost)

    def _on_assign(self, _consumer, partitions) -> None:
        new = {self._tp(p.topic, p.partition): None for p in partitions}
        matches = self._subscription[1] if self._subscription else None
        foreign = sorted(tp for tp in new if matches is not None and not matches(tp.topic))
        if foreign:
            # A static member (group.instance.id) rejoining a stable group gets its previous
            # assignment back without a rebalance, even when its subscription changed since; the
            # group leader must notice and rejoin. kafka-python does; librdkafka assigns them.
            log.warning("consumer group %s assigned this member %s, which it does not subscribe to (a static "
                        "member keeps its old assignment when it rejoins with another subscription); leaving "
                        "them unassigned and rejoining the group", self._group, [f"{tp.topic}[{tp.partition}]" for tp in foreign])
            for tp in foreign:
                del new[tp]
            self._resubscribe = True
        self._pending, self._pending_paused = dict(new), set()
        try:
            if self._listener is not None and new:
                self._listener.on_partitions_assigned(set(new))
        finally:
            self._apply_pending(incremental=self._cooperative)

    def _on_revoke(self, _consumer, partitions) -> None:
        self._give_up(partitions, "on_partitions_revoked")

    def _on_lost(self, _consumer, partitions) -> None:
        self._give_up(partitions, "on_partitions_lost")

    def _give_up(self, partitions, callback: str) -> None:
        gone = {self._tp(p.topic, p.partition) for p in partitions}
        try:
            if self._listener is not None and gone:
                getattr(self._listener, callback)(gone)
        finally:
            if self._cooperative:
                self._c.incremental_unassign(partitions)
                self._assigned -= gone
                self._paused -= gone
            else:
                self._c.unassign()
                self._assigned, self._paused = set(), set()

    # ----- positions

    def seek(self, tp: TopicPartition, offset: int) -> None:
        key = self._tp(tp.topic, tp.partition)
        if self._pending is not None and key in self._pending:
            self._pending[key] = offset
            return
        try:
            self._c.seek(RdTopicPartition(tp.topic, tp.partition, offset))
        except KafkaException as exc:
            raise _error(exc, f"seek {tp.topic}[{tp.partition}] to {offset}") from None

    def pause(self, *partitions: TopicPartition) -> None:
        live = self._split_pending(partitions, self._pending_paused.add)
        if live:
            self._c.pause(live)
            self._paused |= {self._tp(p.topic, p.partition) for p in live}

    def resume(self, *partitions: TopicPartition) -> None:
        live = self._split_pending(partitions, self._pending_paused.discard)
        if live:
            self._c.resume(live)
            self._paused -= {self._tp(p.topic, p.partition) for p in live}

    def paused(self) -> set[TopicPartition]:
        return self._paused | self._pending_paused

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        """The offset of the next record the application gets (librdkafka's own bookkeeping, no
        request); None before the partition returned anything or was sought."""
        key = self._tp(tp.topic, tp.partition)
        if self._pending is not None and key in self._pending:
            return self._pending[key]
        try:
            [got] = self._c.position([RdTopicPartition(tp.topic, tp.partition)])
        except KafkaException as exc:
            raise _error(exc, f"position of {tp.topic}[{tp.partition}]") from None
        return None if got.offset < 0 else got.offset  # OFFSET_INVALID (-1001): none yet

    def _split_pending(self, partitions, on_pending) -> list:
        live = []
        for tp in partitions:
            key = self._tp(tp.topic, tp.partition)
            if self._pending is not None and key in self._pending:
                on_pending(key)
            else:
                live.append(RdTopicPartition(tp.topic, tp.partition))
        return live

    # ----- records

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Record]]:
        if self._pending is not None:  # a manual assign()
            self._apply_pending()
        if self._resubscribe:  # outside the callback: subscribing again makes this member rejoin
            self._resubscribe = False
            self._subscribe()
        n = max_records or self._batch
        c = self._c
        messages = c.consume(n, 0)
        if not messages:
            first = c.poll(timeout_ms / 1000)
            if first is None:
                return {}
            messages = [first, *c.consume(n - 1, 0)] if n > 1 else [first]
        out: dict[TopicPartition, list[Record]] = {}
        last_key, batch = None, None
        tps = self._tps
        for m in messages:
            err = m.error()
            if err is not None:
                _on_consume_error(err)
                continue
            topic, part = m.topic(), m.partition()
            key = (topic, part)
            if key != last_key:
                tp = tps.get(key) or self._tp(topic, part)
                batch = out.get(tp)
                if batch is None:
                    batch = out[tp] = []
                last_key = key
            ts_type, ts = m.timestamp()
            batch.append(Record(topic, part, m.offset(), m.key(), m.value(), m.headers(), ts if ts_type else None))
        return out

    # ----- offsets (a copy for lag tools; PostgreSQL has the truth)

    def commit(self, offsets: Mapping | None = None) -> None:
        try:
            self._c.commit(offsets=_offsets(offsets), asynchronous=False)
        except KafkaException as exc:
            raise _error(exc, "commit offsets") from None

    def commit_async(self, offsets: Mapping | None = None, callback=None) -> None:
        # The outcome reaches on_commit (_on_commit, logged) from a later poll; `callback` is not
        # called: the Runner's only logs failures too.
        try:
            self._c.commit(offsets=_offsets(offsets), asynchronous=True)
        except KafkaException as exc:
            raise _error(exc, "commit offsets") from None

    def end_offsets(self, partitions: Iterable[TopicPartition], timeout_ms: int | None = None) -> dict:
        return self._watermarks(partitions, timeout_ms, high=True)

    def beginning_offsets(self, partitions: Iterable[TopicPartition], timeout_ms: int | None = None) -> dict:
        return self._watermarks(partitions, timeout_ms, high=False)

    def _watermarks(self, partitions: Iterable[TopicPartition], timeout_ms: int | None, high: bool) -> dict:
        deadline = time.monotonic() + (timeout_ms or 10_000) / 1000
        ends = {}
        for tp in partitions:
            left = deadline - time.monotonic()
            if left <= 0:
                raise InboxError("end offsets: timed out")
            try:
                low, hi = self._c.get_watermark_offsets(RdTopicPartition(tp.topic, tp.partition), timeout=left,
                                                        cached=False)
            except KafkaException as exc:
                raise _error(exc, "end offsets" if high else "beginning offsets") from None
            ends[tp] = hi if high else low
        return ends

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        try:
            meta = self._c.list_topics(topic, timeout=10)
        except KafkaException as exc:
            raise _error(exc, f"metadata of {topic}") from None
        t = meta.topics.get(topic)
        if t is None or t.error is not None:
            return None
        return set(t.partitions)

    def close(self, autocommit: bool = False) -> None:
        """Leaves the group (the listener sees the revocation, as with kafka-python); never commits."""
        try:
            self._c.close()
        except (KafkaException, RuntimeError) as exc:  # leaving is best effort: the session times out
            log.warning("closing the Kafka consumer (librdkafka): %s", redact(str(exc)))


def _offsets(offsets: Mapping | None) -> list[RdTopicPartition] | None:
    if offsets is None:
        return None
    return [RdTopicPartition(tp.topic, tp.partition, getattr(om, "offset", om)) for tp, om in offsets.items()]


def _error(exc: KafkaException, what: str) -> InboxError:
    err = exc.args[0] if exc.args else None
    text = f"{err.name()}: {err.str()}" if isinstance(err, KafkaError) else str(exc)
    return InboxError(f"{what} (librdkafka): {redact(text)}")


def _on_error(err: KafkaError) -> None:
    # Broker connections come and go; librdkafka reconnects itself. For the operator only.
    librdkafka_log.log(logging.ERROR if err.fatal() else logging.WARNING, "Kafka consumer (librdkafka): %s: %s",
                       err.name(), redact(err.str()))


def _on_commit(err: KafkaError | None, partitions) -> None:
    if err is not None and err.code() != KafkaError._NO_OFFSET:
        log.debug("offset copy to Kafka failed (lag display only): %s", redact(err.str()))


_quiet_codes = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._PARTITION_EOF}


def _on_consume_error(err: KafkaError) -> None:
    """An error delivered in place of a record. Fatal ones stop the Runner (kafka-python raises
    them from poll() too); a subscribed topic that does not exist yet is waited for, as with
    kafka-python."""
    if err.fatal() or err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED):
        raise InboxError(f"Kafka consumer (librdkafka): {err.name()}: {redact(err.str())}")
    librdkafka_log.log(logging.DEBUG if err.code() in _quiet_codes else logging.WARNING,
                       "Kafka consumer (librdkafka): %s: %s", err.name(), redact(err.str()))
