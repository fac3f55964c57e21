"""Each dashboard view in Streamlit's AppTest (the real script, without a browser), against the
database the real relay and consumers filled: what an operator sees, and the confirm-then-record
flow of a decision."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from inbox import Effects, OutcomeUnknown
from outbox.demo.fake_provider import FakeProvider, ProviderClient
from tests.support.dashboard import (
    AT_RISK_KEY,
    CHARGE_KEY,
    CRASHED_RELAY,
    HOSTILE_AGGREGATE,
    KILLED_KEY,
    UNICODE_AGGREGATE,
    app,
)
from tests.support.relay import query

pytestmark = pytest.mark.usefixtures("release_the_apps_resources")


def view(at: AppTest, name: str) -> AppTest:
    at.sidebar.radio(key="view").set_value(name).run()
    assert not at.exception, at.exception
    assert [h.value for h in at.header] == [name]
    assert at.caption[0].value.startswith("Last updated ")
    return at


def frames(at: AppTest, column: str) -> list:
    """The tables on the page that have this column, in page order."""
    return [d.value for d in at.dataframe if column in d.value.columns]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_overview_says_what_needs_attention_and_shows_the_slot(scenario_app, dashboard_scenario):
    at = scenario_app
    assert [h.value for h in at.header] == ["Overview"]
    problems = texts(at.error)
    assert "Needs attention" in problems
    assert "2 effects with an unknown outcome need a decision" in problems
    assert "2 open dead letters (inbox · billing, handler_failed)" in problems
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["In flight"] == "0" and metrics["wal_status"] == "reserved"
    assert metrics["Lag in seconds"] == "0.0 s" and f"Lag · {dashboard_scenario.slot}" in metrics
    [relays] = frames(at, "heartbeat_age_s")
    assert relays["state"].tolist() == ["active"]
    [lag] = frames(at, "lag")
    assert set(lag["consumer"]) == {"billing", "shipping"} and lag["lag"].tolist() == [0] * len(lag)
    sidebar = texts(at.sidebar.caption)
    assert dashboard_scenario.db.params()["password"] not in sidebar and "password=***" in sidebar


def test_overview_without_kafka_says_lag_is_unknown_and_shows_the_rest(monkeypatch, dashboard_scenario):
    at = app(monkeypatch, dashboard_scenario.db, "127.0.0.1:1").run()
    assert not at.exception, at.exception
    assert "Lag unknown: Kafka at 127.0.0.1:1 did not answer" in texts(at.warning)
    [lag] = frames(at, "lag")
    assert lag["lag"].isna().all() and set(lag["consumer"]) == {"billing", "shipping"}
    assert "2 effects with an unknown outcome need a decision" in texts(at.error)


def test_in_flight_view_says_nothing_is_waiting(scenario_app):
    at = view(scenario_app, "In flight")
    assert {m.label: m.value for m in at.metric}["Events in flight"] == "0"
    assert "Nothing in flight" in texts(at.info)


def test_duplicates_view_names_the_redelivered_events(scenario_app, dashboard_scenario):
    at = view(scenario_app, "Duplicates")
    [totals] = frames(at, "suppressed_pct")
    totals = totals.set_index("consumer")
    assert totals.loc["billing", "suppressed"] == 3 and totals.loc["shipping", "suppressed"] == 3
    assert totals.loc["billing", "republished"] == 3 and totals.loc["billing", "redelivered"] == 0
    assert "**republished** is another Kafka record" in " ".join(c.value for c in at.caption)
    most, recent = frames(at, "duplicates")
    assert set(most["event_id"]) == set(recent["event_id"]) == set(dashboard_scenario.duplicated)
    assert most["duplicates"].tolist()[:2] == [2, 2]
    at.selectbox(key="dup_consumer").set_value("shipping").run()
    assert set(frames(at, "duplicates")[0]["consumer"]) == {"shipping"}


def test_unknown_outcome_view_shows_each_unknown_effect_with_its_evidence(scenario_app):
    at = view(scenario_app, "Unknown outcome")
    subheaders = [s.value for s in at.subheader]
    assert subheaders[0] == "Effects with an unknown outcome (2)"
    assert at.selectbox(key="unknown_key").options == [CHARGE_KEY, KILLED_KEY]
    assert "no answer from the provider" in texts(at.markdown)
    assert frames(at, "what")[0]["what"].tolist() == ["lease", "indeterminate"]
    at.selectbox(key="unknown_key").set_value(KILLED_KEY).run()
    assert "Lease of **doomed-worker** expired" in texts(at.markdown)
    assert "past half their lease" in texts(at.warning)
    [in_progress] = frames(at, "lease_left_s")
    assert AT_RISK_KEY in in_progress["key"].tolist()
    [batches] = frames(at, "batch_id")
    assert CRASHED_RELAY in batches["relay_id"].tolist()
    assert at.button(key="FormSubmitter:decision_form-Review decision") is not None


def test_dead_letters_view_gives_the_replay_commands_and_survives_hostile_search(scenario_app, dashboard_scenario):
    at = view(scenario_app, "Dead letters")
    [relay] = frames(at, "replay_command")
    assert relay["replay_command"].tolist() == [f"outbox dead-letters replay {relay['id'][0]}"]
    [inbox] = frames(at, "command")
    assert sorted(inbox["event_id"]) == sorted([dashboard_scenario.events["poison"],
                                                dashboard_scenario.events["charge"]])
    assert "outbox inbox replay --consumer billing --id" in texts(at.code)
    at.text_input(key="dl_search").set_value("ledger rejects").run()
    assert frames(at, "command")[0]["event_id"].tolist() == [dashboard_scenario.events["poison"]]
    for hostile in ("'; DROP TABLE outbox.inbox_dead_letters; --", "%", "_x_", "注文" * 200):
        at.text_input(key="dl_search").set_value(hostile).run()
        assert not at.exception and not at.error, hostile
        assert "No relay dead letter matches." in texts(at.info)


def test_event_trace_by_event_id_and_by_aggregate_id(scenario_app, dashboard_scenario):
    events = dashboard_scenario.events
    at = view(scenario_app, "Event trace")
    assert "Paste an event id" in texts(at.info)
    at.text_input(key="q").set_value(events["charge"]).run()
    assert [s.value for s in at.subheader] == [f"Event {events['charge']}"]
    assert "**PaymentRequested**" in texts(at.markdown)
    assert frames(at, "delivered_at")[0]["topic"].tolist() == [dashboard_scenario.topic]
    assert frames(at, "suppressed_duplicates")[0]["consumer"].tolist() == ["billing", "shipping"]
    assert frames(at, "resolved_via")[0]["key"].tolist() == [CHARGE_KEY]
    at.text_input(key="q").set_value("o-1").run()
    assert sorted(at.selectbox(key="trace_pick").options) == sorted([events["o-1/OrderPlaced"],
                                                                      events["o-1/OrderPaid"]])
    for term, expected in ((HOSTILE_AGGREGATE, events["hostile"]), (UNICODE_AGGREGATE, events["unicode"])):
        at.text_input(key="q").set_value(term).run()
        assert [s.value for s in at.subheader] == [f"Event {expected}"], term
    for hostile in ("' OR 1=1 --", "%", "o-_", "x" * 1000):
        at.text_input(key="q").set_value(hostile).run()
        assert not at.exception and "No outbox event has this aggregate id" in texts(at.warning), hostile


def test_deciding_an_unknown_outcome_needs_confirmation_and_is_audited(monkeypatch, db, kafka):
    with FakeProvider() as provider, Effects(db, lease_s=5, owner="worker-a") as effects:
        provider.script("drop")
        client = ProviderClient(provider.url, timeout_s=0.5)
        with pytest.raises(OutcomeUnknown):
            effects.run("charge:order-9", {"amount": 900}, lambda key: client.charge(key, 900, "EUR"))
    at = app(monkeypatch, db, kafka).run()
    at = view(at, "Unknown outcome")
    form = "FormSubmitter:decision_form-Review decision"
    at.radio(key="decision").set_value("succeeded")
    at.text_input(key="reference").set_value("")
    at.text_input(key="operator").set_value("alice")
    at.text_area(key="reason").set_value("provider shows ch_000001 captured")
    at.button(key=form).click().run()
    assert "marking succeeded needs the provider's reference" in texts(at.error)
    assert _audit(db) == []

    at.text_input(key="reference").set_value("ch_000001")
    at.button(key=form).click().run()
    assert "Confirm:" in texts(at.warning) and _audit(db) == []  # nothing recorded before the confirmation
    at.button(key="cancel_decision").click().run()
    assert at.button(key=form) is not None and _audit(db) == []

    at.button(key=form).click().run()
    at.button(key="confirm_decision").click().run()
    assert not at.exception, at.exception
    assert "Recorded: alice will mark as SUCCEEDED effect 'charge:order-9'" in texts(at.success)
    assert _audit(db) == [("alice", "mark_succeeded", "charge:order-9", "ch_000001")]
    assert [s.value for s in at.subheader][0] == "Effects with an unknown outcome (0)"
    assert frames(at, "operator")[0]["operator"].tolist() == ["alice"]  # recent decisions


def test_unreachable_database_is_said_without_the_password(monkeypatch, kafka):
    from outbox.core.redact import Dsn

    at = app(monkeypatch, Dsn("postgresql://ops:s3cret-pw@127.0.0.1:1/app"), kafka).run()
    message = texts(at.error)
    assert "cannot connect to PostgreSQL at postgresql://ops:***@127.0.0.1:1/app" in message
    assert "Fix: check that the server runs" in message
    assert "s3cret-pw" not in message


def _audit(db) -> list[tuple]:
    return query(db, "SELECT operator, action, effect_key, provider_reference FROM outbox.operator_audit ORDER BY id")
