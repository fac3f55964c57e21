"""A primary and a physical streaming standby (`outbox dev up --pg-standby`, `outbox dev promote`).

For failover tests of the relay: PostgreSQL 17+ failover slots. A logical slot created with
failover=true on the primary is copied to the standby by the slot-sync worker
(`sync_replication_slots=on`, which needs hot_standby_feedback, a physical slot and a `dbname` in
primary_conninfo), so that after promotion the relay resumes from the same slot. The primary's
`synchronized_standby_slots` makes logical walsenders wait until the standby has received the WAL
they send: no consumer can get ahead of the standby and lose its place on failover. The price:
while the standby is down, logical decoding on the primary stalls.

    <root>/pg/    node "pg"  (the first primary)
    <root>/pg2/   node "pg2" (the first standby)

Which node is primary is recorded in state.json. After `promote`, the next `up` rebuilds the old
primary as a standby of the new one (fresh pg_basebackup; its old data is discarded), never as a
second primary: the multi-host URL would otherwise reach whichever read-write server answers first.
"""

from __future__ import annotations

import os
import shutil
import time

import psycopg

from outbox.core.redact import Dsn
from outbox.devstack.postgres import DATABASE, SUPERUSER, EmbeddedPostgres
from outbox.devstack.procs import StackError, progress

NODES = ("pg", "pg2")

PRIMARY_ONLY = ("synchronized_standby_slots",)
STANDBY_ONLY = ("primary_conninfo", "primary_slot_name", "hot_standby_feedback", "sync_replication_slots")


def slot_for(node: str) -> str:
    return f"outbox_dev_standby_{node}"


class PgPair:
    def __init__(self, root, *, service_user: str, config: dict[str, str] | None, state: dict):
        self.root = root
        self.service_user = service_user
        self.base_config = dict(config or {})
        self.state = {"standby": True, "primary": NODES[0], "ports": {}, **state}

    @property
    def primary_name(self) -> str:
        return self.state["primary"]

    @property
    def standby_name(self) -> str:
        return NODES[1] if self.primary_name == NODES[0] else NODES[0]

    def node(self, name: str, config: dict[str, str] | None = None) -> EmbeddedPostgres:
        return EmbeddedPostgres(self.root / name, service_user=self.service_user,
                                config={**self.base_config, **(config or {})})

    @property
    def primary(self) -> EmbeddedPostgres:
        # Whoever starts the primary (a restart included) writes its whole config: a primary that
        # has a standby must keep synchronized_standby_slots, or the relay could publish
        # transactions the standby never received and a failover would leave them only in Kafka.
        return self.node(self.primary_name, self._primary_config(with_standby_slot=self._has_standby()))

    @property
    def standby(self) -> EmbeddedPostgres:
        return self.node(self.standby_name, self._standby_config())

    # ----- lifecycle

    def start(self) -> Dsn:
        primary = self.primary
        if self.primary_name != NODES[0] and not (primary.data / "PG_VERSION").exists():
            raise StackError(f"the recorded primary {primary.data} is gone. Fix: `outbox dev down` and remove "
                             f"{self.root} to start afresh")
        primary.start(self.state["ports"].get(self.primary_name))
        self.state["ports"][self.primary_name] = primary.status().port
        slot = slot_for(self.standby_name)
        self._ensure_physical_slot(primary, slot)
        # Only once the slot exists: a logical walsender waits for every slot listed here.
        primary.reconfigure(self._primary_config(with_standby_slot=True))

        standby = self.standby
        if not self._is_standby(standby):
            self._basebackup(primary, standby, slot)
        standby.start(self.state["ports"].get(self.standby_name))
        self.state["ports"][self.standby_name] = standby.status().port
        # The primary may have come back on another port: primary_conninfo is reloadable.
        standby.reconfigure(self._standby_config())
        return self.dsn()

    def stop(self) -> list[str]:
        stopped = []
        for name in (self.primary_name, self.standby_name):  # primary first: the standby gets its last WAL
            node = self.node(name)
            if (node.data / "PG_VERSION").exists() and node.stop():
                stopped.append(name)
        return stopped

    def dsn(self) -> Dsn:
        """Both servers, primary first; libpq skips the one that is down or read-only."""
        ports = [self.state["ports"][self.primary_name], self.state["ports"].get(self.standby_name)]
        hosts = ",".join(f"127.0.0.1:{p}" for p in ports if p)
        password = self.primary.password_file.read_text().strip()
        return Dsn(f"postgresql://{SUPERUSER}:{password}@{hosts}/{DATABASE}?target_session_attrs=read-write")

    def restart_primary(self, pause: float = 0.0) -> str:
        primary = self.primary
        port = primary.status().port
        primary.stop()
        time.sleep(pause)
        primary.start(port)
        return self.primary_name

    def promote(self, hard: str = "immediate") -> dict:
        """Crash the primary (`immediate`: pg_ctl stop -m immediate; `kill`: SIGKILL of the
        postmaster), promote the standby, wait until it takes writes. Returns what happened."""
        old, new = self.primary, self.standby
        if not new.status().running:
            raise StackError(f"the standby {self.standby_name} is not running; nothing to promote")
        report: dict = {"old_primary": self.primary_name, "new_primary": self.standby_name}
        report["primary_lsn"], report["standby_replay_lsn"] = self._positions(old, new)
        started = time.monotonic()
        if hard == "kill":
            old.kill()
        else:
            old.stop_immediate()
        report["primary_stopped"] = hard
        result = new._run([new.bin / "pg_ctl", "promote", "-D", new.data, "-w", "-t", "60", "-s"])
        if result.returncode != 0:
            raise StackError(f"pg_ctl promote failed (exit {result.returncode}): {result.stderr.strip()}\n"
                             f"Log: {new.log}")
        self._wait_writable(new)
        report["promote_s"] = round(time.monotonic() - started, 2)
        self.state["primary"] = self.standby_name
        # The new primary has no standby yet: listing a missing slot would stall logical decoding.
        new = self.primary
        new.reconfigure({k: None for k in STANDBY_ONLY + PRIMARY_ONLY})
        with psycopg.connect(self._node_dsn(new).secret(), autocommit=True, connect_timeout=5) as conn:
            report["slots"] = [
                {"slot_name": r[0], "slot_type": r[1], "failover": r[2], "synced": r[3]}
                for r in conn.execute("SELECT slot_name, slot_type, failover, synced FROM pg_replication_slots "
                                      "ORDER BY slot_name").fetchall()
            ]
            # The old primary's standby slot is a copy-free leftover only if it was synced; drop it anyway.
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_type = 'physical' AND slot_name LIKE 'outbox\\_dev\\_standby\\_%' "
                         "AND NOT active")
        return report

    def node_dsn(self, role: str, database: str = DATABASE) -> Dsn:
        """A single-host DSN of the current "primary" or "standby" (tests look at one server)."""
        node = self.primary if role == "primary" else self.standby
        return node.dsn(self.state["ports"][node.root.name], database=database)

    def wait_caught_up(self, timeout: float = 30) -> str:
        """Until the standby has replayed everything the primary has written so far; returns that LSN."""
        with psycopg.connect(self.node_dsn("primary").secret(), connect_timeout=5) as conn:
            target = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
        self._poll(self.node_dsn("standby"), "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,), timeout,
                   f"the standby to replay up to {target}")
        return target

    def wait_slot_synced(self, slot: str, timeout: float = 30) -> None:
        """Until the slot-sync worker has persisted `slot` on the standby (synced, not temporary).

        The standby can only build the slot's snapshot from a running-xacts record after the slot's
        restart_lsn, which an idle primary writes every 15 s at best: we ask for one. The worker
        naps up to 30 s when idle; a config reload wakes it (pg_sync_replication_slots() would
        fail with "cannot synchronize replication slots concurrently" while the worker runs).
        Never advances the slot itself: that would skip the consumer's unread changes.
        """
        with psycopg.connect(self.node_dsn("primary").secret(), autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT pg_log_standby_snapshot()")
        try:
            self._poll(self.node_dsn("standby"),
                       "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND synced "
                       "AND NOT temporary)", (slot,), timeout, f"slot {slot!r} to be synced to the standby",
                       nudge="SELECT pg_reload_conf()")
        except StackError as exc:
            raise StackError(
                f"{exc}. A failover slot that nobody has consumed since transactions ran after its creation "
                f"needs catalog rows the standby no longer keeps, so the standby holds it only as a temporary "
                f"slot (its log: 'Synchronization could lead to data loss') that would not survive a failover; "
                f"it becomes persistent once its consumer on the primary confirms a newer position."
            ) from None

    @staticmethod
    def _poll(dsn: Dsn, query: str, params: tuple, timeout: float, what: str, nudge: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        with psycopg.connect(dsn.secret(), autocommit=True, connect_timeout=5) as conn:
            while not conn.execute(query, params).fetchone()[0]:
                if time.monotonic() > deadline:
                    raise StackError(f"timed out after {timeout:.0f} s waiting for {what}")
                if nudge:
                    conn.execute(nudge)
                time.sleep(0.2)

    def statuses(self) -> list[dict]:
        out = []
        for name in NODES:
            node = self.node(name)
            if not (node.data / "PG_VERSION").exists():
                continue
            status = node.status()
            role = "primary" if name == self.primary_name else "standby"
            if name != self.primary_name and not self._is_standby(node):
                role = "old primary (rebuilt as standby by the next `up`)"
            out.append({"node": name, "role": role, "running": status.running, "pid": status.pid,
                        "port": status.port, "version": status.version, "log": str(status.log)})
        return out

    # ----- internals

    def _primary_config(self, with_standby_slot: bool) -> dict[str, str | None]:
        config: dict[str, str | None] = {k: None for k in STANDBY_ONLY}
        config["synchronized_standby_slots"] = f"'{slot_for(self.standby_name)}'" if with_standby_slot else None
        return config

    def _standby_config(self) -> dict[str, str | None]:
        standby_root = self.root / self.standby_name
        port = self.state["ports"].get(self.primary_name)
        # dbname: the slot-sync worker runs SQL on the primary through this connection.
        conninfo = (f"host=127.0.0.1 port={port} user={SUPERUSER} passfile={standby_root / 'pgpass'} "
                    f"dbname={DATABASE} application_name={self.standby_name}")
        return {"primary_conninfo": f"'{conninfo}'", "primary_slot_name": f"'{slot_for(self.standby_name)}'",
                "hot_standby_feedback": "on", "sync_replication_slots": "on", "hot_standby": "on",
                "synchronized_standby_slots": None}

    def _has_standby(self) -> bool:
        # Its physical slot is created before the standby is built, so a standby implies the slot.
        return self._is_standby(self.node(self.standby_name))

    @staticmethod
    def _is_standby(node: EmbeddedPostgres) -> bool:
        return (node.data / "PG_VERSION").exists() and (node.data / "standby.signal").exists()

    def _node_dsn(self, node: EmbeddedPostgres) -> Dsn:
        return node.dsn(node.status().port, database="postgres")

    def _ensure_physical_slot(self, primary: EmbeddedPostgres, slot: str) -> None:
        with psycopg.connect(self._node_dsn(primary).secret(), autocommit=True, connect_timeout=10) as conn:
            if not conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone():
                conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))

    def _basebackup(self, primary: EmbeddedPostgres, standby: EmbeddedPostgres, slot: str) -> None:
        progress(f"Building the standby {standby.data} from the primary (pg_basebackup) ...")
        started = time.monotonic()
        standby.root.mkdir(parents=True, exist_ok=True)
        standby._prepare_permissions()
        password = primary.password_file.read_text().strip()
        standby.password_file.write_text(password + "\n")
        standby.password_file.chmod(0o600)
        pgpass = standby.root / "pgpass"
        pgpass.write_text(f"127.0.0.1:*:*:{SUPERUSER}:{password}\n")  # libpq reads it; never in argv or logs
        pgpass.chmod(0o600)
        standby._chown(pgpass)
        for leftover in list(standby.root.glob("data.tmp-*")) + list(standby.root.glob("data.old-*")):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = standby.root / f"data.tmp-{os.getpid()}"
        try:
            result = standby._run([
                standby.bin / "pg_basebackup", "-D", tmp, "-h", "127.0.0.1", "-p", primary.status().port,
                "-U", SUPERUSER, "-w", "-X", "stream", "-S", slot, "-c", "fast",
            ], env={"PGPASSFILE": str(pgpass)})
            if result.returncode != 0:
                raise StackError(f"pg_basebackup failed (exit {result.returncode}):\n{result.stderr.strip()}")
            (tmp / "standby.signal").touch()
            standby._chown(tmp / "standby.signal")
            # Swap in atomically: a crash leaves either the old data dir or the complete new one.
            old = standby.root / f"data.old-{os.getpid()}"
            if standby.data.exists():
                standby.data.rename(old)
            tmp.rename(standby.data)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress(f"  standby built in {time.monotonic() - started:.1f} s")

    def _positions(self, old: EmbeddedPostgres, new: EmbeddedPostgres) -> tuple[str | None, str | None]:
        lsns: list[str | None] = []
        for node, query in ((old, "SELECT pg_current_wal_lsn()::text"), (new, "SELECT pg_last_wal_replay_lsn()::text")):
            try:
                with psycopg.connect(self._node_dsn(node).secret(), connect_timeout=3) as conn:
                    lsns.append(conn.execute(query).fetchone()[0])
            except psycopg.Error:
                lsns.append(None)
        return lsns[0], lsns[1]

    def _wait_writable(self, node: EmbeddedPostgres, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self._node_dsn(node).secret(), autocommit=True, connect_timeout=3) as conn:
                    if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                        conn.execute("SELECT pg_current_xact_id()")  # assigning an xid needs a writable server
                        return
            except psycopg.Error:
                pass
            if time.monotonic() > deadline:
                raise StackError(f"the promoted standby did not accept writes within {timeout:.0f} s. Log: {node.log}")
            time.sleep(0.1)
