"""Overview: is the pipeline healthy? Relays, the replication slot, throughput, consumer lag."""

from __future__ import annotations

import streamlit as st

from dashboard import health
from dashboard.queries import overview as queries
from dashboard.units import duration, size
from dashboard.views.common import Context, empty, table


def render(ctx: Context) -> None:
    with ctx.db.snapshot() as conn:
        snap = queries.health_snapshot(conn)
        flow = queries.throughput(conn, minutes=60)
    queries.with_kafka_lag(snap, ctx.end_offsets)
    findings = health.assess(snap)

    attention = [f for f in findings if f.level == "attention"]
    if attention:
        st.error("**Needs attention**\n\n" + "\n".join(f"- {f.text} → *{f.view}*" for f in attention))
    else:
        st.success("**All clear**: relays streaming, nothing stuck in flight, no unknown outcome, no dead letter.")
    for f in findings:
        if f.level == "info":
            st.caption(f"ℹ️ {f.text} → *{f.view}*")

    st.subheader("Replication slot")
    if snap.slots.empty:
        empty("No relay has run against this database yet: start one with `outbox relay`.")
    for slot in snap.slots.itertuples():
        cols = st.columns(5)
        cols[0].metric(f"Lag · {slot.slot_name}", size(slot.lag_bytes),
                       help="WAL written since the relay's last confirmed position")
        cols[1].metric("Lag in seconds", duration(snap.in_flight["oldest_age_s"]),
                       help="age of the oldest committed event not yet acknowledged by Kafka (0 when none)")
        cols[2].metric("In flight", f"{snap.in_flight['count']:,}", help="exact, see In flight")
        cols[3].metric("wal_status", "missing" if slot.slot_missing else str(slot.wal_status),
                       help="reserved/extended are fine; unreserved is about to be lost; lost needs "
                            "`outbox relay --recreate-slot`")
        cols[4].metric("Retained WAL", size(slot.retained_wal_bytes),
                       help="WAL the server keeps for this slot (disk it cannot free)")
        if isinstance(slot.failover_detail, str):
            ready = {"True": "✅ ready", "False": "⚠️ not ready"}.get(str(slot.failover_ready), "n/a")
            st.caption(f"Failover {ready}: {slot.failover_detail}")
        published = slot.last_published_at.strftime("%H:%M:%S") if slot.last_published_at is not None else "never"
        line = (f"Delivery **{slot.delivery}** · {slot.events_published:,} published · "
                f"{slot.events_dead_lettered:,} dead-lettered · last ack {published}")
        if slot.last_error:
            line += f" · last error {slot.last_error_at:%Y-%m-%d %H:%M:%S}: `{slot.last_error}`"
        st.markdown(line)

    st.subheader("Relays")
    if snap.relays.empty:
        empty("No relay process is registered. Start `outbox relay` (run two for a standby).")
    else:
        table(snap.relays.drop(columns=["started_at"]))

    st.subheader("Throughput, last hour (events per minute)")
    pipeline = flow[flow["series"].isin(["published"]) | flow["series"].str.startswith("consumed")]
    trouble = flow[flow["series"].str.startswith(("suppressed", "dead-lettered", "relay dead-lettered"))]
    left, right = st.columns(2)
    with left:
        st.caption("Published by the relay, consumed by each consumer")
        st.line_chart(pipeline, x="minute", y="events", color="series")
    with right:
        st.caption("Suppressed as duplicates, dead-lettered")
        st.line_chart(trouble, x="minute", y="events", color="series")

    st.subheader("Consumer lag")
    if snap.kafka_error:
        st.warning(f"Lag unknown: {snap.kafka_error}. Positions below are PostgreSQL's (where each consumer "
                   f"resumes). Check OUTBOX_KAFKA_BOOTSTRAP and the brokers.")
    if snap.consumers.empty:
        empty("No consumer has processed anything yet (outbox.inbox_offsets is empty).")
    else:
        table(snap.consumers.drop(columns=["updated_at"]),
              lag=st.column_config.NumberColumn("lag", help="Kafka end offset - next offset to process"))
