"""The order service: a producer. It takes an order and asks payments to charge the customer.

Boundary of the guarantee: **one PostgreSQL transaction** holds the order row and the
`ChargeCustomer` event (written by `outbox.emit`). Both commit or neither does, so there is no
order nobody will charge, and no charge request for an order that was rolled back. From there
the relay carries every committed event to Kafka (topic `outbox.event.order`, key = order id)
with a stable `event_id`, at least once; the payment worker's inbox turns "at least once" into
"once".

What it does **not** do: call the payment provider, or publish to Kafka itself. A "write the row,
then publish" service has a crash window between the two in which the order exists and the
command is lost (or, publishing first, a command for an order that never committed).

    python -m outbox.examples.order_service          # places one order, prints its id
"""

from __future__ import annotations

import psycopg
from psycopg.types.json import Jsonb

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS shop;
CREATE TABLE IF NOT EXISTS shop.orders (
    id          bigserial PRIMARY KEY,      -- the order's identity: every key downstream derives from it
    customer    text NOT NULL,
    amount      integer NOT NULL CHECK (amount > 0),   -- cents
    currency    text NOT NULL DEFAULT 'EUR',
    created_at  timestamptz NOT NULL DEFAULT now()
);
"""


def create_schema(conn: psycopg.Connection) -> None:
    conn.execute(SCHEMA)


def place_order(conn: psycopg.Connection, customer: str, amount: int, currency: str = "EUR") -> int:
    """Record the order and the command to charge it, atomically; returns the order id.

    The command carries everything payments needs (no call back to this service), and the order id
    as the business identity the payment worker derives its idempotency key from."""
    with conn.transaction():
        order_id = conn.execute(
            "INSERT INTO shop.orders (customer, amount, currency) VALUES (%s, %s, %s) RETURNING id",
            (customer, amount, currency)).fetchone()[0]
        conn.execute(
            "SELECT outbox.emit('order', %s, 'ChargeCustomer', %s)",
            (str(order_id), Jsonb({"order_id": order_id, "customer": customer, "amount": amount,
                                   "currency": currency})))
    return order_id


def main() -> int:
    from outbox.core.settings import load_settings

    settings = load_settings()
    with psycopg.connect(settings.require_database_url().secret(), autocommit=True) as conn:
        create_schema(conn)
        print(place_order(conn, "ada", 2500))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
