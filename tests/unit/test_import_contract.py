"""The layout's import contract, read from the source (no servers).

    outbox.core            imports no component and none of the tooling
    relay, inbox, dashboard stand on outbox.core only; none imports another component, the CLI,
                           the dev stack or the demo (an application embedding the inbox never
                           loads the relay)
    outbox.devstack        stands on outbox.core only
    outbox.examples        (examples/ in the repository) the reference services: stand on the
                           inbox and outbox.core, like an application; no component imports them
    outbox.cli             the one module that wires every component's subcommands together
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.support.paths import REPO

PACKAGES = ("outbox", "relay", "inbox", "dashboard")
COMPONENTS = {"relay", "inbox", "dashboard"}
TOOLING = {"outbox.cli", "outbox.devstack", "outbox.demo", "outbox.examples", "outbox.__main__"}


def module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "examples":  # shipped as outbox.examples (pyproject.toml, package-dir)
        parts.insert(0, "outbox")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path) -> set[str]:
    """Every module a file imports, at top level or inside functions (a lazy import is still a
    dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


GRAPH = {module_name(p): imports_of(p) for pkg in (*PACKAGES, "examples") for p in (REPO / pkg).rglob("*.py")}


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(importers, forbidden) -> list[str]:
    return sorted(f"{mod} imports {dep}" for mod, deps in GRAPH.items() if within(mod, importers)
                  for dep in deps if within(dep, forbidden))


def test_the_graph_covers_every_package():
    assert {m.split(".")[0] for m in GRAPH} == set(PACKAGES)
    assert "outbox.core.settings" in GRAPH and "relay.pipeline" in GRAPH


def test_core_imports_no_component_and_no_tooling():
    assert violations({"outbox.core"}, COMPONENTS | TOOLING) == []


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_a_component_imports_no_other_component_and_no_tooling(component):
    assert violations({component}, (COMPONENTS - {component}) | TOOLING) == []


def test_the_dev_stack_stands_on_the_core_only():
    assert violations({"outbox.devstack"}, COMPONENTS | {"outbox.cli", "outbox.demo", "outbox.examples"}) == []


def test_the_examples_stand_where_an_application_does():
    """What users copy must not reach into the relay, the dashboard or the tooling; the fake
    provider's client is the one stand-in they replace (by their provider's SDK)."""
    assert violations({"outbox.examples"}, {"relay", "dashboard", "outbox.cli", "outbox.devstack"}) == []
    demo = {dep for mod, deps in GRAPH.items() if within(mod, {"outbox.examples"}) for dep in deps
            if within(dep, {"outbox.demo"})}
    assert demo <= {"outbox.demo.fake_provider", "outbox.demo.fake_provider.ProviderClient"}


def test_only_the_cli_imports_the_components_subcommands():
    clis = {"relay.cli", "inbox.cli", "dashboard.cli", "outbox.devstack.cli", "outbox.demo.cli"}
    importers = {mod for mod, deps in GRAPH.items() for dep in deps if within(dep, clis) and mod not in clis}
    assert importers == {"outbox.cli"}


def test_an_application_embedding_the_inbox_loads_no_relay_dashboard_or_tooling_module():
    code = ("import sys, inbox, inbox.effects, inbox.handlers\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('relay', 'dashboard') "
            "or m.startswith(('outbox.cli', 'outbox.devstack', 'outbox.demo')))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == []
