"""Idempotency keys for side effects outside PostgreSQL (Stripe / IETF Idempotency-Key semantics).

    effects = Effects(dsn)
    result = effects.run("charge:order-123", {"amount": 2500, "currency": "EUR"},
                         call=lambda key: provider.charge(key, 2500, "EUR"),
                         reconcile=provider.lookup, message=msg)

- Before calling, the key is leased in the ledger and that lease is COMMITTED on the ledger's own
  connection (never the handler's transaction, which could still roll back and erase the proof
  that a call was about to happen).
- While the call runs, the lease is renewed every lease_s/3 (compare-and-set on the attempt's
  lease token), so a long call is not mistaken for a dead one. If a renewal finds the token gone
  (the lease expired during a stall and another attempt took the key over), the attempt records
  nothing when its call returns and raises EffectLeaseLost.
- The call gets the key and must pass it to the provider (e.g. an Idempotency-Key header).
- Success or a definite failure (the call raises DefiniteFailure) is stored; every later attempt
  with the key returns it without calling, marked `replayed`.
- A live lease held by another attempt raises EffectInProgress (409); the same key with another
  request raises EffectMismatch (422).
- Anything else the call raises (timeout, reset, 5xx) leaves the outcome UNKNOWN, as does a lease
  that expires without a result (the worker died mid-call). Unknown is settled by `reconcile`
  (ask the provider by key), by calling again with the SAME key when `idempotent=True` (the
  provider dedupes keys) or an operator approved it, or else left to an operator
  (OutcomeUnknown). It is never settled by calling with a new key.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from inbox import codec
from inbox import effect_sql as sql
from inbox.effect_rules import Decision, EffectStatus, Existing, ResolvedVia, decide, fingerprint
from inbox.errors import DefiniteFailure, EffectInProgress, EffectLeaseLost, EffectMismatch, OutcomeUnknown
from inbox.message import Message
from outbox.core.redact import Dsn

log = logging.getLogger("inbox.effects")

_json_dumps = functools.partial(json.dumps, default=str)


@dataclass(frozen=True)
class EffectResult:
    key: str
    status: EffectStatus  # SUCCEEDED or FAILED (a StrEnum: equal to "succeeded" / "failed")
    response: Any
    replayed: bool  # returned from the ledger without calling (Stripe's Idempotent-Replayed: true)
    via: ResolvedVia  # how the stored outcome was established
    attempts: int  # calls made under this key so far

    @property
    def ok(self) -> bool:
        return self.status is EffectStatus.SUCCEEDED


class ReconcileOutcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABSENT = "absent"  # the provider has no trace of the key


@dataclass(frozen=True)
class Reconciled:
    """What a reconcile hook learned from the provider about a key."""

    outcome: ReconcileOutcome  # plain "succeeded" / "failed" / "absent" are accepted too
    response: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcome", ReconcileOutcome(self.outcome))

    @classmethod
    def succeeded(cls, response: Any) -> "Reconciled":
        return cls(ReconcileOutcome.SUCCEEDED, response)

    @classmethod
    def failed(cls, response: Any) -> "Reconciled":
        return cls(ReconcileOutcome.FAILED, response)

    @classmethod
    def absent(cls) -> "Reconciled":
        """The provider has no trace of the key: the call never reached it, calling again is safe."""
        return cls(ReconcileOutcome.ABSENT)


class Claim(enum.Enum):
    """What one claiming step left us with, when it did not end in a result or an error."""

    LEASED = "leased"  # we hold the lease: call now
    UNKNOWN = "unknown"  # the key's outcome is unknown: settle it before anything else
    RETRY = "retry"  # the key changed hands between two statements: look again


_SETTLE = {ReconcileOutcome.SUCCEEDED: EffectStatus.SUCCEEDED, ReconcileOutcome.FAILED: EffectStatus.FAILED}


Call = Callable[[str], Any]
Reconcile = Callable[[str, Any], "Reconciled | None"]  # None: the provider cannot tell

class Effects:
    def __init__(self, dsn: Dsn | str, *, lease_s: float = 30.0, owner: str | None = None):
        """lease_s: how long an attempt may take before others treat its outcome as unknown. Keep the
        provider call's own timeout well below it."""
        self.dsn = dsn if isinstance(dsn, Dsn) else Dsn(dsn)
        self.lease_s = lease_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, **kwargs) -> "Effects":
        return cls(settings.require_database_url(), lease_s=settings.effect_lease_s, **kwargs)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "Effects":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- the API

    def run(self, key: str, request: Any, call: Call, *, reconcile: Reconcile | None = None,
            idempotent: bool = False, message: Message | None = None, consumer: str | None = None,
            event_id: uuid.UUID | None = None) -> EffectResult:
        """Perform `call(key)` at most once per key and return its stored outcome. See the module doc.

        request     what the call does (JSON-able); its fingerprint guards against key reuse
        reconcile   reconcile(key, request) -> Reconciled | None, asks the provider by key
        idempotent  the provider dedupes this key itself, so an unknown outcome may be re-called with it
        message     the inbox message being handled (records consumer and event id for tracing)
        """
        if not key or len(key) > 255:
            raise ValueError("an idempotency key must be 1-255 characters")
        if message is not None:
            consumer, event_id = message.consumer, message.event_id
        fp = fingerprint(request)
        for _ in range(3):  # the key may change hands between two of our statements: look again
            token = uuid.uuid4()
            claim = self._claim(key, fp, request, token, consumer, event_id)
            if claim is Claim.UNKNOWN:
                claim = self._settle_unknown(key, request, token, reconcile, idempotent)
            if isinstance(claim, EffectResult):
                return claim
            if claim is Claim.LEASED:
                return self._call(key, token, call)
        row = self.get(key) or {}
        raise EffectInProgress(key, row.get("lease_owner"), row.get("lease_expires_at"))

    def get(self, key: str) -> dict | None:
        """The ledger row of a key, for inspection."""
        with self._lock, self._connection().cursor(row_factory=dict_row) as cur:
            return cur.execute(sql.SELECT_ROW, {"key": key}).fetchone()

    # ----- steps

    def _claim(self, key, fp, request, token, consumer, event_id) -> EffectResult | Claim:
        """Lease a new key, or say what the existing one means: a result, Claim.UNKNOWN, or an error."""
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                inserted = conn.execute(
                    sql.INSERT_LEASED,
                    {"key": key, "fp": fp, "request": Jsonb(request, dumps=_json_dumps), "owner": self.owner,
                     "token": token, "lease": self.lease_s, "consumer": consumer, "event_id": event_id},
                ).rowcount
                if inserted:
                    return Claim.LEASED
                row = conn.execute(sql.SELECT_FOR_CLAIM, {"key": key}).fetchone()
                if row is None:  # purged between the two statements
                    return Claim.RETRY
                stored_fp, status, response, via, attempts, lease_owner, expires_at, expired = row
                decision = decide(Existing(stored_fp, status, bool(expired)), fp)
                if decision is Decision.MISMATCH:
                    raise EffectMismatch(key, stored_fp, fp)
                if decision is Decision.IN_PROGRESS:
                    raise EffectInProgress(key, lease_owner, expires_at)
                if decision is Decision.REPLAY:
                    conn.execute(sql.COUNT_REPLAY, {"key": key})
                    return EffectResult(key, EffectStatus(status), response, True, ResolvedVia(via), attempts)
                if decision is Decision.EXPIRED:
                    note = (f"lease of {lease_owner} expired at {expires_at} without a recorded result: "
                            f"the worker died or stalled during or after the call")
                    conn.execute(sql.EXPIRE_LEASE, {"key": key, "owner": self.owner, "what": "expired", "detail": note})
                    log.warning("effect %s: %s; outcome unknown", key, note)
                return Claim.UNKNOWN

    def _settle_unknown(self, key, request, token, reconcile, idempotent) -> EffectResult | Claim:
        """Try to settle an unknown outcome without risking a second effect."""
        if reconcile is not None:
            try:
                found = reconcile(key, request)
            except Exception as exc:  # noqa: BLE001 - the provider could not tell; keep it unknown
                found = None
                self._note(key, "reconcile", f"reconcile failed: {codec.describe_error(exc)}")
            if found is not None and found.outcome in _SETTLE:
                return self._record(key, _SETTLE[found.outcome], found.response, ResolvedVia.RECONCILE)
            if found is not None and found.outcome is ReconcileOutcome.ABSENT:
                self._note(key, "reconcile", "the provider has no record of the key: calling again with it")
                return self._take_over(key, token, "provider has no record of the key")
        approved = self._reattempt_approved(key)
        if idempotent or approved:
            why = "re-attempt approved by an operator" if approved else "provider dedupes the key (idempotent=True)"
            return self._take_over(key, token, why)
        row = self.get(key) or {}
        raise OutcomeUnknown(key, row.get("last_error") or "no result was recorded")

    def _take_over(self, key, token, why: str) -> Claim:
        with self._lock:
            row = self._connection().execute(
                sql.TAKE_OVER,
                {"key": key, "owner": self.owner, "token": token, "lease": self.lease_s, "what": "lease",
                 "detail": f"re-attempt with the same key: {why}"}).fetchone()
        # Someone else took it over (or settled it) meanwhile: run() re-reads the key.
        return Claim.LEASED if row else Claim.RETRY

    def _call(self, key: str, token: uuid.UUID, call: Call) -> EffectResult:
        renewal = _LeaseRenewal(self, key, token)
        try:
            try:
                response = call(key)
            finally:
                renewal.stop()
        except DefiniteFailure as exc:
            return self._record(key, EffectStatus.FAILED, exc.response, ResolvedVia.CALL, token)
        except BaseException as exc:
            error = codec.describe_error(exc)
            self._mark_unknown(key, token, error)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit: still recorded as unknown above
            raise OutcomeUnknown(key, f"the call failed without a definite answer ({error})") from exc
        # A lost renewal needs no branch of its own: the token it could not find is gone for good
        # (tokens are never reused), so _record's compare-and-set refuses and raises EffectLeaseLost.
        return self._record(key, EffectStatus.SUCCEEDED, response, ResolvedVia.CALL, token)

    def _renew(self, key: str, token: uuid.UUID) -> bool:
        """Extend our lease; False when the token is gone (expired and taken over, or settled by an
        operator): from then on this attempt must not record anything."""
        with self._lock:
            return self._connection().execute(
                sql.RENEW_LEASE, {"key": key, "token": token, "lease": self.lease_s}).rowcount == 1

    def _record(self, key, status: EffectStatus, response, via: ResolvedVia,
                token: uuid.UUID | None = None) -> EffectResult | Claim:
        """Store a definite outcome. With `token` (the outcome of our own call) only while we still
        hold that lease: an attempt whose lease expired and was taken over must not settle the key
        under the new holder's feet, whose call may be in flight or may end differently. The fence
        is the token, not the clock: a late result is still accepted if nobody took the key over.
        Without a token (reconcile) only while the key is still unknown; Claim.RETRY otherwise."""
        detail = f"{via}: {status}"
        params = {"key": key, "status": status, "response": Jsonb(response, dumps=_json_dumps), "via": via,
                  "owner": self.owner, "what": status, "detail": detail, "token": token}
        with self._lock:
            conn = self._connection()
            row = conn.execute(sql.RECORD_OWN_RESULT if token else sql.RECORD_RECONCILED, params).fetchone()
            if row is not None:
                return EffectResult(key, status, response, False, via, row[0])
            if token is None:
                return Claim.RETRY  # taken over or settled meanwhile: run() looks again
            # Not recorded, but an operator deciding the key wants to know what this attempt got.
            late = f"late {detail} of an attempt whose lease was taken over; not recorded: {_json_dumps(response)}"
            stored = conn.execute(sql.NOTE_LATE_RESULT,
                                  {**params, "what": "lease_lost", "detail": late[:2000]}).fetchone()
        holder_status, holder = stored if stored else (None, None)
        log.warning("effect %s: this attempt (%s) lost its lease before recording its %s result; the key is now "
                    "%s, held by %s", key, self.owner, status, holder_status or "gone", holder or "nobody")
        raise EffectLeaseLost(key, self.owner, holder, holder_status)

    def _mark_unknown(self, key, token, error: str) -> None:
        with self._lock:
            self._connection().execute(
                sql.MARK_UNKNOWN,
                {"key": key, "token": token, "owner": self.owner, "what": "indeterminate", "detail": error})
        log.warning("effect %s: outcome unknown after %s", key, error)

    def _note(self, key, what: str, detail: str) -> None:
        with self._lock:
            self._connection().execute(sql.NOTE, {"key": key, "owner": self.owner, "what": what, "detail": detail})

    def _reattempt_approved(self, key) -> bool:
        with self._lock:
            row = self._connection().execute(sql.SELECT_REATTEMPT_APPROVED, {"key": key}).fetchone()
        return bool(row and row[0])

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn.secret(), autocommit=True, connect_timeout=15,
                                         application_name="inbox-effects")
        return self._conn


class _LeaseRenewal:
    """Keeps an attempt's lease alive while its call runs, so a call may take longer than lease_s
    without another worker declaring its outcome unknown; lease_s then only bounds how long a
    worker that died mid-call keeps the key busy. Renews every lease_s/3: two renewals can fail
    (a slow statement, a brief disconnect) before the lease runs out."""

    def __init__(self, effects: Effects, key: str, token: uuid.UUID):
        self.effects, self.key, self.token = effects, key, token
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"effect-lease:{key[:40]}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.effects.lease_s / 3
        while not self._stopped.wait(interval):
            try:
                held = self.effects._renew(self.key, self.token)
            except Exception as exc:  # noqa: BLE001 - the lease may still be alive: try again next time
                log.warning("effect %s: could not renew the lease of %s (%s); retrying in %.1f s", self.key,
                            self.effects.owner, codec.describe_error(exc), interval)
                continue
            if not held:
                log.warning("effect %s: the lease of %s is gone (expired and taken over, or settled by an "
                            "operator) while its call is still running; its result will not be recorded",
                            self.key, self.effects.owner)
                return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
