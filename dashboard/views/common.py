"""What every view shares: the context it renders with, tables, empty states, human units."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import streamlit as st

from dashboard.db import Database
from dashboard.kafka_lag import EndOffsets
from outbox.core.settings import Settings


@dataclass
class Context:
    settings: Settings
    db: Database
    end_offsets: EndOffsets


def table(df: pd.DataFrame, *, key: str | None = None, **column_config) -> None:
    """A full-width table; event ids get a link to their trace."""
    config = dict(column_config)
    if "event_id" in df.columns and len(df):
        df = df.copy()
        df.insert(0, "trace", ["?view=Event+trace&q=" + str(e) if pd.notna(e) and e else None for e in df["event_id"]])
        config.setdefault("trace", st.column_config.LinkColumn("trace", display_text="trace", width="small"))
    for col in df.columns:
        if col.endswith("_s") and col not in config:
            config[col] = st.column_config.NumberColumn(col.removesuffix("_s") + " (s)", format="%.1f")
        elif col.endswith("_bytes") and col not in config:
            config[col] = st.column_config.NumberColumn(col, format="%d")
    st.dataframe(df, hide_index=True, column_config=config, key=key)


def empty(message: str) -> None:
    """An empty state that says what it means and what to do, not just 'no data'."""
    st.info(message, icon=":material/check_circle:")
