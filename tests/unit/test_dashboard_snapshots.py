"""The dashboard's views hold the shared database connection only while they read: inside a
`with ctx.db.snapshot() as conn:` block every call is a query on `conn`, never a widget (a widget
waiting on a slow browser would make every other session wait). Read from the source."""

from __future__ import annotations

import ast

import pytest

from tests.support.paths import REPO

VIEWS = sorted((REPO / "dashboard" / "views").glob("*.py"))


def snapshot_blocks(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.With):
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "snapshot":
                    yield node


def is_query(call: ast.Call) -> bool:
    """A call that passes the connection (or is a method of it)."""
    func = call.func
    on_conn = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "conn"
    passes_conn = any(isinstance(a, ast.Name) and a.id == "conn" for a in call.args)
    return on_conn or passes_conn


def calls_inside_snapshots(source: str) -> list[str]:
    bad = []
    for block in snapshot_blocks(ast.parse(source)):
        for stmt in block.body:
            for node in ast.walk(stmt):
                if isinstance(node, ast.Call) and not is_query(node):
                    bad.append(ast.unparse(node)[:80])
    return bad


@pytest.mark.parametrize("view", VIEWS, ids=[v.stem for v in VIEWS])
def test_views_draw_no_widget_while_holding_the_shared_connection(view):
    assert calls_inside_snapshots(view.read_text()) == []


def test_the_rule_catches_a_widget_inside_a_snapshot():
    source = ("def render(ctx):\n    with ctx.db.snapshot() as conn:\n        names = q.consumers(conn)\n"
              "        who = st.selectbox('Consumer', names)\n")
    assert calls_inside_snapshots(source) == ["st.selectbox('Consumer', names)"]
    assert len(list(snapshot_blocks(ast.parse(source)))) == 1
