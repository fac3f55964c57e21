"""Pure rules of the effects ledger: request fingerprints and what an existing key means for a new attempt."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any


def canonical_json(value: Any) -> str:
    """One spelling per JSON value (sorted keys, no spaces), so equal requests hash equally.
    Non-JSON scalars (UUID, Decimal, datetime) are taken by their str()."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(request: Any) -> str:
    return hashlib.sha256(canonical_json(request).encode("utf-8")).hexdigest()


class EffectStatus(enum.StrEnum):
    """outbox.effects.status (the CHECK constraint effects_status in sql/003_inbox.sql)."""

    IN_PROGRESS = "in_progress"  # a worker holds a lease and may be calling right now
    SUCCEEDED = "succeeded"  # settled: the stored result is returned to every later attempt
    FAILED = "failed"  # settled: a definite failure (DefiniteFailure), also returned without calling
    UNKNOWN = "unknown"  # the call may or may not have happened: reconcile, re-call with the same key, or an operator

    @property
    def settled(self) -> bool:
        return self in SETTLED


SETTLED = frozenset({EffectStatus.SUCCEEDED, EffectStatus.FAILED})


class ResolvedVia(enum.StrEnum):
    """outbox.effects.resolved_via: how a settled outcome was established."""

    CALL = "call"
    RECONCILE = "reconcile"
    OPERATOR = "operator"


class Decision(enum.Enum):
    MISMATCH = "mismatch"  # same key, different request: refuse (422)
    REPLAY = "replay"  # settled: return the stored result, do not call
    IN_PROGRESS = "in_progress"  # a live lease: refuse for now (409)
    EXPIRED = "expired"  # lease ran out without a result: the outcome is now unknown
    UNKNOWN = "unknown"  # already unknown: reconcile, re-call with the same key, or leave to an operator


@dataclass(frozen=True)
class Existing:
    """What the ledger holds for a key when a new attempt arrives."""

    fingerprint: str
    status: EffectStatus | str  # the column's text is accepted and checked by decide()
    lease_expired: bool


def decide(existing: Existing, request_fingerprint: str) -> Decision:
    # A mismatch is reported even for settled keys: replaying another request's result would be
    # wrong, and the caller has a bug (the key does not identify the request).
    if existing.fingerprint != request_fingerprint:
        return Decision.MISMATCH
    try:
        status = EffectStatus(existing.status)
    except ValueError:
        raise ValueError(f"unexpected effect status {existing.status!r}") from None
    if status.settled:
        return Decision.REPLAY
    if status is EffectStatus.IN_PROGRESS:
        return Decision.EXPIRED if existing.lease_expired else Decision.IN_PROGRESS
    return Decision.UNKNOWN
