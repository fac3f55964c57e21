"""Event trace: one event's whole story, from the outbox row through Kafka to each consumer,
its effects, dead letters and operator decisions."""

from __future__ import annotations

import streamlit as st

from dashboard.queries import trace as queries
from dashboard.views.common import Context, empty, table


def render(ctx: Context) -> None:
    term = st.text_input("Event id or aggregate id", max_chars=1000, key="q", bind="query-params",
                         placeholder="0193f0c2-... or an order number")
    if not (term or "").strip():
        empty("Paste an event id (from a log line, a Kafka header or another view) or an aggregate id to see "
              "where the event went.")
        return
    event_id = queries.parse_event_id(term)
    # Widgets are drawn between snapshots, never inside one (the connection is shared).
    if event_id is None:
        with ctx.db.snapshot() as conn:
            matches = queries.find_events(conn, term)
        if matches.empty:
            st.warning("No outbox event has this aggregate id (exact match, any aggregate type), and it is "
                       "not an event id. Old events may have been pruned by retention.")
            return
        st.caption(f"{len(matches)} events of aggregate {term!r}, newest first.")
        table(matches)
        event_id = st.selectbox("Trace event", list(matches["event_id"]), key="trace_pick")
    with ctx.db.snapshot() as conn:
        found = queries.trace(conn, event_id)
    _render(found)


def _render(t: queries.Trace) -> None:
    st.subheader(f"Event {t.event_id}")
    if not t.found:
        st.warning("Nothing is recorded for this event id: not in the outbox, not delivered, not seen by any "
                   "consumer. Check the id, or it was pruned by retention everywhere.")
        return
    if t.event.empty:
        st.info("The outbox row is gone (pruned by retention); what follows is what the rest recorded.")
    else:
        e = t.event.iloc[0]
        if t.in_flight:
            state = "**in flight**: committed, not yet acknowledged by Kafka"
        elif len(t.relay_dead_letters) and t.deliveries.empty:
            state = "**dead-lettered by the relay**: not in Kafka, see Dead letters below"
        else:
            state = "**published**"
        st.markdown(f"`{e['aggregate_type']}` / `{e['aggregate_id']}` · **{e['event_type']}** · created "
                    f"{e['created_at']:%Y-%m-%d %H:%M:%S.%f} · txid {e['txid']} · {state}")
        left, right = st.columns(2)
        left.markdown("**Payload**")
        left.code(e["payload"] or "null (tombstone)", language="json")
        right.markdown("**Headers**")
        right.code(e["headers"], language="json")

    st.markdown("**Kafka** — where the relay delivered it")
    if t.deliveries.empty:
        empty("No delivery recorded: in flight, dead-lettered, or OUTBOX_TRACK_DELIVERIES is off.")
    else:
        if len(t.deliveries) > 1:
            st.caption(f"Delivered {len(t.deliveries)} times: an at-least-once redelivery after a relay crash. "
                       f"Consumers suppress the extra copies (see below).")
        table(t.deliveries)

    st.markdown("**Consumers** — each consumer's inbox record")
    if t.inbox.empty:
        empty("No consumer has recorded this event yet.")
    else:
        table(t.inbox)

    st.markdown("**Effects** — external calls made while handling it")
    if t.effects.empty:
        empty("No effect recorded for this event.")
    else:
        table(t.effects)

    if len(t.relay_dead_letters) or len(t.inbox_dead_letters):
        st.markdown("**Dead letters**")
        if len(t.relay_dead_letters):
            table(t.relay_dead_letters, key="trace_relay_dl")
        if len(t.inbox_dead_letters):
            table(t.inbox_dead_letters, key="trace_inbox_dl")

    st.markdown("**Operator decisions**")
    if t.audit.empty:
        empty("No operator decision concerns this event.")
    else:
        table(t.audit, key="trace_audit")
