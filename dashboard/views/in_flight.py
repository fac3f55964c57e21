"""In flight: committed events Kafka has not acknowledged yet, oldest first (outbox.in_flight)."""

from __future__ import annotations

import streamlit as st

from dashboard.queries import in_flight as queries
from dashboard.queries.overview import in_flight_summary, relays
from dashboard.units import duration
from dashboard.views.common import Context, empty, table


def render(ctx: Context) -> None:
    with ctx.db.snapshot() as conn:
        summary = in_flight_summary(conn)
        rows = queries.in_flight(conn)
        relay_rows = relays(conn)
    st.caption("Exact as of one database snapshot: an event leaves this list in the refresh after Kafka "
               "acknowledged it and the relay recorded it; none is missing before.")
    left, right = st.columns(2)
    left.metric("Events in flight", f"{summary['count']:,}")
    right.metric("Oldest", duration(summary["oldest_age_s"]))
    if not summary["count"]:
        empty("Nothing in flight: every committed outbox event has been acknowledged by Kafka.")
        return
    if not (relay_rows["state"] == "active").any():
        st.error("No relay is streaming, so these events are not moving. Start `outbox relay`; it resumes "
                 "from the slot and publishes them.")
    shown = f"the oldest {len(rows):,} of {summary['count']:,}" if len(rows) < summary["count"] else "all"
    st.caption(f"Showing {shown}.")
    table(rows)
