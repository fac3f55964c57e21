"""The exactly-once checkpoint and the identity it describes — pure, no I/O.

The checkpoint travels inside each Kafka transaction of the relay: after a crash the relay skips
what a committed Kafka transaction already holds, down to the event inside a source transaction
too large for one Kafka transaction. An LSN means something only within one WAL history of one
server, so every checkpoint carries the identity of what it describes (system identifier,
timeline, database, slot and the slot's creation) and `mismatch()` refuses to let a checkpoint of
another history skip anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from outbox.core.lsn import lsn_to_str


@dataclass(frozen=True)
class Identity:
    """What a checkpoint's positions belong to."""

    system_identifier: str  # pg_control: differs for every initdb, the same on physical standbys
    timeline: int
    database_oid: int
    database: str
    slot: str
    slot_created_lsn: str = ""  # where the relay created its slot ("" = created before this was recorded)

    @property
    def key(self) -> str:
        """Checkpoint key and transactional-id suffix: two deployments sharing one Kafka cluster never
        collide, while a promoted physical standby (same system id and database oid) keeps them."""
        return f"{self.system_identifier}-{self.database_oid}-{self.slot}"

    def to_json(self) -> dict:
        return {"system_identifier": self.system_identifier, "timeline": self.timeline,
                "database_oid": self.database_oid, "database": self.database, "slot": self.slot,
                "slot_created_lsn": self.slot_created_lsn}

    @classmethod
    def from_json(cls, doc: dict) -> "Identity":
        return cls(str(doc["system_identifier"]), int(doc["timeline"]), int(doc["database_oid"]),
                   str(doc["database"]), str(doc["slot"]), str(doc.get("slot_created_lsn") or ""))


@dataclass(frozen=True)
class Checkpoint:
    identity: Identity | None = None
    commit_lsn: int = 0  # every transaction with a commit LSN <= this is fully in Kafka or dead-lettered
    partial_commit_lsn: int = 0  # this transaction is in Kafka only in part...
    partial_events: int = 0  # ...its first partial_events events
    batch_id: int = 0  # the relay_batches row of the Kafka transaction that wrote this
    # Backfill progress: events of backfill_snapshot up to this (created_at, event_id) are in Kafka.
    backfill_snapshot: str = ""
    backfill_after: tuple[str, str] | None = None
    # Events of this batch that were dead-lettered instead of published: [event_id, reason, error].
    # The relay restores them into PostgreSQL if the database lost them (crash, failover).
    dead: tuple[tuple[str, str, str], ...] = field(default=())

    def skip_transaction(self, final_lsn: int) -> bool:
        return final_lsn <= self.commit_lsn

    def events_to_skip(self, final_lsn: int) -> int:
        return self.partial_events if final_lsn == self.partial_commit_lsn else 0

    @property
    def positions(self) -> tuple[int, int]:
        return self.commit_lsn, self.partial_commit_lsn

    def without_positions(self) -> "Checkpoint":
        """The same checkpoint, skipping nothing (for a slot created after it was written)."""
        return replace(self, commit_lsn=0, partial_commit_lsn=0, partial_events=0, backfill_snapshot="",
                       backfill_after=None)

    def to_json(self) -> dict:
        return {"identity": self.identity.to_json() if self.identity else None,
                "commit_lsn": self.commit_lsn, "partial_commit_lsn": self.partial_commit_lsn,
                "partial_events": self.partial_events, "batch_id": self.batch_id,
                "backfill_snapshot": self.backfill_snapshot,
                "backfill_after": list(self.backfill_after) if self.backfill_after else None,
                "dead": [list(d) for d in self.dead]}

    @classmethod
    def from_json(cls, doc: dict | None) -> "Checkpoint":
        if not doc:
            return cls()
        after = doc.get("backfill_after")
        identity = doc.get("identity")
        return cls(Identity.from_json(identity) if identity else None, int(doc["commit_lsn"]),
                   int(doc["partial_commit_lsn"]), int(doc["partial_events"]), int(doc.get("batch_id", 0)),
                   doc.get("backfill_snapshot") or "", tuple(after) if after else None,
                   tuple(tuple(d) for d in doc.get("dead") or ()))


def mismatch(checkpoint: Checkpoint, current: Identity, *, history: dict[int, int], wal_lsn: int,
             batch_known: bool) -> str | None:
    """Why `checkpoint` must not be used to skip anything in `current`, or None if it may.

    history     {timeline: LSN where it ended} for the ancestors of current.timeline (TIMELINE_HISTORY)
    wal_lsn     the server's current WAL position
    batch_known whether relay_batches of this database holds the batch that wrote the checkpoint
    """
    cp = checkpoint.identity
    if cp is None:
        return "the checkpoint records no identity (written by an older relay), so it cannot be matched"
    for what, theirs, ours in (("system identifier", cp.system_identifier, current.system_identifier),
                               ("database oid", cp.database_oid, current.database_oid),
                               ("slot", cp.slot, current.slot)):
        if theirs != ours:
            return f"{what} is {ours!r} here but {theirs!r} in the checkpoint"
    top = max(checkpoint.positions)
    if cp.timeline != current.timeline:
        ended = history.get(cp.timeline)
        if ended is None:
            return (f"the checkpoint belongs to timeline {cp.timeline}, which is not an ancestor of this server's "
                    f"timeline {current.timeline}")
        if top >= ended:
            return (f"the checkpoint covers WAL up to {lsn_to_str(top)} of timeline {cp.timeline}, but this server's "
                    f"history left that timeline at {lsn_to_str(ended)} (point-in-time recovery, or failover to a "
                    f"replica that had not received everything): transactions after that point differ")
        return None
    if top > wal_lsn:
        return (f"the checkpoint covers WAL up to {lsn_to_str(top)} but this server is only at {lsn_to_str(wal_lsn)} "
                f"(restored from an older copy?)")
    if checkpoint.batch_id and not batch_known:
        return (f"the batch {checkpoint.batch_id} that wrote the checkpoint is not in outbox.relay_batches of this "
                f"database (restored from an older copy?)")
    return None
