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
    rp.add_argument("--dry-run", action="store_true", help="show what would be replayed, change nothing")
    rp.add_argument("--wait", type=float, metavar="SECONDS", default=0,
                    help="wait up to SECONDS for the consumer to perform the replays and report each outcome")
    rp.set_defaults(func=_replay)

    ds = sub.add_parser("discard", help="give up on dead letters (kept for the record, purged by retention)")
    _selection_args(ds, allow_all=False)
    ds.add_argument("--dry-run", action="store_true", help="show what would be discarded, change nothing")
    ds.set_defaults(func=_discard)

    pg = sub.add_parser("purge", help="delete inbox rows and resolved records past the retention window",
                        description="Deletes, in bounded batches: inbox rows not seen for --older-than (a "
                                    "duplicate arriving later is accepted again, see docs/inbox.md), per-minute "
                                    "stats and replayed/discarded dead letters older than --older-than, and settled "
                                    "effect keys older than --effects-older-than. Run it from cron or a scheduler. "
                                    "Same flags as `outbox prune`.")
    pg.add_argument("--older-than", metavar="INTERVAL",
                    help="inbox window, a PostgreSQL interval such as '30 days' (default OUTBOX_INBOX_RETENTION_DAYS)")
    pg.add_argument("--effects-older-than", metavar="INTERVAL",
                    help="effects window, a PostgreSQL interval (default OUTBOX_EFFECT_RETENTION_DAYS)")
    pg.add_argument("--batch-size", type=int, metavar="N", help="rows per DELETE (default OUTBOX_INBOX_PURGE_BATCH)")
    pg.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    # The flags before `outbox prune`'s names were shared; kept so existing cron lines keep working.
    pg.add_argument("--days", type=float, help=argparse.SUPPRESS)
    pg.add_argument("--effect-days", type=float, help=argparse.SUPPRESS)
    pg.add_argument("--batch", type=int, dest="batch_size", help=argparse.SUPPRESS)
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
            print(f"    fix the producer, then: {commands.inbox_discard(row['consumer'], row['id'])}")
    return EXIT_OK


def _preview(conn, args, verb: str) -> int:
    """--dry-run of replay/discard: the dead letters the selection names that are in status dead."""
    rows = [r for r in replay.list_dead_letters(conn, args.consumer, ids=args.ids)
            if r["status"] == "dead" and (not args.event_ids or r["event_id"] in args.event_ids)]
    for r in rows:
        print(f"would {verb} #{r['id']}: event {r['event_id'] or '-'} ({r['event_type'] or '?'}), {r['reason']}")
    missing = _missing(args, [r["id"] for r in rows], {})
    if missing:
        print(missing, file=sys.stderr)
    print(f"dry run: {len(rows)} dead letter(s) would be {verb}ed, nothing was changed", file=sys.stderr)
    return EXIT_FAILED if missing else EXIT_OK


def _replay(args, settings) -> int:
    if args.dry_run:
        with _connect(settings) as conn:
            return _preview(conn, args, "replay")
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
    if args.dry_run:
        with _connect(settings) as conn:
            return _preview(conn, args, "discard")
    with _connect(settings) as conn:
        done = replay.discard(conn, _selection(args))
    if not done:
        print("nothing discarded (only dead letters in status `dead` can be)", file=sys.stderr)
        return EXIT_FAILED
    print(f"discarded dead letter(s) {', '.join(map(str, done))}")
    return EXIT_OK


def _window(conn, interval: str | None, days: float | None, default_days: float) -> timedelta:
    if interval is not None:
        try:
            return conn.execute("SELECT %s::interval", (interval,)).fetchone()[0]
        except psycopg.errors.DataError:
            raise ValueError(f"{interval!r} is not a PostgreSQL interval (e.g. '30 days')") from None
    return timedelta(days=default_days if days is None else days)


def _purge(args, settings) -> int:
    batch = settings.inbox_purge_batch if args.batch_size is None else args.batch_size
    try:
        with _connect(settings) as conn:
            inbox_window = _window(conn, args.older_than, args.days, settings.inbox_retention_days)
            effect_window = _window(conn, args.effects_older_than, args.effect_days, settings.effect_retention_days)
    except ValueError as exc:
        print(f"outbox inbox purge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if inbox_window <= timedelta(0) or effect_window <= timedelta(0) or batch < 1:
        print("outbox inbox purge: --older-than and --effects-older-than must be positive and --batch-size >= 1",
              file=sys.stderr)
        return EXIT_USAGE
    report = retention.purge(settings.require_database_url(), inbox_window=inbox_window,
                             effect_window=effect_window, batch=batch, dry_run=args.dry_run)
    parts = ", ".join(f"{n} from {table}" for table, n in report.deleted.items())
    verb = "dry run: would purge" if args.dry_run else "purged"
    print(f"{verb} {parts} (inbox cutoff {report.cutoff:%Y-%m-%d %H:%M:%S%z}, effects cutoff "
          f"{report.effect_cutoff:%Y-%m-%d %H:%M:%S%z}"
          + (", nothing was deleted)" if args.dry_run else f", {report.batches} batches)"))
    return EXIT_OK
