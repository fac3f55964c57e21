"""What is acknowledged where — pure bookkeeping, no I/O.

Three positions matter, always in this order:
    1. Kafka acknowledged every record of a batch (futures done),
    2. the ledger persisted the batch's outcome in PostgreSQL (dead letters included),
    3. the slot's confirmed_flush_lsn moves to the end LSN of the last transaction in it.
Moving 3 before 1 or 2 could lose an event; the AckQueue only ever releases a position whose
every predecessor is done. Positions are Commit end LSNs (acking the commit LSN itself would
replay the transaction) or idle keepalive positions with nothing pending.

For exactly-once, the Checkpoint is written to Kafka inside each transaction: after a crash
the relay skips what a committed Kafka transaction already holds, down to the event inside a
source transaction too large for one Kafka transaction.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class DeadLetter:
    event_id: bytes
    reason: str
    error: str
    topic: str | None
    row: tuple  # the decoded outbox row, for the dead-letter copy
    commit_lsn: int


@dataclass(eq=False)
class Batch:
    """A run of consecutive events tracked together (one Kafka transaction in exactly-once mode)."""

    batch_id: int
    first_lsn: int
    opened_at: float = field(default_factory=time.monotonic)
    futures: list = field(default_factory=list)
    event_ids: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # decoded rows, to dead-letter a record Kafka rejects later
    commit_ts: list = field(default_factory=list)  # µs since 2000 of each event's transaction
    dead: list[DeadLetter] = field(default_factory=list)
    xids: list[bytes] = field(default_factory=list)
    ack_lsn: int | None = None  # end LSN of the last transaction completed in this batch
    last_commit_lsn: int = 0  # its commit LSN (exactly-once checkpoint)
    partial_commit_lsn: int = 0  # a transaction still open when the batch closed...
    partial_events: int = 0  # ...and how many of its events this and earlier batches hold
    nbytes: int = 0
    backfill_after: tuple[str, str] | None = None  # (created_at, event_id) of its last backfilled event
    closed: bool = False
    handed_over: bool = False  # given to the ledger
    persisted: bool = False  # set by the ledger thread once its outcome is in PostgreSQL
    _checked: int = 0

    def add(self, future, event_id: bytes, commit_ts: int, nbytes: int) -> None:
        self.futures.append(future)
        self.event_ids.append(event_id)
        self.commit_ts.append(commit_ts)
        self.nbytes += nbytes

    def kafka_done(self) -> bool:
        """True once every record has an outcome; resumes where the last call stopped."""
        futures = self.futures
        i = self._checked
        while i < len(futures) and futures[i].is_done:
            i += 1
        self._checked = i
        return i == len(futures)


@dataclass(slots=True)
class _Mark:
    lsn: int
    persisted: bool = True


class AckQueue:
    """Batches and bare positions in stream order; releases the confirmed LSN of the done prefix."""

    def __init__(self, confirmed: int = 0):
        self.items: deque[Batch | _Mark] = deque()
        self.confirmed = confirmed

    def add(self, batch: Batch) -> None:
        self.items.append(batch)

    def mark(self, lsn: int) -> None:
        """A position with nothing to wait for (a transaction without outbox events)."""
        if self.items:
            self.items.append(_Mark(lsn))
        else:
            self.confirmed = max(self.confirmed, lsn)

    def advance(self) -> bool:
        moved = False
        items = self.items
        while items and items[0].persisted:
            item = items.popleft()
            lsn = item.ack_lsn if isinstance(item, Batch) else item.lsn
            if lsn is not None and lsn > self.confirmed:
                self.confirmed = lsn
                moved = True
        return moved

    @property
    def idle(self) -> bool:
        return not self.items

    def pending_batches(self) -> list[Batch]:
        return [item for item in self.items if isinstance(item, Batch)]


@dataclass(frozen=True)
class Checkpoint:
    commit_lsn: int = 0  # every transaction with a commit LSN <= this is fully in Kafka
    partial_commit_lsn: int = 0  # this transaction is in Kafka only in part...
    partial_events: int = 0  # ...its first partial_events events
    batch_id: int = 0  # the relay_batches row of the Kafka transaction that wrote this
    # Backfill progress: events of backfill_snapshot up to this (created_at, event_id) are in Kafka.
    backfill_snapshot: str = ""
    backfill_after: tuple[str, str] | None = None

    def skip_transaction(self, final_lsn: int) -> bool:
        return final_lsn <= self.commit_lsn

    def events_to_skip(self, final_lsn: int) -> int:
        return self.partial_events if final_lsn == self.partial_commit_lsn else 0

    def to_json(self) -> dict:
        return {"commit_lsn": self.commit_lsn, "partial_commit_lsn": self.partial_commit_lsn,
                "partial_events": self.partial_events, "batch_id": self.batch_id,
                "backfill_snapshot": self.backfill_snapshot,
                "backfill_after": list(self.backfill_after) if self.backfill_after else None}

    @classmethod
    def from_json(cls, doc: dict | None) -> "Checkpoint":
        if not doc:
            return cls()
        after = doc.get("backfill_after")
        return cls(int(doc["commit_lsn"]), int(doc["partial_commit_lsn"]), int(doc["partial_events"]),
                   int(doc.get("batch_id", 0)), doc.get("backfill_snapshot") or "", tuple(after) if after else None)

    @classmethod
    def after(cls, batch: Batch, previous: "Checkpoint", backfill_snapshot: str = "") -> "Checkpoint":
        """The checkpoint once `batch` is committed."""
        commit_lsn = batch.last_commit_lsn or previous.commit_lsn
        if batch.backfill_after:
            snapshot, after = backfill_snapshot, batch.backfill_after
        else:
            snapshot, after = previous.backfill_snapshot, previous.backfill_after
        return cls(commit_lsn, batch.partial_commit_lsn, batch.partial_events, batch.batch_id, snapshot, after)
