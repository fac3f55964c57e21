"""The payment worker: reads `ChargeCustomer`, charges the customer once, emits `PaymentCaptured`.

This is the worker of the seed's story. It will be redelivered a command it already handled, it
will time out on a charge that did or did not happen, and it will be killed after the provider
charged and before it recorded anything. None of that may charge a customer twice. Three
boundaries, each with its own guarantee:

1. **Inbox (exactly once into this database).** Source: the Kafka partitions of
   `outbox.event.order`; state and sink: this PostgreSQL database. One transaction per batch holds
   the inbox row `(event_id, "payments")`, the handler's writes and the Kafka offsets. A redelivered
   `ChargeCustomer` (same `event_id`) is suppressed before `charge()` runs. Dedupe = the stable
   `event_id` + the remembered inbox row, committed atomically with the effect.

2. **Effects ledger + the provider's idempotency key (the charge, outside the database).** The
   provider is outside every transaction we have, so "exactly once" cannot be claimed there. What
   we can claim: every attempt for order N uses the same key `charge:order-N`, derived from the
   business identity and never from the attempt; the ledger commits a lease on that key *before*
   calling (on its own connection: the handler's transaction could roll back and erase it) and the
   result after. Repeats converge on one charge:
     - the call times out or the answer is dropped -> outcome unknown -> the next attempt asks the
       provider by key (`reconcile=provider.lookup`): found = recorded, absent = charged again with
       the SAME key;
     - the worker is killed after the provider charged, before recording -> the lease expires ->
       unknown -> reconciled the same way;
     - the handler's transaction rolls back after a successful charge -> the retry gets the stored
       result (`replayed=True`) without calling.
   Assumption: the provider honours `Idempotency-Key` and can be asked about a key. If it could
   not tell, the effect stays unknown and waits for an operator (dashboard: "Unknown outcome"),
   never a charge under a new key.

3. **Outbox (a consumer that is also a producer).** `PaymentCaptured` is written with
   `outbox.emit` on the handler's connection, so it commits in the same transaction as the inbox
   row and the payment row: one event per handled command, never an event for a payment that
   rolled back, never a recorded payment whose event is lost. Publishing to Kafka from the handler
   instead would leave that boundary: a rolled-back batch would have published anyway.

One more line of defence, business-level: `payments.payments` is keyed by order id, so a second
`ChargeCustomer` for the same order (a new event, e.g. the order service re-sent it) records no
second payment and emits no second `PaymentCaptured` (its charge replays from the ledger).

    python -m outbox.examples.payment_worker --provider-url http://127.0.0.1:8099
"""

from __future__ import annotations

import argparse
from typing import Any, Literal, Protocol

import psycopg
from psycopg.types.json import Jsonb
from pydantic import BaseModel, PositiveInt

from inbox import Effects, Handlers, Message, Reconciled

CONSUMER = "payments"  # the inbox's name for this consumer, and its Kafka group
TOPIC = "outbox.event.order"  # where the relay puts the order service's events (aggregate 'order')

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS payments;
CREATE TABLE IF NOT EXISTS payments.payments (
    order_id     bigint PRIMARY KEY,        -- one payment per order, whatever arrives twice
    status       text NOT NULL,             -- captured | declined
    charge_id    text,                      -- the provider's reference
    amount       integer NOT NULL,
    currency     text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
"""


class ChargeCustomer(BaseModel):
    """The command's payload as this worker needs it; anything else is dead-lettered at once."""

    order_id: int
    customer: str
    amount: PositiveInt  # cents
    currency: Literal["EUR", "USD"] = "EUR"


class PaymentProvider(Protocol):
    """What the worker needs from a payment provider (Stripe-like): a charge that carries an
    idempotency key, and a lookup by that key. Map its answers to the ledger's vocabulary:
    return the charge, raise `inbox.DefiniteFailure` for a definite no (402 declined), raise
    anything else when there was no definite answer (timeouts, resets, 5xx, 409)."""

    def charge(self, key: str, amount: int, currency: str, metadata: dict | None = None) -> dict: ...

    def lookup(self, key: str, request: Any = None) -> Reconciled | None: ...


def create_schema(conn: psycopg.Connection) -> None:
    conn.execute(SCHEMA)


def charge_key(order_id: int) -> str:
    """The idempotency key: what the charge is about (the order), never which attempt this is.
    A key that changed on retry would turn every retry into a new charge."""
    return f"charge:order-{order_id}"


def payment_handlers(effects: Effects, provider: PaymentProvider) -> Handlers:
    # Default unknown="dead-letter": a command type this worker does not know is kept, not dropped.
    handlers = Handlers()

    @handlers.on("ChargeCustomer", ChargeCustomer)
    def charge(conn: psycopg.Connection, msg: Message, cmd: ChargeCustomer) -> None:
        # The outside effect first, so that a rolled-back transaction re-runs it and gets the stored
        # result instead of charging again. It may raise (OutcomeUnknown, EffectInProgress): the
        # inbox retries the command with backoff, and the next run() reconciles.
        result = effects.run(
            charge_key(cmd.order_id), cmd.model_dump(),
            call=lambda key: provider.charge(key, cmd.amount, cmd.currency,
                                             metadata={"order_id": str(cmd.order_id)}),
            reconcile=provider.lookup, message=msg)
        status = "captured" if result.ok else "declined"
        charge_id = result.response.get("id") if result.ok else None
        # Everything below is on `conn`: it commits with the inbox row and the offsets, or not at all.
        recorded = conn.execute(
            "INSERT INTO payments.payments (order_id, status, charge_id, amount, currency) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
            (cmd.order_id, status, charge_id, cmd.amount, cmd.currency)).fetchone()
        if recorded is None:
            return  # this order was settled by an earlier command: its event was emitted then
        conn.execute(
            "SELECT outbox.emit('payment', %s, %s, %s)",
            (str(cmd.order_id), "PaymentCaptured" if result.ok else "PaymentDeclined",
             Jsonb({"order_id": cmd.order_id, "charge_id": charge_id, "amount": cmd.amount,
                    "currency": cmd.currency})))

    return handlers


def main(argv: list[str] | None = None) -> int:
    from inbox import Runner, run_consumer
    from outbox.core.logs import setup_logging
    from outbox.core.settings import load_settings
    from outbox.demo.fake_provider import ProviderClient  # stands in for your provider's SDK

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--provider-url", default="http://127.0.0.1:8099")
    parser.add_argument("--provider-timeout-s", type=float, default=2.0,
                        help="keep it well below OUTBOX_EFFECT_LEASE_S: the lease must outlive the call")
    parser.add_argument("--instance-id", help="Kafka static membership: a restarted worker with the same id "
                        "gets its partitions back at once instead of after a rebalance")
    args = parser.parse_args(argv)

    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    with psycopg.connect(settings.require_database_url().secret(), autocommit=True) as conn:
        create_schema(conn)
    provider = ProviderClient(args.provider_url, timeout_s=args.provider_timeout_s)
    kafka_config = {"group_instance_id": args.instance_id} if args.instance_id else {}
    with Effects.from_settings(settings) as effects:
        runner = Runner.from_settings(settings, CONSUMER, payment_handlers(effects, provider), topics=[TOPIC],
                                      kafka_config=kafka_config)
        return run_consumer(runner)


if __name__ == "__main__":
    raise SystemExit(main())
