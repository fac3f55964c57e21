"""Planning a polled batch: repeats inside it, partition ends, records without an event id (pure)."""

from __future__ import annotations

import uuid

import pytest

from inbox.plan import Suppressed, plan_batch
from tests.support.inbox import Rec, headers_for

A, B, C = (uuid.UUID(int=i) for i in (1, 2, 3))


def rec(offset, event_id, partition=0, topic="t"):
    headers = headers_for(event_id) if event_id is not None else [("traceparent", b"00-x")]
    return Rec(topic, partition, offset, b"{}", headers)



def test_plan_marks_repeats_inside_the_batch_and_partition_ends():
    records = [rec(10, A), rec(11, B), rec(12, A), rec(5, C, partition=1), rec(13, A), rec(6, B, partition=1)]
    plan = plan_batch(records)
    assert plan.first == [0, 1, 3]
    assert plan.repeats == {A: 2, B: 1}
    assert plan.next_offsets == {("t", 0): 14, ("t", 1): 7}
    assert plan.records_per_partition == {("t", 0): 4, ("t", 1): 2}
    # All first occurrences new: only the in-batch repeats are suppressed.
    assert plan.suppressed([0, 1, 3]) == [Suppressed(A, 2, 0, False), Suppressed(B, 1, 1, False)]
    # A was already in the inbox: all three of its deliveries are duplicates.
    assert plan.suppressed([1, 3]) == [Suppressed(A, 3, 0, True), Suppressed(B, 1, 1, False)]
    assert plan.tallies(records, [1, 3]) == {("t", 0): (1, 3, 0), ("t", 1): (1, 1, 0)}


def test_plan_without_duplicates_suppresses_nothing():
    plan = plan_batch([rec(0, A), rec(1, B)])
    assert plan.suppressed([0, 1]) == []
    assert plan.tallies([rec(0, A), rec(1, B)], [0, 1]) == {("t", 0): (2, 0, 0)}


@pytest.mark.parametrize(("headers", "reason"), [
    ([("traceparent", b"00-x")], "no event_id header"),
    ([("event_id", b"not-a-uuid")], "is not a UUID"),
    ([("event_id", b"\xff\xfe")], "is not a UUID"),
    ([("event_id", str(A).encode()), ("event_id", str(B).encode())], "more than one event_id header"),
    # A header without a value counts as one, whichever comes first.
    ([("event_id", None), ("event_id", str(A).encode())], "more than one event_id header"),
    ([("event_id", str(A).encode()), ("event_id", None)], "more than one event_id header"),
    ([("event_id", None)], "event_id header None is not a UUID"),
    (None, "no event_id header"),
])
def test_plan_sets_aside_records_without_a_valid_event_id(headers, reason):
    records = [rec(0, A), Rec("t", 0, 1, b"{}", headers), rec(2, B)]
    plan = plan_batch(records)
    assert plan.first == [0, 2]
    assert reason in plan.invalid[1]
    assert plan.event_ids[1] is None
    assert plan.next_offsets == {("t", 0): 3}  # the partition still moves past it
    assert plan.tallies(records, [0, 2]) == {("t", 0): (2, 0, 1)}

