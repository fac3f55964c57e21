"""Does anything need a human? One set of rules shared by `outbox status` (exit code) and the
dashboard's overview banner, so the terminal and the browser never disagree.

Rules only: they read a Snapshot (dashboard.queries.overview.health_snapshot fills it) and do no I/O,
so each rule is tested on hand-made numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd

from dashboard import MAX_IN_FLIGHT_AGE_S, STALLED_AFTER_S
from dashboard.units import duration


@dataclass(frozen=True)
class Finding:
    level: Literal["attention", "info"]
    text: str
    view: str  # the dashboard view with the details


@dataclass
class Snapshot:
    """The numbers the rules look at, read in one database snapshot."""

    relays: pd.DataFrame
    slots: pd.DataFrame
    in_flight: dict
    effects: pd.DataFrame
    batches: pd.DataFrame
    dead_letters: pd.DataFrame
    consumers: pd.DataFrame  # positions with lag (lag NA when Kafka was not reachable)
    duplicates_last_hour: pd.DataFrame
    kafka_error: str | None = None


def assess(s: Snapshot, *, max_in_flight_age_s: float = MAX_IN_FLIGHT_AGE_S,
           stalled_after_s: float = STALLED_AFTER_S) -> list[Finding]:
    found: list[Finding] = []

    def attention(text: str, view: str) -> None:
        found.append(Finding("attention", text, view))

    def info(text: str, view: str) -> None:
        found.append(Finding("info", text, view))

    live = s.relays[s.relays["state"] == "active"]
    for slot in s.slots.itertuples():
        if slot.slot_missing:
            attention(f"replication slot {slot.slot_name} does not exist: start `outbox relay`, or "
                      f"`outbox relay --recreate-slot` if it was dropped", "Overview")
        elif slot.wal_status == "lost":
            attention(f"replication slot {slot.slot_name} is invalidated (wal_status=lost): run "
                      f"`outbox relay --recreate-slot`", "Overview")
        elif slot.wal_status == "unreserved":
            attention(f"replication slot {slot.slot_name} is about to be invalidated (wal_status=unreserved): "
                      f"the relay is too far behind max_slot_wal_keep_size", "Overview")
        if str(slot.failover_ready) == "False":  # None/NA: no standby configured, nothing to lose
            attention(f"a failover now would lose replication slot {slot.slot_name}: {slot.failover_detail}",
                      "Overview")
        if not (live["slot_name"] == slot.slot_name).any():
            attention(f"no relay is streaming slot {slot.slot_name}: start `outbox relay`", "Overview")
    if s.slots.empty and s.in_flight["count"]:
        attention(f"{s.in_flight['count']} events wait and no relay has ever run here: start `outbox relay`",
                  "In flight")
    if s.in_flight["oldest_age_s"] > max_in_flight_age_s:
        attention(f"{s.in_flight['count']} events not yet in Kafka, the oldest for "
                  f"{duration(s.in_flight['oldest_age_s'])}", "In flight")

    unknown = s.effects[s.effects["effective_status"] == "unknown"]
    if len(unknown):
        attention(f"{len(unknown)} effects with an unknown outcome need a decision", "Unknown outcome")
    at_risk = s.effects[s.effects["at_risk"].fillna(False).astype(bool)]
    if len(at_risk):
        info(f"{len(at_risk)} effects in progress past half their lease", "Unknown outcome")
    orphaned = s.batches[s.batches["status"] == "in flight, relay gone"]
    if len(orphaned):
        attention(f"{len(orphaned)} relay batches are in flight from a relay that is gone: start a relay to "
                  f"settle them", "Unknown outcome")
    day = pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=1)
    replayed = s.batches[(s.batches["status"] == "unknown") & (s.batches["started_at"] >= day)]
    if len(replayed):
        info(f"{len(replayed)} relay batches had an unknown outcome at a crash in the last 24 h (replayed; "
             f"consumers suppress the duplicates)", "Unknown outcome")

    for row in s.dead_letters.itertuples():
        attention(f"{row.open} open dead letters ({row.source}, {row.reason})", "Dead letters")

    if s.kafka_error:
        info(f"consumer lag unknown: {s.kafka_error}", "Overview")
    stalled = s.consumers[(s.consumers["lag"].fillna(0) > 0) & (s.consumers["idle_s"] > stalled_after_s)]
    for row in stalled.itertuples():
        attention(f"consumer {row.consumer} is stalled on {row.topic}[{row.kafka_partition}]: lag {row.lag}, "
                  f"no progress for {duration(row.idle_s)}", "Overview")
    for row in s.duplicates_last_hour.itertuples():
        if row.suppressed:
            info(f"{row.consumer} suppressed {row.suppressed} duplicates in the last hour", "Duplicates")
    return found


def needs_attention(findings: list[Finding]) -> bool:
    return any(f.level == "attention" for f in findings)
