"""Unit tests of the relay's pure parts: checkpoint identity, settling, stall rule, router, frames."""

from __future__ import annotations

import pytest

from relay.bookkeeper import Bookkeeper
from relay.checkpoint import Checkpoint, Identity, mismatch
from relay.ledger import settle
from relay.pgoutput import Column, Relation
from relay.replication import Keepalive, XLogData, parse_frame, parse_timeline_history, status_update
from relay.router import Layout, Router, RouteError, SchemaError, Txn

ID = Identity("7300000000000000001", 1, 16384, "app", "outbox_relay", "0/1000000")


def cp(**kw) -> Checkpoint:
    return Checkpoint(identity=kw.pop("identity", ID), **kw)


def test_checkpoint_round_trips_through_json_with_its_identity_and_dead_letters():
    c = cp(commit_lsn=5, partial_commit_lsn=9, partial_events=3, batch_id=7, backfill_snapshot="1:2:",
           backfill_after=("t", "e"), dead=(("e1", "oversize", "too big"),))
    assert Checkpoint.from_json(c.to_json()) == c


def test_checkpoint_of_another_server_database_or_slot_is_refused():
    for other in (Identity("7300000000000000002", 1, 16384, "app", "outbox_relay"),
                  Identity(ID.system_identifier, 1, 16385, "app", "outbox_relay"),
                  Identity(ID.system_identifier, 1, 16384, "app", "other")):
        why = mismatch(cp(commit_lsn=10), other, history={}, wal_lsn=100, batch_known=True)
        assert why is not None


def test_checkpoint_without_identity_is_never_used():
    assert "no identity" in mismatch(Checkpoint(commit_lsn=10), ID, history={}, wal_lsn=100, batch_known=True)


def test_checkpoint_ahead_of_the_server_or_of_its_batches_is_refused_on_the_same_timeline():
    assert "restored from an older copy" in mismatch(cp(commit_lsn=500), ID, history={}, wal_lsn=100,
                                                    batch_known=True)
    assert "not in outbox.relay_batches" in mismatch(cp(commit_lsn=50, batch_id=3), ID, history={}, wal_lsn=100,
                                                     batch_known=False)
    assert mismatch(cp(commit_lsn=50, batch_id=3), ID, history={}, wal_lsn=100, batch_known=True) is None


def test_checkpoint_of_an_earlier_timeline_is_used_only_below_the_fork():
    promoted = Identity(ID.system_identifier, 2, 16384, "app", "outbox_relay", "0/1000000")
    assert mismatch(cp(commit_lsn=50), promoted, history={1: 60}, wal_lsn=100, batch_known=False) is None
    assert "left that timeline" in mismatch(cp(commit_lsn=70), promoted, history={1: 60}, wal_lsn=100,
                                            batch_known=True)
    assert "not an ancestor" in mismatch(cp(commit_lsn=50), promoted, history={}, wal_lsn=100, batch_known=True)


def test_timeline_history_file_is_parsed():
    assert parse_timeline_history("1\t0/3000148\tno recovery target specified\n2\t1/A0\tx\n") == {
        1: 0x3000148, 2: (1 << 32) | 0xA0}


def test_settle_follows_the_checkpoint_in_exactly_once_and_says_unknown_otherwise():
    assert [s for _, s, _ in settle([3, 4, 5], "exactly-once", cp(batch_id=4))] == ["committed", "committed",
                                                                                   "aborted"]
    assert [s for _, s, _ in settle([3], "at-least-once", None)] == ["unknown"]


def test_stall_rule_fires_only_when_work_waits_without_acknowledgement():
    bk = Bookkeeper(exactly_once=False, batch_max_events=10, batch_max_bytes=10**6, batch_max_age_s=1,
                    max_inflight_events=100, max_inflight_bytes=10**6, confirmed=0, now=0.0)
    assert not bk.stalled(1000.0, 60)
    bk.begin(10, 0)
    bk.unroutable(b"e", b"1", (), "x", "y", now=5.0)
    assert not bk.stalled(60.0, 60) and bk.stalled(66.0, 60)


def relation(*names: str) -> Relation:
    return Relation(1, "outbox", "events", "d", tuple(Column(0, n, 25, -1) for n in names))


ALL = ("event_id", "aggregate_type", "aggregate_id", "event_type", "payload", "headers", "created_at", "txid")


def test_layout_without_a_routing_column_dead_letters_and_without_event_id_stops():
    layout = Layout.of(relation(*[c for c in ALL if c != "event_type"]))
    assert layout.missing == ("event_type",)
    with pytest.raises(RouteError) as err:
        Router("t.{aggregate_type}").route(layout, (b"id", b"order", b"1", b"{}", b"{}", b"now", b"5"), Txn.of(1, 0))
    assert err.value.reason == "schema" and "event_type" in str(err.value)
    with pytest.raises(SchemaError, match="no event_id column"):
        Layout.of(relation(*ALL[1:]))


@pytest.mark.parametrize("column", ["aggregate_type", "aggregate_id", "event_type", "payload"])
def test_text_that_is_not_utf8_is_refused_by_the_router_with_the_column(column):
    layout = Layout.of(relation(*ALL))
    row = dict(zip(ALL, (b"id", b"order", b"1", b"Placed", b'{"a": 1}', b"{}", b"now", b"5")))
    row[column] = b"\xff\xfe" + row[column]
    with pytest.raises(RouteError) as err:
        Router("t.{aggregate_type}").route(layout, tuple(row.values()), Txn.of(1, 0))
    assert err.value.reason == "invalid_encoding" and column in str(err.value)


def test_replication_frames_parse():
    frame = b"w" + (5).to_bytes(8, "big") + (9).to_bytes(8, "big") + (7).to_bytes(8, "big") + b"B..."
    assert parse_frame(frame) == XLogData(5, 9, 7, b"B...")
    assert parse_frame(b"k" + (9).to_bytes(8, "big") + (7).to_bytes(8, "big") + b"\x01") == Keepalive(9, 7, True)
    status = status_update(10, 8, 8)
    assert status[:1] == b"r" and int.from_bytes(status[9:17], "big") == 8
