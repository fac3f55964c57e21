"""`outbox dev up|down|status`: embedded PostgreSQL + Kafka under one directory (default .outbox/).

    <dev_dir>/pg/       PostgreSQL (see postgres.py)
    <dev_dir>/pg2/      its streaming standby with --pg-standby (see pgpair.py)
    <dev_dir>/kafka/    broker config, data and logs
    <dev_dir>/kafka-cluster/node-<id>/  the nodes with --kafka-brokers 3 (see cluster.py)
    <dev_dir>/state.json  what `up` started (broker kind, pids, ports, layout, which PG is primary)
    <dev_dir>/dev.env   export lines for the shell, also read by the settings loader

Test fixtures drive the same class, so what CI proves is what developers run.
"""

from __future__ import annotations

import fcntl
import json
import shlex
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from outbox.core.redact import Dsn
from outbox.core.settings import Settings
from outbox.devstack.cluster import KafkaCluster
from outbox.devstack.kafka import TANSU_LIMITS, ApacheKafka, Broker, Tansu, find_java
from outbox.devstack.pgpair import PgPair
from outbox.devstack.postgres import EmbeddedPostgres
from outbox.devstack.procs import StackError, progress


@dataclass
class StackUrls:
    database_url: Dsn
    kafka_bootstrap: str
    broker: str

    def exports(self) -> str:
        return (f"export OUTBOX_DATABASE_URL={shlex.quote(self.database_url.secret())}\n"
                f"export OUTBOX_KAFKA_BOOTSTRAP={shlex.quote(self.kafka_bootstrap)}\n")


class DevStack:
    """`kafka_brokers` / `pg_standby`: the layout; None keeps what state.json records (default: one
    broker, no standby), so a plain `up` after `up --kafka-brokers 3` is still idempotent."""

    def __init__(self, settings: Settings, root: Path | None = None, pg_config: dict[str, str] | None = None,
                 kafka_brokers: int | None = None, pg_standby: bool | None = None):
        self.settings = settings
        self.root = (root or settings.dev_dir).absolute()
        self.state_file = self.root / "state.json"
        self.env_file = self.root / "dev.env"
        self.pg_config = pg_config
        if kafka_brokers is not None and kafka_brokers not in (1, 3):
            raise StackError(f"--kafka-brokers must be 1 or 3, not {kafka_brokers}: the cluster settings "
                             f"(replication factor 3, min ISR 2) are made for three nodes")
        self.kafka_brokers = kafka_brokers
        self.pg_standby = pg_standby

    # ----- commands

    def up(self) -> StackUrls:
        started = time.monotonic()
        with self._locked():
            state = self._read_state()
            brokers, standby = self._layout(state)
            if standby:
                pair = self.pg_pair(state)
                dsn = pair.start()
                state["pg"] = pair.state
                self._write_state(state)
            else:
                dsn = self.postgres().start()
                if state.pop("pg", None):
                    self._drop_standby_slots(dsn)
            pg = self.postgres()
            if brokers > 1:
                cluster = self.kafka_cluster(state, brokers)
                try:
                    state["kafka"] = cluster.start()
                finally:
                    if cluster.state["nodes"]:
                        state["kafka"] = cluster.state  # pids of nodes already up, even if one failed
                        self._write_state(state)
                urls = StackUrls(dsn, cluster.bootstrap, "apache")
                broker_name, broker_kind, version = f"{brokers}-node Apache Kafka", "apache", cluster.version
            else:
                broker = self._broker(state)
                kafka = state.get("kafka", {})
                same_kind = kafka.get("kind") == broker.kind and not kafka.get("brokers", 1) > 1
                pid, port = broker.start(kafka.get("pid") if same_kind else None,
                                         kafka.get("port") if same_kind else None)
                state["kafka"] = {"kind": broker.kind, "pid": pid, "port": port, "version": broker.version}
                urls = StackUrls(dsn, f"127.0.0.1:{port}", broker.kind)
                broker_name, broker_kind, version = broker.name, broker.kind, broker.version
            self._write_state(state)
            self.env_file.write_text(urls.exports())
            self.env_file.chmod(0o600)  # it holds the database password
        pg_label = "PostgreSQL primary + standby" if standby else "PostgreSQL"
        progress(f"Dev stack up in {time.monotonic() - started:.1f} s "
                 f"({pg_label} {pg.version()} + {broker_name} {version}); env written to {self.env_file}")
        if broker_kind == "tansu":
            progress(f"WARNING: {TANSU_LIMITS}")
        return urls

    def down(self) -> list[str]:
        stopped = []
        with self._locked():
            state = self._read_state()
            kafka = state.get("kafka", {})
            if kafka.get("brokers", 1) > 1:
                if self.kafka_cluster(state, kafka["brokers"]).stop():
                    stopped.append(f"apache x{kafka['brokers']}")
            elif kafka and self._broker(state, kind=kafka.get("kind")).stop(kafka.get("pid"), kafka.get("port")):
                stopped.append(kafka["kind"])
            if state.get("pg", {}).get("standby"):
                stopped += ["postgres" if n == "pg" else f"postgres ({n})" for n in self.pg_pair(state).stop()]
            elif (self.root / "pg" / "data").exists() and self.postgres().stop():
                stopped.append("postgres")
            if kafka.get("brokers", 1) > 1:
                for node in kafka["nodes"]:
                    node["pid"] = None  # keep ports and cluster id: the voters of the next `up`
            else:
                state.pop("kafka", None)
            self._write_state(state)
        return stopped

    def restart_primary(self, pause: float = 0.0) -> str:
        """Stop the PostgreSQL primary (fast), wait `pause` seconds, start it on its port; its name."""
        with self._locked():
            state = self._read_state()
            if not state.get("pg", {}).get("standby"):
                raise StackError("restart_primary is for the primary + standby layout (`outbox dev up --pg-standby`)")
            return self.pg_pair(state).restart_primary(pause)

    def promote(self, hard: str = "immediate") -> dict:
        """Crash the PostgreSQL primary and promote its standby; the multi-host URL then reaches it."""
        with self._locked():
            state = self._read_state()
            if not state.get("pg", {}).get("standby"):
                raise StackError("there is no standby to promote. Fix: `outbox dev up --pg-standby` first")
            pair = self.pg_pair(state)
            report = pair.promote(hard)
            state["pg"] = pair.state
            self._write_state(state)
        return report

    def status(self) -> dict:
        state = self._read_state()
        report: dict = {"dir": str(self.root)}
        if state.get("pg", {}).get("standby"):
            nodes = self.pg_pair(state).statuses()
            primary = next((n for n in nodes if n["role"] == "primary"), nodes[0] if nodes else None)
            if primary:
                report["postgres"] = {**primary, "running": all(n["running"] for n in nodes), "nodes": nodes}
        elif (self.root / "pg" / "data").exists():
            pg = self.postgres().status()
            report["postgres"] = {"running": pg.running, "pid": pg.pid, "port": pg.port,
                                  "version": pg.version, "log": str(pg.log)}
        kafka = state.get("kafka")
        if kafka and kafka.get("brokers", 1) > 1:
            cluster = self.kafka_cluster(state, kafka["brokers"])
            nodes = [{"node_id": n.node_id, "running": n.running and not n.paused, "paused": n.paused,
                      "pid": n.pid, "port": n.port, "controller_port": n.controller_port, "log": str(n.log)}
                     for n in cluster.statuses()]
            report["kafka"] = {"broker": "apache", "brokers": kafka["brokers"], "version": cluster.version,
                               "running": all(n["running"] for n in nodes), "pid": None,
                               "port": None, "bootstrap": cluster.bootstrap, "log": str(cluster.root), "nodes": nodes}
        elif kafka:
            broker = self._broker(state, kind=kafka["kind"]).status(kafka.get("pid"), kafka.get("port"))
            report["kafka"] = {"broker": broker.kind, "running": broker.running, "pid": broker.pid,
                               "port": broker.port, "version": broker.version, "log": str(broker.log)}
        return report

    # ----- failover helpers (tests)

    def pg_node_dsn(self, role: str = "primary", database: str = "app"):
        """Single-host DSN of the current "primary" or "standby" of a --pg-standby stack."""
        return self._pair_now().node_dsn(role, database)

    def wait_standby_caught_up(self, timeout: float = 30) -> str:
        return self._pair_now().wait_caught_up(timeout)

    def wait_slot_synced(self, slot: str, timeout: float = 30) -> None:
        self._pair_now().wait_slot_synced(slot, timeout)

    def _pair_now(self) -> PgPair:
        state = self._read_state()
        if not state.get("pg", {}).get("standby"):
            raise StackError("this dev stack has no PostgreSQL standby. Fix: `outbox dev up --pg-standby`")
        return self.pg_pair(state)

    # ----- failure injection (tests): one Kafka node by its node id

    def kill_broker(self, node_id: int) -> int:
        """SIGKILL one node (no controlled shutdown); returns its pid."""
        return self._cluster_now().signal(node_id, signal.SIGKILL)

    def pause_broker(self, node_id: int) -> int:
        """SIGSTOP: the node keeps its sockets open but answers nothing (a GC pause, a frozen VM)."""
        return self._cluster_now().signal(node_id, signal.SIGSTOP)

    def resume_broker(self, node_id: int) -> int:
        return self._cluster_now().signal(node_id, signal.SIGCONT)

    def restart_broker(self, node_id: int) -> None:
        """Start a killed node again (or SIGTERM and restart a running one) on its old ports."""
        with self._locked():
            state = self._read_state()
            cluster = self.kafka_cluster(state, state["kafka"]["brokers"])
            state["kafka"] = cluster.restart(node_id)
            self._write_state(state)

    def partitions(self, topic: str) -> dict[int, dict]:
        """{partition: {"leader": node id (-1: none), "replicas": [...], "isr": [...]}}."""
        return self._cluster_now().partitions(topic)

    def leaders(self, topic: str) -> dict[int, int]:
        return {p: info["leader"] for p, info in self.partitions(topic).items()}

    def _cluster_now(self) -> KafkaCluster:
        state = self._read_state()
        if state.get("kafka", {}).get("brokers", 1) < 2:
            raise StackError("this dev stack runs a single Kafka broker. Fix: `outbox dev up --kafka-brokers 3`")
        return self.kafka_cluster(state, state["kafka"]["brokers"])

    # ----- parts

    def _layout(self, state: dict) -> tuple[int, bool]:
        kafka, pg = state.get("kafka", {}), state.get("pg", {})
        recorded_brokers = kafka.get("brokers", 1)
        brokers = self.kafka_brokers or recorded_brokers
        standby = bool(pg.get("standby")) if self.pg_standby is None else self.pg_standby
        if brokers != recorded_brokers and kafka and self._kafka_running(state):
            raise StackError(f"this dev stack runs {recorded_brokers} Kafka broker(s); asked for {brokers}. "
                             f"Fix: `outbox dev down` first (the data of either layout is kept)")
        if standby != bool(pg.get("standby")) and pg.get("standby"):
            if pg.get("primary", "pg") != "pg":
                raise StackError("after a promotion the standby layout is kept (the primary now lives in pg2/). "
                                 "Fix: `outbox dev down` and remove the dev directory to start afresh")
            if any(n["running"] for n in self.pg_pair(state).statuses()):
                raise StackError("the standby layout is running. Fix: `outbox dev down` first")
        if brokers > 1 and (self.settings.dev_kafka == "tansu" or find_java() is None):
            raise StackError("a Kafka cluster needs Apache Kafka (Java 17+); Tansu runs a single node only")
        return brokers, standby

    @staticmethod
    def _drop_standby_slots(dsn) -> None:
        # Back to one server: the old standby's physical slot would pin WAL for nobody.
        import psycopg

        with psycopg.connect(dsn.secret(), autocommit=True, connect_timeout=10) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_type = 'physical' AND slot_name LIKE 'outbox\\_dev\\_standby\\_%' "
                         "AND NOT active")

    def _kafka_running(self, state: dict) -> bool:
        kafka = state["kafka"]
        if kafka.get("brokers", 1) > 1:
            return any(n.running for n in self.kafka_cluster(state, kafka["brokers"]).statuses())
        return self._broker(state, kind=kafka.get("kind")).status(kafka.get("pid"), kafka.get("port")).running

    def pg_pair(self, state: dict) -> PgPair:
        return PgPair(self.root, service_user=self.settings.dev_pg_user, config=self.pg_config,
                      state=state.get("pg", {}))

    def kafka_cluster(self, state: dict, brokers: int) -> KafkaCluster:
        java = find_java()
        if java is None:
            raise StackError("a Kafka cluster needs Java 17 or newer and none was found on PATH or in JAVA_HOME")
        kafka = state.get("kafka", {})
        return KafkaCluster(self.root / "kafka-cluster", brokers, self.settings.dev_kafka_version,
                            self.settings.dev_cache_dir, self.settings.maven_repo, java,
                            kafka if kafka.get("brokers") == brokers else None)

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
