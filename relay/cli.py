"""The `outbox` command line.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or configuration, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from relay import __version__
from relay.redact import redact
from relay.settings import ConfigError, Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    from relay.devstack import DevStack

    stack = DevStack(settings)
    if args.action == "up":
        urls = stack.up()
        sys.stdout.write(urls.exports())
    elif args.action == "down":
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running", file=sys.stderr)
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
                state = f"running, pid {part['pid']}, 127.0.0.1:{part['port']}" if part["running"] else "stopped"
                print(f"{name:9} {label}: {state} (log: {part['log']})")
        return EXIT_OK if all(report.get(n, {}).get("running") for n in ("postgres", "kafka")) else 3
    return EXIT_OK


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from relay.migrate import migrate

    migrate(settings.require_database_url(), wal_check=not args.no_wal_check,
            log=lambda line: print(line, file=sys.stderr))
    return EXIT_OK


def _not_yet(issue: str) -> Callable[[argparse.Namespace, Settings], int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        print(f"outbox {args.command}: not implemented yet ({issue})", file=sys.stderr)
        return EXIT_FAILED

    return run


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
    dev.add_argument("action", choices=["up", "down", "status"])
    dev.add_argument("--json", action="store_true", help="status as JSON")
    dev.set_defaults(func=_dev)

    mig = sub.add_parser("migrate", help="apply the SQL schema to OUTBOX_DATABASE_URL",
                         description="Apply pending sql/ migrations (idempotent, versioned, safe to run concurrently).")
    mig.add_argument("--no-wal-check", action="store_true",
                     help="install the schema even if wal_level is not 'logical'")
    mig.set_defaults(func=_migrate)

    for name, text, issue in [
        ("relay", "run the relay daemon in the foreground", "issue #3"),
        ("dashboard", "run the Streamlit operator dashboard", "issue #5"),
        ("demo", "everything at once for a first look", "issue #3"),
        ("status", "terminal summary: slot lag, in flight, duplicates, unknown outcomes", "issue #5"),
    ]:
        sub.add_parser(name, help=text, description=text).set_defaults(func=_not_yet(issue))
    _register_components(sub)
    return parser


def _register_components(sub: argparse._SubParsersAction) -> None:
    """Subcommands owned by the other packages (each has a `register(subparsers)`)."""
    from inbox.cli import register as register_inbox

    register_inbox(sub)



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        from relay.logs import setup_logging

        setup_logging(settings.log_level, settings.log_format)
        return args.func(args, settings)
    except ConfigError as exc:
        print(f"outbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one clear line, no secrets
        from relay.devstack.procs import StackError
        from relay.migrate import MigrationError

        known = isinstance(exc, (StackError, MigrationError)) or type(exc).__module__.startswith("psycopg")
        message = str(exc) if known else f"{type(exc).__name__}: {exc}"
        print(f"outbox {args.command}: error: {redact(message)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
