"""`outbox dev up|down|status`: embedded PostgreSQL + Kafka under one directory (default .outbox/).

    <dev_dir>/pg/       PostgreSQL (see postgres.py)
    <dev_dir>/kafka/    broker config, data and logs
    <dev_dir>/state.json  what `up` started (broker kind, pid, ports)
    <dev_dir>/dev.env   export lines for the shell, also read by the settings loader

Test fixtures drive the same class, so what CI proves is what developers run.
"""

from __future__ import annotations

import fcntl
import json
import shlex
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from relay.devstack.kafka import TANSU_LIMITS, ApacheKafka, Broker, Tansu, find_java
from relay.devstack.postgres import EmbeddedPostgres
from relay.devstack.procs import StackError, progress
from relay.redact import Dsn
from relay.settings import Settings


@dataclass
class StackUrls:
    database_url: Dsn
    kafka_bootstrap: str
    broker: str

    def exports(self) -> str:
        return (f"export OUTBOX_DATABASE_URL={shlex.quote(self.database_url.secret())}\n"
                f"export OUTBOX_KAFKA_BOOTSTRAP={shlex.quote(self.kafka_bootstrap)}\n")


class DevStack:
    def __init__(self, settings: Settings, root: Path | None = None, pg_config: dict[str, str] | None = None):
        self.settings = settings
        self.root = (root or settings.dev_dir).absolute()
        self.state_file = self.root / "state.json"
        self.env_file = self.root / "dev.env"
        self.pg_config = pg_config

    # ----- commands

    def up(self) -> StackUrls:
        started = time.monotonic()
        with self._locked():
            state = self._read_state()
            pg = self.postgres()
            dsn = pg.start()
            broker = self._broker(state)
            kafka = state.get("kafka", {})
            same_kind = kafka.get("kind") == broker.kind
            pid, port = broker.start(kafka.get("pid") if same_kind else None,
                                     kafka.get("port") if same_kind else None)
            state["kafka"] = {"kind": broker.kind, "pid": pid, "port": port, "version": broker.version}
            self._write_state(state)
            urls = StackUrls(dsn, f"127.0.0.1:{port}", broker.kind)
            self.env_file.write_text(urls.exports())
            self.env_file.chmod(0o600)  # it holds the database password
        progress(f"Dev stack up in {time.monotonic() - started:.1f} s "
                 f"(PostgreSQL {pg.version()} + {broker.name} {broker.version}); env written to {self.env_file}")
        if broker.kind == "tansu":
            progress(f"WARNING: {TANSU_LIMITS}")
        return urls

    def down(self) -> list[str]:
        stopped = []
        with self._locked():
            state = self._read_state()
            kafka = state.get("kafka", {})
            if kafka and self._broker(state, kind=kafka.get("kind")).stop(kafka.get("pid"), kafka.get("port")):
                stopped.append(kafka["kind"])
            if (self.root / "pg" / "data").exists() and self.postgres().stop():
                stopped.append("postgres")
            state.pop("kafka", None)
            self._write_state(state)
        return stopped

    def status(self) -> dict:
        state = self._read_state()
        report: dict = {"dir": str(self.root)}
        if (self.root / "pg" / "data").exists():
            pg = self.postgres().status()
            report["postgres"] = {"running": pg.running, "pid": pg.pid, "port": pg.port,
                                  "version": pg.version, "log": str(pg.log)}
        kafka = state.get("kafka")
        if kafka:
            broker = self._broker(state, kind=kafka["kind"]).status(kafka.get("pid"), kafka.get("port"))
            report["kafka"] = {"broker": broker.kind, "running": broker.running, "pid": broker.pid,
                               "port": broker.port, "version": broker.version, "log": str(broker.log)}
        return report

    # ----- parts

    def postgres(self) -> EmbeddedPostgres:
        return EmbeddedPostgres(self.root / "pg", service_user=self.settings.dev_pg_user, config=self.pg_config)

    def _broker(self, state: dict, kind: str | None = None) -> Broker:
        kind = kind or self.settings.dev_kafka
        if kind == "auto":
            recorded = state.get("kafka", {}).get("kind")
            kind = recorded or ("apache" if find_java() else "tansu")
            if kind == "tansu" and not recorded:
                progress("No Java 17+ found: falling back to Tansu (set OUTBOX_DEV_KAFKA=apache to insist).")
        if kind == "tansu":
            return Tansu(self.root / "tansu")
        java = find_java()
        if java is None:
            raise StackError("Apache Kafka needs Java 17 or newer and none was found on PATH or in JAVA_HOME. "
                             "Fix: install a JDK/JRE 17+, or set OUTBOX_DEV_KAFKA=tansu for the JVM-free demo broker.")
        return ApacheKafka(self.root / "kafka", self.settings.dev_kafka_version, self.settings.dev_cache_dir,
                           self.settings.maven_repo, java)

    @contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # two `up`s at once would race for ports and data dirs
            yield

    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self, state: dict) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)
