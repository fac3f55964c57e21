"""The dashboard's only write: an operator's decision on an effect whose outcome is unknown,
performed and audited by outbox.resolve_effect() (sql/004_dashboard.sql) as the dashboard role."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg.types.json import Jsonb

from dashboard.db import DashboardError, connect
from outbox.core.redact import Dsn, redact

Decision = Literal["succeeded", "failed", "reattempt"]

DECISIONS: dict[str, str] = {
    "succeeded": "Mark succeeded (the provider has it: give its reference)",
    "failed": "Mark failed (the provider never performed it, or refused it)",
    "reattempt": "Re-attempt with the same key (the provider deduplicates the key)",
}

# SQLSTATEs resolve_effect raises on purpose; their messages are written for the operator.
_REFUSALS = {"22023", "P0002", "55000"}


class Refused(Exception):
    """The decision was not applied; the message says why."""


@dataclass(frozen=True)
class Request:
    key: str
    decision: Decision
    reason: str
    operator: str
    provider_reference: str | None = None
    response: dict | None = None

    def summary(self) -> str:
        what = {"succeeded": "mark as SUCCEEDED", "failed": "mark as FAILED",
                "reattempt": "approve a RE-ATTEMPT with the same key for"}[self.decision]
        ref = f" with provider reference {self.provider_reference!r}" if self.provider_reference else ""
        return f"{self.operator} will {what} effect {self.key!r}{ref}, because: {self.reason}"


def request(key: str, decision: str, reason: str, operator: str, provider_reference: str | None = None,
            response_text: str | None = None) -> Request:
    """A decision from what the operator typed, refused here when the database would refuse it anyway
    (the database checks again: this only spares a round trip and gives the message sooner)."""
    for name, text in (("key", key), ("reason", reason), ("name", operator),
                       ("provider reference", provider_reference), ("response", response_text)):
        if text and "\x00" in text:
            raise Refused(f"the {name} contains a NUL character, which PostgreSQL cannot store")
    if decision not in DECISIONS:
        raise Refused(f"unknown decision {decision!r}; choose one of {', '.join(DECISIONS)}")
    reason, operator = (reason or "").strip(), (operator or "").strip()
    reference = (provider_reference or "").strip() or None
    if not operator:
        raise Refused("say who you are (your name is recorded in the audit log)")
    if not reason:
        raise Refused("say why: what did you check (e.g. the provider's dashboard shows charge ch_123)?")
    if decision == "succeeded" and reference is None:
        raise Refused("marking succeeded needs the provider's reference for this key (e.g. the charge id)")
    if decision == "reattempt" and reference is not None:
        raise Refused("a re-attempt takes no provider reference: the provider will answer the new attempt")
    return Request(key, decision, reason, operator, reference, parse_response(response_text or ""))


def parse_response(text: str) -> dict | None:
    """The optional response JSON typed by the operator: empty means none, else a JSON object."""
    if not (text or "").strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Refused(f"the response is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise Refused("the response must be a JSON object, e.g. {\"id\": \"ch_123\"}")
    return value


def resolve(dsn: Dsn, role: str, request: Request) -> int:
    """Apply the decision; returns the audit row's id. Raises Refused when the database refused it
    (not unknown any more, invalid input) and DashboardError when it could not be asked."""
    conn = connect(dsn, role, read_only=False)
    try:
        row = conn.execute(
            "SELECT outbox.resolve_effect(%s, %s, %s, %s, %s, %s)",
            (request.key, request.decision, request.reason, request.operator, request.provider_reference,
             Jsonb(request.response) if request.response is not None else None)).fetchone()
        return row[0]
    except psycopg.Error as exc:
        diag = exc.diag
        if diag.sqlstate in _REFUSALS:
            text = (diag.message_primary or str(exc)).removeprefix("resolve_effect: ")
            if diag.message_hint:
                text += f" ({diag.message_hint})"
            raise Refused(text) from None
        raise DashboardError(f"the decision could not be recorded: {redact(str(exc)).strip()}") from None
    finally:
        conn.close()
