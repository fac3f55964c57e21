"""Unknown outcome: side effects that may or may not have happened, and what to decide about them;
relay batches whose outcome was unknown at a crash."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import actions
from dashboard.db import DashboardError
from dashboard.queries import unknown as queries
from dashboard.units import duration
from dashboard.views.common import Context, empty, table

_PENDING = "pending_decision"
_DONE = "decision_done"


def render(ctx: Context) -> None:
    with ctx.db.snapshot() as conn:
        effects = queries.unresolved_effects(conn)
        batches = queries.relay_batches_at_risk(conn)
        audit = queries.audit_log(conn, limit=20)
    if done := st.session_state.pop(_DONE, None):
        st.success(done)

    unknown = effects[effects["effective_status"] == "unknown"]
    st.subheader(f"Effects with an unknown outcome ({len(unknown)})")
    st.caption("The call to the external system may or may not have happened (a timeout, a dropped answer, a "
               "worker that died holding the lease). The ledger will not call again with a new key; a "
               "reconcile hook, a provider that deduplicates the key, or you decide.")
    if unknown.empty:
        empty("No effect has an unknown outcome: nothing to decide.")
    else:
        table(unknown[["key", "status", "lease_expired", "attempts", "age_s", "consumer", "event_id", "last_error",
                       "reattempt_approved", "request"]])
        key = st.selectbox("Inspect and decide", list(unknown["key"]), key="unknown_key")
        _details(unknown[unknown["key"] == key].iloc[0])
        _decision(ctx, key)

    in_progress = effects[effects["effective_status"] == "in_progress"]
    st.subheader(f"In progress ({len(in_progress)})")
    if in_progress.empty:
        empty("No effect is being attempted right now.")
    else:
        at_risk = int(in_progress["at_risk"].sum())
        if at_risk:
            st.warning(f"{at_risk} attempts are past half their lease: if the worker does not record a result "
                       f"before the lease ends, the outcome becomes unknown.")
        table(in_progress[["key", "at_risk", "lease_owner", "lease_left_s", "attempts", "age_s", "consumer",
                           "event_id", "request"]])

    st.subheader(f"Relay batches with an unknown outcome ({len(batches)})")
    if batches.empty:
        empty("No relay batch had an unknown outcome: no relay crashed with records in flight.")
    else:
        st.caption("'unknown': the relay stopped before Kafka acknowledged the batch; the next relay replayed its "
                   "events from the slot, so consumers may have seen some twice (see Duplicates) — nothing to "
                   "do. 'in flight, relay gone': not settled yet; start a relay and it settles them.")
        table(batches)

    st.subheader("Recent operator decisions")
    if audit.empty:
        empty("No operator decision has been recorded.")
    else:
        table(audit)


def _details(row: pd.Series) -> None:
    left, right = st.columns(2)
    with left:
        st.markdown(f"**Key** `{row['key']}` · **attempts** {row['attempts']} · **age** {duration(row['age_s'])}")
        if row["lease_expired"]:
            st.markdown(f"Lease of **{row['lease_owner']}** expired at {row['lease_expires_at']:%Y-%m-%d %H:%M:%S} "
                        f"without a recorded result.")
        if row["last_error"]:
            st.markdown(f"**Last error** `{row['last_error']}`")
        if row["reattempt_approved"]:
            st.info("A re-attempt with the same key is approved: the next attempt will call the provider again.")
        st.markdown("**Request**")
        st.code(row["request"], language="json")
    with right:
        st.markdown("**Evidence**")
        table(pd.DataFrame(row["evidence"], columns=["at", "owner", "what", "detail"]), key="evidence")


def _decision(ctx: Context, key: str) -> None:
    # The form stays on the page while the decision waits for confirmation, so that Cancel (or a
    # refusal) leaves what the operator typed in place.
    with st.form("decision_form"):
        st.markdown(f"**Decide the outcome of** `{key}`")
        decision = st.radio("Decision", list(actions.DECISIONS), format_func=actions.DECISIONS.get, key="decision")
        reference = st.text_input("Provider reference (required to mark succeeded)", max_chars=500, key="reference")
        response = st.text_area("Response JSON for the handler (optional)", max_chars=20_000, key="response",
                                placeholder='{"id": "ch_123", "amount": 2500}')
        operator = st.text_input("Your name", max_chars=200, key="operator")
        reason = st.text_area("Why: what did you check?", max_chars=2000, key="reason")
        submitted = st.form_submit_button("Review decision")
    if submitted:
        st.session_state.pop(_PENDING, None)
        try:
            st.session_state[_PENDING] = actions.request(key, decision, reason, operator, reference,
                                                         None if decision == "reattempt" else response)
        except actions.Refused as exc:
            st.error(str(exc))
            return
    pending: actions.Request | None = st.session_state.get(_PENDING)
    if pending is None or pending.key != key:
        return
    st.warning(f"**Confirm:** {pending.summary()}. This is recorded in the audit log and cannot be undone from the "
               f"dashboard.")
    confirm, cancel = st.columns(2)
    if cancel.button("Cancel", key="cancel_decision"):
        del st.session_state[_PENDING]
        st.rerun()
    if confirm.button("Confirm decision", type="primary", key="confirm_decision"):
        del st.session_state[_PENDING]
        try:
            audit_id = actions.resolve(ctx.db.dsn, ctx.db.role, pending)
        except (actions.Refused, DashboardError) as exc:
            st.error(f"Not recorded: {exc}")
            return
        st.session_state[_DONE] = f"Recorded: {pending.summary()} (audit entry #{audit_id})."
        st.rerun()
