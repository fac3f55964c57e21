"""Pure routing: one decoded outbox row -> one Kafka record (topic, key, value, headers). No I/O.

A row that cannot become a valid record raises RouteError with a machine-readable reason and an
explanation that says how to fix it; the daemon dead-letters it and moves on.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass

from outbox.core import envelope
from outbox.core.lsn import lsn_to_str, pg_timestamp
from relay.pgoutput import Relation

OUTBOX_COLUMNS = ("event_id", "aggregate_type", "aggregate_id", "event_type", "payload", "headers", "created_at",
                  "txid")
# Header names, transaction headers and record framing, roughly: for the in-flight byte budget.
RECORD_OVERHEAD = 260


class SchemaError(Exception):
    """The published table does not look like outbox.events (a configuration problem, not a row problem)."""


class RouteError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Layout:
    """Column positions of outbox.events in the relation as PostgreSQL announced it (-1: absent)."""

    oid: int
    event_id: int
    aggregate_type: int
    aggregate_id: int
    event_type: int
    payload: int
    headers: int
    created_at: int
    txid: int
    missing: tuple[str, ...] = ()  # columns a record needs that the table no longer has
    problem: str = ""

    @classmethod
    def of(cls, relation: Relation) -> "Layout":
        names = [c.name for c in relation.columns]
        if "event_id" not in names:
            raise SchemaError(
                f"published table {relation.namespace}.{relation.name} has no event_id column (it has {names}), so "
                f"its rows cannot even be dead-lettered. Fix: restore outbox.events as `outbox migrate` created it "
                f"(ALTER TABLE outbox.events ADD/RENAME COLUMN ...), check the publication with `\\dRp+` in psql, "
                f"then restart the relay."
            )
        missing = tuple(c for c in ROUTING_COLUMNS if c not in names)
        problem = ""
        if missing:
            problem = (f"outbox.events lacks column(s) {list(missing)} (dropped or renamed while the relay ran), so "
                       f"its rows cannot become Kafka records and are dead-lettered. Fix: restore the column(s) as "
                       f"`outbox migrate` created them, then `outbox dead-letters replay --all`.")
        return cls(relation.oid, *(names.index(c) if c in names else -1 for c in OUTBOX_COLUMNS), missing, problem)


# What a record cannot be built without (headers, created_at and txid have defaults).
ROUTING_COLUMNS = ("aggregate_type", "aggregate_id", "event_type", "payload")

# Rows read from the table itself (backfill, dead-letter replays) select the columns in OUTBOX_COLUMNS order.
TABLE_LAYOUT = Layout(-1, *range(len(OUTBOX_COLUMNS)))


@dataclass(frozen=True, slots=True)
class Txn:
    """Per-transaction header values, formatted once for all events of the transaction."""

    commit_lsn: int
    commit_lsn_text: bytes
    commit_ts_text: bytes

    @classmethod
    def of(cls, final_lsn: int, commit_ts: int) -> "Txn":
        ts = pg_timestamp(commit_ts).isoformat(timespec="microseconds").replace("+00:00", "Z")
        return cls(final_lsn, lsn_to_str(final_lsn).encode(), ts.encode())


@dataclass(slots=True)
class Record:
    topic: str
    key: bytes
    value: bytes | None
    headers: list
    event_id: bytes
    txid: bytes
    size: int


class Router:
    def __init__(self, topic_template: str, reserved: frozenset[str] = frozenset()):
        """`reserved`: topics no event may be routed to (the relay's checkpoint topic)."""
        self.template = topic_template
        self.reserved = reserved
        fields = {name for _, name, _, _ in string.Formatter().parse(topic_template) if name}
        self._uses_event_type = "event_type" in fields
        self._topics: dict[tuple[bytes, bytes], str] = {}

    def topic(self, aggregate_type: bytes, event_type: bytes) -> str:
        cache_key = (aggregate_type, event_type if self._uses_event_type else b"")
        topic = self._topics.get(cache_key)
        if topic is None:
            topic = self.template.format(aggregate_type=_text(aggregate_type, "aggregate_type"),
                                         event_type=_text(event_type, "event_type"))
            if not envelope.is_topic_name(topic):
                raise RouteError(
                    "invalid_topic",
                    f"topic {topic!r} formed by OUTBOX_TOPIC_TEMPLATE={self.template!r} is not a legal Kafka topic "
                    f"name (1-249 characters of a-z A-Z 0-9 . _ -). Fix: use aggregate types made of those "
                    f"characters, or change the template; then replay the dead letter.",
                )
            if topic in self.reserved or topic.startswith("__"):
                # aggregate_type comes from whoever calls outbox.emit: it must not reach the topics
                # the relay's own bookkeeping trusts (a record keyed like a checkpoint there would be
                # read back as one and skip events) or Kafka's internal ones.
                raise RouteError(
                    "reserved_topic",
                    f"topic {topic!r} formed by OUTBOX_TOPIC_TEMPLATE={self.template!r} is reserved (the relay's "
                    f"checkpoint topic, or a Kafka-internal '__' topic), so no event may be written to it. Fix: "
                    f"use another aggregate type, or change OUTBOX_TOPIC_TEMPLATE or OUTBOX_CHECKPOINT_TOPIC; then "
                    f"replay the dead letter.")
            if len(self._topics) < 100_000:
                self._topics[cache_key] = topic
        return topic

    def route(self, layout: Layout, row: tuple, txn: Txn) -> Record:
        if layout.missing:
            raise RouteError("schema", layout.problem)
        event_id = row[layout.event_id]
        aggregate_type = row[layout.aggregate_type]
        aggregate_id = row[layout.aggregate_id]
        event_type = row[layout.event_type]
        value = row[layout.payload]
        txid = row[layout.txid] if layout.txid >= 0 else b""
        topic = self.topic(aggregate_type, event_type)
        # The contract promises UTF-8 keys, values and headers; bytes from a SQL_ASCII database may
        # be anything. isascii() is the cheap common case.
        if not aggregate_id.isascii():
            _text(aggregate_id, "aggregate_id")
        if not event_type.isascii():
            _text(event_type, "event_type")
        if value is not None and not value.isascii():
            _text(value, "payload")
        raw_headers = row[layout.headers] if layout.headers >= 0 else b"{}"
        own = None if raw_headers == b"{}" else own_headers(raw_headers)
        headers = envelope.build_headers(event_id, event_type, aggregate_type, aggregate_id, txn.commit_lsn_text,
                                         txid, txn.commit_ts_text, own)
        # An estimate for the in-flight byte budget only; the producer enforces the exact record limit
        # (OUTBOX_MAX_RECORD_BYTES) and the daemon dead-letters what it refuses.
        size = RECORD_OVERHEAD + 2 * len(aggregate_id) + len(event_type) + len(aggregate_type) + \
            (len(value) if value is not None else 0) + (len(raw_headers) if own else 0)
        return Record(topic, aggregate_id, value, headers, event_id, txid, size)


def own_headers(raw: bytes) -> list[tuple[str, bytes]]:
    """The event's own headers (a JSON object of strings) as Kafka headers, in their JSON order."""
    try:
        # Strict UTF-8 first: json.loads(bytes) would let encoded surrogates through.
        parsed = json.loads(raw.decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; nesting deeper than Python's stack
        raise RouteError("bad_headers", "headers column is not valid UTF-8 JSON of a sane depth") from None
    if not isinstance(parsed, dict):
        raise RouteError("bad_headers", "headers must be a JSON object; write events with outbox.emit()")
    out = []
    for name, value in parsed.items():
        if not isinstance(value, str):
            raise RouteError("bad_headers", f"header {name!r} has a non-string value; write events with "
                                            f"outbox.emit(), which rejects those")
        if envelope.is_reserved(name):
            raise RouteError("bad_headers", f"header {name!r} is reserved for the relay; rename it")
        try:
            name.encode()
            encoded = value.encode()
        except UnicodeEncodeError:  # a \ud800 escape: valid JSON, but no UTF-8 spelling
            raise RouteError("bad_headers", f"header {name!r} holds a lone surrogate escape, which UTF-8 "
                                            f"cannot carry; fix the producer") from None
        out.append((name, encoded))
    return out


def _text(value: bytes, column: str) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise RouteError("invalid_encoding",
                         f"column {column} is not valid UTF-8 ({value[:40]!r}...), which Kafka records of the outbox "
                         f"contract must be (the database encoding is probably SQL_ASCII). Fix: correct the "
                         f"event's text, or move the outbox to a UTF8 database; the original bytes are kept "
                         f"backslash-escaped in the dead letter") from None
