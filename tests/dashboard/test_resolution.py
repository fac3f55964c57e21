"""The dashboard's one write: outbox.resolve_effect() as the read-only dashboard role. An operator
decision on an unknown outcome is audited and honoured by the effects ledger; anything that is
not actually unknown, and any invalid input, is refused; the role can write nothing else."""

from __future__ import annotations

import re

import psycopg
import pytest
from psycopg import sql

from dashboard import actions
from dashboard.db import DashboardError, connect
from inbox import OutcomeUnknown
from outbox.core.migrate import migrate

REQUEST = {"amount": 2500, "currency": "EUR"}
ROLE = "outbox_dashboard"


def charge(client):
    return lambda key: client.charge(key, 2500, "EUR")


def never(key):
    raise AssertionError(f"the provider must not be called for {key}")


def unknown(effects, client, provider, key="charge:order-1") -> str:
    """A real unknown outcome: the provider charged and the answer was lost."""
    provider.script("drop")
    with pytest.raises(OutcomeUnknown):
        effects.run(key, REQUEST, charge(client))
    assert effects.get(key)["status"] == "unknown"
    return key


def decide(db, key, decision, reason="checked the provider dashboard", operator="alice", ref=None, response=None):
    return actions.resolve(db, ROLE, actions.Request(key, decision, reason, operator, ref, response))


def audit(db) -> list[dict]:
    with psycopg.connect(db.secret()) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT * FROM outbox.operator_audit ORDER BY id").fetchall()


def test_mark_succeeded_is_audited_and_the_ledger_returns_it_without_calling(db, effects, client, provider):
    key = unknown(effects, client, provider)
    charged = provider.charges()[0]
    audit_id = decide(db, key, "succeeded", ref=charged["id"], response={"id": charged["id"], "amount": 2500})
    [entry] = audit(db)
    assert entry["id"] == audit_id
    assert (entry["operator"], entry["action"], entry["effect_key"], entry["provider_reference"],
            entry["previous_status"], entry["previous_attempts"], entry["reason"]) == (
        "alice", "mark_succeeded", key, charged["id"], "unknown", 1, "checked the provider dashboard")
    assert entry["db_user"] == db.params()["user"] and entry["at"] is not None
    result = effects.run(key, REQUEST, never)
    assert (result.status, result.via, result.replayed) == ("succeeded", "operator", True)
    assert result.response == {"id": charged["id"], "amount": 2500, "provider_reference": charged["id"]}
    row = effects.get(key)
    assert row["evidence"][-1]["what"] == "mark_succeeded" and row["evidence"][-1]["owner"] == "operator alice"
    assert len(provider.charges()) == 1


def test_mark_failed_is_returned_as_a_failure(db, effects, client, provider):
    key = unknown(effects, client, provider)
    decide(db, key, "failed", reason="provider has no such charge")
    result = effects.run(key, REQUEST, never)
    assert (result.status, result.ok, result.via) == ("failed", False, "operator")
    assert result.response == {"error": "marked failed by an operator", "reason": "provider has no such charge"}


def test_reattempt_calls_the_provider_again_with_the_same_key_and_charges_once(db, effects, client, provider):
    key = unknown(effects, client, provider)
    decide(db, key, "reattempt", reason="provider deduplicates keys for 24 h")
    assert effects.get(key)["reattempt_approved"] is True
    result = effects.run(key, REQUEST, charge(client))
    assert result.ok and result.via == "call" and result.attempts == 2
    assert len(provider.charges()) == 1  # the provider recognised the key: still one charge
    assert [e["action"] for e in audit(db)] == ["approve_reattempt"]


def test_an_expired_lease_is_unknown_and_can_be_decided(db, effects):
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        conn.execute("INSERT INTO outbox.effects (key, fingerprint, request, status, attempts, lease_owner, "
                     "lease_token, lease_expires_at) VALUES ('charge:dead', 'f', '{}', 'in_progress', 1, 'w-9', "
                     "gen_random_uuid(), now() - interval '1 second')")
    decide(db, "charge:dead", "failed", reason="worker died before calling; provider has nothing")
    assert audit(db)[0]["previous_status"] == "in_progress (lease expired)"
    row = effects.get("charge:dead")
    assert (row["status"], row["lease_token"], row["resolved_via"]) == ("failed", None, "operator")


def test_refuses_to_decide_what_is_not_unknown(db, effects, client, provider):
    effects.run("charge:ok", REQUEST, charge(client))
    decided = unknown(effects, client, provider, "charge:decided")
    decide(db, decided, "failed")
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        conn.execute("INSERT INTO outbox.effects (key, fingerprint, request, status, attempts, lease_owner, "
                     "lease_token, lease_expires_at) VALUES ('charge:busy', 'f', '{}', 'in_progress', 1, 'w-1', "
                     "gen_random_uuid(), now() + interval '1 hour')")
    snapshot = _effects(db)
    for key, decision, expected in [
        ("charge:ok", "failed", "is not unknown: succeeded (via call)"),
        ("charge:decided", "succeeded", "is not unknown: failed (via operator)"),
        ("charge:busy", "failed", "in progress, w-1 holds its lease"),
        ("charge:nope", "failed", "no effect with key 'charge:nope'"),
    ]:
        with pytest.raises(actions.Refused, match=re.escape(expected)):
            decide(db, key, decision, ref="ch_1" if decision == "succeeded" else None)
    assert _effects(db) == snapshot and len(audit(db)) == 1
    approved = unknown(effects, client, provider, "charge:approved")
    decide(db, approved, "reattempt")
    with pytest.raises(actions.Refused, match="already approved"):
        decide(db, approved, "reattempt")


@pytest.mark.parametrize("overrides, message", [
    ({"decision": "refund"}, "decision must be succeeded, failed or reattempt"),
    ({"decision": "succeeded"}, "needs the provider's reference"),
    ({"decision": "succeeded", "ref": "   "}, "needs the provider's reference"),
    ({"reason": "  "}, "reason must say why"),
    ({"reason": "x" * 2001}, "reason must say why"),
    ({"operator": ""}, "operator must name who decides"),
    ({"operator": "o" * 201}, "operator must name who decides"),
    ({"ref": "r" * 501}, "provider_reference is longer than 500"),
    ({"decision": "reattempt", "ref": "ch_1"}, "a re-attempt takes no provider reference"),
    ({"response": ["not", "an", "object"]}, "response must be a JSON object"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_the_function_validates_its_inputs(db, effects, client, provider, overrides, message):
    key = unknown(effects, client, provider)
    kwargs = {"decision": "failed", **overrides}
    with pytest.raises(actions.Refused, match=message):
        decide(db, key, **kwargs)
    assert effects.get(key)["status"] == "unknown" and audit(db) == []


def test_hostile_text_is_stored_verbatim(db, effects, client, provider):
    key = unknown(effects, client, provider, "charge:'; DROP TABLE outbox.effects; --")
    reason = "Robert'); DROP TABLE outbox.operator_audit; -- ✓ 注文 %s %(x)s"
    decide(db, key, "succeeded", reason=reason, operator="O'Brien \"ops\"", ref="ch_'1'")
    [entry] = audit(db)
    assert (entry["effect_key"], entry["reason"], entry["operator"], entry["provider_reference"]) == (
        key, reason, "O'Brien \"ops\"", "ch_'1'")
    assert effects.get(key)["status"] == "succeeded"


def test_operator_input_is_checked_before_asking_the_database():
    with pytest.raises(actions.Refused, match="say who you are"):
        actions.request("k", "failed", "why", "  ")
    with pytest.raises(actions.Refused, match="NUL"):
        actions.request("k", "failed", "why\x00", "me")
    with pytest.raises(actions.Refused, match="not valid JSON"):
        actions.request("k", "succeeded", "why", "me", "ch_1", "{oops")
    with pytest.raises(actions.Refused, match="JSON object"):
        actions.request("k", "succeeded", "why", "me", "ch_1", "[1]")
    ok = actions.request("k", "succeeded", " why ", " me ", " ch_1 ", '{"id": "ch_1"}')
    assert ok == actions.Request("k", "succeeded", "why", "me", "ch_1", {"id": "ch_1"})


@pytest.mark.parametrize("statement", [
    "UPDATE outbox.effects SET status = 'succeeded'",
    "INSERT INTO outbox.operator_audit (operator, action, effect_key, reason, previous_status, previous_attempts) "
    "VALUES ('x', 'mark_failed', 'k', 'r', 'unknown', 1)",
    "DELETE FROM outbox.events",
    "UPDATE outbox.inbox_dead_letters SET status = 'replay_requested'",
    "TRUNCATE outbox.deliveries",
    "SELECT outbox.emit('order', '1', 'OrderPlaced', '{}')",
    "CALL outbox.prune('0 days')",
    "SELECT outbox.grant_dashboard('outbox_dashboard')",
    "CREATE TABLE outbox.mine (x int)",
    "ALTER TABLE outbox.effects ADD COLUMN x int",
    "SELECT pg_drop_replication_slot('any')",
])
def test_the_dashboard_role_cannot_write_anything_else(db, statement):
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(ROLE)))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
        # ...while reading and the audited function are allowed.
        conn.execute("SELECT count(*) FROM outbox.in_flight, outbox.effects_unresolved")
        with pytest.raises(psycopg.errors.NoDataFound):
            conn.execute("SELECT outbox.resolve_effect('missing', 'failed', 'r', 'o')")


def _effects(db) -> list[tuple]:
    with psycopg.connect(db.secret()) as conn:
        return conn.execute("SELECT key, status, response, resolved_via, reattempt_approved, lease_token, "
                            "evidence FROM outbox.effects ORDER BY key").fetchall()


def test_migrate_without_createrole_succeeds_and_says_what_to_run(plain_cluster):
    admin = plain_cluster
    with psycopg.connect(admin.secret(), autocommit=True) as conn:
        conn.execute("CREATE ROLE app_owner LOGIN PASSWORD 'app-pw' NOCREATEROLE")
        conn.execute("CREATE DATABASE app_nocreaterole OWNER app_owner")
    owner = admin.with_params(user="app_owner", password="app-pw", dbname="app_nocreaterole")
    lines: list[str] = []
    migrate(owner, wal_check=False, log=lines.append)
    notes = [line for line in lines if line.startswith("note:")]
    assert notes == ["note: role outbox_dashboard was not created: app_owner may not create roles. As a role with "
                     "CREATEROLE run: CREATE ROLE outbox_dashboard NOLOGIN; then as app_owner: "
                     "SELECT outbox.grant_dashboard('outbox_dashboard');"]
    assert "app-pw" not in "\n".join(lines)
    with pytest.raises(DashboardError, match="CREATE ROLE outbox_dashboard NOLOGIN"):
        connect(owner, ROLE)

    with psycopg.connect(admin.secret(), autocommit=True) as conn:
        conn.execute("CREATE ROLE outbox_dashboard NOLOGIN")
    with pytest.raises(DashboardError, match='GRANT outbox_dashboard TO "app_owner"') as err:
        connect(owner, ROLE)
    assert "app-pw" not in str(err.value)
    with psycopg.connect(admin.secret(), autocommit=True) as conn:
        conn.execute("GRANT outbox_dashboard TO app_owner")
    with psycopg.connect(owner.secret(), autocommit=True) as conn:
        conn.execute("SELECT outbox.grant_dashboard('outbox_dashboard')")
    conn = connect(owner, ROLE)
    try:
        assert conn.execute("SELECT current_user, count(*) FROM outbox.in_flight").fetchone() == (ROLE, 0)
    finally:
        conn.close()
    with pytest.raises(actions.Refused, match="no effect with key"):
        actions.resolve(owner, ROLE, actions.Request("k", "failed", "why", "me"))
