"""Reading the deployment files (Dockerfile, docker-compose.yml, deploy/kubernetes/) the way a
container engine and Kubernetes would, so that tests can hold them to the code."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

import yaml

from tests.support.paths import REPO

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
KUBERNETES = REPO / "deploy" / "kubernetes"


@dataclass
class Container:
    """One process the files start: where it comes from, its command and its OUTBOX_* environment."""

    where: str
    command: list[str]
    env: dict[str, str | None] = field(default_factory=dict)  # None: set from elsewhere (valueFrom)
    ports: list[int] = field(default_factory=list)  # container-side ports
    probes: dict[str, tuple[str, int | str]] = field(default_factory=dict)  # kind -> (path, port)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def exec_form(rest: str) -> list[str]:
    """CMD/ENTRYPOINT/HEALTHCHECK CMD arguments; only the exec (JSON) form is allowed here, because a
    shell form would make the shell PID 1 and SIGTERM would never reach the relay."""
    return json.loads(rest)


def dockerfile_cmd() -> list[str]:
    return exec_form([rest for word, rest in dockerfile_instructions() if word == "CMD"][-1])


def dockerfile_healthcheck() -> list[str]:
    rest = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"][-1]
    return exec_form(rest[rest.index("CMD ") + 4:])


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves the << merge keys


def compose_containers() -> dict[str, Container]:
    image_env = dockerfile_env()
    out = {}
    for name, svc in compose()["services"].items():
        if "build" not in svc:
            continue  # postgres, kafka: not ours
        env = {k: v for k, v in image_env.items() if k.startswith("OUTBOX_")}
        env.update({k: None if v is None else str(v) for k, v in (svc.get("environment") or {}).items()})
        ports = [int(str(p).rsplit(":", 1)[-1]) for p in svc.get("ports", [])]
        probes = {}
        check = svc.get("healthcheck", {"test": ["CMD", *dockerfile_healthcheck()]})
        if not check.get("disable"):
            probes["healthcheck"] = url_in(" ".join(check["test"][1:]))
        out[name] = Container(f"docker-compose.yml services.{name}", svc.get("command") or dockerfile_cmd(),
                              env, ports, probes)
    return out


def url_in(text: str) -> tuple[str, int]:
    """The path and port of the http://127.0.0.1... URL a health check command requests."""
    # Either a literal port or the Dockerfile's `os.environ.get('OUTBOX_METRICS_PORT', '9464')`.
    port_from_env = r"' \+ os\.environ\.get\('OUTBOX_METRICS_PORT', '(\d+)'\) \+ '"
    m = re.search(rf"http://127\.0\.0\.1:(?:(\d+)|{port_from_env})(/[\w/]+)", text)
    assert m, f"no http://127.0.0.1:PORT/PATH in {text!r}"
    return m.group(3), int(m.group(1) or m.group(2))


def kubernetes_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue  # kustomize's own file, not a Kubernetes object
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def kubernetes_containers() -> dict[str, Container]:
    out = {}
    for filename, doc in kubernetes_documents():
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            named_ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
            probes = {}
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                if kind in c:
                    get = c[kind]["httpGet"]
                    probes[kind] = (get["path"], named_ports.get(get["port"], get["port"]))
            where = f"{filename} {doc['kind']}/{doc['metadata']['name']} container {c['name']}"
            out[f"{doc['metadata']['name']}/{c['name']}"] = Container(
                where, c.get("command", []) + c.get("args", []), env,
                [p["containerPort"] for p in c.get("ports", [])], probes)
    return out
