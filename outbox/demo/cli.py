"""`outbox demo`."""

from __future__ import annotations

import argparse
import sys

from outbox.core.commands import DASHBOARD_MODULES, EMBEDDED_MODULES, missing_extra
from outbox.core.exits import EXIT_USAGE
from outbox.core.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="the seed's story, live: an order, a charge, a shipment, and the faults in between",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Runs the reference services of examples/ (shipped as outbox.examples) on the dev stack:

  order service   writes an order and emits ChargeCustomer with outbox.emit, one transaction
  payment worker  inbox consumer (its own process): charges a fake provider under the key
                  charge:order-<id> through the effects ledger, records the payment and emits
                  PaymentCaptured in the transaction of its inbox row
  shipping        inbox consumer: one shipment per PaymentCaptured

plus the relay (outbox -> Kafka) and the dashboard. Faults happen on purpose, in turn: a record
redelivered (suppressed by the inbox), a provider time-out and a dropped response (outcome
unknown, reconciled by key), the worker killed -9 after the provider charged and before it
recorded (lease expires, reconciled), a declined card. A summary line every 10 s counts each
fault from the evidence it left, and double charges from the provider's own charge log (0), and
orders shipped twice (0). With --duration, the shop stops when the time is up and the demo waits
for the orders in flight to settle before the last line. Ctrl-C does the same.""")
    demo.add_argument("--rate", type=float, default=3.0, help="orders per second (default 3)")
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
    demo.add_argument("--fault-every", type=float, default=4.0, metavar="SECONDS",
                      help="seconds between two faults (default 4)")
    demo.add_argument("--no-dashboard", action="store_true", help="do not start the Streamlit dashboard")
    demo.add_argument("--external", action="store_true",
                      help="use OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP (and OUTBOX_DELIVERY) instead of "
                      "starting the embedded dev stack, e.g. in docker compose")
    demo.add_argument("--no-relay", action="store_true",
                      help="do not run a relay of its own (one runs separately for the same database)")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    if not args.external and (problem := missing_extra(EMBEDDED_MODULES, "embedded", "demo")) is not None:
        print(problem + " - or run it on your own servers with --external.", file=sys.stderr)
        return EXIT_USAGE
    if not args.no_dashboard and (problem := missing_extra(DASHBOARD_MODULES, "dashboard", "demo")) is not None:
        print(problem + " - or run it with --no-dashboard.", file=sys.stderr)
        return EXIT_USAGE
    from outbox.demo.run import run_demo

    return run_demo(settings, rate=args.rate, duration=args.duration, dashboard=not args.no_dashboard,
                    external=args.external, with_relay=not args.no_relay, fault_every_s=args.fault_every)
