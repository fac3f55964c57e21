"""The CI variant of `make chaos`: at least 8 faults covering every kind, within 10 minutes, on a
three-broker Kafka cluster and a PostgreSQL primary with a standby (bench/chaos.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_chaos_run_with_every_kind_of_fault_keeps_every_invariant():
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    proc = subprocess.run([sys.executable, "-m", "bench.chaos", "--faults", "8", "--rate", "25"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "LOST (in the outbox, not in Kafka)" in proc.stdout
