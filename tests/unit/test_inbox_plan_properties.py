"""Property tests of batch planning (inbox/plan.py) over random polled batches, no servers.

A batch is generated the way a Kafka poll returns it: a few topic-partitions, each with strictly
increasing (possibly gapped) offsets, cut into runs that are interleaved with other partitions'
runs. Event ids come from a small pool so an event repeats inside a batch, some spelled in upper
case (the same UUID), and some records carry no usable event id: no event_id header, no headers at
all, a value that is not a UUID, or two event_id headers. Which first occurrences are new to the
inbox is a random subset (all, none or some). Against a reference model built from the generator's
own labels, never from the code under test:

- `event_ids[i]` is the record's UUID, or None exactly for the invalid records; `invalid` has
  exactly those indices, with a reason naming what was wrong;
- `first` lists the index of the first occurrence of each distinct valid id, in batch order;
  `repeats[id]` is its occurrences - 1, absent when 0;
- `next_offsets` is max offset + 1 for every partition in the batch, including partitions whose
  records are all invalid; `records_per_partition` counts every record;
- `tallies` gives every partition of the batch (processed, duplicates, dead_lettered) summing to its
  records, with processed = its new first occurrences and dead_lettered = its invalid records;
  `invalid_per_partition` counts the invalid records of the partitions that have any;
- `suppressed(new)` has one entry per event id with a suppressed delivery, in `first` order, with
  known = "its first occurrence is not in new" and count = repeats + known; the counts add up to
  valid records - len(new), and the list is empty exactly when nothing is suppressed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inbox.plan import Suppressed, plan_batch
from tests.support.inbox import Rec, headers_for

POOL = [uuid.UUID(int=0x1000 + i) for i in range(6)] + [uuid.uuid5(uuid.NAMESPACE_URL, "x"), uuid.UUID(int=0)]
PARTITIONS = [(t, p) for t in ("orders", "payments", "x") for p in (0, 1, 2)]

# Invalid shapes and the reason the plan must give for each.
NOT_A_UUID = [b"not-a-uuid", b"\xff\xfe", b"", str(POOL[0]).encode()[:-1], b"1234", None]  # None: no value
REASONS = {"missing": "no event_id header", "no_headers": "no event_id header",
           "not_uuid": "is not a UUID", "twice": "more than one event_id header"}


@dataclass
class Labelled:
    record: Rec
    event_id: uuid.UUID | None  # what the generator put in: None for an invalid record
    kind: str  # "valid" or a key of REASONS


@st.composite
def envelopes(draw) -> tuple[list[tuple[str, bytes]] | None, uuid.UUID | None, str]:
    kind = draw(st.sampled_from(["valid"] * 6 + list(REASONS)))
    if kind == "valid":
        event_id = draw(st.sampled_from(POOL))
        headers = headers_for(event_id, own=draw(st.sampled_from([None, [("traceparent", b"00-abc")]])))
        if draw(st.booleans()):  # the same UUID spelled in upper case
            headers[0] = ("event_id", str(event_id).upper().encode())
        return headers, event_id, kind
    if kind == "missing":
        return draw(st.sampled_from([[], [("traceparent", b"00-x")], headers_for(POOL[1])[1:]])), None, kind
    if kind == "no_headers":
        return None, None, kind
    if kind == "not_uuid":
        headers = headers_for(POOL[2])
        headers[0] = ("event_id", draw(st.sampled_from(NOT_A_UUID)))
        return headers, None, kind
    a, b = draw(st.sampled_from(POOL)), draw(st.sampled_from(POOL))  # the same id twice counts too
    headers = headers_for(a, own=[("event_id", draw(st.sampled_from([str(b).encode(), None])))])
    if draw(st.booleans()):  # whichever of the two comes first
        headers[0], headers[-1] = headers[-1], headers[0]
    return headers, None, kind


@st.composite
def batches(draw) -> list[Labelled]:
    tps = draw(st.lists(st.sampled_from(PARTITIONS), min_size=1, max_size=4, unique=True))
    runs: dict[tuple[str, int], list[list[Labelled]]] = {}
    for topic, partition in tps:
        offset = draw(st.integers(0, 10**6))
        records = []
        for _ in range(draw(st.integers(1, 10))):
            headers, event_id, kind = draw(envelopes())
            records.append(Labelled(Rec(topic, partition, offset, b"{}", headers), event_id, kind))
            offset += draw(st.sampled_from([1, 1, 1, 2, 7]))  # gaps: compaction, transaction markers
        cuts = sorted(draw(st.sets(st.integers(1, len(records) - 1), max_size=3)) if len(records) > 1 else set())
        bounds = [0, *cuts, len(records)]
        runs[(topic, partition)] = [records[a:b] for a, b in zip(bounds, bounds[1:])]
    batch: list[Labelled] = []
    while runs:  # interleave the runs, keeping each partition's own order
        tp = draw(st.sampled_from(sorted(runs)))
        batch.extend(runs[tp].pop(0))
        if not runs[tp]:
            del runs[tp]
    return batch


@dataclass
class Model:
    first: list[int]
    repeats: dict[uuid.UUID, int]
    next_offsets: dict[tuple[str, int], int]
    records_per_partition: dict[tuple[str, int], int]
    invalid_per_partition: dict[tuple[str, int], int]


def model_of(batch: list[Labelled]) -> Model:
    """The reference: the obvious, slow way, from the generator's labels."""
    first, occurrences = [], {}
    next_offsets, per_partition, invalid = {}, {}, {}
    for i, lab in enumerate(batch):
        r = lab.record
        tp = (r.topic, r.partition)
        next_offsets[tp] = max(next_offsets.get(tp, 0), r.offset + 1)
        per_partition[tp] = per_partition.get(tp, 0) + 1
        if lab.event_id is None:
            invalid[tp] = invalid.get(tp, 0) + 1
            continue
        if lab.event_id not in occurrences:
            first.append(i)
        occurrences[lab.event_id] = occurrences.get(lab.event_id, 0) + 1
    repeats = {e: n - 1 for e, n in occurrences.items() if n > 1}
    return Model(first, repeats, next_offsets, per_partition, invalid)


def choose_new(data, first: list[int]) -> list[int]:
    mode = data.draw(st.sampled_from(["all", "none", "some"]))
    if mode == "all":
        return list(first)
    if mode == "none":
        return []
    keep = data.draw(st.lists(st.booleans(), min_size=len(first), max_size=len(first)))
    return [i for i, k in zip(first, keep) if k]


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(batches())
def test_plan_classifies_every_record_and_moves_every_partition_past_its_last_record(batch):
    last: dict[tuple[str, int], int] = {}  # the generator itself: offsets increase within a partition
    for lab in batch:
        tp = (lab.record.topic, lab.record.partition)
        assert lab.record.offset > last.get(tp, -1)
        last[tp] = lab.record.offset
    records = [lab.record for lab in batch]
    plan, model = plan_batch(records), model_of(batch)

    assert plan.event_ids == [lab.event_id for lab in batch]
    assert sorted(plan.invalid) == [i for i, lab in enumerate(batch) if lab.event_id is None]
    for i, why in plan.invalid.items():
        assert REASONS[batch[i].kind] in why, (batch[i], why)
    assert plan.first == model.first
    assert plan.repeats == model.repeats
    assert all(n > 0 for n in plan.repeats.values())

    assert plan.next_offsets == model.next_offsets
    assert plan.records_per_partition == model.records_per_partition
    assert sum(plan.records_per_partition.values()) == len(records)
    assert plan.invalid_per_partition(records) == model.invalid_per_partition


@SETTINGS
@given(batches(), st.data())
def test_tallies_and_suppressed_account_for_every_record_exactly_once(batch, data):
    records = [lab.record for lab in batch]
    plan, model = plan_batch(records), model_of(batch)
    new = choose_new(data, model.first)

    tallies = plan.tallies(records, new)
    assert set(tallies) == set(model.records_per_partition)
    for tp, (processed, duplicates, dead) in tallies.items():
        assert processed == sum(1 for i in new if (records[i].topic, records[i].partition) == tp)
        assert dead == model.invalid_per_partition.get(tp, 0)
        assert duplicates >= 0
        assert processed + duplicates + dead == model.records_per_partition[tp]
    assert sum(p for p, _, _ in tallies.values()) == len(new)

    valid = sum(1 for lab in batch if lab.event_id is not None)
    out = plan.suppressed(new)
    assert sum(s.count for s in out) == valid - len(new)
    assert (out == []) == (valid == len(new))
    new_set = set(new)
    expected = []
    for i in model.first:
        event_id = batch[i].event_id
        known = i not in new_set
        count = model.repeats.get(event_id, 0) + known
        if count:
            expected.append(Suppressed(event_id, count, i, known))
    assert out == expected
    assert all(s.count > 0 and plan.event_ids[s.index] == s.event_id for s in out)
    assert {s.index for s in out if s.known} == set(model.first) - new_set
