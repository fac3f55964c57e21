"""How a batch left unsettled by a crash is settled (pure part of the ledger)."""

from __future__ import annotations

from relay.checkpoint import Checkpoint, Identity
from relay.ledger import settle

ID = Identity("7300000000000000001", 1, 16384, "app", "outbox_relay", "0/1000000")


def cp(**kw) -> Checkpoint:
    return Checkpoint(identity=kw.pop("identity", ID), **kw)


def test_settle_follows_the_checkpoint_in_exactly_once_and_says_unknown_otherwise():
    assert [s for _, s, _ in settle([3, 4, 5], "exactly-once", cp(batch_id=4))] == ["committed", "committed",
                                                                                   "aborted"]
    assert [s for _, s, _ in settle([3], "at-least-once", None)] == ["unknown"]

