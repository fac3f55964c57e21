"""PostgreSQL refusals that no retry can cure, turned into an exit code and a message with the fix.

Shared by the relay and `outbox migrate`. Connection failures carry no SQLSTATE in psycopg (there
is no result to read it from), so those are recognised by libpq's wording, which has been stable
for many major versions. Every message is built from the DSN's non-secret parts and the driver's
redacted text, never from the DSN itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from outbox.core.exits import EXIT_LOGIN_REFUSED, EXIT_PRIVILEGE
from outbox.core.redact import Dsn, redact

ROLES_DOC = "docs/roles.md"

_LOGIN_REFUSED = ("password authentication failed", "no pg_hba.conf entry", "fe_sendauth: no password supplied",
                  "authentication failed for user")
_NO_REPLICATION = ("permission denied to start WAL sender", "must be superuser or replication role",
                   "REPLICATION attribute")


@dataclass(frozen=True)
class Refusal:
    code: int
    message: str


def _where(dsn: Dsn) -> tuple[str, str]:
    p = dsn.params()
    return p.get("user") or "(the OS user)", f"{p.get('host') or 'localhost'}:{p.get('port') or '5432'}/{p.get('dbname') or ''}"


def _reason(exc: psycopg.Error) -> str:
    # libpq prefixes "connection failed: connection to server at ... failed: FATAL:  "; the tail is the reason.
    text = redact(str(exc)).strip()
    return " ".join(text.rpartition("FATAL:")[2].split()) if "FATAL:" in text else " ".join(text.split())


def managed_replication(user: str) -> str:
    """The managed services' own ways to the REPLICATION right (their superuser is not one)."""
    q = '"' + user.replace('"', '""') + '"'
    return (f"Amazon RDS/Aurora: GRANT rds_replication TO {q}; Google Cloud SQL: ALTER USER {q} WITH REPLICATION; "
            f"Azure Flexible Server: ALTER ROLE {q} REPLICATION as a member of azure_pg_admin")


def replication_fix(user: str) -> str:
    """How to give `user` the REPLICATION attribute, on each kind of server."""
    q = '"' + user.replace('"', '""') + '"'
    return (f"Fix: as a superuser run ALTER ROLE {q} REPLICATION; (REPLICATION is an attribute, membership of a "
            f"group role does not pass it on). {managed_replication(user)}. See {ROLES_DOC}.")


def refusal(exc: BaseException, dsn: Dsn, *, component: str) -> Refusal | None:
    """The refusal `exc` is, or None when it may be transient. `component`: the `outbox grants --role`
    the connecting program needs ('relay', 'migrate' for the schema owner)."""
    if not isinstance(exc, psycopg.Error):
        return None
    text = str(exc)
    user, where = _where(dsn)
    if any(s in text for s in _LOGIN_REFUSED) or exc.sqlstate in ("28P01", "28000"):
        return Refusal(EXIT_LOGIN_REFUSED, (
            f"PostgreSQL at {where} refused the login of role {user!r}: {_reason(exc)}. Fix: check the user and "
            f"password in OUTBOX_DATABASE_URL (after a password rotation, update the secret and restart), and that "
            f"pg_hba.conf allows this role from this host."))
    if any(s in text for s in _NO_REPLICATION):
        return Refusal(EXIT_PRIVILEGE, (
            f"role {user!r} may not open a replication connection to {where}: {_reason(exc)}. "
            + replication_fix(user)))
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        what = exc.diag.message_primary or _reason(exc)
        if component == "migrate":
            fix = ("Fix: run `outbox migrate` as the role that owns the schema `outbox` (or, on a new database, a "
                   "role with CREATE on it); the other roles get their grants from `outbox grants`.")
        else:
            fix = (f"Fix: as the owner of the schema `outbox` run `outbox grants --role {component} --login {user} "
                   f"--apply` (or print the GRANT statements without --apply). See {ROLES_DOC}.")
        return Refusal(EXIT_PRIVILEGE, f"role {user!r} lacks a privilege at {where}: {redact(what)}. {fix}")
    return None
