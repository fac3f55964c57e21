"""`outbox demo` runs the whole pipeline, weather included, and charges no order twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psycopg

from tests.support.paths import REPO, TEST_STACK_DIR


def test_demo_runs_end_to_end_and_never_charges_twice(stack):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(OUTBOX_DEV_DIR=str(TEST_STACK_DIR), OUTBOX_METRICS_PORT="0")  # reuses the session's stack
    result = subprocess.run([sys.executable, "-m", "outbox.cli", "demo", "--duration", "30", "--rate", "5",
                             "--no-dashboard"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    last = [line for line in result.stderr.splitlines() if line.startswith("orders ")][-1]
    orders, paid = map(int, re.match(r"orders (\d+): paid (\d+)", last).groups())
    assert orders >= 50 and paid >= orders * 0.7, last
    assert last.endswith("orders charged twice 0")
    with psycopg.connect(stack.database_url.secret()) as conn:
        assert conn.execute("SELECT count(*) FROM (SELECT order_id FROM demo.payments GROUP BY 1 "
                            "HAVING count(*) > 1) d").fetchone()[0] == 0
        receipts = conn.execute("SELECT count(*), count(DISTINCT order_id) FROM demo.receipts").fetchone()
        assert receipts[0] == receipts[1]  # duplicates were delivered, and suppressed
        assert conn.execute("SELECT count(*) FROM outbox.in_flight").fetchone()[0] == 0
