"""Every statement the effects ledger (inbox/effects.py) runs on outbox.effects, in one place.

The table and its constraints are in sql/003_inbox.sql. Statuses are spelled through EffectStatus
so that the Python side and the SQL side cannot drift apart; the values are fixed identifiers
interpolated once at import, never user input. Parameters are named (%(key)s) throughout.
"""

from __future__ import annotations

from inbox.effect_rules import EffectStatus as S

# Appends one entry to the row's evidence trail; used inside the SET list of an UPDATE.
EVIDENCE = ("evidence = evidence || jsonb_build_array(jsonb_build_object("
            "'at', clock_timestamp(), 'owner', %(owner)s::text, 'what', %(what)s::text, 'detail', %(detail)s::text))")

# A new key: leased at once, attempt 1. Nothing happens when the key exists (see SELECT_FOR_CLAIM).
INSERT_LEASED = (
    "INSERT INTO outbox.effects (key, fingerprint, request, status, attempts, lease_owner, "
    "lease_token, lease_expires_at, consumer, event_id, evidence) "
    f"VALUES (%(key)s, %(fp)s, %(request)s, '{S.IN_PROGRESS}', 1, %(owner)s, %(token)s, "
    "now() + make_interval(secs => %(lease)s), %(consumer)s, %(event_id)s, "
    "jsonb_build_array(jsonb_build_object('at', clock_timestamp(), 'owner', %(owner)s::text, "
    "'what', 'lease', 'detail', 'attempt 1'))) ON CONFLICT (key) DO NOTHING")

# The existing key, locked for the rest of the claiming transaction.
SELECT_FOR_CLAIM = (
    "SELECT fingerprint, status, response, resolved_via, attempts, lease_owner, lease_expires_at, "
    "lease_expires_at <= clock_timestamp() AS expired FROM outbox.effects WHERE key = %(key)s FOR UPDATE")

SELECT_ROW = "SELECT * FROM outbox.effects WHERE key = %(key)s"

SELECT_REATTEMPT_APPROVED = "SELECT reattempt_approved FROM outbox.effects WHERE key = %(key)s"

COUNT_REPLAY = "UPDATE outbox.effects SET replays = replays + 1, last_replayed_at = now() WHERE key = %(key)s"

# A lease that ran out without a result: the outcome is unknown from now on.
EXPIRE_LEASE = (
    f"UPDATE outbox.effects SET status = '{S.UNKNOWN}', lease_owner = NULL, lease_token = NULL, "
    f"lease_expires_at = NULL, last_error = %(detail)s, updated_at = now(), {EVIDENCE} "
    "WHERE key = %(key)s")

# Re-attempt an unknown outcome with the same key (provider dedupes it, absent, or operator approved).
TAKE_OVER = (
    f"UPDATE outbox.effects SET status = '{S.IN_PROGRESS}', attempts = attempts + 1, lease_owner = %(owner)s, "
    "lease_token = %(token)s, lease_expires_at = now() + make_interval(secs => %(lease)s), "
    f"reattempt_approved = false, updated_at = now(), {EVIDENCE} "
    f"WHERE key = %(key)s AND status = '{S.UNKNOWN}' RETURNING attempts")

RENEW_LEASE = (
    "UPDATE outbox.effects SET lease_expires_at = now() + make_interval(secs => %(lease)s) "
    f"WHERE key = %(key)s AND status = '{S.IN_PROGRESS}' AND lease_token = %(token)s")

# A definite outcome. Fenced by our lease token (our own call's result), or by the key still
# being unknown (a reconcile's finding); RETURNING nothing means the fence refused.
_RECORD = (
    "UPDATE outbox.effects SET status = %(status)s, response = %(response)s, resolved_via = %(via)s, "
    "completed_at = now(), updated_at = now(), lease_owner = NULL, lease_token = NULL, "
    f"lease_expires_at = NULL, {EVIDENCE} "
    "WHERE key = %(key)s AND {fence} RETURNING attempts")
RECORD_OWN_RESULT = _RECORD.format(fence=f"status = '{S.IN_PROGRESS}' AND lease_token = %(token)s")
RECORD_RECONCILED = _RECORD.format(fence=f"status = '{S.UNKNOWN}'")

# Evidence only (a late result that was not recorded, a reconcile note): returns what the key is now.
NOTE_LATE_RESULT = (f"UPDATE outbox.effects SET updated_at = now(), {EVIDENCE} WHERE key = %(key)s "
                    "RETURNING status, lease_owner")
NOTE = f"UPDATE outbox.effects SET last_error = %(detail)s, updated_at = now(), {EVIDENCE} WHERE key = %(key)s"

# Our call ended without a definite answer: unknown, unless the lease changed hands meanwhile.
MARK_UNKNOWN = (
    f"UPDATE outbox.effects SET status = '{S.UNKNOWN}', lease_owner = NULL, lease_token = NULL, "
    f"lease_expires_at = NULL, last_error = %(detail)s, updated_at = now(), {EVIDENCE} "
    "WHERE key = %(key)s AND lease_token = %(token)s")

# Settled keys past the effects window (%(cutoff)s), for inbox/retention.py's batched purge.
# in_progress and unknown keys are never purged: they still need a decision.
PURGEABLE = f"status IN ('{S.SUCCEEDED}', '{S.FAILED}') AND completed_at < %(cutoff)s"
