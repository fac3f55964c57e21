"""The inbox's pure parts: batch planning, backoff, dead-letter encoding, effect rules."""

from __future__ import annotations

import random
import uuid
from decimal import Decimal

import pytest

from inbox import codec
from inbox.effect_rules import Decision, Existing, canonical_json, decide, fingerprint
from inbox.errors import InboxError
from inbox.plan import plan_batch
from inbox.retry import RetryPolicy

from .inbox_support import Rec, headers_for

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
    assert plan.suppressed([0, 1, 3]) == {A: 2, B: 1}
    # A was already in the inbox: all three of its deliveries are duplicates.
    assert plan.suppressed([1, 3]) == {A: 3, B: 1}
    assert plan.tallies(records, [1, 3]) == {("t", 0): (1, 3, 0), ("t", 1): (1, 1, 0)}


def test_plan_without_duplicates_suppresses_nothing():
    plan = plan_batch([rec(0, A), rec(1, B)])
    assert plan.suppressed([0, 1]) == {}
    assert plan.tallies([rec(0, A), rec(1, B)], [0, 1]) == {("t", 0): (2, 0, 0)}


@pytest.mark.parametrize(("headers", "reason"), [
    ([("traceparent", b"00-x")], "no event_id header"),
    ([("event_id", b"not-a-uuid")], "is not a UUID"),
    ([("event_id", b"\xff\xfe")], "is not a UUID"),
    ([("event_id", str(A).encode()), ("event_id", str(B).encode())], "more than one event_id header"),
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


def test_backoff_doubles_up_to_the_cap_and_jitter_only_shortens():
    policy = RetryPolicy(max_attempts=6, backoff_initial_s=0.5, backoff_max_s=3.0, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.worst_case_wait() == 9.5
    jittered = RetryPolicy(max_attempts=6, backoff_initial_s=0.5, backoff_max_s=3.0, jitter=0.2)
    rand = random.Random(7)
    for n in range(1, 6):
        assert 0.8 * policy.delay(n) <= jittered.delay(n, rand) <= policy.delay(n)


def test_retry_policy_refuses_retries_longer_than_the_poll_budget():
    policy = RetryPolicy(max_attempts=10, backoff_initial_s=1, backoff_max_s=60)
    with pytest.raises(InboxError, match=r"sleeps up to 243\.0 s .* allows 150\.0 s.*OUTBOX_INBOX_MAX_ATTEMPTS"):
        policy.check_fits(150, "half of max_poll_interval_ms")
    RetryPolicy().check_fits(150, "x")  # the defaults fit the default budget
    with pytest.raises(InboxError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(InboxError):
        RetryPolicy(backoff_initial_s=5, backoff_max_s=1)


def test_headers_round_trip_exactly_and_stay_readable():
    headers = [("event_id", str(A).encode()), ("bin", b"\xff\x00\x01"), ("empty", b""), ("event_id", b"x")]
    doc = codec.headers_to_json(headers)
    assert doc[0] == {"name": "event_id", "value": str(A)}
    assert doc[1] == {"name": "bin", "base64": "/wAB"}
    assert codec.headers_from_json(doc) == headers
    with pytest.raises(ValueError, match="not valid"):
        codec.headers_from_json([{"name": "x", "base64": "%%%"}])


def test_payload_json_and_errors_are_safe_to_store():
    assert codec.payload_json(b'{"a": 1}') == {"a": 1}
    assert codec.payload_json(b"\xff not json") is None
    assert codec.payload_json(None) is None
    exc = RuntimeError("connect to postgresql://app:hunter2@db/app failed\nsecond line")
    assert codec.describe_error(exc) == "RuntimeError: connect to postgresql://app:***@db/app failed second line"
    try:
        raise exc
    except RuntimeError as caught:
        detail = codec.error_detail(caught)
    assert "hunter2" not in detail and "Traceback" in detail


def test_fingerprint_ignores_key_order_and_spacing_but_not_values():
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert fingerprint({"amount": 25, "currency": "EUR"}) == fingerprint({"currency": "EUR", "amount": 25})
    assert fingerprint({"amount": 25}) != fingerprint({"amount": 26})
    assert fingerprint({"id": A, "amount": Decimal("2.50")}) == fingerprint({"id": str(A), "amount": "2.50"})


@pytest.mark.parametrize(("status", "expired", "same", "expected"), [
    ("succeeded", False, True, Decision.REPLAY),
    ("failed", False, True, Decision.REPLAY),
    ("in_progress", False, True, Decision.IN_PROGRESS),
    ("in_progress", True, True, Decision.EXPIRED),
    ("unknown", False, True, Decision.UNKNOWN),
    ("succeeded", False, False, Decision.MISMATCH),
    ("in_progress", False, False, Decision.MISMATCH),
    ("unknown", False, False, Decision.MISMATCH),
])
def test_effect_decisions(status, expired, same, expected):
    assert decide(Existing("fp", status, expired), "fp" if same else "other") is expected


def test_dedupe_window_check_refuses_short_or_unreadable_horizons_and_warns_on_a_thin_margin(caplog):
    import math

    from inbox.horizon import DAY_S, check_window

    check_window("c", 10 * DAY_S, {"a": 7 * DAY_S}, allow_short=False)  # 3 days to spare: silent
    assert caplog.records == []
    check_window("c", 7 * DAY_S, {"a": 7 * DAY_S}, allow_short=False)  # covered, but no margin
    assert "less than 2 days to spare" in caplog.text and "OUTBOX_INBOX_RETENTION_DAYS=9" in caplog.text
    with pytest.raises(InboxError) as err:
        check_window("c", 7 * DAY_S, {"a": 7 * DAY_S + 1, "b": math.inf, "c": "its configuration could not be read"},
                     allow_short=False)
    text = str(err.value)
    assert "topic a keeps records for 7.00001 days" in text and "OUTBOX_INBOX_RETENTION_DAYS=10" in text
    assert "topic b keeps records forever" in text and "topic c: its configuration could not be read" in text
    caplog.clear()
    check_window("c", 3600, {"a": DAY_S}, allow_short=True)
    assert "STARTING ANYWAY" in caplog.text and "inbox retention, 1 hour" in caplog.text


def test_handlers_refuse_ambiguous_registrations_and_only_their_own_validation_is_final():
    from pydantic import BaseModel, ValidationError

    from inbox import Handlers, Message, NonRetryable, PayloadInvalid

    class Ping(BaseModel):
        n: int

    with pytest.raises(InboxError, match="unknown='drop'"):
        Handlers(unknown="drop")
    handlers = Handlers()
    handlers.on("Ping", Ping)(lambda conn, msg, ping: Ping.model_validate({"n": "not a number"}))
    with pytest.raises(InboxError, match="already has a handler"):
        handlers.on("Ping")(lambda conn, msg: None)
    with pytest.raises(InboxError, match="already has a handler"):
        handlers.ignore("Ping")

    def message(value):
        return Message(Rec("t", 0, 0, value, headers_for(A, event_type="Ping")), A, "c")

    with pytest.raises(PayloadInvalid, match="n: Input should be a valid integer") as err:
        handlers(None, message(b'{"n": "x"}'))
    assert isinstance(err.value, NonRetryable)
    with pytest.raises(PayloadInvalid, match="tombstone"):
        handlers(None, message(None))
    with pytest.raises(ValidationError) as inner:  # raised by the function itself: retried like any error
        handlers(None, message(b'{"n": 1}'))
    assert not isinstance(inner.value, NonRetryable)
