"""`outbox dev up|down|status|promote`: the embedded stack from a shell."""

from __future__ import annotations

import argparse
import json
import sys

from outbox.core.commands import EMBEDDED_MODULES, missing_extra
from outbox.core.exits import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE
from outbox.core.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
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


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    if (problem := missing_extra(EMBEDDED_MODULES, "embedded", "dev")) is not None:
        print(problem + " - or point OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP at servers of your own.",
              file=sys.stderr)
        return EXIT_USAGE
    from outbox.devstack.stack import DevStack  # needs the embedded extra

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
        return EXIT_OK if all(report.get(n, {}).get("running") for n in ("postgres", "kafka")) else EXIT_ATTENTION
    return EXIT_OK
