"""The database side of the relay: server checks, publication, replication slot, HA lock.

Every problem a restart cannot fix becomes a FatalError whose message names the fix; the daemon
exits non-zero with it instead of retrying forever.
"""

from __future__ import annotations

import re

import psycopg

from outbox.core.exits import EXIT_FAILED, EXIT_PRIVILEGE
from outbox.core.migrate import wal_level_problem


class FatalError(Exception):
    """A problem that retrying will not solve; the message says how to fix it, `code` is the exit
    code (outbox.core.exits) that tells scripts and orchestrators which kind of fix it is."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


SLOT_LOST_FIX = (
    "replication slot {slot!r} was invalidated ({why}): PostgreSQL removed WAL the relay had not read yet, "
    "typically because the relay was down longer than max_slot_wal_keep_size (or idle_replication_slot_timeout) "
    "allows. Events committed in that time were not streamed. Fix: run `outbox relay --recreate-slot`, which drops "
    "and re-creates the slot and republishes, from the outbox table, every event not recorded as published; "
    "consider raising max_slot_wal_keep_size and alerting on outbox_relay_slot_lag_bytes."
)
SLOT_MISSING_FIX = (
    "replication slot {slot!r} (created by the relay at {created}) no longer exists: it was dropped, or this server "
    "was promoted from a standby that did not have it synchronized (PostgreSQL 16 or older, a standby without "
    "sync_replication_slots, or one that was behind). A new slot would start now and never stream what was "
    "committed since the old slot's position, so the relay does not create one by itself. Fix: run "
    "`outbox relay --recreate-slot`, which creates the slot and republishes, from the outbox table, every event "
    "not recorded as published (consumers may see some twice; the inbox deduplicates them)."
)
PUBLICATION_GONE_FIX = (
    "the slot cannot decode the outbox: {detail}. The publication was dropped (or re-created after the slot's "
    "position, which a slot cannot see). Fix: run `outbox relay --recreate-slot`: it re-creates the publication "
    "{pub!r} if needed, then the slot after it, and republishes from the outbox table every event not recorded "
    "as published."
)


def lock_key(slot: str) -> str:
    return f"outbox-relay:{slot}"


def check_server(conn: psycopg.Connection) -> None:
    if (problem := wal_level_problem(conn)) is not None:
        raise FatalError(problem)
    exists, usable = conn.execute("SELECT n.oid IS NOT NULL, has_schema_privilege(n.oid, 'USAGE') FROM "
                                  "(SELECT NULL) x LEFT JOIN pg_namespace n ON n.nspname = 'outbox'").fetchone()
    if exists and not usable:
        # Without this, the lookup below would call the schema missing and send the operator to migrate.
        user = conn.execute("SELECT current_user").fetchone()[0]
        raise FatalError(f"role {user!r} may not use the schema `outbox` (no USAGE privilege). Fix: as its owner run "
                         f"`outbox grants --role relay --login {user} --apply`. See docs/roles.md.", EXIT_PRIVILEGE)
    if conn.execute("SELECT to_regclass('outbox.relay_batches')").fetchone()[0] is None:
        raise FatalError("the outbox schema is missing or outdated in this database. Fix: run `outbox migrate` "
                         "against OUTBOX_DATABASE_URL.")


def try_lock(conn: psycopg.Connection, slot: str) -> bool:
    """Session advisory lock: exactly one relay per slot streams; the others wait as standbys.
    It is released by PostgreSQL the moment the holder's connection dies (e.g. kill -9)."""
    return conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (lock_key(slot),)).fetchone()[0]


def ensure_publication(conn: psycopg.Connection, publication: str) -> None:
    """Create the publication if missing (before the slot: a slot cannot see a later publication)."""
    row = conn.execute("SELECT pubinsert FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
    if row is not None:
        tables = conn.execute("SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s",
                              (publication,)).fetchall()
        if [t for (t,) in tables] != ["outbox.events"] or not row[0]:
            raise FatalError(
                f"publication {publication!r} exists but does not publish inserts of exactly outbox.events "
                f"(it covers {[t for (t,) in tables]}). Fix: choose another OUTBOX_PUBLICATION, or "
                f"ALTER PUBLICATION {publication} SET TABLE outbox.events; ALTER PUBLICATION {publication} "
                f"SET (publish = 'insert')."
            )
        return
    try:
        conn.execute(f'CREATE PUBLICATION "{publication}" FOR TABLE outbox.events WITH (publish = \'insert\')')
    except psycopg.errors.InsufficientPrivilege as exc:
        raise FatalError(
            f"publication {publication!r} is missing and this role may not create it ({exc.diag.message_primary}). "
            f"Fix: run `outbox migrate` as the owner of outbox.events, or have them run CREATE PUBLICATION "
            f"{publication} FOR TABLE outbox.events WITH (publish = 'insert').", EXIT_PRIVILEGE
        ) from None


def slot_state(conn: psycopg.Connection, slot: str) -> dict | None:
    row = conn.execute(
        "SELECT plugin, database, active_pid, wal_status, confirmed_flush_lsn::text, "
        "to_jsonb(s) ->> 'invalidation_reason', to_jsonb(s) ->> 'failover', to_jsonb(s) ->> 'synced' "
        "FROM pg_replication_slots s WHERE slot_name = %s", (slot,)).fetchone()
    if row is None:
        return None
    keys = ("plugin", "database", "active_pid", "wal_status", "confirmed_flush_lsn", "invalidation_reason",
            "failover", "synced")
    return dict(zip(keys, row))


def check_slot(conn: psycopg.Connection, slot: str, state: dict) -> None:
    """Refuse an existing slot (its slot_state()) that cannot serve us, with the fix."""
    database = conn.execute("SELECT current_database()").fetchone()[0]
    if state["plugin"] != "pgoutput" or state["database"] != database:
        raise FatalError(
            f"replication slot {slot!r} belongs to plugin {state['plugin']!r} in database {state['database']!r}, "
            f"not pgoutput in {database!r}. Fix: set OUTBOX_SLOT_NAME to another name."
        )
    if state["wal_status"] == "lost" or state["invalidation_reason"]:
        why = f"wal_status={state['wal_status']}"
        if state["invalidation_reason"]:
            why += f", reason={state['invalidation_reason']}"
        raise FatalError(SLOT_LOST_FIX.format(slot=slot, why=why))


def drop_slot(conn: psycopg.Connection, slot: str) -> None:
    conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                 (slot,))


_ACTIVE = re.compile(r"is active for PID (\d+)")


def slot_holder(message: str) -> int | None:
    """The PID holding the slot, if START_REPLICATION failed because another process streams it."""
    match = _ACTIVE.search(message)
    return int(match.group(1)) if match else None


def fatal_stream_error(message: str, slot: str, publication: str) -> FatalError | None:
    """Replication errors a restart cannot cure, rewritten to say what to do."""
    if "can no longer access replication slot" in message or "has been invalidated" in message \
            or "can no longer get changes from replication slot" in message:
        return FatalError(SLOT_LOST_FIX.format(slot=slot, why=message.splitlines()[0]))
    if "publication" in message and "does not exist" in message:
        return FatalError(PUBLICATION_GONE_FIX.format(detail=message.splitlines()[0], pub=publication))
    return None  # e.g. the slot was dropped under us: the next session re-creates it


def failover_readiness(conn: psycopg.Connection, slot: str) -> tuple[bool | None, str, int | None]:
    """Would a promotion of the standby keep the slot? (ready, why, standby lag in bytes).

    None when no standby is configured for slot synchronization (nothing to fail over to). Seen
    from the primary: the slot is a failover slot, `synchronized_standby_slots` names the standby's
    physical slot, and that standby is connected; how far behind it is bounds what the synced slot
    may lack. Whether the standby runs with sync_replication_slots=on is visible only there."""
    if conn.info.server_version < 170000:
        return None, "PostgreSQL 16 or older has no failover slots: a promoted standby has no slot", None
    row = conn.execute(
        "SELECT (to_jsonb(s) ->> 'failover')::boolean, current_setting('synchronized_standby_slots', true) "
        "FROM pg_replication_slots s WHERE slot_name = %s", (slot,)).fetchone()
    if row is None:
        return False, f"slot {slot!r} does not exist", None
    failover, standby_slots = row
    names = [n.strip().strip('"') for n in (standby_slots or "").split(",") if n.strip()]
    if not names:
        streaming = [] if not failover else [r[0] for r in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'physical' AND active ORDER BY 1")]
        if not streaming:
            return None, "no standby is configured (synchronized_standby_slots is empty)", None
        # A failover slot synced to a standby the walsender does not wait for: the relay can publish
        # a transaction the standby never receives, which after a promotion is in Kafka only.
        listed = ", ".join(streaming)
        return False, (f"standby slot(s) {streaming} stream from this primary but synchronized_standby_slots is "
                       f"empty, so the relay may publish transactions a promoted standby would not have. Fix: "
                       f"ALTER SYSTEM SET synchronized_standby_slots = '{listed}'; SELECT pg_reload_conf();"), None
    if not failover:
        return False, f"slot {slot!r} is not a failover slot (OUTBOX_SLOT_FAILOVER)", None
    rows = conn.execute(
        "SELECT slot_name, active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
        "FROM pg_replication_slots WHERE slot_type = 'physical' AND slot_name = ANY(%s)", (names,)).fetchall()
    found = {name: (active, lag) for name, active, lag in rows}
    missing = [n for n in names if n not in found]
    if missing:
        return False, f"synchronized_standby_slots names {missing}, which do not exist", None
    down = [n for n, (active, _) in found.items() if not active]
    lag = max((lag or 0) for _, lag in found.values())
    if down:
        return False, f"standby slot(s) {down} are not connected: a promotion now would not have the slot", lag
    return True, f"standby slot(s) {names} connected, {lag} bytes behind", lag
