"""`outbox demo` tells the seed's story: every fault it names happens, and no customer is charged
twice, no order shipped twice, every paid order shipped by the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import psycopg

from tests.support.paths import REPO, TEST_STACK_DIR


def parse(line: str) -> dict[str, int]:
    """The summary line's "name N" fields (outbox/demo/run.py, Summary.line)."""
    line = re.sub(r"^\[\w+\] ", "", line).replace("faults: ", "")
    return {name: int(n) for name, n in re.findall(r"([a-z][a-z ]*?) (\d+)(?:,|$| \|)", line)}


def test_demo_injects_every_fault_and_charges_and_ships_each_order_once(stack):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(OUTBOX_DEV_DIR=str(TEST_STACK_DIR), OUTBOX_METRICS_PORT="0")  # reuses the session's stack
    # 45 s at one fault every 3 s: the rotation (6 faults) goes round 2.5 times.
    result = subprocess.run([sys.executable, "-m", "outbox.cli", "demo", "--duration", "45", "--rate", "4",
                             "--fault-every", "3", "--no-dashboard"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = [line for line in result.stderr.splitlines() if line.startswith("[final] ")]
    assert final, result.stderr[-3000:]
    s = parse(final[-1])
    assert "Not settled" not in result.stderr, result.stderr[-3000:]

    # Each fault kind the seed names happened, visibly.
    for kind in ("worker killed after charging", "provider timeouts", "responses dropped", "redeliveries",
                 "duplicates suppressed", "unknown outcomes", "declined"):
        assert s[kind] > 0, (kind, final[-1])
    # ... and none of them multiplied an effect.
    assert s["double charges"] == 0 and s["shipped twice"] == 0, final[-1]
    assert s["orders"] >= 100, final[-1]
    assert s["captured"] + s["declined"] == s["orders"] and s["shipped"] == s["captured"], final[-1]
    assert s["resolved"] == s["unknown outcomes"] and s["dead letters"] == 0 and s["in flight"] == 0, final[-1]

    # The same, read from the services' own tables rather than from the demo's summary.
    with psycopg.connect(stack.database_url.secret()) as conn:
        shipments = Counter(order_id for (order_id,) in conn.execute("SELECT order_id FROM shipping.shipments"))
        assert shipments and max(shipments.values()) == 1
        captured = {order_id for (order_id,) in conn.execute(
            "SELECT order_id FROM payments.payments WHERE status = 'captured'")}
        assert captured == set(shipments)
        # Every charge key the ledger knows is settled; the killed worker's charges were reconciled.
        assert conn.execute("SELECT count(*) FROM outbox.effects WHERE key LIKE 'charge:order-%' "
                            "AND status NOT IN ('succeeded', 'failed')").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM outbox.effects WHERE resolved_via = 'reconcile' AND "
                            "evidence @> '[{\"what\": \"expired\"}]'").fetchone()[0] >= s["worker killed after charging"]
        assert conn.execute("SELECT count(*) FROM outbox.in_flight").fetchone()[0] == 0
