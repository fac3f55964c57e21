"""Dead letters: what the relay could not publish and what consumers could not process, why, and
the documented command that replays each one after the cause is fixed."""

from __future__ import annotations

import streamlit as st

from dashboard.queries import dead_letters as queries
from dashboard.queries.common import consumers
from dashboard.views.common import Context, empty, table


def render(ctx: Context) -> None:
    left, middle, right = st.columns([3, 2, 1])
    search = left.text_input("Search reason, error, event id, type, aggregate (literal text)", max_chars=500,
                             key="dl_search")
    # Widgets are drawn between snapshots, never inside one: the connection is shared by every
    # browser session, and a page must hold it only while it reads.
    with ctx.db.snapshot() as conn:
        names = consumers(conn)
    consumer = middle.selectbox("Consumer (inbox)", ["all consumers", *names], key="dl_consumer")
    resolved = right.toggle("Include resolved", key="dl_resolved")
    with ctx.db.snapshot() as conn:
        reasons = queries.dead_letter_reasons(conn)
        relay = queries.relay_dead_letters(conn, search=search, include_replayed=resolved)
        inbox = queries.inbox_dead_letters(conn, consumer=None if consumer == "all consumers" else consumer,
                                           search=search, include_resolved=resolved)

    st.subheader("Open, by reason")
    if reasons.empty:
        empty("No open dead letter: everything committed was published, and every consumer processed what it read.")
    else:
        table(reasons)

    waiting = "." if resolved else " that waits for a replay."
    _section("Relay", relay, "No relay dead letter matches." if search else
             "The relay has not dead-lettered anything" + waiting,
             "Fix the cause given in `error` (raise a size limit, grant the topic, change the template), then "
             "run the command: it republishes the stored copy with the original event_id.",
             lambda rows: rows.loc[rows["replayed_at"].isna(), "replay_command"])
    _section("Inbox", inbox, "No inbox dead letter matches." if search else
             "No consumer has dead-lettered anything" + waiting,
             "handler_failed: fix the handler or the data, then replay (the running consumer re-runs its "
             "handler on the stored record). invalid_envelope: no valid event_id, nothing to deduplicate "
             "on; fix the producer and discard it.",
             lambda rows: rows.loc[rows["command"].str.startswith("outbox"), "command"])


def _section(title: str, rows, when_empty: str, caption: str, commands_of) -> None:
    st.subheader(f"{title} ({len(rows)})")
    if rows.empty:
        empty(when_empty)
        return
    st.caption(caption)
    table(rows)
    commands = commands_of(rows)
    if len(commands):
        with st.expander(f"Copy the {len(commands)} command(s)"):
            st.code("\n".join(commands), language="bash")
