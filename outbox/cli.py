"""The `outbox` command line: the one place that wires the components together. Each component
registers its own subcommands; `migrate` belongs to the shared core.

Exit codes (outbox.core.exits): 0 success, 1 the operation failed, 2 bad usage or configuration,
3 a check found something that needs attention, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from dashboard.cli import register as register_dashboard
from inbox.cli import register as register_inbox
from outbox import __version__
from outbox.core.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from outbox.core.redact import redact
from outbox.core.settings import ConfigError, Settings, load_settings
from outbox.demo.cli import register as register_demo
from outbox.devstack.cli import register as register_dev
from relay.cli import register as register_relay


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.core.migrate import migrate

    migrate(settings.require_database_url(), wal_check=not args.no_wal_check,
            log=lambda line: print(line, file=sys.stderr))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox",
        description="Reliable event delivery out of PostgreSQL: outbox -> logical replication relay -> Kafka "
        "-> deduplicating inbox. Settings come from OUTBOX_* environment variables or a .env file.",
        epilog="Quick start: outbox dev up && outbox migrate && outbox relay",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    mig = sub.add_parser("migrate", help="apply the SQL schema to OUTBOX_DATABASE_URL",
                         description="Apply pending sql/ migrations (idempotent, versioned, safe to run concurrently).")
    mig.add_argument("--no-wal-check", action="store_true",
                     help="install the schema even if wal_level is not 'logical'")
    mig.set_defaults(func=_migrate)

    # The registering modules import their extras (embedded, dashboard) only when a command runs,
    # so `--help` and every other command work on a plain install.
    for register in (register_dev, register_relay, register_inbox, register_dashboard, register_demo):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(warn_unknown=False)
        from outbox.core.logs import setup_logging
        from outbox.core.settings import warn_unknown_variables

        setup_logging(settings.log_level, settings.log_format)
        warn_unknown_variables()  # after setup: in OUTBOX_LOG_FORMAT=json it is a JSON line like the rest
        return args.func(args, settings)
    except ConfigError as exc:
        print(f"outbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one clear line, no secrets
        from outbox.core.migrate import MigrationError

        # StackError by its module, not an import: outbox.devstack needs the embedded extra.
        known = (isinstance(exc, MigrationError) or type(exc).__name__ == "StackError"
                 or type(exc).__module__.startswith("psycopg"))
        message = str(exc) if known else f"{type(exc).__name__}: {exc}"
        print(f"outbox {args.command}: error: {redact(message)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
