"""Duplicates suppressed: what each consumer's inbox recognised as seen before, and kept out."""

from __future__ import annotations

import streamlit as st

from dashboard.queries import duplicates as queries
from dashboard.queries.common import consumers
from dashboard.views.common import Context, empty, table

WINDOWS = {"1 hour": 1, "6 hours": 6, "24 hours": 24, "7 days": 168}


def render(ctx: Context) -> None:
    left, right = st.columns(2)
    window = left.selectbox("Window", list(WINDOWS), index=2, key="dup_window")
    hours = WINDOWS[window]
    # Widgets are drawn between snapshots, never inside one (the connection is shared).
    with ctx.db.snapshot() as conn:
        names = consumers(conn)
    consumer = right.selectbox("Consumer", ["all consumers", *names], key="dup_consumer")
    chosen = None if consumer == "all consumers" else consumer
    with ctx.db.snapshot() as conn:
        totals = queries.duplicate_totals(conn, hours=hours)
        over_time = queries.duplicates_over_time(conn, hours=hours)
        most = queries.most_duplicated(conn, chosen, order="count")
        recent = queries.most_duplicated(conn, chosen, order="recent")
    st.caption("A duplicate is a delivery of an event this consumer already took responsibility for (same "
               "event_id). It is counted and suppressed; the handler does not run again. By cause: "
               "**redelivered** is the same Kafka record (topic, partition, offset) again: Kafka gave it to the "
               "consumer twice (a rebalance, a zombie instance, a replayed offset); **republished** is another "
               "Kafka record carrying the event id: the relay published it again (a crash in at-least-once "
               "mode, a dead-letter replay, `--reset-checkpoint`) or a producer emitted the same event id twice.")
    if chosen:
        totals = totals[totals["consumer"] == chosen]
        over_time = over_time[over_time["consumer"] == chosen]
    st.subheader(f"Per consumer, last {window}")
    if totals.empty:
        empty(f"No consumer processed anything in the last {window}.")
    else:
        table(totals)
    if over_time["suppressed"].sum():
        st.subheader("Suppressed over time")
        st.bar_chart(over_time, x="bucket", y="suppressed", color="consumer")
    st.subheader("Most duplicated events")
    if most.empty:
        empty("No duplicate has been suppressed (within the inbox's retention window). Duplicates appear "
              "after relay crashes and consumer restarts; the inbox keeps them out.")
        return
    table(most, key="most_duplicated")
    st.subheader("Duplicates seen most recently")
    table(recent, key="recent_duplicates")
