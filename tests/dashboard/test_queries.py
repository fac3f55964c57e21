"""dashboard.queries and dashboard.health against a database filled by the real relay and real
consumers (tests/support/dashboard.py): each page's numbers are exactly what happened, and no
search box or filter can inject SQL or fail on hostile text."""

from __future__ import annotations

import time

import pandas as pd
import psycopg
import pytest

from dashboard import health
from dashboard.db import Database
from dashboard.kafka_lag import EndOffsets
from dashboard.queries import dead_letters as q_dead_letters
from dashboard.queries import duplicates as q_duplicates
from dashboard.queries import in_flight as q_in_flight
from dashboard.queries import overview as q_overview
from dashboard.queries import trace as q_trace
from dashboard.queries import unknown as q_unknown
from outbox.core.commands import inbox_replay
from tests.support.dashboard import (
    AT_RISK_KEY,
    CHARGE_KEY,
    CRASHED_RELAY,
    GONE_RELAY,
    HOSTILE_AGGREGATE,
    KILLED_KEY,
    LIVE_KEY,
    UNICODE_AGGREGATE,
)
from tests.support.helpers import wait_for
from tests.support.relay import RelayThread, emit, query, relay_settings, wait_streaming

HOSTILE = [
    "'", "''", '"', "\\", "%", "_", "%%", "o-%", "o-_", "' OR '1'='1", "'; DROP TABLE outbox.events; --",
    "\"; DELETE FROM outbox.effects; --", "$1", "%s", "%(q)s", "{}", "ünï ✓ 注文 🚀", "\u202e", "a\x00b",
    "\ud800", "x" * 100_000, " ", "\n\t",
]


def read(database, fn, *args, **kwargs):
    with database.snapshot() as conn:
        return fn(conn, *args, **kwargs)


def test_overview_shows_the_running_relay_its_slot_and_nothing_in_flight(s, dash):
    relays = read(dash, q_overview.relays)
    assert list(zip(relays["relay_id"], relays["state"])) == [(s.relay.relay.s.relay_id, "active")]
    slots = read(dash, q_overview.slots)
    assert len(slots) == 1
    slot = slots.iloc[0]
    assert (slot.slot_name, slot.delivery, slot.slot_missing, slot.wal_status) == (
        s.slot, "at-least-once", False, "reserved")
    assert (slot.events_published, slot.events_dead_lettered) == (len(s.events) - 1, 1)
    assert slot.lag_bytes >= 0 and slot.retained_wal_bytes >= slot.lag_bytes
    assert read(dash, q_overview.in_flight_summary) == {"count": 0, "oldest_age_s": 0.0}


def test_throughput_counts_what_the_relay_published_and_each_consumer_did(s, dash):
    flow = read(dash, q_overview.throughput, 60)
    totals = flow.groupby("series")["events"].sum().to_dict()
    published = len(s.events) - 1
    assert totals == {
        "published": published, "relay dead-lettered": 1,
        # billing: the poison event and the charge with an unknown outcome were dead-lettered
        "consumed · billing": published - 2, "dead-lettered · billing": 2, "suppressed · billing": 3,
        "consumed · shipping": published, "dead-lettered · shipping": 0, "suppressed · shipping": 3,
    }
    assert flow["minute"].nunique() == 60  # every minute present: a stall is a drop, not a gap


def test_consumer_lag_is_kafka_end_offset_minus_the_stored_position(s, dash):
    positions = read(dash, q_overview.consumer_positions)
    assert set(positions["consumer"]) == {"billing", "shipping"} and set(positions["topic"]) == {s.topic}
    ends = EndOffsets(s.kafka)
    try:
        lag = q_overview.with_lag(positions, ends.fetch(list(zip(positions["topic"], positions["kafka_partition"]))))
    finally:
        ends.close()
    assert ends.error is None
    assert lag["lag"].tolist() == [0] * len(lag) and (lag["end_offset"] == lag["next_offset"]).all()
    unknown = q_overview.with_lag(positions, None)
    assert unknown["lag"].isna().all()


def test_unreachable_kafka_degrades_to_lag_unknown_within_seconds():
    ends = EndOffsets("127.0.0.1:1")
    started = time.monotonic()
    assert ends.fetch([("orders", 0)]) is None
    assert time.monotonic() - started < 15
    assert "127.0.0.1:1 did not answer" in ends.error
    started = time.monotonic()
    assert ends.fetch([("orders", 0)]) is None and time.monotonic() - started < 0.1  # no new wait per refresh
    assert "127.0.0.1:1 did not answer" in ends.error


def test_in_flight_lists_exactly_the_unpublished_events_until_the_relay_publishes_them(db, kafka, topic_prefix):
    ids = emit(db, [("order", "a-1", "OrderPlaced", {"n": 1}, {}), ("order", "a-2", "OrderPlaced", {"n": 2}, {})])
    later = emit(db, [("order", "a-1", "OrderPaid", {"n": 3}, {})])
    database = Database(db, "outbox_dashboard")
    try:
        rows = read(database, q_in_flight.in_flight)
        assert rows["event_id"].tolist() == ids + later  # oldest first
        summary = read(database, q_overview.in_flight_summary)
        assert summary["count"] == 3 and summary["oldest_age_s"] >= rows["age_s"].iloc[0] >= rows["age_s"].iloc[-1]
        with RelayThread(relay_settings(db, kafka, topic_prefix)):
            wait_streaming(db)
            wait_for(lambda: read(database, q_overview.in_flight_summary)["count"] == 0, 30, "the relay to publish")
            assert read(database, q_in_flight.in_flight).empty
    finally:
        database.close()


def test_duplicates_name_each_redelivered_event_with_its_count(s, dash):
    most = read(dash, q_duplicates.most_duplicated, None, order="count")
    got = sorted(zip(most["consumer"], most["event_id"], most["duplicates"]))
    expected = sorted((c, e, n) for c in ("billing", "shipping") for e, n in s.duplicated.items())
    assert got == expected
    assert most["duplicates"].tolist() == sorted(most["duplicates"], reverse=True)
    recent = read(dash, q_duplicates.most_duplicated, "billing", order="recent")
    assert set(recent["consumer"]) == {"billing"} and recent["last_seen"].is_monotonic_decreasing
    totals = read(dash, q_duplicates.duplicate_totals, 24).set_index("consumer")
    assert totals.loc["billing", "suppressed"] == totals.loc["shipping", "suppressed"] == 3
    # The scenario's duplicates are records produced again (what a relay replay does), not Kafka
    # redelivering the same record: tests/inbox/test_process.py covers the other cause.
    assert totals[["redelivered", "republished"]].to_dict("list") == {"redelivered": [0, 0], "republished": [3, 3]}
    assert (most["republished"] == most["duplicates"]).all() and (most["redelivered"] == 0).all()
    over_time = read(dash, q_duplicates.duplicates_over_time, 24)
    assert over_time.groupby("consumer")["suppressed"].sum().to_dict() == {"billing": 3, "shipping": 3}
    with pytest.raises(ValueError):
        read(dash, q_duplicates.most_duplicated, None, order="1; DROP TABLE x")


def test_unknown_outcomes_list_unknown_effects_first_with_their_evidence(s, dash):
    effects = read(dash, q_unknown.unresolved_effects)
    assert list(zip(effects["key"], effects["effective_status"])) == [
        (CHARGE_KEY, "unknown"), (KILLED_KEY, "unknown"), (LIVE_KEY, "in_progress"), (AT_RISK_KEY, "in_progress")]
    by_key = effects.set_index("key")
    charge = by_key.loc[CHARGE_KEY]
    assert (charge.consumer, charge.event_id, charge.attempts) == ("billing", s.events["charge"], 1)
    assert "no answer from the provider" in charge.last_error
    assert [e["what"] for e in charge.evidence] == ["lease", "indeterminate"]
    killed = by_key.loc[KILLED_KEY]
    assert (killed.status, bool(killed.lease_expired), killed.lease_owner) == ("in_progress", True, "doomed-worker")
    assert by_key.loc[AT_RISK_KEY, "at_risk"] and not by_key.loc[LIVE_KEY, "at_risk"]
    assert '"amount": 2500' in charge.request


def test_relay_batches_with_an_unknown_outcome_and_those_of_a_gone_relay(s, dash):
    batches = read(dash, q_unknown.relay_batches_at_risk)
    assert sorted(zip(batches["relay_id"], batches["status"])) == [
        (CRASHED_RELAY, "unknown"), (GONE_RELAY, "in flight, relay gone")]
    crashed = batches[batches["relay_id"] == CRASHED_RELAY].iloc[0]
    assert "replayed from the slot" in crashed.resolution  # written by the real relay when it settled it


def test_dead_letters_carry_their_reason_and_the_documented_command(s, dash):
    relay = read(dash, q_dead_letters.relay_dead_letters)
    assert relay["event_id"].tolist() == [s.events["too_big"]]
    assert relay["replay_command"].tolist() == [f"outbox dead-letters replay {relay['id'][0]}"]
    assert relay["reason"].tolist() == ["oversize"] and "OUTBOX_MAX_RECORD_BYTES" in relay["error"][0]
    inbox = read(dash, q_dead_letters.inbox_dead_letters)
    assert sorted(inbox["event_id"]) == sorted([s.events["poison"], s.events["charge"]])
    assert inbox["command"].tolist() == [inbox_replay("billing", i) for i in inbox["id"]]
    assert set(inbox["reason"]) == {"handler_failed"}
    reasons = read(dash, q_dead_letters.dead_letter_reasons)
    assert reasons[["source", "open"]].values.tolist() == [["inbox · billing", 2], ["relay", 1]]
    assert read(dash, q_dead_letters.inbox_dead_letters, consumer="shipping").empty


def test_trace_of_an_event_follows_it_through_kafka_to_each_consumer_and_its_effect(s, dash):
    t = read(dash, q_trace.trace, s.events["charge"])
    assert t.found and not t.in_flight
    assert t.event[["aggregate_id", "event_type"]].values.tolist() == [["o-pay", "PaymentRequested"]]
    assert t.deliveries[["topic"]].values.tolist() == [[s.topic]]
    assert t.inbox[["consumer", "status"]].values.tolist() == [["billing", "dead_lettered"],
                                                                 ["shipping", "processed"]]
    assert t.effects["key"].tolist() == [CHARGE_KEY]
    assert t.inbox_dead_letters["consumer"].tolist() == ["billing"] and t.relay_dead_letters.empty
    dup = read(dash, q_trace.trace, s.events["o-1/OrderPlaced"])
    assert dict(zip(dup.inbox["consumer"], dup.inbox["suppressed_duplicates"])) == {"billing": 2, "shipping": 2}
    big = read(dash, q_trace.trace, s.events["too_big"])
    assert big.deliveries.empty and big.inbox.empty and big.relay_dead_letters["reason"].tolist() == ["oversize"]


def test_find_events_by_aggregate_id_is_exact_across_aggregate_types(s, dash):
    found = read(dash, q_trace.find_events, "o-1")
    assert sorted(found["event_id"]) == sorted([s.events["o-1/OrderPlaced"], s.events["o-1/OrderPaid"]])
    assert read(dash, q_trace.find_events, "o-")["event_id"].tolist() == []  # no prefix matching
    assert read(dash, q_trace.find_events, s.events["poison"])["event_id"].tolist() == [s.events["poison"]]
    assert read(dash, q_trace.find_events, f"  {UNICODE_AGGREGATE} ")["event_id"].tolist() == [s.events["unicode"]]
    assert read(dash, q_trace.find_events, HOSTILE_AGGREGATE)["event_id"].tolist() == [s.events["hostile"]]
    unknown = read(dash, q_trace.trace, "00000000-0000-7000-8000-000000000000")
    assert not unknown.found


def test_hostile_input_in_every_search_box_and_filter_neither_fails_nor_injects(s, dash):
    before = query(s.db, "SELECT (SELECT count(*) FROM outbox.events), (SELECT count(*) FROM outbox.effects), "
                         "(SELECT count(*) FROM outbox.inbox_messages)")
    all_relay = read(dash, q_dead_letters.relay_dead_letters, include_replayed=True)
    all_inbox = read(dash, q_dead_letters.inbox_dead_letters, include_resolved=True)
    for text in HOSTILE:
        assert read(dash, q_trace.find_events, text).empty, repr(text[:40])
        for consumer in (text, None):
            assert read(dash, q_duplicates.most_duplicated, text, order="count").empty
            got = read(dash, q_dead_letters.inbox_dead_letters, consumer=consumer, search=text, include_resolved=True)
            expected = [] if consumer is not None else _literal(all_inbox, text)
            assert sorted(got["id"]) == expected, repr(text[:40])
        got = read(dash, q_dead_letters.relay_dead_letters, search=text, include_replayed=True)
        assert sorted(got["id"]) == _literal(all_relay, text), repr(text[:40])
    assert query(s.db, "SELECT (SELECT count(*) FROM outbox.events), (SELECT count(*) FROM outbox.effects), "
                       "(SELECT count(*) FROM outbox.inbox_messages)") == before


def _literal(df: pd.DataFrame, text: str) -> list[int]:
    """Rows a literal, case-insensitive substring search must return (no wildcards)."""
    needle = text.strip().lower()
    if "\x00" in needle:
        return []
    cols = [c for c in ("consumer", "reason", "error", "event_id", "event_type", "aggregate_type", "aggregate_id",
                        "topic") if c in df.columns]
    hay = df[cols].astype(str).where(df[cols].notna(), "").agg(" ".join, axis=1).str.lower()
    return sorted(int(i) for i, h in zip(df["id"], hay) if needle in h)


def test_health_rules_on_the_scenario(s, dash):
    ends = EndOffsets(s.kafka)
    try:
        with dash.snapshot() as conn:
            snap = q_overview.health_snapshot(conn)
        q_overview.with_kafka_lag(snap, ends)
    finally:
        ends.close()
    findings = health.assess(snap)
    attention = sorted(f.text for f in findings if f.level == "attention")
    assert attention == sorted([
        "1 open dead letters (relay, oversize)",
        "2 effects with an unknown outcome need a decision",
        "2 open dead letters (inbox · billing, handler_failed)",
        "1 relay batches are in flight from a relay that is gone: start a relay to settle them",
    ])
    info = [f.text for f in findings if f.level == "info"]
    assert "1 effects in progress past half their lease" in info
    assert any(t.startswith("1 relay batches had an unknown outcome at a crash") for t in info)
    assert health.needs_attention(findings)


def test_the_dashboard_role_reads_in_a_read_only_snapshot(s, dash):
    with dash.snapshot() as conn:
        assert conn.execute("SELECT current_user, current_setting('transaction_read_only'), "
                            "current_setting('transaction_isolation')").fetchone() == (
            "outbox_dashboard", "on", "repeatable read")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("SELECT outbox.resolve_effect('k', 'failed', 'r', 'o')")
