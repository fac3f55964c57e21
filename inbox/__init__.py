"""The inbox: deduplicating Kafka consumers with exactly-once effects in PostgreSQL, and an
idempotency-key ledger for effects outside it. See docs/inbox.md.

    from inbox import Runner, run_consumer, Effects

    def handle(conn, msg):              # runs inside the inbox's transaction
        order = msg.json()
        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (order["total"], order["account"]))

    run_consumer(Runner.from_settings(load_settings(), "billing", handle, topics=["outbox.event.order"]))
"""

from inbox.consumer import Runner, run_consumer
from inbox.effect_rules import EffectStatus
from inbox.effects import EffectResult, Effects, Reconciled
from inbox.errors import (DefiniteFailure, EffectError, EffectInProgress, EffectLeaseLost, EffectMismatch,
                          InboxError, NonRetryable, OutcomeUnknown)
from inbox.handlers import Handlers, PayloadInvalid, UnknownEventType
from inbox.message import Message
from inbox.process import BatchResult, Handler, process
from inbox.replay import replay_requested
from inbox.retention import PurgeReport, purge
from inbox.retry import RetryPolicy
from inbox.store import load_positions

__all__ = [
    "BatchResult", "DefiniteFailure", "EffectError", "EffectInProgress", "EffectLeaseLost", "EffectMismatch", "EffectResult", "EffectStatus", "Effects",
    "Handler", "Handlers", "InboxError", "Message", "NonRetryable", "OutcomeUnknown", "PayloadInvalid", "PurgeReport", "Reconciled", "RetryPolicy", "Runner", "UnknownEventType",
    "load_positions", "process", "purge", "replay_requested", "run_consumer",
]
