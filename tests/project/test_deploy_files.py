"""The deployment files are held to the code, since no container engine or cluster runs them here:
every OUTBOX_* variable is a setting with a valid value, every command is a real `outbox` command,
ports and probe paths are what the servers listen on and answer. The last tests run the relays'
container command outside a container, with the containers' environment, against the test stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from outbox.cli import build_parser
from outbox.core.settings import ENV_PREFIX, Settings, load_settings
from outbox.devstack.procs import free_port
from relay.metrics import RelayMetrics, serve
from tests.support.deploy import (
    DOCKERIGNORE,
    KUBERNETES,
    Container,
    compose,
    compose_containers,
    dockerfile_cmd,
    dockerfile_env,
    dockerfile_healthcheck,
    dockerfile_instructions,
    kubernetes_containers,
    kubernetes_documents,
)
from tests.support.helpers import wait_for
from tests.support.paths import REPO
from tests.support.relay import query, relay_env, wait_streaming

KNOWN = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
CONTAINERS = {**{f"compose:{k}": v for k, v in compose_containers().items()},
              **{f"k8s:{k}": v for k, v in kubernetes_containers().items()}}
RELAYS = [k for k, c in CONTAINERS.items() if c.command[1:2] == ["relay"]]
CONSUMERS = [k for k, c in CONTAINERS.items() if c.command[:2] == ["python", "-m"]]  # inbox consumers
DASHBOARDS = [k for k, c in CONTAINERS.items() if c.command[1:2] == ["dashboard"]]
STREAMLIT_HEALTH = "/_stcore/health"  # Streamlit's own endpoint; the dashboard has no relay inside


def effective(c: Container) -> Settings:
    """The settings the container's process would load (valueFrom entries left to their default)."""
    env = {k: v for k, v in c.env.items() if k.startswith(ENV_PREFIX) and v is not None}
    return load_settings(**{k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items()})


def test_the_files_were_found():
    assert {"compose:migrate", "compose:relay", "compose:relay-standby", "compose:dashboard", "compose:demo"} \
        <= CONTAINERS.keys()
    assert {"k8s:outbox-relay/relay", "k8s:outbox-dashboard/dashboard", "k8s:outbox-migrate/migrate"} \
        <= CONTAINERS.keys()
    assert len(RELAYS) == 3 and len(DASHBOARDS) == 2
    assert sorted(CONSUMERS) == ["compose:shipping", "k8s:outbox-consumer/consumer"]


@pytest.mark.parametrize("name", sorted(CONTAINERS))
def test_every_outbox_variable_is_a_setting_with_a_valid_value(name, monkeypatch):
    c = CONTAINERS[name]
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    unknown = {k for k in c.env if k.startswith(ENV_PREFIX)} - KNOWN
    assert not unknown, f"{c.where}: not settings: {sorted(unknown)}"
    effective(c)  # a ConfigError names the variable and the fix


def test_the_images_own_environment_is_made_of_settings():
    env = {k for k in dockerfile_env() if k.startswith(ENV_PREFIX)}
    assert env and env <= KNOWN


def test_the_k8s_secret_holds_only_settings():
    secrets = [doc for _, doc in kubernetes_documents() if doc["kind"] == "Secret"]
    assert len(secrets) == 1
    keys = set(secrets[0]["stringData"])
    assert keys <= KNOWN and "OUTBOX_DATABASE_URL" in keys
    refs = {ref["secretRef"]["name"] for c in kubernetes_containers().values() for ref in c_env_from(c)}
    assert refs == {secrets[0]["metadata"]["name"]}


def c_env_from(c: Container) -> list[dict]:
    for _, doc in kubernetes_documents():
        if doc["kind"] in ("Deployment", "Job"):
            for spec in doc["spec"]["template"]["spec"]["containers"]:
                if c.where.endswith(f"container {spec['name']}") and doc["metadata"]["name"] in c.where:
                    return spec.get("envFrom", [])
    return []


@pytest.mark.parametrize("name", sorted(set(CONTAINERS) - set(CONSUMERS)))
def test_every_command_is_a_real_cli_command(name, capsys):
    c = CONTAINERS[name]
    assert c.command[0] == "outbox", f"{c.where}: {c.command}"
    try:
        args = build_parser().parse_args(c.command[1:])
    except SystemExit:
        pytest.fail(f"{c.where}: `{' '.join(c.command)}` is not a valid command: {capsys.readouterr().err}")
    assert callable(args.func)


@pytest.mark.parametrize("name", CONSUMERS)
def test_every_consumer_command_runs_a_module_of_the_package_with_a_main(name):
    import importlib

    c = CONTAINERS[name]
    assert len(c.command) == 3 and c.command[2].startswith("outbox."), f"{c.where}: {c.command}"
    module = importlib.import_module(c.command[2])
    assert callable(getattr(module, "main", None)) and "__main__" in Path(module.__file__).read_text()


@pytest.mark.parametrize("name", CONSUMERS)
def test_consumer_ports_and_probes_match_the_inbox_metrics_server(name):
    c = CONTAINERS[name]
    settings = effective(c)
    port = settings.inbox_metrics_port
    assert port and settings.metrics_host == "0.0.0.0", f"{c.where}: the Runner's server must listen on 0.0.0.0"
    assert port in c.ports, f"{c.where}: exposes {c.ports}, the Runner's server listens on {port}"
    assert {probe_port for _, probe_port in c.probes.values()} == {port}
    paths = {kind: path for kind, (path, _) in c.probes.items()}
    if name.startswith("k8s:"):
        assert paths == {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    else:  # an idle extra member is alive but not ready: compose's healthcheck is the liveness one
        assert paths == {"healthcheck": "/healthz"}


def test_the_image_runs_the_relay_by_default_in_exec_form():
    assert dockerfile_cmd() == ["outbox", "relay"]
    build_parser().parse_args(dockerfile_cmd()[1:])


@pytest.mark.parametrize("name", RELAYS)
def test_relay_ports_and_probes_match_the_metrics_server(name):
    c = CONTAINERS[name]
    port = effective(c).metrics_port
    assert effective(c).metrics_host == "0.0.0.0", f"{c.where}: probes from outside the container need 0.0.0.0"
    assert port in c.ports, f"{c.where}: exposes {c.ports}, the metrics server listens on {port}"
    for kind, (path, probe_port) in c.probes.items():
        assert probe_port == port, f"{c.where} {kind}: port {probe_port}, metrics on {port}"
    paths = {kind: path for kind, (path, _) in c.probes.items()}
    if name.startswith("k8s:"):
        assert paths == {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    else:
        assert paths == {"healthcheck": "/healthz"}


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_ports_and_probes_match_streamlit(name):
    c = CONTAINERS[name]
    s = effective(c)
    assert s.dashboard_host == "0.0.0.0" and s.dashboard_port in c.ports, c.where
    assert c.probes and all(p == (STREAMLIT_HEALTH, s.dashboard_port) for p in c.probes.values()), c.probes


def test_probe_paths_are_answered_by_the_metrics_server():
    """Not a 404: what each probe path asks is what relay.metrics serves."""
    paths = {path for c in CONTAINERS.values() for path, _ in c.probes.values()} - {STREAMLIT_HEALTH}
    assert paths == {"/healthz", "/readyz"}
    port = free_port()
    server = serve(RelayMetrics(), port)
    try:
        for path in sorted(paths | {"/metrics"}):
            try:
                code = urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
            except urllib.error.HTTPError as exc:
                code = exc.code
            assert code in (200, 503), (path, code)
    finally:
        server.shutdown()
        server.server_close()


def test_the_image_healthcheck_is_the_relays_liveness():
    check = dockerfile_healthcheck()
    assert check[0] == "python" and "/healthz" in check[-1]
    assert "OUTBOX_METRICS_PORT" in check[-1] and str(Settings.model_fields["metrics_port"].default) in check[-1]


def test_dockerfile_multi_stage_non_root_and_only_real_extras():
    steps = dockerfile_instructions()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2 and all("slim" in f for f in froms)
    user = [rest for word, rest in steps if word == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root")
    extras_arg = next(rest for word, rest in steps if word == "ARG" and rest.startswith("EXTRAS="))
    extras = set(extras_arg.removeprefix("EXTRAS=").split(","))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert extras <= set(project["optional-dependencies"]) and "dev" not in extras and "embedded" not in extras
    # Every package the wheel needs is copied into the build stage.
    copied = {src for word, rest in steps if word == "COPY" and "--from" not in rest for src in rest.split()[:-1]}
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    top = {p.split(".")[0] for p in tool["packages"]}
    assert top | set(tool["package-dir"].values()) | {"pyproject.toml", "README.md"} <= copied


def test_dockerignore_keeps_credentials_and_local_state_out():
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"}
    assert {".env", ".outbox/", ".venv/", ".git/"} <= ignored


def test_compose_start_order_and_servers():
    services = compose()["services"]
    pg, kafka = services["postgres"], services["kafka"]
    assert pg["image"] == "postgres:18" and "wal_level=logical" in pg["command"] and pg["volumes"]
    assert kafka["image"] == "apache/kafka:4.1.1" and "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    for name in ("postgres", "kafka"):
        assert services[name]["healthcheck"]["test"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for relay in ("relay", "relay-standby"):
        assert services[relay]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert services[relay]["depends_on"]["kafka"] == {"condition": "service_healthy"}
    assert services["dashboard"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["demo"]["depends_on"]["relay"]["condition"] == "service_healthy"
    # The standby shares the slot and differs only by its id.
    a, b = (CONTAINERS[f"compose:{n}"] for n in ("relay", "relay-standby"))
    assert effective(a).slot_name == effective(b).slot_name
    assert a.env["OUTBOX_RELAY_ID"] != b.env["OUTBOX_RELAY_ID"]
    # Inside the compose network the services' names are the hosts.
    s = effective(a)
    assert s.database_url.params()["host"] == "postgres" and s.kafka_servers[0].split(":")[0] == "kafka"
    listeners = kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"//{s.kafka_bootstrap}" in listeners


def test_kubernetes_relay_is_active_standby_with_split_probes():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in kubernetes_documents()}
    relay = docs[("Deployment", "outbox-relay")]["spec"]
    assert relay["replicas"] == 2
    # Readiness is the active one only: a rollout waiting for ready new pods would never finish.
    assert relay["strategy"]["rollingUpdate"]["maxUnavailable"] >= relay["replicas"]
    assert docs[("Job", "outbox-migrate")]["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    dashboard_svc = docs[("Service", "outbox-dashboard")]["spec"]
    assert dashboard_svc["type"] == "ClusterIP"  # no login of its own: never exposed by default
    dash = CONTAINERS["k8s:outbox-dashboard/dashboard"]
    assert dashboard_svc["ports"][0]["targetPort"] in ("http", effective(dash).dashboard_port)
    kustomize = yaml_load(KUBERNETES / "kustomization.yaml")
    assert set(kustomize["resources"]) == {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}


def yaml_load(path: Path):
    return yaml.safe_load(path.read_text())


# ----- the relays' container command, run here with the containers' environment


def container_relay(compose_service: str, db, kafka: str, prefix: str, log: Path, metrics_port: int):
    """`outbox relay` as compose's service would start it: its command through the installed
    `outbox` script, its environment (image + service), only the servers and ports pointed here."""
    c = CONTAINERS[f"compose:{compose_service}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update({k: v for k, v in c.env.items() if v is not None})
    test = relay_env(db, kafka, prefix)
    env.update({k: test[k] for k in ("OUTBOX_DATABASE_URL", "OUTBOX_KAFKA_BOOTSTRAP", "OUTBOX_SLOT_NAME",
                                     "OUTBOX_TOPIC_TEMPLATE", "OUTBOX_CHECKPOINT_TOPIC")})
    env["OUTBOX_METRICS_PORT"] = str(metrics_port)
    assert env["OUTBOX_METRICS_HOST"] == "0.0.0.0"
    argv = [str(Path(sys.executable).with_name(c.command[0])), *c.command[1:]]
    return subprocess.Popen(argv, env=env, cwd=log.parent, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def probe(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_container_relays_answer_healthz_and_readyz_as_active_and_standby(db, kafka, topic_prefix, tmp_path):
    port_a, port_b = free_port(), free_port()
    a = container_relay("relay", db, kafka, topic_prefix, tmp_path / "a.log", port_a)
    b = None
    try:
        wait_streaming(db, "relay-a", timeout=60)
        wait_for(lambda: probe(port_a, "/readyz")[0] == 200, 15, "relay-a ready")
        code, body = probe(port_a, "/readyz")
        assert body["role"] == "active" and body["streaming"] and body["kafka_ok"]
        code, body = probe(port_a, "/healthz")
        assert code == 200 and body["status"] == "ok" and body["role"] == "active"

        b = container_relay("relay-standby", db, kafka, topic_prefix, tmp_path / "b.log", port_b)
        wait_for(lambda: query(db, "SELECT role FROM outbox.relay_instances WHERE relay_id = 'relay-b'")
                 == [("standby",)], 30, "relay-b on standby")
        assert probe(port_b, "/healthz")[0] == 200  # alive: nothing should restart it
        code, body = probe(port_b, "/readyz")
        assert code == 503 and body["role"] == "standby" and body["status"] == "not ready", body
        assert "outbox_relay_ready 1.0" in scrape(port_a) and "outbox_relay_ready 0.0" in scrape(port_b)
        # Listening on every interface, as in a container (not only on loopback).
        assert any(":%04X" % port_b in line and " 00000000:" in line
                   for line in Path("/proc/net/tcp").read_text().splitlines()), "not bound to 0.0.0.0"

        # The active one stops (a rollout, a drain): the standby takes over and becomes ready.
        a.send_signal(signal.SIGTERM)
        assert a.wait(60) == 0, (tmp_path / "a.log").read_text()[-2000:]
        wait_for(lambda: probe(port_b, "/readyz")[0] == 200, 60, "relay-b ready after the takeover")
        assert probe(port_b, "/readyz")[1]["role"] == "active"
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def test_container_dashboard_answers_its_health_probe_on_every_interface(db, tmp_path):
    """The compose dashboard's command and environment: Streamlit serves the probe path the compose
    healthcheck and the Kubernetes probes ask for, listening on 0.0.0.0."""
    c = CONTAINERS["compose:dashboard"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update({k: v for k, v in c.env.items() if v is not None})
    env.update(OUTBOX_DATABASE_URL=db.secret(), OUTBOX_DASHBOARD_PORT=str(port))
    assert env["OUTBOX_DASHBOARD_HOST"] == "0.0.0.0"
    argv = [str(Path(sys.executable).with_name(c.command[0])), *c.command[1:]]
    log = tmp_path / "dashboard.log"
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def healthy():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{STREAMLIT_HEALTH}", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                assert proc.poll() is None, log.read_text()[-2000:]
                return False

        wait_for(healthy, 60, "the dashboard's health endpoint", interval=0.3)
        assert any(":%04X" % port in line and " 00000000:" in line
                   for line in Path("/proc/net/tcp").read_text().splitlines()), "not bound to 0.0.0.0"
        assert "(listening on 0.0.0.0)" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_container_consumer_answers_healthz_and_readyz_and_stops_on_sigterm(db, kafka, tmp_path):
    """The compose consumer's command and environment, outside a container: the Runner's server
    listens on 0.0.0.0 at OUTBOX_INBOX_METRICS_PORT, /readyz turns 200 once partitions are assigned,
    and SIGTERM ends it with exit 0."""
    from outbox.examples import shipping
    from relay.publisher import ensure_topic

    ensure_topic({"bootstrap_servers": kafka}, shipping.TOPIC, 3)
    c = CONTAINERS["compose:shipping"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update({k: v for k, v in c.env.items() if v is not None})
    env.update(OUTBOX_DATABASE_URL=db.secret(), OUTBOX_KAFKA_BOOTSTRAP=kafka, OUTBOX_INBOX_METRICS_PORT=str(port))
    argv = [sys.executable, *c.command[1:]]
    log = tmp_path / "consumer.log"
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def ready():
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                return probe(port, "/readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, 60, "the consumer's /readyz", interval=0.3)
        code, body = probe(port, "/readyz")
        assert body["assigned_partitions"] == 3 and body["database_up"] is True
        assert probe(port, "/healthz")[0] == 200
        assert 'outbox_inbox_ready{consumer="shipping"} 1.0' in scrape(port)
        assert any(":%04X" % port in line and " 00000000:" in line
                   for line in Path("/proc/net/tcp").read_text().splitlines()), "not bound to 0.0.0.0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_build_stage_has_all_the_wheel_needs(tmp_path):
    """Only what the Dockerfile COPYs reaches the build stage: a wheel built from just that must hold
    every module, the SQL migrations and py.typed (a forgotten COPY would fail only in `docker build`)."""
    import shutil
    import zipfile

    context = tmp_path / "context"
    context.mkdir()
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                source = REPO / src
                if source.is_dir():
                    shutil.copytree(source, context / src, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(source, context / src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(context)], check=True, capture_output=True, timeout=300)
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist())
    expected = {str(p.relative_to(REPO)) for pkg in ("outbox", "relay", "inbox", "dashboard")
                for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    assert expected <= names, sorted(expected - names)
    assert {f"outbox/sql/{p.name}" for p in (REPO / "sql").glob("*.sql")} <= names
    assert {f"outbox/examples/{p.name}" for p in (REPO / "examples").glob("*.py")} <= names  # `outbox demo` runs them
    assert {"outbox/py.typed", "relay/py.typed", "inbox/py.typed", "dashboard/py.typed",
            "outbox/devstack/kafka-4.1.1.lock"} <= names
