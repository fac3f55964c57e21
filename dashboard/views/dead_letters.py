"""Dead letters: what the relay could not publish and what consumers could not process, why, and
the documented command that replays each one after the cause is fixed."""

from __future__ import annotations

import streamlit as st

from dashboard import queries
from dashboard.views.common import Context, empty, table


def render(ctx: Context) -> None:
    left, middle, right = st.columns([3, 2, 1])
    search = left.text_input("Search reason, error, event id, type, aggregate (literal text)", max_chars=500,
                             key="dl_search")
    with ctx.db.snapshot() as conn:
        names = queries.consumers(conn)
        consumer = middle.selectbox("Consumer (inbox)", ["all consumers", *names], key="dl_consumer")
        resolved = right.toggle("Include resolved", key="dl_resolved")
        reasons = queries.dead_letter_reasons(conn)
        relay = queries.relay_dead_letters(conn, search=search, include_replayed=resolved)
        inbox = queries.inbox_dead_letters(conn, consumer=None if consumer == "all consumers" else consumer,
                                           search=search, include_resolved=resolved)

    st.subheader("Open, by reason")
    if reasons.empty:
        empty("No open dead letter: everything committed was published, and every consumer processed what it read.")
    else:
        table(reasons)

    st.subheader(f"Relay ({len(relay)})")
    if relay.empty:
        empty("No relay dead letter matches." if search else
              "The relay has not dead-lettered anything" + ("." if resolved else " that waits for a replay."))
    else:
        st.caption("Fix the cause given in `error` (raise a size limit, grant the topic, change the template), then "
                   "run the command: it republishes the stored copy with the original event_id.")
        table(relay)
        _commands(relay.loc[relay["replayed_at"].isna(), "replay_command"])

    st.subheader(f"Inbox ({len(inbox)})")
    if inbox.empty:
        empty("No inbox dead letter matches." if search else
              "No consumer has dead-lettered anything" + ("." if resolved else " that waits for a replay."))
    else:
        st.caption("handler_failed: fix the handler or the data, then replay (the running consumer re-runs its "
                   "handler on the stored record). invalid_envelope: no valid event_id, nothing to deduplicate "
                   "on; fix the producer and discard it.")
        table(inbox)
        _commands(inbox.loc[inbox["command"].str.startswith("outbox"), "command"])


def _commands(commands) -> None:
    if len(commands):
        with st.expander(f"Copy the {len(commands)} command(s)"):
            st.code("\n".join(commands), language="bash")
