"""`outbox status` and `outbox dashboard` as an operator runs them: exit codes, output, and clear
errors without passwords."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from outbox.core.redact import Dsn


def outbox(args: list[str], cwd, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "outbox.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=60)


def test_status_is_all_clear_with_exit_code_0_on_a_quiet_database(db, kafka, tmp_path):
    result = outbox(["status"], tmp_path, OUTBOX_DATABASE_URL=db.secret(), OUTBOX_KAFKA_BOOTSTRAP=kafka)
    assert result.returncode == 0, result.stderr
    assert "in flight   0 events" in result.stdout and result.stdout.rstrip().endswith("all clear")


def test_status_lists_what_needs_attention_with_exit_code_3(dashboard_scenario, tmp_path):
    s = dashboard_scenario
    env = {"OUTBOX_DATABASE_URL": s.db.secret(), "OUTBOX_KAFKA_BOOTSTRAP": s.kafka}
    result = outbox(["status"], tmp_path, **env)
    print(result.stdout)  # the example in docs/dashboard.md
    assert result.returncode == 3, result.stderr
    out = result.stdout
    assert f"slot        {s.slot} (at-least-once): lag " in out and "wal_status reserved" in out
    assert "consumer    billing: lag 0 over 3 partitions" in out
    assert ("duplicates  suppressed in the last hour: billing 3 (0 redelivered, 3 republished), "
            "shipping 3 (0 redelivered, 3 republished)") in out
    assert "unknown     2 effects (+2 in progress), 2 relay batches" in out
    assert "dead        relay 1, inbox 2 open" in out
    assert "NEEDS ATTENTION:\n" in out and "! 2 effects with an unknown outcome need a decision" in out
    report = json.loads(outbox(["status", "--json"], tmp_path, **env).stdout)
    assert report["attention"] is True and report["unknown_effects"] == 2 and report["in_flight"]["count"] == 0
    assert {"level": "attention", "text": "2 effects with an unknown outcome need a decision",
            "view": "Unknown outcome"} in report["findings"]


def test_status_and_dashboard_say_when_the_database_is_unreachable_without_the_password(tmp_path):
    dsn = Dsn("postgresql://ops:hunter2-secret@127.0.0.1:1/app")
    for command in (["status"], ["dashboard"]):
        result = outbox(command, tmp_path, OUTBOX_DATABASE_URL=dsn.secret())
        assert result.returncode == 1, result
        assert f"outbox {command[0]}: cannot connect to PostgreSQL at postgresql://ops:***@127.0.0.1:1/app" in \
            result.stderr
        assert "hunter2-secret" not in result.stderr + result.stdout


def test_dashboard_refuses_a_port_in_use(db, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = outbox(["dashboard", "--port", str(port)], tmp_path, OUTBOX_DATABASE_URL=db.secret())
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is not available" in result.stderr and "OUTBOX_DASHBOARD_PORT" in result.stderr
