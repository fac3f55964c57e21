"""Every exception the inbox raises on purpose, in one place so callers can import and catch them."""

from __future__ import annotations


class InboxError(Exception):
    """The inbox cannot do what was asked; the message says why and how to fix it."""


class NonRetryable(Exception):
    """Raised by a handler when the record can never succeed (a malformed payload, a business rule
    that rejects it for good): retrying would only delay the partition, so the record is
    dead-lettered at once (attempts = 1). Every other exception keeps the retry policy. Chain the
    cause (`raise NonRetryable("...") from exc`) to keep it in the dead letter's traceback."""


class EffectError(Exception):
    """Base class of the effects ledger's refusals; `key` is the idempotency key concerned."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class EffectInProgress(EffectError):
    """Another attempt holds a live lease on this key (HTTP 409 in the IETF draft). Retry later."""

    def __init__(self, key: str, owner: str | None, expires_at):
        super().__init__(key, f"effect {key!r} is in progress under a lease held by {owner or '?'} "
                              f"until {expires_at}; retry after that (the lease expires if the holder died)")
        self.owner = owner
        self.expires_at = expires_at


class EffectLeaseLost(EffectError):
    """This attempt's lease expired and another attempt took the key over before this one could record
    its result, so the result was not recorded: only the current lease holder settles a key. Retry:
    the retry returns whatever the holder records (or waits on its lease). The late result is kept
    in the key's evidence for an operator."""

    def __init__(self, key: str, owner: str, holder: str | None, status: str | None):
        super().__init__(key, f"effect {key!r}: the lease of {owner} expired and the key changed hands "
                              f"(now {status or 'gone'}, held by {holder or 'nobody'}) before this attempt "
                              f"recorded its result; not recorded. Retry to get the stored outcome. Fix: give "
                              f"the call a timeout below the lease (OUTBOX_EFFECT_LEASE_S)")
        self.owner = owner
        self.holder = holder
        self.status = status


class EffectMismatch(EffectError):
    """The key was used before with a different request (HTTP 422 in the IETF draft). A bug in the caller:
    an idempotency key must identify one request, so derive it from what the request is about."""

    def __init__(self, key: str, stored: str, given: str):
        super().__init__(key, f"effect {key!r} was first requested with a different request "
                              f"(fingerprint {stored[:12]}..., now {given[:12]}...); an idempotency key must "
                              f"always carry the same request")
        self.stored_fingerprint = stored
        self.given_fingerprint = given


class OutcomeUnknown(EffectError):
    """The external call may or may not have happened and nothing could settle it: no reconcile hook
    or it could not tell, and the provider is not declared idempotent. Calling again could repeat the
    effect, so it is left to an operator (mark succeeded/failed, or approve a re-attempt with the same key)."""

    def __init__(self, key: str, reason: str):
        super().__init__(key, f"outcome of effect {key!r} is unknown: {reason}. Resolve it: reconcile with the "
                              f"provider, or have an operator mark it succeeded/failed or approve a "
                              f"re-attempt with the same key (outbox.effects.reattempt_approved)")
        self.reason = reason


class DefiniteFailure(Exception):
    """Raised by an effect's call when the provider definitely did NOT perform the effect and said so
    (e.g. HTTP 402 card declined, 400/422 validation). The ledger stores it as the key's final result.
    Anything else a call raises (timeouts, connection resets, 5xx) leaves the outcome unknown."""

    def __init__(self, response, message: str | None = None):
        super().__init__(message or f"definite failure: {response!r}")
        self.response = response
