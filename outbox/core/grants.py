"""`outbox grants`: the least privileges each part needs, as SQL for an existing role.

Printed by default so that a DBA can review it or put it in their own tooling; `--apply` runs it as
OUTBOX_DATABASE_URL (the schema's owner). Grants go to whatever role is named: a login role, or a
NOLOGIN group role that logins are then made members of. The relay's REPLICATION is the exception:
it is a role attribute, which membership does not pass on, so it always names the login itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from outbox.core.exits import EXIT_OK, EXIT_PRIVILEGE
from outbox.core.redact import Dsn
from outbox.core.refusals import managed_replication, refusal, replication_fix

EMIT = "outbox.emit(text, text, text, jsonb, jsonb)"
# What the relay writes (relay/daemon.py, ledger.py, dead_letters.py); it reads outbox.events for
# the backfill of events committed before its slot existed, and never writes them.
RELAY_TABLES = ("relay_status", "relay_instances", "relay_batches", "deliveries", "relay_dead_letters",
                "relay_backfill")
RELAY_SEQUENCES = ("relay_batches_batch_id_seq", "relay_dead_letters_id_seq")  # bigserial columns
# The inbox library's tables (sql/003_inbox.sql); a consumer that migrates its own database with
# `outbox migrate --inbox-only` owns them and needs none of this.
INBOX_TABLES = ("inbox_messages", "inbox_offsets", "inbox_stats", "inbox_dead_letters", "effects")

ROLES = {
    "producer": "calls outbox.emit() in its own transactions; cannot read or write any outbox table",
    "relay": "streams the outbox (REPLICATION) and writes only its own bookkeeping tables",
    "consumer": "reads and writes the inbox tables (dedupe, offsets, dead letters, effects ledger)",
    "dashboard": "reads the schema and may call only the audited outbox.resolve_effect()",
}


@dataclass(frozen=True)
class Plan:
    statements: list[str]  # run in one transaction by --apply
    replication: bool  # the login also needs the REPLICATION attribute (not grantable)


def _ident(name: str) -> str:
    return sql.Identifier(name).as_string()


def plan(role: str, login: str) -> Plan:
    who = _ident(login)
    usage = f"GRANT USAGE ON SCHEMA outbox TO {who}"
    if role == "producer":
        return Plan([usage, f"GRANT EXECUTE ON FUNCTION {EMIT} TO {who}"], False)
    if role == "relay":
        tables = ", ".join(f"outbox.{t}" for t in RELAY_TABLES)
        return Plan([usage, f"GRANT SELECT ON outbox.events TO {who}",
                     f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {who}",
                     f"GRANT USAGE ON SEQUENCE {', '.join(f'outbox.{q}' for q in RELAY_SEQUENCES)} TO {who}",
                     f"GRANT EXECUTE ON FUNCTION outbox.dead_lettered(uuid, text) TO {who}"], True)
    if role == "consumer":
        tables = ", ".join(f"outbox.{t}" for t in INBOX_TABLES)
        return Plan([usage, f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {who}",
                     f"GRANT SELECT ON outbox.effects_unresolved TO {who}"], False)
    if role == "dashboard":
        # 004_dashboard.sql's function, so the dashboard's grants are defined once.
        return Plan([f"SELECT outbox.grant_dashboard({sql.Literal(login).as_string()})"], False)
    raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


def render(role: str, login: str) -> str:
    """The SQL an administrator runs, with why each part is there."""
    p = plan(role, login)
    lines = [f"-- outbox {role}: {ROLES[role]}", "-- run as the owner of the schema outbox (who ran `outbox migrate`)",
             "BEGIN;", *(f"{s};" for s in p.statements), "COMMIT;"]
    if role == "dashboard":
        lines += ["-- The dashboard switches to OUTBOX_DASHBOARD_ROLE (default outbox_dashboard, which `outbox migrate`",
                  f"-- sets up) after connecting: run it with OUTBOX_DASHBOARD_ROLE={login}, or instead make the login a",
                  f"-- member of that role: GRANT outbox_dashboard TO {_ident(login)};"]
    if p.replication:
        lines += ["-- REPLICATION is a role attribute: a group role cannot pass it on, so it names the login, and",
                  "-- only a superuser (or, on PostgreSQL 16+, a CREATEROLE role that has it) may set it:",
                  f"ALTER ROLE {_ident(login)} REPLICATION;",
                  "-- " + managed_replication(login) + "."]
    return "\n".join(lines)


def apply(dsn: Dsn, role: str, login: str, log=print) -> int:
    """Run the grants; returns an exit code. The REPLICATION attribute is set when this connection
    may, and otherwise reported with the statement to hand to a superuser."""
    p = plan(role, login)
    try:
        with psycopg.connect(dsn.secret(), autocommit=True, connect_timeout=15, client_encoding="utf8") as conn:
            with conn.transaction():
                for statement in p.statements:
                    conn.execute(statement)
            log(f"granted the {role} privileges to {login}")
            if not p.replication:
                return EXIT_OK
            row = conn.execute("SELECT rolreplication FROM pg_roles WHERE rolname = %s", (login,)).fetchone()
            if row and row[0]:
                log(f"{login} has the REPLICATION attribute")
                return EXIT_OK
            try:
                conn.execute(f"ALTER ROLE {_ident(login)} REPLICATION")
            except psycopg.errors.InsufficientPrivilege:
                log(f"{login} still needs the REPLICATION attribute, which this role may not give. "
                    + replication_fix(login))
                return EXIT_PRIVILEGE
            log(f"gave {login} the REPLICATION attribute")
            return EXIT_OK
    except psycopg.Error as exc:
        if (refused := refusal(exc, dsn, component="migrate")) is not None:
            log(refused.message.replace("run `outbox migrate`", "run `outbox grants --apply`"))
            return refused.code
        raise
