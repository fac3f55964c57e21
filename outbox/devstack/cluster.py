"""A KRaft cluster of N combined broker+controller nodes (`outbox dev up --kafka-brokers 3`).

For failure tests of the relay: a broker killed, paused or restarted while the others keep the
partition available. Same jars as the single node, one JVM per node with a small heap.

    <root>/node-<id>/  server.properties, data/, server.log, stdout.log

The controller quorum is static (`controller.quorum.voters` names all nodes): with kraft.version 0
the voter set lives only in the config, so every node gets the same list, formatted with one
shared cluster id. A node's controller port is therefore fixed once chosen; restarting one node
on another controller port would make it a stranger to the other two.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from outbox.devstack.jars import ensure_jars
from outbox.devstack.kafka import BROKER_PROPERTIES, ApacheKafka, kafka_cluster_id
from outbox.devstack.procs import StackError, free_port, ours, port_is_free, progress, terminate

# Durability as a production cluster would have it: a write acknowledged with acks=all is on two
# nodes at least, and a replica that fell out of the ISR never becomes leader (it would lose
# acknowledged writes). Internal topics get the same, or transactions and groups would be the weak
# spot. Shorter broker session: a killed node is fenced (and leadership moves) after ~6 s, not 9 s.
CLUSTER_PROPERTIES = {
    **BROKER_PROPERTIES,
    "default.replication.factor": "3",
    "min.insync.replicas": "2",
    "unclean.leader.election.enable": "false",
    "offsets.topic.replication.factor": "3",
    "transaction.state.log.replication.factor": "3",
    "transaction.state.log.min.isr": "2",
    "share.coordinator.state.topic.replication.factor": "3",
    "share.coordinator.state.topic.min.isr": "2",
    "broker.session.timeout.ms": "6000",
    "broker.heartbeat.interval.ms": "1000",
    # Three JVMs share 2 cores with PostgreSQL: fewer threads, less contention.
    "num.network.threads": "2",
    "num.io.threads": "2",
    "num.replica.fetchers": "1",
    "background.threads": "2",
}


class KafkaNode(ApacheKafka):
    heap = ["-Xms64m", "-Xmx256m"]

    def __init__(self, root: Path, version: str, cache_dir: Path | None, repo: str, java: str, *,
                 node_id: int, controller_port: int, voters: str, cluster_id: str):
        super().__init__(root, version, cache_dir, repo, java)
        self.node_id = node_id
        self.name = f"Kafka node {node_id}"
        self.controller_port = controller_port
        self.voters = voters
        self.cluster_id = cluster_id
        self.properties = {**CLUSTER_PROPERTIES, "node.id": str(node_id)}

    def _controller_port(self) -> int:
        return self.controller_port

    def _voters(self, controller_port: int) -> str:
        return self.voters

    def _cluster_id(self) -> str:
        return self.cluster_id

    def prepare(self, port: int) -> None:
        """Write the config and format storage now, so that several nodes can format in parallel."""
        self.root.mkdir(parents=True, exist_ok=True)
        libs = ensure_jars(self._version, self.cache_dir, self.repo)
        self._write_config(port, self.controller_port)
        if not (self.data / "meta.properties").exists():
            self._format(libs)


@dataclass
class NodeStatus:
    node_id: int
    running: bool
    paused: bool
    pid: int | None
    port: int | None
    controller_port: int | None
    log: Path


class KafkaCluster:
    """Start/reuse/stop the nodes recorded in `state` (the "kafka" entry of state.json)."""

    kind = "apache"
    name = "Apache Kafka cluster"

    def __init__(self, root: Path, size: int, version: str, cache_dir: Path | None, repo: str, java: str,
                 state: dict | None = None):
        self.root = root.absolute()
        self.size = size
        self.version = version
        self.cache_dir, self.repo, self.java = cache_dir, repo, java
        state = dict(state or {})
        if state.get("brokers") != size:
            state = {}
        self.state = {"kind": self.kind, "version": version, "brokers": size,
                      "cluster_id": state.get("cluster_id") or self._formatted_cluster_id() or kafka_cluster_id(),
                      "nodes": state.get("nodes") or []}

    # ----- addresses

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n['port']}" for n in self.state["nodes"])

    def live_bootstrap(self) -> str:
        """Only the nodes that run and are not paused: kafka-python's admin client sends a request
        to one node it picks and fails on a refused connection instead of trying the next."""
        live = [s for s in self.statuses() if s.running and not s.paused]
        return ",".join(f"127.0.0.1:{s.port}" for s in live) or self.bootstrap

    def _recorded(self, node_id: int) -> dict:
        for entry in self.state["nodes"]:
            if entry["id"] == node_id:
                return entry
        return {}

    def node(self, node_id: int) -> KafkaNode:
        rec = self._recorded(node_id)
        return KafkaNode(self.root / f"node-{node_id}", self.version, self.cache_dir, self.repo, self.java,
                         node_id=node_id, controller_port=rec.get("controller_port", 0),
                         voters=self._voters(), cluster_id=self.state["cluster_id"])

    def _voters(self) -> str:
        return ",".join(f"{n['id']}@127.0.0.1:{n['controller_port']}" for n in self.state["nodes"])

    def _process(self, node_id: int) -> psutil.Process | None:
        rec = self._recorded(node_id)
        return ours(rec.get("pid"), self.node(node_id).config) if rec else None

    # ----- lifecycle

    def start(self, timeout: float = 120) -> dict:
        ids = list(range(1, self.size + 1))
        running = {i: self._process(i) for i in ids}
        for proc in running.values():
            if proc is not None and proc.status() == psutil.STATUS_STOPPED:
                proc.send_signal(signal.SIGCONT)  # paused by a test that died before resuming it
        if not all(running.values()):
            self._assign_ports(ids, running)
        spawned: dict[int, subprocess.Popen] = {}
        try:
            todo = [i for i in ids if running[i] is None]
            if todo:
                for i in todo:
                    self.node(i)._stop_orphan()
                with ThreadPoolExecutor(len(todo)) as pool:
                    list(pool.map(lambda i: self.node(i).prepare(self._recorded(i)["port"]), todo))
                for i in todo:
                    proc, port = self.node(i).spawn(self._recorded(i)["port"])
                    spawned[i] = proc
                    self._recorded(i).update(pid=proc.pid, port=port)
            started = time.monotonic()
            for i in ids:
                # A lone voter never elects a leader: wait only once every node was launched.
                self.node(i).wait_ready(spawned.get(i) or running[i], self._recorded(i)["port"], timeout,
                                        already=i not in spawned)
            self.wait_registered(ids, timeout)
        except BaseException:
            for proc in spawned.values():
                proc.kill()
                proc.wait()
            raise
        if spawned:
            progress(f"  {self.size}-node Kafka cluster ready in {time.monotonic() - started:.1f} s "
                     f"after the last launch")
        return self.state

    def _assign_ports(self, ids: list[int], running: dict) -> None:
        taken = {p for n in self.state["nodes"] for p in (n.get("port"), n.get("controller_port")) if p}

        def fresh() -> int:
            while (port := free_port()) in taken:
                pass
            taken.add(port)
            return port

        old_voters = self._voters() if len(self.state["nodes"]) == self.size else None
        nodes = []
        for i in ids:
            rec = self._recorded(i)
            if running[i] is not None:
                nodes.append(rec)
                continue
            port = rec.get("port") if rec.get("port") and port_is_free(rec["port"]) else fresh()
            cport = rec.get("controller_port")
            cport = cport if cport and port_is_free(cport) else fresh()
            nodes.append({"id": i, "pid": None, "port": port, "controller_port": cport})
        self.state["nodes"] = nodes
        if old_voters is not None and old_voters != self._voters():
            for i, proc in running.items():
                if proc is not None:
                    progress(f"  restarting Kafka node {i}: a controller port changed, all voters must agree")
                    terminate(proc, timeout=30)
                    running[i] = None

    def wait_registered(self, ids: list[int], timeout: float) -> None:
        """Until the controller lists every node as an unfenced broker: before that a topic with
        replication factor 3 cannot be created."""
        deadline = time.monotonic() + timeout
        while True:
            alive = self.unfenced_brokers()
            if set(ids) <= alive:
                return
            if time.monotonic() > deadline:
                raise StackError(f"Kafka brokers {sorted(set(ids) - alive)} did not register with the controller "
                                 f"within {timeout:.0f} s. Logs: {self.root}/node-*/server.log")
            time.sleep(0.2)

    def unfenced_brokers(self) -> set[int]:
        try:
            with admin(self.live_bootstrap()) as client:
                return {b["broker_id"] for b in client.describe_cluster()["brokers"] if not b.get("is_fenced")}
        except Exception:  # noqa: BLE001 - not ready yet, whatever the client says
            return set()

    def stop(self) -> bool:
        stopped = False
        procs = [p for p in (self._process(n["id"]) for n in self.state["nodes"]) if p is not None]
        for proc in procs:
            if proc.status() == psutil.STATUS_STOPPED:
                proc.send_signal(signal.SIGCONT)  # a paused JVM cannot act on SIGTERM
        for proc in procs:
            proc.send_signal(signal.SIGTERM)  # together: a controlled shutdown needs the others alive
        gone, alive = psutil.wait_procs(procs, timeout=30)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=10)
        stopped = bool(procs)
        for node in self.state["nodes"]:
            node["pid"] = None
        return stopped

    def signal(self, node_id: int, sig: int) -> int:
        """Send `sig` to one node (SIGKILL waits until it is gone); returns its pid."""
        proc = self._process(node_id)
        if proc is None:
            raise StackError(f"Kafka node {node_id} is not running")
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait(10)
        return proc.pid

    def restart(self, node_id: int, timeout: float = 90) -> dict:
        """Start one stopped/killed node again on its old ports; SIGTERM it first if it still runs."""
        proc = self._process(node_id)
        if proc is not None:
            if proc.status() == psutil.STATUS_STOPPED:
                proc.send_signal(signal.SIGCONT)
            terminate(proc, timeout=30)
        rec = self._recorded(node_id)
        if not port_is_free(rec["controller_port"]):
            raise StackError(f"Kafka node {node_id}: its controller port {rec['controller_port']} is taken; "
                             f"`outbox dev down` and `up` again to pick new ports for all nodes")
        node = self.node(node_id)
        new, port = node.spawn(rec["port"])
        rec.update(pid=new.pid, port=port)
        node.wait_ready(new, port, timeout)
        self.wait_registered([node_id], timeout)
        return self.state

    def statuses(self) -> list[NodeStatus]:
        out = []
        for rec in self.state["nodes"]:
            proc = self._process(rec["id"])
            paused = proc is not None and proc.status() == psutil.STATUS_STOPPED
            out.append(NodeStatus(rec["id"], proc is not None, paused, proc.pid if proc else None, rec.get("port"),
                                  rec.get("controller_port"), self.node(rec["id"]).log))
        return out

    # ----- topics

    def partitions(self, topic: str) -> dict[int, dict]:
        """{partition: {"leader": id, "replicas": [...], "isr": [...]}} as the cluster reports it now."""
        # Right after a node died the cluster still lists it, and the admin client may pick it and
        # fail: retry (each time through another live node) until the controller has caught up.
        deadline = time.monotonic() + 20
        attempt = 0
        while True:
            live = self.live_bootstrap().split(",")
            try:
                with admin(live[attempt % len(live)]) as client:
                    (meta,) = client.describe_topics([topic])
                break
            except Exception:  # noqa: BLE001 - whatever the client raises, the next try may work
                if time.monotonic() > deadline:
                    raise
                attempt += 1
                time.sleep(0.3)
        if meta.get("error_code"):
            raise StackError(f"describing topic {topic!r} failed with Kafka error code {meta['error_code']}")
        return {p["partition_index"]: {"leader": p["leader_id"], "replicas": sorted(p["replica_nodes"]),
                                       "isr": sorted(p["isr_nodes"])} for p in meta["partitions"]}

    def _formatted_cluster_id(self) -> str | None:
        # state.json lost but data kept: reuse the id the storage was formatted with.
        for meta in sorted(self.root.glob("node-*/data/meta.properties")):
            for line in meta.read_text().splitlines():
                if line.startswith("cluster.id="):
                    return line.split("=", 1)[1].strip()
        return None


class admin:  # noqa: N801 - used like a function in `with`
    """A short-lived, quiet admin client (kafka-python logs every refused connection at ERROR)."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap

    def __enter__(self):
        from kafka import KafkaAdminClient

        self._quiet = logging.getLogger("kafka")
        self._level, self._quiet.level = self._quiet.level, logging.CRITICAL
        try:
            self.client = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        except BaseException:
            self._quiet.setLevel(self._level)
            raise
        return self.client

    def __exit__(self, *exc):
        try:
            self.client.close()
        finally:
            self._quiet.setLevel(self._level)
