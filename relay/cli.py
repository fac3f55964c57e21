"""`outbox relay`, `outbox dead-letters`, `outbox prune`: the relay's subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from outbox.core.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from outbox.core.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
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
        "cleanly, 1 a problem that needs a fix (the message says which), 2 bad configuration, 4 PostgreSQL "
        "refused the login, 5 a privilege, the REPLICATION attribute or the publication is missing (see "
        "`outbox grants`), 6 a Kafka topic is missing and the relay may not create it.")
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
    dlq.add_argument("ids", nargs="*", type=int, help="dead-letter ids to replay (or --id)")
    dlq.add_argument("--id", type=int, nargs="+", dest="id_flags", metavar="N", default=[],
                     help="dead letter id(s), as in `outbox inbox replay`")
    dlq.add_argument("--all", action="store_true", help="list: include replayed ones; replay: every open one")
    dlq.add_argument("--limit", type=int, default=100)
    dlq.add_argument("--json", action="store_true")
    dlq.add_argument("--dry-run", action="store_true", help="replay: show what would be republished, publish nothing")
    dlq.set_defaults(func=_dead_letters)

    prune = sub.add_parser("prune", help="delete published outbox events and bookkeeping older than a window",
                           description="Retention for the outbox table: deletes events the relay has published, "
                           "with their delivery rows and finished batches, older than --older-than, in small "
                           "committed batches (no long locks). Unpublished events are never deleted.")
    prune.add_argument("--older-than", default="7 days", metavar="INTERVAL",
                       help="a PostgreSQL interval (default: 7 days)")
    prune.add_argument("--batch-size", type=int, default=10_000, metavar="N", help="rows per DELETE (default 10000)")
    prune.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    prune.set_defaults(func=_prune)


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
    ids = args.ids + args.id_flags
    if bool(ids) == args.all:
        print("outbox dead-letters replay: give dead-letter ids (--id N ...) or --all, not both", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        rows = dead_letters.list_dead_letters(settings.require_database_url(), limit=1_000_000,
                                              ids=None if args.all else ids)
        for r in rows:
            print(f"would replay #{r.id}: event {r.event_id} {r.aggregate_type}/{r.aggregate_id} {r.event_type} "
                  f"({r.reason})")
        missing = sorted(set(ids) - {r.id for r in rows})
        if missing:
            print(f"no open dead letter {', '.join(map(str, missing))}", file=sys.stderr)
        print(f"dry run: {len(rows)} dead letter(s) would be replayed, nothing was published", file=sys.stderr)
        return EXIT_FAILED if missing else EXIT_OK
    report = dead_letters.replay(settings, None if args.all else ids,
                                 log=lambda line: print(line, file=sys.stderr))
    skipped = f", skipped {report.skipped} (being replayed concurrently)" if report.skipped else ""
    print(f"replayed {report.replayed}, failed {report.failed}{skipped}", file=sys.stderr)
    return EXIT_OK if report.failed == 0 else EXIT_FAILED


def _prune(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    if args.batch_size < 1:
        print("outbox prune: --batch-size must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    with psycopg.connect(settings.require_database_url().secret(), autocommit=True) as conn:
        if args.dry_run:
            events, deliveries, batches = conn.execute("SELECT * FROM outbox.prune_preview(%s::interval)",
                                                       (args.older_than,)).fetchone()
        else:
            events, deliveries, batches = conn.execute("CALL outbox.prune(%s::interval, %s)",
                                                       (args.older_than, args.batch_size)).fetchone()
    verb = "dry run: would prune" if args.dry_run else "pruned"
    print(f"{verb} {events} published events, {deliveries} delivery rows, {batches} batches older than "
          f"{args.older_than}" + (" (nothing was deleted)" if args.dry_run else ""), file=sys.stderr)
    return EXIT_OK
