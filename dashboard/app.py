"""The operator dashboard (Streamlit). `outbox dashboard` runs this file; layout only: the numbers
come from dashboard.queries, the rules from dashboard.health, the one write from dashboard.actions."""

from __future__ import annotations

from datetime import datetime, timezone

import streamlit as st

from dashboard.db import DashboardError, Database
from dashboard.kafka_lag import EndOffsets
from dashboard.views import dead_letters, duplicates, in_flight, overview, trace, unknown
from dashboard.views.common import Context
from outbox.core.settings import ConfigError, load_settings

VIEWS = {
    "Overview": overview.render,
    "In flight": in_flight.render,
    "Duplicates": duplicates.render,
    "Unknown outcome": unknown.render,
    "Dead letters": dead_letters.render,
    "Event trace": trace.render,
}


def _release(ctx: Context) -> None:
    ctx.db.close()
    ctx.end_offsets.close()


@st.cache_resource(on_release=_release)
def _context() -> Context:
    """Shared by every browser session of this process: one database connection, one Kafka client."""
    settings = load_settings()
    ends = EndOffsets(settings.kafka_bootstrap, settings.kafka_security())
    return Context(settings, Database.from_settings(settings), ends)


def main() -> None:
    st.set_page_config(page_title="Outbox operator", page_icon=":material/outbox:", layout="wide")
    try:
        ctx = _context()
    except (ConfigError, DashboardError) as exc:
        st.error(f"The dashboard cannot start: {exc}")
        st.stop()

    with st.sidebar:
        st.title("Outbox operator")
        view = st.radio("View", list(VIEWS), key="view", bind="query-params")
        auto = st.toggle("Auto-refresh", value=True, key="auto_refresh",
                         help=f"Re-read every {ctx.settings.dashboard_refresh_s:g} s")
        st.caption(f"Database: {ctx.db.dsn.masked} as role {ctx.db.role}  \nKafka: {ctx.settings.kafka_bootstrap}")

    @st.fragment(run_every=ctx.settings.dashboard_refresh_s if auto else None)
    def body() -> None:
        st.header(view)
        stamp = st.empty()
        try:
            VIEWS[view](ctx)
        except DashboardError as exc:
            st.error(str(exc))
        now = datetime.now(timezone.utc)
        every = f"every {ctx.settings.dashboard_refresh_s:g} s" if auto else "auto-refresh off"
        stamp.caption(f"Last updated {now:%Y-%m-%d %H:%M:%S} UTC ({every})")

    body()


main()
