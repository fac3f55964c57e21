"""What a handler receives: one Kafka record that the inbox has accepted as new for this consumer."""

from __future__ import annotations

import json
import uuid
from typing import Any, Protocol

from outbox.core.envelope import Envelope, read_envelope


class Record(Protocol):
    """The fields of kafka-python's ConsumerRecord that the inbox uses (any object with them works)."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None


class Message:
    """A record plus its event id. Built for every record on the hot path, so it wraps the record
    instead of copying its fields."""

    __slots__ = ("record", "event_id", "consumer", "attempt")

    def __init__(self, record: Record, event_id: uuid.UUID, consumer: str, attempt: int = 1):
        self.record = record
        self.event_id = event_id
        self.consumer = consumer
        self.attempt = attempt  # 1 on first delivery; >1 on retries and dead-letter replays

    @property
    def topic(self) -> str:
        return self.record.topic

    @property
    def partition(self) -> int:
        return self.record.partition

    @property
    def offset(self) -> int:
        return self.record.offset

    @property
    def key(self) -> bytes | None:
        return self.record.key

    @property
    def value(self) -> bytes | None:
        return self.record.value

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return list(self.record.headers or ())

    @property
    def envelope(self) -> Envelope:
        return read_envelope(self.record.headers)

    def json(self) -> Any:
        """The payload decoded from JSON; None for a tombstone (null value)."""
        return None if self.record.value is None else json.loads(self.record.value)

    def __repr__(self) -> str:
        return (f"Message(event_id={self.event_id}, consumer={self.consumer!r}, "
                f"{self.topic}[{self.partition}]@{self.offset}, attempt={self.attempt})")


class StoredRecord:
    """A record rebuilt from a dead letter, shaped like a ConsumerRecord for the handler."""

    __slots__ = ("topic", "partition", "offset", "timestamp", "key", "value", "headers")

    def __init__(self, topic: str, partition: int, offset: int, timestamp: int | None,
                 key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]):
        self.topic, self.partition, self.offset, self.timestamp = topic, partition, offset, timestamp
        self.key, self.value, self.headers = key, value, headers
