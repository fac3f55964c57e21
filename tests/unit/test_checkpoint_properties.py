"""Property tests of the exactly-once checkpoint (relay/checkpoint.py) over random values, no servers.

The checkpoint travels inside each Kafka transaction as JSON, and `mismatch()` decides whether one
may be used to skip anything on the server the relay is connected to. Over arbitrary identities,
positions, histories and WAL positions:

- `Identity` and `Checkpoint` survive to_json -> json.dumps -> json.loads -> from_json unchanged;
- a checkpoint without an identity, or of another system identifier, database oid or slot, is
  refused whatever the positions, history, WAL position and batch;
- on the checkpoint's own timeline it is used iff max(positions) <= the WAL position and either it
  names no batch (batch_id 0) or relay_batches holds that batch;
- on another timeline it is used iff its timeline is an ancestor in `history` and max(positions) is
  below the LSN where the server's history left that timeline (the WAL position and batch then do
  not matter);
- the database name and the slot's creation LSN do not enter into it (the daemon compares those).
"""

from __future__ import annotations

import json
from dataclasses import replace

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.checkpoint import Checkpoint, Identity, mismatch

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LSN_MAX = 2**64 - 1
# Mostly small LSNs so positions, the WAL position and fork points often coincide; now and then any.
lsns = st.one_of(st.integers(0, 12), st.integers(0, LSN_MAX))
timelines = st.integers(1, 4)
texts = st.text(max_size=12)  # any text, lone surrogates included: JSON escapes them


def identities(system_identifier=st.sampled_from(["7300000000000000001", "7300000000000000002"]),
               database_oid=st.sampled_from([16384, 16385]), slot=st.sampled_from(["outbox_relay", "other"]),
               timeline=timelines, database=st.sampled_from(["app", "app2"]),
               slot_created_lsn=st.sampled_from(["", "0/1000000", "16/B374D848"])):
    return st.builds(Identity, system_identifier, timeline, database_oid, database, slot, slot_created_lsn)


any_identity = identities(texts, st.integers(0, 2**32 - 1), texts, st.integers(1, 2**32 - 1), texts, texts)


def checkpoints(identity):
    return st.builds(Checkpoint, identity=identity, commit_lsn=lsns, partial_commit_lsn=lsns,
                     partial_events=st.integers(0, 10**6), batch_id=st.one_of(st.just(0), st.integers(1, 2**63 - 1)),
                     backfill_snapshot=texts, backfill_after=st.none() | st.tuples(texts, texts),
                     dead=st.lists(st.tuples(texts, texts, texts), max_size=3).map(tuple))


histories = st.dictionaries(timelines, lsns, max_size=4)


def via_json(doc: dict) -> dict:
    return json.loads(json.dumps(doc))


@SETTINGS
@given(any_identity)
def test_identity_round_trips_through_json(identity):
    assert Identity.from_json(via_json(identity.to_json())) == identity


@SETTINGS
@given(checkpoints(st.none() | any_identity))
def test_checkpoint_round_trips_through_json(checkpoint):
    assert Checkpoint.from_json(via_json(checkpoint.to_json())) == checkpoint


def test_no_checkpoint_reads_as_the_empty_checkpoint():
    assert Checkpoint.from_json(None) == Checkpoint.from_json({}) == Checkpoint()
    assert Checkpoint.from_json(via_json(Checkpoint().to_json())) == Checkpoint()


@SETTINGS
@given(checkpoints(identities()), identities(), histories, lsns, st.booleans())
def test_checkpoint_of_another_server_database_or_slot_is_never_used(checkpoint, current, history, wal_lsn,
                                                                     batch_known):
    cp = checkpoint.identity
    why = mismatch(checkpoint, current, history=history, wal_lsn=wal_lsn, batch_known=batch_known)
    if (cp.system_identifier, cp.database_oid, cp.slot) != (current.system_identifier, current.database_oid,
                                                            current.slot):
        assert why is not None
    assert mismatch(replace(checkpoint, identity=None), current, history=history, wal_lsn=wal_lsn,
                    batch_known=batch_known) is not None


def near(lsn: int):
    """An LSN either side of `lsn`, or any: the boundaries are where a wrong comparison shows."""
    return st.one_of(st.integers(-2, 2).map(lambda d: min(max(lsn + d, 0), LSN_MAX)), lsns)


@st.composite
def same_deployment(draw):
    """A checkpoint, the identity of the server now (same system, database oid and slot; the
    timeline, database name and slot creation as they come), its history and WAL position, the
    latter two often right at the checkpoint's highest position."""
    checkpoint = draw(checkpoints(identities()))
    cp = checkpoint.identity
    top = max(checkpoint.positions)
    current = draw(identities(st.just(cp.system_identifier), st.just(cp.database_oid), st.just(cp.slot),
                              timeline=st.one_of(st.just(cp.timeline), timelines)))
    history = draw(histories)
    if draw(st.booleans()):  # the checkpoint's timeline is an ancestor, forked near its position
        history[cp.timeline] = draw(near(top))
    return checkpoint, current, history, draw(near(top))


ID = Identity("7300000000000000001", 1, 16384, "app", "outbox_relay", "0/1000000")
PROMOTED = replace(ID, timeline=2)


@SETTINGS
@given(same_deployment(), st.booleans())
@example((Checkpoint(ID, commit_lsn=100, batch_id=3), ID, {}, 100), True)  # right at the WAL position
@example((Checkpoint(ID, commit_lsn=100, partial_commit_lsn=101), ID, {}, 100), True)  # one past it
@example((Checkpoint(ID, commit_lsn=59), PROMOTED, {1: 60}, 0), False)  # just below the fork
@example((Checkpoint(ID, commit_lsn=50, partial_commit_lsn=60), PROMOTED, {1: 60}, 100), True)  # at the fork
def test_checkpoint_is_used_exactly_when_its_history_is_this_servers(case, batch_known):
    checkpoint, current, history, wal_lsn = case
    cp = checkpoint.identity
    top = max(checkpoint.commit_lsn, checkpoint.partial_commit_lsn)
    if cp.timeline == current.timeline:
        usable = top <= wal_lsn and (checkpoint.batch_id == 0 or batch_known)
    else:
        usable = cp.timeline in history and top < history[cp.timeline]
    why = mismatch(checkpoint, current, history=history, wal_lsn=wal_lsn, batch_known=batch_known)
    assert (why is None) == usable, why
    # Neither the database name nor the slot's creation LSN changes the verdict.
    other = replace(current, database=current.database + "x", slot_created_lsn="FF/0")
    assert (mismatch(checkpoint, other, history=history, wal_lsn=wal_lsn, batch_known=batch_known) is None) == usable
