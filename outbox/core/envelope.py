"""The event envelope: how an outbox event travels as a Kafka record. Defined once, used by the
relay (to write records) and the inbox (to read them back).

    topic    outbox.event.<aggregate_type> by default (OUTBOX_TOPIC_TEMPLATE)
    key      aggregate_id, UTF-8            -> per-aggregate order (one partition per key)
    value    payload JSON, UTF-8; null for a tombstone (SQL NULL payload)
    headers  event_id         uuid text, the same on every redelivery, forever
             event_type, aggregate_type, aggregate_id
             outbox_commit_lsn  LSN of the producing transaction's commit record
             outbox_xid         the producing transaction id (64-bit, as text)
             outbox_commit_ts   commit time, RFC 3339 UTC
             + the event's own headers (string values), e.g. a W3C traceparent, untouched
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

EVENT_ID = "event_id"
EVENT_TYPE = "event_type"
AGGREGATE_TYPE = "aggregate_type"
AGGREGATE_ID = "aggregate_id"
COMMIT_LSN = "outbox_commit_lsn"
XID = "outbox_xid"
COMMIT_TS = "outbox_commit_ts"

CONTRACT_HEADERS = (EVENT_ID, EVENT_TYPE, AGGREGATE_TYPE, AGGREGATE_ID)
RESERVED_PREFIX = "outbox_"  # mirrored by outbox.reserved_header() in sql/001_outbox.sql


def is_reserved(name: str) -> bool:
    return name in CONTRACT_HEADERS or name.startswith(RESERVED_PREFIX)


class EnvelopeError(ValueError):
    """A Kafka record does not carry a valid envelope; the message says which part is wrong."""


# Kafka's own rule for topic names (kafka.common.internals.Topic): the router and the settings check it.
_TOPIC_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")


def is_topic_name(name: str) -> bool:
    return bool(_TOPIC_NAME.match(name)) and name not in (".", "..")


@dataclass(frozen=True, slots=True)
class Envelope:
    event_id: uuid.UUID
    event_type: str | None
    aggregate_type: str | None
    aggregate_id: str | None
    commit_lsn: str | None = None
    xid: int | None = None
    commit_ts: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # the event's own headers only


def build_headers(event_id: bytes, event_type: bytes, aggregate_type: bytes, aggregate_id: bytes,
                  commit_lsn: bytes, xid: bytes, commit_ts: bytes,
                  own: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]]:
    """Kafka headers for one event. Arguments are already UTF-8 (the relay's hot path works on the
    bytes it decoded from pgoutput and never round-trips them through str)."""
    headers = [(EVENT_ID, event_id), (EVENT_TYPE, event_type), (AGGREGATE_TYPE, aggregate_type),
               (AGGREGATE_ID, aggregate_id), (COMMIT_LSN, commit_lsn), (XID, xid), (COMMIT_TS, commit_ts)]
    if own:
        headers.extend(own)
    return headers


def event_id_of(headers: list[tuple[str, bytes]] | None) -> uuid.UUID:
    """The event id of a record, or EnvelopeError saying why there is none."""
    raw, found = None, False
    for name, value in headers or ():
        if name == EVENT_ID:
            # Kafka allows a header without a value: it still counts, or the verdict would depend on order.
            if found:
                raise EnvelopeError("record has more than one event_id header")
            raw, found = value, True
    if not found:
        raise EnvelopeError("record has no event_id header (was it published by the outbox relay?)")
    try:
        return uuid.UUID(raw.decode("ascii"))
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise EnvelopeError(f"event_id header {raw if raw is None else raw[:64]!r} is not a UUID") from None


def read_envelope(headers: list[tuple[str, bytes]] | None) -> Envelope:
    """Everything the envelope carries, with the event's own headers separated from ours."""
    event_id = event_id_of(headers)
    ours: dict[str, str] = {}
    own: dict[str, str] = {}
    for name, value in headers or ():
        text = value.decode("utf-8", errors="replace") if value is not None else ""
        (ours if is_reserved(name) else own)[name] = text
    xid = ours.get(XID)
    return Envelope(
        event_id=event_id,
        event_type=ours.get(EVENT_TYPE),
        aggregate_type=ours.get(AGGREGATE_TYPE),
        aggregate_id=ours.get(AGGREGATE_ID),
        commit_lsn=ours.get(COMMIT_LSN),
        xid=int(xid) if xid and xid.isdigit() else None,
        commit_ts=ours.get(COMMIT_TS),
        headers=own,
    )
