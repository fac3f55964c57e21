"""The `outbox` command line: the one place that wires the components together. Each component
registers its own subcommands; `migrate` belongs to the shared core.

Exit codes (outbox.core.exits): 0 success, 1 the operation failed, 2 bad usage or configuration,
3 a check found something that needs attention, 4 PostgreSQL refused the login, 5 a privilege,
REPLICATION or the publication is missing, 6 a Kafka topic is missing and may not be created,
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from dashboard.cli import register as register_dashboard
from inbox.cli import register as register_inbox
from outbox import __version__
from outbox.core.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_LOGIN_REFUSED, EXIT_OK, EXIT_USAGE
from outbox.core.redact import redact
from outbox.core.settings import ConfigError, Settings, load_settings
from outbox.demo.cli import register as register_demo
from outbox.devstack.cli import register as register_dev
from relay.cli import register as register_relay


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.core.migrate import migrate

    migrate(settings.require_database_url(), wal_check=not args.no_wal_check, inbox_only=args.inbox_only,
            log=lambda line: print(line, file=sys.stderr))
    return EXIT_OK


def _grants(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.core import grants

    if not args.apply:
        print(grants.render(args.role, args.login))
        return EXIT_OK
    return grants.apply(settings.require_database_url(), args.role, args.login,
                        log=lambda line: print(line, file=sys.stderr))


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
    mig.add_argument("--inbox-only", action="store_true",
                     help="a database only consumers use: the inbox tables and the effects ledger; no wal_level "
                     "check, no publication")
    mig.set_defaults(func=_migrate)

    from outbox.core.grants import ROLES

    gr = sub.add_parser("grants", help="print (or --apply) the least privileges of a producer, relay, consumer or "
                        "dashboard role",
                        description="The GRANT statements one part needs, for an existing role (a login, or a "
                        "NOLOGIN group role its logins are members of). "
                        + " ".join(f"{r}: {what}." for r, what in ROLES.items())
                        + " The relay also needs the REPLICATION attribute, which a group role cannot pass on: "
                        "the output names ALTER ROLE ... REPLICATION and the managed services' equivalents. "
                        "See docs/roles.md. Exit codes: 0 done, 4 login refused, 5 a privilege is missing "
                        "(the message says which and who can give it).")
    gr.add_argument("--role", required=True, choices=list(ROLES))
    gr.add_argument("--login", required=True, metavar="NAME", help="the existing role that gets the privileges")
    gr.add_argument("--apply", action="store_true",
                    help="run the statements as OUTBOX_DATABASE_URL (the schema's owner) instead of printing them")
    gr.set_defaults(func=_grants)

    # The registering modules import their extras (embedded, dashboard) only when a command runs,
    # so `--help` and every other command work on a plain install.
    for register in (register_dev, register_relay, register_inbox, register_dashboard, register_demo):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = None
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
        dsn = settings.database_url if settings is not None else None
        if type(exc).__name__ == "OperationalError" and "connection failed" in message:
            from outbox.core.refusals import refusal

            refused = refusal(exc, dsn, component="migrate") if dsn is not None else None
            if refused is not None and refused.code == EXIT_LOGIN_REFUSED:  # as the relay and migrate say it
                print(f"outbox {args.command}: {refused.message}", file=sys.stderr)
                return refused.code
            # psycopg's text spans lines and names neither the URL nor the setting.
            where = f" to {dsn.masked}" if dsn is not None else ""
            message = (f"cannot connect{where}: {' '.join(message.split())}. Fix: check that PostgreSQL runs there "
                       f"and that OUTBOX_DATABASE_URL is right")
        print(f"outbox {args.command}: error: {redact(message)}", file=sys.stderr)
        return exc.code if isinstance(exc, MigrationError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
