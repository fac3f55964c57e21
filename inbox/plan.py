"""Pure bookkeeping for one batch of records: which carry a valid event id, which repeat an event id
seen earlier in the same batch, where each partition ends, and the per-partition counts.

No I/O here, so the rules are unit-tested on plain objects. `store` turns a plan into SQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from inbox.message import Record
from outbox.core.envelope import EnvelopeError, event_id_of

Partition = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True, slots=True)
class Suppressed:
    """Deliveries of one event id kept from the handler in a batch."""

    event_id: uuid.UUID
    count: int
    index: int  # the event's first record in the batch
    known: bool  # the inbox had the event before the batch (else: only repeats inside it)


@dataclass(slots=True)
class Plan:
    event_ids: list[uuid.UUID | None]  # per record; None when the envelope is invalid
    invalid: dict[int, str] = field(default_factory=dict)  # record index -> why it has no usable event id
    first: list[int] = field(default_factory=list)  # index of the first occurrence of each event id
    repeats: dict[uuid.UUID, int] = field(default_factory=dict)  # extra occurrences inside the batch
    next_offsets: dict[Partition, int] = field(default_factory=dict)  # last offset + 1
    records_per_partition: dict[Partition, int] = field(default_factory=dict)

    def suppressed(self, new: Sequence[int]) -> list[Suppressed]:
        """Suppressed deliveries per event id, given the indices (from `first`) that were new to the
        inbox: every occurrence of an event already known, and every repeat after a new one."""
        if len(new) == len(self.first) and not self.repeats:
            return []
        new_set = set(new)
        out = []
        for i in self.first:
            event_id = self.event_ids[i]
            known = i not in new_set
            n = self.repeats.get(event_id, 0) + known
            if n:
                out.append(Suppressed(event_id, n, i, known))
        return out

    def tallies(self, records: Sequence[Record], new: Sequence[int]) -> dict[Partition, tuple[int, int, int]]:
        """(processed, duplicates, dead_lettered) per partition: every record is exactly one of them."""
        if len(new) == len(records):  # the common case: every record was new
            return {tp: (n, 0, 0) for tp, n in self.records_per_partition.items()}
        processed: dict[Partition, int] = {}
        for i in new:
            r = records[i]
            tp = (r.topic, r.partition)
            processed[tp] = processed.get(tp, 0) + 1
        dead = self.invalid_per_partition(records)
        out = {}
        for tp, total in self.records_per_partition.items():
            p, d = processed.get(tp, 0), dead.get(tp, 0)
            out[tp] = (p, total - p - d, d)
        return out

    def invalid_per_partition(self, records: Sequence[Record]) -> dict[Partition, int]:
        counts: dict[Partition, int] = {}
        for i in self.invalid:
            tp = (records[i].topic, records[i].partition)
            counts[tp] = counts.get(tp, 0) + 1
        return counts


def plan_batch(records: Sequence[Record]) -> Plan:
    """Classify records in order. Runs once per record on the hot path: poll() returns records in
    runs per partition, so partition bookkeeping happens once per run, not per record."""
    event_ids: list[uuid.UUID | None] = []
    plan = Plan(event_ids)
    seen: set[uuid.UUID] = set()
    append_id, append_first, add_seen = event_ids.append, plan.first.append, seen.add
    repeats, invalid = plan.repeats, plan.invalid
    run_topic = run_partition = None
    run_length = 0
    for i, r in enumerate(records):
        if r.partition != run_partition or r.topic != run_topic:
            if run_length:
                _close_run(plan, run_topic, run_partition, run_length, records[i - 1].offset)
            run_topic, run_partition, run_length = r.topic, r.partition, 0
        run_length += 1
        try:
            event_id = event_id_of(r.headers)
        except EnvelopeError as exc:
            append_id(None)
            invalid[i] = str(exc)
            continue
        append_id(event_id)
        if event_id in seen:
            repeats[event_id] = repeats.get(event_id, 0) + 1
        else:
            add_seen(event_id)
            append_first(i)
    if run_length:
        _close_run(plan, run_topic, run_partition, run_length, records[-1].offset)
    return plan


def _close_run(plan: Plan, topic: str, partition: int, length: int, last_offset: int) -> None:
    tp = (topic, partition)
    plan.records_per_partition[tp] = plan.records_per_partition.get(tp, 0) + length
    if last_offset + 1 > plan.next_offsets.get(tp, -1):
        plan.next_offsets[tp] = last_offset + 1
