"""The effects ledger against the fake payment provider (a real HTTP server on loopback) and the
real PostgreSQL. The provider's charge log is the proof of how many times money moved."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import psycopg
import pytest

from inbox import (
    DefiniteFailure,
    EffectInProgress,
    EffectLeaseLost,
    EffectMismatch,
    Effects,
    OutcomeUnknown,
    Reconciled,
    RetryPolicy,
    process,
)
from tests.support.inbox import Rec, create_business_schema, deposit, headers_for
from tests.workers.process import WorkerProcess

REQUEST = {"amount": 2500, "currency": "EUR"}


def charge(client, amount=2500):
    return lambda key: client.charge(key, amount, "EUR")


def never(key):
    raise AssertionError(f"the provider must not be called again for {key}")


def posts(provider, key):
    return [r["behaviour"] for r in provider.requests() if r["key"] == key]


def test_lease_is_committed_before_the_call_and_the_result_after(effects, client, provider, db):
    seen_during_call = []

    def call(key):
        # From another connection: the lease must already be durable while the provider is called.
        with psycopg.connect(db.secret()) as other:
            seen_during_call.append(other.execute(
                "SELECT status, lease_owner, lease_expires_at > now(), attempts FROM outbox.effects WHERE key = %s",
                (key,)).fetchone())
        return client.charge(key, 2500, "EUR")

    result = effects.run("charge:order-1", REQUEST, call)
    assert seen_during_call == [("in_progress", "worker-a", True, 1)]
    assert result.ok and not result.replayed and result.via == "call" and result.attempts == 1
    assert result.response["id"] == "ch_000001" and result.response["idempotency_key"] == "charge:order-1"
    row = effects.get("charge:order-1")
    assert (row["status"], row["response"], row["lease_token"], row["completed_at"] is not None) == (
        "succeeded", result.response, None, True)
    assert [e["what"] for e in row["evidence"]] == ["lease", "succeeded"]
    assert len(provider.charges()) == 1


def test_retry_of_a_completed_key_returns_the_stored_result_marked_replayed(effects, client, provider):
    first = effects.run("charge:order-2", REQUEST, charge(client))
    again = effects.run("charge:order-2", {"currency": "EUR", "amount": 2500}, never)  # same request, other order
    assert again.replayed and again.response == first.response and again.status == "succeeded"
    assert effects.get("charge:order-2")["replays"] == 1
    assert len(provider.charges()) == 1 and posts(provider, "charge:order-2") == ["ok"]


def test_same_key_with_another_request_is_refused(effects, client, provider):
    effects.run("charge:order-3", REQUEST, charge(client))
    with pytest.raises(EffectMismatch, match="different request") as err:
        effects.run("charge:order-3", {"amount": 9900, "currency": "EUR"}, never)
    assert err.value.key == "charge:order-3"
    assert len(provider.charges()) == 1


def test_concurrent_attempt_while_the_lease_is_live_gets_in_progress(db, client, provider):
    inside, release = threading.Event(), threading.Event()
    results = {}

    def slow_charge(key):
        inside.set()
        release.wait(10)
        return client.charge(key, 2500, "EUR")

    with Effects(db, lease_s=30, owner="worker-a") as a, Effects(db, lease_s=30, owner="worker-b") as b:
        first = threading.Thread(target=lambda: results.setdefault("a", a.run("charge:order-4", REQUEST, slow_charge)))
        first.start()
        assert inside.wait(10)
        with pytest.raises(EffectInProgress, match="worker-a") as err:
            b.run("charge:order-4", REQUEST, never)
        assert err.value.owner == "worker-a"
        release.set()
        first.join(10)
        second = b.run("charge:order-4", REQUEST, never)
    assert results["a"].ok and not results["a"].replayed
    assert second.replayed and second.response == results["a"].response
    assert len(provider.charges()) == 1


def test_definite_failure_is_stored_and_replayed(effects, client, provider):
    provider.script("decline")
    result = effects.run("charge:order-5", REQUEST, charge(client))
    assert result.status == "failed" and not result.ok and result.response["error"] == "card_declined"
    again = effects.run("charge:order-5", REQUEST, never)
    assert again.replayed and again.status == "failed"
    assert provider.charges() == [] and posts(provider, "charge:order-5") == ["decline"]


def test_indeterminate_error_leaves_the_outcome_unknown_until_settled_with_the_same_key(effects, client, provider):
    provider.script("error")
    with pytest.raises(OutcomeUnknown, match="HTTP 500"):
        effects.run("charge:order-6", REQUEST, charge(client))
    row = effects.get("charge:order-6")
    assert (row["status"], row["lease_token"], "HTTP 500" in row["last_error"]) == ("unknown", None, True)

    # Not idempotent and nothing to ask: it stays unknown, and nothing is called.
    with pytest.raises(OutcomeUnknown, match="Resolve it"):
        effects.run("charge:order-6", REQUEST, never)
    # The provider dedupes keys, so calling again with the same key is safe.
    result = effects.run("charge:order-6", REQUEST, charge(client), idempotent=True)
    assert result.ok and result.attempts == 2 and not result.replayed
    assert posts(provider, "charge:order-6") == ["error", "ok"] and len(provider.charges()) == 1


def test_dropped_response_is_reconciled_by_key_without_a_second_charge(effects, client, provider):
    provider.script("drop")  # charged, then the connection is closed without an answer
    with pytest.raises(OutcomeUnknown, match="no answer from the provider"):
        effects.run("charge:order-7", REQUEST, charge(client))
    assert len(provider.charges()) == 1
    result = effects.run("charge:order-7", REQUEST, never, reconcile=client.lookup)
    assert result.ok and result.via == "reconcile" and result.response == provider.charges()[0]
    assert posts(provider, "charge:order-7") == ["drop"]  # one charge request, ever
    assert effects.run("charge:order-7", REQUEST, never).replayed


def test_timed_out_call_that_never_reached_the_provider_is_retried_with_the_same_key(effects, client, provider):
    provider.script("timeout")  # held past the client's 0.5 s timeout, nothing charged
    with pytest.raises(OutcomeUnknown, match="timed out"):
        effects.run("charge:order-8", REQUEST, charge(client))
    result = effects.run("charge:order-8", REQUEST, charge(client), reconcile=client.lookup)
    assert result.ok and result.via == "call" and result.attempts == 2
    assert [c["idempotency_key"] for c in provider.charges()] == ["charge:order-8"]
    row = effects.get("charge:order-8")
    assert "provider has no record" in " ".join(e["detail"] for e in row["evidence"])


def test_operator_approved_reattempt_calls_again_with_the_same_key(effects, client, provider, db):
    provider.script("drop")
    with pytest.raises(OutcomeUnknown):
        effects.run("charge:order-9", REQUEST, charge(client))
    with psycopg.connect(db.secret()) as conn:
        conn.execute("UPDATE outbox.effects SET reattempt_approved = true WHERE key = 'charge:order-9'")
    result = effects.run("charge:order-9", REQUEST, charge(client))
    # The provider recognised the key and answered with the original charge: still one charge.
    assert result.ok and result.response == provider.charges()[0] and len(provider.charges()) == 1
    assert posts(provider, "charge:order-9") == ["drop", "replay"]
    assert effects.get("charge:order-9")["reattempt_approved"] is False


def test_worker_killed_after_the_charge_leaves_an_unknown_outcome_reconciled_without_a_second_charge(
        db, client, provider):
    with WorkerProcess("tests.workers.effect_worker", "--provider", provider.url, "--key", "charge:order-10", "--amount",
                       "2500", "--lease-s", "1.5", env={"OUTBOX_DATABASE_URL": db.secret()}) as worker:
        assert worker.wait(60) == -signal.SIGKILL
    assert len(provider.charges()) == 1  # the money moved...
    with Effects(db, lease_s=5, owner="worker-b") as effects:
        row = effects.get("charge:order-10")
        assert (row["status"], row["lease_owner"], row["response"]) == ("in_progress", "doomed-worker", None)
        # ...but the ledger cannot know. While the lease lives, the key is busy.
        with pytest.raises(EffectInProgress):
            effects.run("charge:order-10", REQUEST, never)
        time.sleep(max(0.0, (row["lease_expires_at"].timestamp() - time.time())) + 0.1)
        # Expired without a result: unknown. Without a way to ask, nothing is called.
        with pytest.raises(OutcomeUnknown, match="expired .* without a recorded result"):
            effects.run("charge:order-10", REQUEST, never)
        assert effects.get("charge:order-10")["status"] == "unknown"
        result = effects.run("charge:order-10", REQUEST, never, reconcile=client.lookup)
        assert result.ok and result.via == "reconcile" and result.response["id"] == provider.charges()[0]["id"]
        evidence = [e["what"] for e in effects.get("charge:order-10")["evidence"]]
    assert evidence == ["lease", "expired", "succeeded"]
    assert len(provider.charges()) == 1 and posts(provider, "charge:order-10") == ["ok"]


def test_attempt_whose_lease_was_taken_over_does_not_settle_the_key_and_raises_lease_lost(db, client, provider,
                                                                                          monkeypatch):
    """Worker A's call outlives its 1 s lease and A's renewals cannot reach PostgreSQL (a network
    partition, a stalled host); worker B takes the key over (same key, idempotent provider) and is
    still calling when A's call returns. A must not settle the key under B's lease."""
    key = "charge:order-stale"
    a_expired, b_calling, a_finished = threading.Event(), threading.Event(), threading.Event()
    outcome_a = []

    def call_a(k):
        time.sleep(1.3)  # past A's lease
        a_expired.set()
        assert b_calling.wait(15), "worker B never took the key over"
        return client.charge(k, 2500, "EUR")

    def call_b(k):
        b_calling.set()
        assert a_finished.wait(15), "worker A never finished"
        return client.charge(k, 2500, "EUR")

    with Effects(db, lease_s=1, owner="worker-a") as a, Effects(db, lease_s=30, owner="worker-b") as b:
        def unreachable(key, token):
            raise psycopg.OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(a, "_renew", unreachable)

        def run_a():
            try:
                outcome_a.append(a.run(key, REQUEST, call_a))
            except Exception as exc:  # noqa: BLE001 - inspected below
                outcome_a.append(exc)
            finally:
                a_finished.set()

        thread_a = threading.Thread(target=run_a)
        thread_a.start()
        assert a_expired.wait(15)
        result_b = []
        thread_b = threading.Thread(target=lambda: result_b.append(b.run(key, REQUEST, call_b, idempotent=True)))
        thread_b.start()
        thread_a.join(20)
        # A finished while B holds the lease: nothing recorded, B's lease intact, a retryable error.
        assert len(outcome_a) == 1 and isinstance(outcome_a[0], EffectLeaseLost), outcome_a
        assert (outcome_a[0].owner, outcome_a[0].holder, outcome_a[0].status) == ("worker-a", "worker-b", "in_progress")
        row = b.get(key)
        assert (row["status"], row["lease_owner"], row["response"], row["attempts"]) == (
            "in_progress", "worker-b", None, 2)
        thread_b.join(20)
        assert len(result_b) == 1 and result_b[0].ok and not result_b[0].replayed and result_b[0].attempts == 2
        # The handler's retry of A sees B's result without calling.
        retried = a.run(key, REQUEST, never)
        row = a.get(key)
    assert retried.replayed and retried.response == result_b[0].response and retried.via == "call"
    assert (row["status"], row["lease_token"], row["response"]) == ("succeeded", None, result_b[0].response)
    assert [e["what"] for e in row["evidence"]] == ["lease", "expired", "lease", "lease_lost", "succeeded"]
    assert [e["owner"] for e in row["evidence"]] == ["worker-a", "worker-b", "worker-b", "worker-a", "worker-b"]
    # One charge: B re-called with the same key and the provider deduplicated it.
    assert len(provider.charges()) == 1 and posts(provider, key) == ["ok", "replay"]


def test_effect_inside_a_handler_is_replayed_when_the_handler_retries(db, client, provider):
    """The handler's transaction rolls back after the charge; the retry must not charge again,
    and the ledger row points back at the inbox event for the trace view."""
    create_business_schema(db)
    eid = uuid.uuid4()
    results = []
    with Effects(db, lease_s=5) as effects, psycopg.connect(db.secret(), autocommit=True) as conn:
        def handler(c, msg):
            body = msg.json()
            key = f"charge:{msg.event_id}"
            results.append(effects.run(key, body, lambda k: client.charge(k, body["amount"], "EUR"), message=msg))
            if msg.attempt == 1:
                raise RuntimeError("crash after the charge, before the transaction commits")

        policy = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.01)
        process(conn, "payments", [Rec("orders", 0, 0, deposit("acc-1", 2500), headers_for(eid))], handler,
                policy=policy)
        row = effects.get(f"charge:{eid}")
    assert [r.replayed for r in results] == [False, True]
    assert (row["consumer"], row["event_id"], row["replays"]) == ("payments", eid, 1)
    assert len(provider.charges()) == 1


def test_definite_failure_is_raised_by_the_provider_client(client, provider):
    provider.script("decline")
    with pytest.raises(DefiniteFailure) as err:
        client.charge("k-decline", 100, "EUR")
    assert err.value.response["error"] == "card_declined"
    assert client.lookup("k-never-seen") == Reconciled.absent()


def test_call_lasting_three_leases_keeps_its_lease_renewed_and_records_while_others_get_in_progress(
        db, client, provider):
    """Lease 1 s, call 3 s: the lease is renewed while the call runs, so worker B (even declaring the
    provider idempotent, which would let it take an expired key over) is told to wait, and A's
    result is recorded as the first and only attempt."""
    key = "charge:order-long"
    inside, done = threading.Event(), threading.Event()
    outcome = []

    def long_call(k):
        inside.set()
        time.sleep(3.0)
        return client.charge(k, 2500, "EUR")

    with Effects(db, lease_s=1, owner="worker-a") as a, Effects(db, lease_s=1, owner="worker-b") as b:
        def run_a():
            try:
                outcome.append(a.run(key, REQUEST, long_call))
            except Exception as exc:  # noqa: BLE001 - inspected below
                outcome.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=run_a)
        thread.start()
        assert inside.wait(10)
        started = time.monotonic()
        refused, expiries = [], set()
        while not done.is_set():
            time.sleep(0.4)
            if done.is_set():
                break
            row = b.get(key)
            if row["status"] != "in_progress":
                break
            expiries.add(row["lease_expires_at"])
            with pytest.raises(EffectInProgress) as err:
                b.run(key, REQUEST, never, idempotent=True, reconcile=lambda k, r: Reconciled.absent())
            assert err.value.owner == "worker-a"
            refused.append(time.monotonic() - started)
        thread.join(10)
        row = a.get(key)
    assert len(outcome) == 1 and not isinstance(outcome[0], Exception), outcome
    assert outcome[0].ok and outcome[0].attempts == 1 and not outcome[0].replayed
    assert refused and max(refused) > 2.0  # long after the first 1 s lease would have expired
    assert len(expiries) >= 3  # the expiry moved forward while the call ran
    assert (row["status"], row["attempts"], row["lease_owner"]) == ("succeeded", 1, None)
    assert [e["what"] for e in row["evidence"]] == ["lease", "succeeded"]
    assert len(provider.charges()) == 1 and posts(provider, key) == ["ok"]


def test_renewal_that_finds_the_lease_token_gone_makes_the_attempt_record_nothing(db, client, provider, caplog):
    """While A's call runs, its lease changes hands behind its back (here: expired and declared
    unknown, as a worker finding it expired after a stall would do). A's next renewal finds its
    token gone; when the call returns, A records nothing and raises EffectLeaseLost."""
    key = "charge:order-fenced"
    inside, taken = threading.Event(), threading.Event()

    def call(k):
        inside.set()
        assert taken.wait(10)
        time.sleep(1.0)  # past at least one renewal (every lease_s / 3)
        return client.charge(k, 2500, "EUR")

    outcome = []
    caplog.set_level("WARNING", logger="inbox.effects")
    with Effects(db, lease_s=1.5, owner="worker-a") as a:
        thread = threading.Thread(target=lambda: outcome.append(_attempt(a, key, call)))
        thread.start()
        assert inside.wait(10)
        with psycopg.connect(db.secret(), autocommit=True) as other:
            other.execute("UPDATE outbox.effects SET status = 'unknown', lease_owner = NULL, lease_token = NULL, "
                          "lease_expires_at = NULL, last_error = 'expired' WHERE key = %s", (key,))
        taken.set()
        thread.join(15)
        row = a.get(key)
    assert len(outcome) == 1 and isinstance(outcome[0], EffectLeaseLost), outcome
    assert (outcome[0].holder, outcome[0].status) == (None, "unknown")
    assert (row["status"], row["response"], row["lease_token"]) == ("unknown", None, None)
    assert [e["what"] for e in row["evidence"]] == ["lease", "lease_lost"]
    # Noticed by the renewal while the call was still running, not only by the final compare-and-set.
    assert any("the lease of worker-a is gone" in r.getMessage() for r in caplog.records), caplog.text


def _attempt(effects, key, call):
    try:
        return effects.run(key, REQUEST, call)
    except Exception as exc:  # noqa: BLE001 - inspected by the caller
        return exc
