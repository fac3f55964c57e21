"""The exactly-once checkpoint and its identity: which checkpoint may be used where (pure)."""

from __future__ import annotations

from relay.checkpoint import Checkpoint, Identity, mismatch

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

