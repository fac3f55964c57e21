"""`outbox demo`."""

from __future__ import annotations

import argparse
import sys

from outbox.core.commands import DASHBOARD_MODULES, EMBEDDED_MODULES, missing_extra
from outbox.core.exits import EXIT_USAGE
from outbox.core.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="everything at once for a first look",
                          description="Starts the dev stack, the relay, two inbox consumers (one charging a fake "
                          "payment provider through the effects ledger), a shop placing orders, the dashboard, and "
                          "now and then a failure on purpose (a duplicate delivery, a dropped provider response, a "
                          "declined card, an unknown outcome). Prints a summary every 10 s; Ctrl-C stops it.")
    demo.add_argument("--rate", type=float, default=3.0, help="orders per second (default 3)")
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
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
                    external=args.external, with_relay=not args.no_relay)
