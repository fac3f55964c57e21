"""`outbox inbox ...`: operate the inbox's dead letters and retention from a shell.

    outbox inbox dead-letters [--consumer C] [--all] [--json]
    outbox inbox replay  --consumer C (--id N ... | --event UUID ... | --all) [--wait SECONDS]
    outbox inbox discard --consumer C (--id N ... | --event UUID ...)
    outbox inbox purge   [--days D] [--effect-days D] [--batch N]

Exit codes: 0 done, 1 something was refused or failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from datetime import timedelta

import psycopg

from inbox import replay, retention
from outbox.core import commands
from outbox.core.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inbox", help="inbox dead letters (list, replay, discard) and retention",
        description="Operate the deduplicating inbox of your consumers (tables outbox.inbox_* in "
                    "OUTBOX_DATABASE_URL). Replays are performed by the running consumer itself.")
    sub = parser.add_subparsers(dest="inbox_command", metavar="ACTION", required=True)

    dl = sub.add_parser("dead-letters", help="list dead letters with the command that replays each")
    dl.add_argument("--consumer", help="only this consumer")
    dl.add_argument("--all", action="store_true", help="include replayed and discarded ones")
    dl.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    dl.set_defaults(func=_dead_letters)

    rp = sub.add_parser("replay", help="ask the running consumer to re-run its handler on dead letters",
                        description="Marks dead letters for replay. The consumer's runner picks them up within "
                                    "a few seconds and re-runs its handler on the stored record, in one "
                                    "transaction with the inbox row (no Kafka round trip, so the event cannot be "
                                    "suppressed as a duplicate of itself). A failing replay puts the dead letter "
                                    "back with the new error.")
    _selection_args(rp, allow_all=True)
    rp.add_argument("--wait", type=float, metavar="SECONDS", default=0,
                    help="wait up to SECONDS for the consumer to perform the replays and report each outcome")
    rp.set_defaults(func=_replay)

    ds = sub.add_parser("discard", help="give up on dead letters (kept for the record, purged by retention)")
    _selection_args(ds, allow_all=False)
    ds.set_defaults(func=_discard)

    pg = sub.add_parser("purge", help="delete inbox rows and resolved records past the retention window",
                        description="Deletes, in bounded batches: inbox rows not seen for --days (a duplicate "
                                    "arriving later is accepted again, see docs/inbox.md), per-minute stats and "
                                    "replayed/discarded dead letters older than --days, and settled effect keys "
                                    "older than --effect-days. Run it from cron or a scheduler.")
    pg.add_argument("--days", type=float, help="inbox window in days (default OUTBOX_INBOX_RETENTION_DAYS)")
    pg.add_argument("--effect-days", type=float, help="effects window in days (default OUTBOX_EFFECT_RETENTION_DAYS)")
    pg.add_argument("--batch", type=int, help="rows per DELETE (default OUTBOX_INBOX_PURGE_BATCH)")
    pg.set_defaults(func=_purge)


def _selection_args(parser: argparse.ArgumentParser, *, allow_all: bool) -> None:
    parser.add_argument("--consumer", required=True, help="the consumer whose dead letters these are")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--id", type=int, nargs="+", dest="ids", metavar="N", help="dead letter id(s)")
    group.add_argument("--event", type=uuid.UUID, nargs="+", dest="event_ids", metavar="UUID", help="event id(s)")
    if allow_all:
        group.add_argument("--all", action="store_true", help="every dead letter of the consumer")


def _selection(args) -> replay.Selection:
    return replay.Selection(args.consumer, ids=args.ids, event_ids=args.event_ids)


def _connect(settings) -> psycopg.Connection:
    return psycopg.connect(settings.require_database_url().secret(), autocommit=True, connect_timeout=15,
                           application_name="outbox-inbox-cli")


def _dead_letters(args, settings) -> int:
    with _connect(settings) as conn:
        rows = replay.list_dead_letters(conn, args.consumer, include_resolved=args.all)
    if args.json:
        for row in rows:
            row["replay_command"] = commands.inbox_replay(row["consumer"], row["id"]) if row["event_id"] else None
        print(json.dumps(rows, default=str, indent=2))
        return EXIT_OK
    if not rows:
        print("no dead letters" + (f" for consumer {args.consumer}" if args.consumer else ""))
        return EXIT_OK
    for row in rows:
        where = f"{row['topic']}[{row['kafka_partition']}]@{row['kafka_offset']}"
        print(f"#{row['id']} {row['status']:16} {row['consumer']} {where} event {row['event_id'] or '-'} "
              f"({row['event_type'] or '?'}), {row['reason']}, {row['attempts']} attempts, "
              f"{row['created_at']:%Y-%m-%d %H:%M:%S}")
        print(f"    error: {row['error']}")
        if row["event_id"] and row["status"] == "dead":
            print(f"    replay: {commands.inbox_replay(row['consumer'], row['id'])}")
        elif not row["event_id"] and row["status"] == "dead":
            print(f"    fix the producer, then: outbox inbox discard --consumer {row['consumer']} --id {row['id']}")
    return EXIT_OK


def _replay(args, settings) -> int:
    with _connect(settings) as conn:
        requested, refused = replay.request_replay(conn, _selection(args))
        for dl_id, why in refused.items():
            print(f"dead letter {dl_id}: not replayed: {why}", file=sys.stderr)
        missing = _missing(args, requested, refused)
        if not requested:
            print("nothing to replay" + (f" ({missing})" if missing else ""), file=sys.stderr)
            return EXIT_FAILED if (refused or missing) else EXIT_OK
        print(f"replay requested for dead letter(s) {', '.join(map(str, requested))}; the running consumer "
              f"{args.consumer!r} performs it within seconds")
        if missing:
            print(missing, file=sys.stderr)
        status = EXIT_FAILED if refused or missing else EXIT_OK
        if args.wait > 0:
            status = max(status, _wait_for(conn, args.consumer, requested, args.wait))
    return status


def _missing(args, requested, refused) -> str:
    if args.ids is None:
        return ""
    absent = sorted(set(args.ids) - set(requested) - set(refused))
    return f"no dead letter {', '.join(map(str, absent))} for consumer {args.consumer}" if absent else ""


def _wait_for(conn, consumer: str, ids: list[int], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        rows = replay.list_dead_letters(conn, consumer, include_resolved=True, ids=ids)
        if all(r["status"] != "replay_requested" for r in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    status = EXIT_OK
    for r in rows:
        if r["status"] == "replayed":
            print(f"dead letter {r['id']}: replayed")
        elif r["status"] == "replay_requested":
            print(f"dead letter {r['id']}: still waiting after {timeout:g} s - is consumer {consumer!r} running?",
                  file=sys.stderr)
            status = EXIT_FAILED
        else:
            print(f"dead letter {r['id']}: replay failed, it is {r['status']} again: {r['error']}", file=sys.stderr)
            status = EXIT_FAILED
    return status


def _discard(args, settings) -> int:
    with _connect(settings) as conn:
        done = replay.discard(conn, _selection(args))
    if not done:
        print("nothing discarded (only dead letters in status `dead` can be)", file=sys.stderr)
        return EXIT_FAILED
    print(f"discarded dead letter(s) {', '.join(map(str, done))}")
    return EXIT_OK


def _purge(args, settings) -> int:
    days = settings.inbox_retention_days if args.days is None else args.days
    effect_days = settings.effect_retention_days if args.effect_days is None else args.effect_days
    batch = settings.inbox_purge_batch if args.batch is None else args.batch
    if days <= 0 or effect_days <= 0 or batch < 1:
        print("outbox inbox purge: --days and --effect-days must be > 0 and --batch >= 1", file=sys.stderr)
        return EXIT_USAGE
    report = retention.purge(settings.require_database_url(), inbox_window=timedelta(days=days),
                             effect_window=timedelta(days=effect_days), batch=batch)
    parts = ", ".join(f"{n} from {table}" for table, n in report.deleted.items())
    print(f"purged {parts} (inbox cutoff {report.cutoff:%Y-%m-%d %H:%M:%S%z}, effects cutoff "
          f"{report.effect_cutoff:%Y-%m-%d %H:%M:%S%z}, {report.batches} batches)")
    return EXIT_OK
