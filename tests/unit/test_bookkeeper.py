"""Property tests of the relay's bookkeeping state machine (relay/bookkeeper.py), no servers.

A simulated world plays PostgreSQL (a WAL of transactions, the slot's confirmed position, the
relay_batches and dead-letter tables) and Kafka (acknowledged records, transactions, the
checkpoint). Relay sessions perform the Bookkeeper's actions against it the way relay/pipeline.py
does, and die (kill -9) at random points between any two steps, or restart after a transient
Kafka failure. Over random transaction shapes, settings, outcomes and crash points:

- the confirmed LSN never passes an event that is neither in Kafka nor durably dead-lettered;
- at the end every event is in Kafka or dead-lettered; in exactly-once mode exactly once, never both;
- no input stalls: the last session finishes every transaction within a bounded number of steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.bookkeeper import CLOSE, OPEN, PERSIST, SEND, Bookkeeper, Failure, Restart
from relay.checkpoint import Checkpoint
from relay.ledger import settle

KINDS = ("ok", "ok", "ok", "ok", "route", "refuse", "async")  # async: the broker rejects it, permanently


@dataclass
class Ev:
    id: bytes
    kind: str


@dataclass
class Tx:
    final_lsn: int
    end_lsn: int
    txid: bytes
    events: list[Ev]


@dataclass
class Rec:
    size: int = 10


class Crash(Exception):
    pass


class Handle:
    __slots__ = ("ev", "exception", "is_done", "failure")

    def __init__(self, ev: Ev):
        self.ev, self.exception, self.is_done, self.failure = ev, None, False, None

    def resolve(self, transient: bool) -> None:
        self.is_done = True
        if self.ev.kind == "async":
            self.failure = Failure(True, "authorization", "not authorised")
        elif transient:
            self.failure = Failure(False, "transient", "broker gone")
        if self.failure:
            self.exception = RuntimeError(self.failure.message)


@dataclass
class World:
    wal: list[Tx]
    eos: bool
    confirmed: int = 0
    kafka: list[bytes] = field(default_factory=list)  # what a (read_committed) reader sees
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    batches: dict[int, str] = field(default_factory=dict)
    dead: list[tuple[bytes, int]] = field(default_factory=list)  # (event id, batch id)
    next_batch: int = 1

    def durable(self) -> set[bytes]:
        ok = {b for b, status in self.batches.items() if status in ("acked", "committed")}
        return set(self.kafka) | {e for e, b in self.dead if b in ok}

    def check_confirmed(self) -> None:
        durable = self.durable()
        for tx in self.wal:
            if tx.end_lsn <= self.confirmed:
                lost = [e.id for e in tx.events if e.id not in durable]
                assert not lost, f"confirmed {self.confirmed} passed events {lost} of tx ending {tx.end_lsn}"


class Session:
    """One relay session: performs the Bookkeeper's actions on the world, like Pipeline does."""

    def __init__(self, world: World, cfg: dict, rnd: random.Random, crash_at: int | None, poison: dict,
                 transient: float):
        self.w, self.rnd, self.crash_at, self.transient = world, rnd, crash_at, transient
        self.steps = 0
        self.now = 0.0
        for batch_id, status, _ in settle(sorted(b for b, s in world.batches.items() if s == "in_flight"),
                                          "exactly-once" if world.eos else "at-least-once",
                                          world.checkpoint if world.eos else None):
            world.batches[batch_id] = status
            if status == "aborted":
                world.dead = [(e, b) for e, b in world.dead if b != batch_id]
        self.bk = Bookkeeper(exactly_once=world.eos, batch_max_events=cfg["batch_events"], batch_max_bytes=10_000,
                             batch_max_age_s=cfg["batch_age"], max_inflight_events=cfg["inflight"],
                             max_inflight_bytes=10_000, confirmed=world.confirmed, now=0.0,
                             checkpoint=world.checkpoint if world.eos else None, poison=poison)
        self.kafka_txn: list[bytes] = []
        self.ledger: list = []  # PERSIST actions not yet written

    def step(self) -> None:
        self.steps += 1
        if self.crash_at is not None and self.steps >= self.crash_at:
            raise Crash()

    def run(self) -> None:
        bk, w = self.bk, self.w
        for tx in [t for t in w.wal if t.end_lsn > w.confirmed]:
            bk.begin(tx.final_lsn, 0)
            for ev in tx.events:
                if bk.skip_event():
                    continue
                if ev.kind == "route":
                    bk.unroutable(ev.id, tx.txid, (ev,), "invalid_topic", "bad", self.now)
                else:
                    bk.event(ev.id, tx.txid, (ev,), Rec(), self.now)
                if self.rnd.random() < 0.3 or bk.saturated:
                    self.perform()
                for _ in range(100):
                    if not bk.saturated:
                        break
                    self.outcomes(all_of_them=True)
                else:
                    raise AssertionError("stalled: saturated, and no outcome can release the budget")
            self.now += self.rnd.choice((0.0, 0.5, 1.0))
            bk.commit(tx.final_lsn, tx.end_lsn, self.now)
            self.perform()
            bk.tick(self.now)
            self.perform()
            if self.rnd.random() < 0.5:
                self.outcomes(all_of_them=self.rnd.random() < 0.5)
            if self.rnd.random() < 0.3:
                bk.keepalive(tx.end_lsn + 1)
        bk.close()
        self.perform()
        for _ in range(1000):
            if not bk.queue:
                break
            self.outcomes(all_of_them=True)
        assert not bk.queue, "the session could not finish: stalled"
        w.confirmed = bk.confirmed
        assert bk.confirmed >= w.wal[-1].end_lsn

    def perform(self) -> None:
        bk, w = self.bk, self.w
        while bk.actions:
            actions, bk.actions = bk.actions, []
            for action in actions:
                self.step()
                kind, batch = action[0], action[1]
                if kind is OPEN:
                    batch.batch_id = w.next_batch
                    w.next_batch += 1
                    w.batches[batch.batch_id] = "in_flight"
                    self.kafka_txn = []
                elif kind is SEND:
                    i = action[2]
                    ev = batch.rows[i][0]
                    if ev.kind == "refuse":
                        h = Handle(ev)
                        h.is_done, h.failure = True, Failure(True, "oversize", "too large", refused=True)
                        h.exception = RuntimeError("too large")
                    else:
                        h = Handle(ev)
                    batch.handles[i] = h
                elif kind is CLOSE and w.eos:
                    for h in batch.handles:  # flush
                        if not h.is_done:
                            h.resolve(False)
                    self.step()
                    failures = [(i, h.failure) for i, h in enumerate(batch.handles) if h.exception is not None]
                    bk.records_done(batch, failures)  # Restart propagates: the transaction is aborted
                    if any(not f.refused for _, f in failures):
                        raise Restart("Kafka refuses to commit a transaction with a failed record")
                    checkpoint = bk.checkpoint_for(batch)
                    w.dead.extend((d.event_id, batch.batch_id) for d in batch.dead)  # prepare_batch
                    self.step()
                    w.kafka.extend(e for e, h in zip(batch.event_ids, batch.handles) if h.exception is None)
                    w.checkpoint = checkpoint
                    self.step()
                    bk.committed(batch, checkpoint)
                elif kind is CLOSE and not batch.event_ids:
                    bk.records_done(batch, [])
                elif kind is PERSIST:
                    self.ledger.append(batch)
        if self.rnd.random() < 0.7:
            self.write_ledger()
        w.confirmed = bk.confirmed  # the status update to PostgreSQL
        w.check_confirmed()

    def outcomes(self, all_of_them: bool) -> None:
        bk = self.bk
        if not self.w.eos:
            for batch in list(bk.awaiting_kafka()):
                for h in batch.handles:
                    if not h.is_done and (all_of_them or self.rnd.random() < 0.5):
                        h.resolve(self.rnd.random() < self.transient)
                        if h.exception is None:
                            self.w.kafka.append(h.ev.id)  # acknowledged by Kafka
                if all(h.is_done for h in batch.handles):
                    self.step()
                    failures = [(i, h.failure) for i, h in enumerate(batch.handles) if h.exception is not None]
                    bk.records_done(batch, failures)
                else:
                    break
        self.perform()
        self.write_ledger()

    def write_ledger(self) -> None:
        w = self.w
        while self.ledger:
            batch = self.ledger.pop(0)
            self.step()
            w.batches[batch.batch_id] = "committed" if w.eos else "acked"
            if not w.eos:
                w.dead.extend((d.event_id, batch.batch_id) for d in batch.dead)
            self.step()
            self.bk.persisted(batch, self.now)
            w.confirmed = self.bk.confirmed  # the status update to PostgreSQL
            w.check_confirmed()


def wal_of(shapes: list[list[str]]) -> list[Tx]:
    wal, lsn, n = [], 100, 0
    for t, kinds in enumerate(shapes):
        events = []
        for kind in kinds:
            events.append(Ev(f"e{n}".encode(), kind))
            n += 1
        wal.append(Tx(lsn + 10, lsn + 11, str(1000 + t).encode(), events))
        lsn += 20
    return wal


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(st.lists(st.sampled_from(KINDS), max_size=12), min_size=1, max_size=12),
       eos=st.booleans(), batch_events=st.integers(1, 8), inflight=st.integers(1, 10),
       batch_age=st.sampled_from((0.0, 0.5, 2.0, 60.0)), crashes=st.lists(st.integers(1, 120), max_size=4),
       seed=st.integers(0, 2**32))
def test_no_event_is_lost_or_doubled_across_any_crash_sequence(shapes, eos, batch_events, inflight, batch_age,
                                                               crashes, seed):
    rnd = random.Random(seed)
    wal = wal_of(shapes)
    world = World(wal, eos)
    cfg = {"batch_events": batch_events, "inflight": inflight, "batch_age": batch_age}
    poison: dict = {}
    plan = list(crashes) + [None] * (sum(e.kind == "async" for t in wal for e in t.events) + 3)
    finished = False
    for crash_at in plan:
        session = Session(world, cfg, rnd, crash_at, poison, transient=0.0 if crash_at is None else 0.05)
        try:
            session.run()
            finished = True
            break
        except Crash:
            poison = {}  # kill -9: the process's memory is gone
        except Restart:
            pass  # transient: the daemon starts a new session in the same process
        world.check_confirmed()
    assert finished, "the relay never got through the stream without a fault"
    world.check_confirmed()
    seen: dict[bytes, int] = {}
    for e in world.kafka:
        seen[e] = seen.get(e, 0) + 1
    ok = {b for b, status in world.batches.items() if status in ("acked", "committed")}
    dead: dict[bytes, int] = {}
    for e, b in world.dead:
        if b in ok:
            dead[e] = dead.get(e, 0) + 1
    for tx in wal:
        for ev in tx.events:
            published, lettered = seen.get(ev.id, 0), dead.get(ev.id, 0)
            if ev.kind == "ok":
                assert published >= 1 and lettered == 0, (ev, published, lettered)
            else:
                assert lettered >= 1 and published == 0, (ev, published, lettered)
            if eos:
                assert published + lettered == 1, (ev, published, lettered)
    assert world.confirmed >= wal[-1].end_lsn


def test_stall_rule_fires_only_when_work_waits_without_acknowledgement():
    bk = Bookkeeper(exactly_once=False, batch_max_events=10, batch_max_bytes=10**6, batch_max_age_s=1,
                    max_inflight_events=100, max_inflight_bytes=10**6, confirmed=0, now=0.0)
    assert not bk.stalled(1000.0, 60)
    bk.begin(10, 0)
    bk.unroutable(b"e", b"1", (), "x", "y", now=5.0)
    assert not bk.stalled(60.0, 60) and bk.stalled(66.0, 60)

