"""The shipping service: one shipment per captured payment.

Boundary of the guarantee: **the inbox**. Source: the Kafka partitions of `outbox.event.payment`
(the payment worker's `PaymentCaptured`, key = order id); state and sink: this PostgreSQL
database. The inbox row `(event_id, "shipping")`, the shipment row and the Kafka offsets commit
in one transaction, so a redelivered `PaymentCaptured` (a relay retry, a consumer restart, a
replayed topic) is recognised by its `event_id` and creates no second shipment; a crash before
the commit creates none and the event comes again.

Outside it: anything that leaves this database (a courier's API, an email) would need the effects
ledger, as the payment worker's charge does. And the dedupe memory is bounded by
`OUTBOX_INBOX_RETENTION_DAYS`: a duplicate older than that would be accepted again.

    python -m outbox.examples.shipping
"""

from __future__ import annotations

import psycopg
from pydantic import BaseModel

from inbox import Handlers, Message

CONSUMER = "shipping"
TOPIC = "outbox.event.payment"

# No UNIQUE (order_id) on purpose: the demo counts shipments per order to show that the inbox alone
# keeps it at one. In your own schema add it as well: a second line of defence that still holds for
# duplicates older than the inbox's retention window.
SCHEMA = """
CREATE SCHEMA IF NOT EXISTS shipping;
CREATE TABLE IF NOT EXISTS shipping.shipments (
    id          bigserial PRIMARY KEY,
    order_id    bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS shipments_order_id ON shipping.shipments (order_id);
"""


class PaymentCaptured(BaseModel):
    order_id: int
    charge_id: str


def create_schema(conn: psycopg.Connection) -> None:
    conn.execute(SCHEMA)


def shipping_handlers() -> Handlers:
    # A declined payment is not shipped, but it is a known event: ignored explicitly, so that an
    # event type nobody expected still goes to the dead letters instead of vanishing.
    handlers = Handlers().ignore("PaymentDeclined")

    @handlers.on("PaymentCaptured", PaymentCaptured)
    def ship(conn: psycopg.Connection, msg: Message, payment: PaymentCaptured) -> None:
        conn.execute("INSERT INTO shipping.shipments (order_id) VALUES (%s)", (payment.order_id,))

    return handlers


def main() -> int:
    from inbox import Runner, run_consumer
    from outbox.core.logs import setup_logging
    from outbox.core.settings import load_settings

    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    with psycopg.connect(settings.require_database_url().secret(), autocommit=True) as conn:
        create_schema(conn)
    return run_consumer(Runner.from_settings(settings, CONSUMER, shipping_handlers(), topics=[TOPIC]))


if __name__ == "__main__":
    raise SystemExit(main())
