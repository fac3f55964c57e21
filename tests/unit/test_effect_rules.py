"""The effects ledger decisions and request fingerprints (pure)."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from inbox.effect_rules import Decision, Existing, canonical_json, decide, fingerprint

A, B, C = (uuid.UUID(int=i) for i in (1, 2, 3))


def test_fingerprint_ignores_key_order_and_spacing_but_not_values():
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert fingerprint({"amount": 25, "currency": "EUR"}) == fingerprint({"currency": "EUR", "amount": 25})
    assert fingerprint({"amount": 25}) != fingerprint({"amount": 26})
    assert fingerprint({"id": A, "amount": Decimal("2.50")}) == fingerprint({"id": str(A), "amount": "2.50"})


@pytest.mark.parametrize(("status", "expired", "same", "expected"), [
    ("succeeded", False, True, Decision.REPLAY),
    ("failed", False, True, Decision.REPLAY),
    ("in_progress", False, True, Decision.IN_PROGRESS),
    ("in_progress", True, True, Decision.EXPIRED),
    ("unknown", False, True, Decision.UNKNOWN),
    ("succeeded", False, False, Decision.MISMATCH),
    ("in_progress", False, False, Decision.MISMATCH),
    ("unknown", False, False, Decision.MISMATCH),
])
def test_effect_decisions(status, expired, same, expected):
    assert decide(Existing("fp", status, expired), "fp" if same else "other") is expected



def test_effect_statuses_are_the_columns_text_and_anything_else_is_refused():
    from inbox.effect_rules import EffectStatus

    assert decide(Existing("fp", EffectStatus.SUCCEEDED, False), "fp") is Decision.REPLAY
    assert [s.value for s in EffectStatus] == ["in_progress", "succeeded", "failed", "unknown"]
    assert EffectStatus.FAILED == "failed" and f"{EffectStatus.UNKNOWN}" == "unknown"
    with pytest.raises(ValueError, match="unexpected effect status 'pending'"):
        decide(Existing("fp", "pending", False), "fp")
