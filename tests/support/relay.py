"""Running the relay in tests: in a thread (fast, inspectable) or as a real `outbox relay` process
(for SIGTERM and kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from outbox.core.redact import Dsn
from outbox.core.settings import Settings, load_settings
from relay.daemon import Relay
from tests.support.helpers import wait_for
from tests.support.paths import REPO


def relay_env(db: Dsn, kafka: str, prefix: str, **overrides) -> dict[str, str]:
    env = {
        "OUTBOX_DATABASE_URL": db.secret(),
        "OUTBOX_KAFKA_BOOTSTRAP": kafka,
        "OUTBOX_TOPIC_TEMPLATE": f"{prefix}.{{aggregate_type}}",
        "OUTBOX_SLOT_NAME": f"slot_{prefix}",
        "OUTBOX_CHECKPOINT_TOPIC": f"{prefix}.checkpoints",
        "OUTBOX_METRICS_PORT": "0",
        "OUTBOX_HEARTBEAT_INTERVAL_S": "2",
        "OUTBOX_STATUS_INTERVAL_S": "1",
    }
    env.update({f"OUTBOX_{k.upper()}": str(v) for k, v in overrides.items()})
    return env


def relay_settings(db: Dsn, kafka: str, prefix: str, **overrides) -> Settings:
    env = relay_env(db, kafka, prefix, **overrides)
    return load_settings(**{k.removeprefix("OUTBOX_").lower(): v for k, v in env.items()})


class RelayThread:
    """An in-process relay; `stop()` is what SIGTERM does in the CLI."""

    def __init__(self, settings: Settings):
        self.relay = Relay(settings)
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"relay-{settings.relay_id}", daemon=True)

    def _run(self) -> None:
        self.exit_code = self.relay.run()

    def start(self) -> "RelayThread":
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> int | None:
        self.relay.request_stop()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "relay did not stop"
        return self.exit_code

    def join(self, timeout: float) -> int | None:
        self._thread.join(timeout)
        return self.exit_code

    def __enter__(self) -> "RelayThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self.stop()


def relay_process(env: dict[str, str], log: Path, relay_id: str = "proc") -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    full.update(env)
    full["OUTBOX_RELAY_ID"] = relay_id
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "outbox.cli", "relay"], env=full, cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def active_and_standby(db: Dsn, env: dict[str, str], tmp_path: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Two `outbox relay` processes for one slot: relay-a streaming, relay-b waiting as its standby."""
    active = relay_process(env, tmp_path / "a.log", relay_id="relay-a")
    wait_streaming(db, "relay-a")
    standby = relay_process(env, tmp_path / "b.log", relay_id="relay-b")
    wait_for(lambda: query(db, "SELECT role FROM outbox.relay_instances WHERE relay_id = 'relay-b'") == [("standby",)],
             30, "relay-b on standby")
    return active, standby


def sigterm(proc: subprocess.Popen, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def emit(db: Dsn, events: list[tuple[str, str, str, object, dict]]) -> list[str]:
    """Emit events in one transaction; returns their event ids."""
    with psycopg.connect(db.secret()) as conn:
        return [str(conn.execute("SELECT outbox.emit(%s, %s, %s, %s, %s)",
                                 (a, i, t, Jsonb(p) if p is not None else None, Jsonb(h))).fetchone()[0])
                for a, i, t, p, h in events]


def emit_many(db: Dsn, aggregate_type: str, count: int, *, per_txn: int = 1000, payload_bytes: int = 100) -> None:
    """`count` events with sequential aggregate ids, `per_txn` per transaction, via SQL (fast)."""
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        done = 0
        while done < count:
            n = min(per_txn, count - done)
            conn.execute(
                "SELECT outbox.emit(%s, (i %% 97)::text, 'Load', jsonb_build_object('seq', i, 'pad', repeat('x', %s))) "
                "FROM generate_series(%s::int, %s::int) i", (aggregate_type, payload_bytes, done, done + n - 1))
            done += n


def wait_streaming(db: Dsn, relay_id: str | None = None, timeout: float = 30) -> None:
    """Until a relay streams: slot created, backfill done, role active."""
    def ready():
        rows = query(db, "SELECT count(*) FROM outbox.relay_instances i JOIN outbox.relay_status s USING (slot_name) "
                         "WHERE i.role = 'active' AND s.backfill_snapshot IS NULL AND NOT s.slot_creating "
                         "AND (%s::text IS NULL OR i.relay_id = %s)", (relay_id, relay_id))
        return rows[0][0] > 0
    wait_for(ready, timeout, "the relay to stream")


def query(db: Dsn, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def published(db: Dsn) -> int:
    rows = query(db, "SELECT coalesce(sum(events_published), 0) FROM outbox.relay_status")
    return int(rows[0][0])


def slot_confirmed(db: Dsn, slot: str) -> int:
    rows = query(db, "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots "
                     "WHERE slot_name = %s", (slot,))
    return rows[0][0] if rows and rows[0][0] is not None else 0
